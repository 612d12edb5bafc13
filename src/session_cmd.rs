//! `kiln sessions …`: list, show, export, remove and rename saved sessions.

use crate::cli::{Common, ExportFormat, SessionsAction};
use crate::error::{KilnError, Result};
use crate::launch::paths_and_config;
use crate::store::{display_time, Loaded, SessionStore};
use crate::transcript::EntryKind;

pub fn run(action: SessionsAction, common: &Common) -> Result<i32> {
    let (paths, _) = paths_and_config(common)?;
    let store = SessionStore::new(&paths);
    match action {
        SessionsAction::List { json } => list(&store, json),
        SessionsAction::Show { id } => {
            let loaded = load(&store, &id)?;
            print!(
                "{}",
                loaded
                    .transcript
                    .to_markdown(&loaded.meta.title, &loaded.meta.model)
            );
            Ok(0)
        }
        SessionsAction::Export { id, format } => {
            let loaded = load(&store, &id)?;
            match format {
                ExportFormat::Md => print!(
                    "{}",
                    loaded
                        .transcript
                        .to_markdown(&loaded.meta.title, &loaded.meta.model)
                ),
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
        SessionsAction::Rm { id } => {
            let dir = store.resolve(Some(&id))?;
            store.remove(&dir)?;
            eprintln!("kiln: removed {}", dir.display());
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
                l.problem.as_deref().unwrap_or("unreadable")
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
            meta.title
        );
    }
    Ok(0)
}
