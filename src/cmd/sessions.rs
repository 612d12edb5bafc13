//! `kiln sessions …`: list, show, export, remove and rename saved sessions.

use crate::cli::{Common, ExportFormat, SessionsAction};
use crate::error::{KilnError, Result};
use crate::host::launch::paths_and_config;
use crate::store::transcript::EntryKind;
use crate::store::{display_time, id_of, Loaded, SessionStore};
use crate::visible::{for_output, visible, visible_line};

pub fn run(action: SessionsAction, common: &Common) -> Result<i32> {
    let (paths, _) = paths_and_config(common)?;
    let store = SessionStore::new(&paths);
    match action {
        SessionsAction::List { json } => list(&store, json),
        SessionsAction::Show { id } => {
            let loaded = load(&store, &id)?;
            let md = loaded
                .transcript
                .to_markdown(&loaded.meta.title, &loaded.meta.model);
            print!("{}", for_output(&md, raw()));
            Ok(0)
        }
        SessionsAction::Export { id, format } => {
            let loaded = load(&store, &id)?;
            match format {
                ExportFormat::Md => {
                    let md = loaded
                        .transcript
                        .to_markdown(&loaded.meta.title, &loaded.meta.model);
                    print!("{}", for_output(&md, raw()));
                }
                ExportFormat::Json => {
                    let doc = serde_json::json!({
                        "meta": loaded.meta,
                        "system_prompt": loaded.transcript.system_prompt,
                        "entries": loaded.transcript.entries,
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&doc).expect("serializes")
                    );
                }
            }
            Ok(0)
        }
        SessionsAction::Rm { id, yes } => {
            let dir = store.resolve(Some(&id))?;
            if !yes && !confirm_removal(&store, &dir)? {
                eprintln!("kiln: kept {}", id_of(&dir));
                return Ok(1);
            }
            store.remove(&dir)?;
            eprintln!("kiln: removed session {}", id_of(&dir));
            Ok(0)
        }
        SessionsAction::Rename { id, title } => {
            if title.trim().is_empty() {
                return Err(KilnError::BadArgument("the title is empty".into()));
            }
            let dir = store.resolve(Some(&id))?;
            store.rename(&dir, title.trim())?;
            Ok(0)
        }
    }
}

/// Whether stdout keeps the bytes as they are (a file or a pipe): a
/// terminal gets what would act on it made visible.
fn raw() -> bool {
    use std::io::IsTerminal;
    !std::io::stdout().is_terminal()
}

/// Ask on the terminal before deleting; with no terminal to ask, refuse
/// unless `--yes` was given.
fn confirm_removal(store: &SessionStore, dir: &std::path::Path) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    let id = id_of(dir);
    if !std::io::stdin().is_terminal() {
        return Err(KilnError::BadArgument(format!(
            "removing session {id} needs a yes: run it on a terminal, or add --yes"
        )));
    }
    let title = store
        .load(dir)
        .map(|l| visible(&l.meta.title).into_owned())
        .unwrap_or_else(|_| "damaged".into());
    eprint!("kiln: remove session {id} ({title}) and everything in it? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| KilnError::io("stdin", e))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// A session with its warnings (skipped journal lines) on stderr.
fn load(store: &SessionStore, id: &str) -> Result<Loaded> {
    let dir = store.resolve(Some(id))?;
    let loaded = store.load(&dir)?;
    for w in &loaded.warnings {
        eprintln!("kiln: warning: {w}");
    }
    Ok(loaded)
}

fn list(store: &SessionStore, json: bool) -> Result<i32> {
    let listings = store.list();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&listings).expect("serializes")
        );
        return Ok(0);
    }
    if listings.is_empty() {
        eprintln!("kiln: no sessions yet ({})", store.root.display());
        return Ok(0);
    }
    println!("{:<22} {:<22} {:>5}  TITLE", "ID", "UPDATED", "MSGS");
    for l in listings {
        let Some(meta) = &l.meta else {
            println!(
                "{:<22} DAMAGED: {}",
                l.id,
                visible_line(l.problem.as_deref().unwrap_or("unreadable"))
            );
            continue;
        };
        let messages = store
            .load(&l.dir)
            .map(|s| {
                s.transcript
                    .entries
                    .iter()
                    .filter(|e| matches!(e.kind, EntryKind::User | EntryKind::Assistant))
                    .count()
            })
            .unwrap_or(0);
        let open = if l.open_elsewhere { "  [open]" } else { "" };
        println!(
            "{:<22} {:<22} {:>5}  {}{open}",
            l.id,
            display_time(meta.updated_ms),
            messages,
            visible_line(&meta.title)
        );
    }
    Ok(0)
}
