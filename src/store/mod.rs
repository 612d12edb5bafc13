//! kiln's data on disk: sessions (this module), durable writes (`atomic`),
//! the journal writer task (`journal`), KV snapshots (`snapshot`) and the
//! prompt cache (`prompt_cache`).

pub mod atomic;
pub mod journal;
pub mod kv_budget;
pub mod prompt_cache;
pub mod session;
pub mod snapshot;
pub mod transcript;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{KilnError, Result};
use crate::paths::Paths;
use crate::store::transcript::Transcript;
use session::{read_events, read_meta, Meta, OpenSession, SCHEMA_VERSION};

/// A session's KV snapshot, written on close for a fast resume.
pub const SNAPSHOT: &str = "kv.snapshot";

/// The folder of every session of one user.
#[derive(Clone, Debug)]
pub struct SessionStore {
    pub root: PathBuf,
}

/// A session as `kiln sessions list` shows it.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub id: String,
    pub dir: PathBuf,
    /// `None` when `meta.json` is damaged; `problem` says how.
    pub meta: Option<Meta>,
    pub problem: Option<String>,
    pub open_elsewhere: bool,
}

/// A session read back: its meta, the rebuilt transcript, and warnings about
/// lines that were skipped.
pub struct Loaded {
    pub meta: Meta,
    pub transcript: Transcript,
    pub warnings: Vec<String>,
}

impl SessionStore {
    pub fn new(paths: &Paths) -> SessionStore {
        SessionStore {
            root: paths.data.join("sessions"),
        }
    }

    /// Sessions, newest first; damaged ones are listed with their problem.
    /// Only real folders with an id's name count: a link in the sessions
    /// folder is never followed out of it.
    pub fn list(&self) -> Vec<Listing> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<Listing> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let id = e.file_name().to_str().filter(|n| is_id(n))?.to_string();
                let dir = e.path();
                let (meta, problem) = match read_meta(&dir) {
                    Ok(m) => (Some(m), None),
                    Err(err) => (None, Some(err.to_string())),
                };
                Some(Listing {
                    open_elsewhere: session::is_locked(&dir),
                    id,
                    dir,
                    meta,
                    problem,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |l: &Listing| l.meta.as_ref().map_or(0, |m| m.updated_ms);
            key(b).cmp(&key(a)).then_with(|| b.id.cmp(&a.id))
        });
        out
    }

    /// Sessions holding an agent run that never ended and that no process
    /// holds: its process died (or its daemon stopped) mid-run, and
    /// `kiln agent --resume` can go on with it. Newest first.
    pub fn interrupted_runs(&self) -> Vec<(Listing, session::RunHost)> {
        self.list()
            .into_iter()
            .filter(|l| !l.open_elsewhere)
            .filter_map(|l| {
                let run = l.meta.as_ref()?.run.as_ref()?;
                let host = run.host;
                run.ended.is_none().then_some((l, host))
            })
            .collect()
    }

    /// The folder of a session named by its id or a unique start of it, or
    /// the most recent one (`None`). Only ids are taken, and only sessions
    /// inside this store are found: a path, an empty id or anything else
    /// that is not an id is refused.
    pub fn resolve(&self, query: Option<&str>) -> Result<PathBuf> {
        let Some(query) = query else {
            return self
                .list()
                .into_iter()
                .find(|l| l.meta.is_some())
                .map(|l| l.dir)
                .ok_or_else(|| KilnError::BadArgument("there are no sessions yet".into()));
        };
        if !is_id(query) {
            return Err(KilnError::BadArgument(format!(
                "'{}' is not a session id (ids look like 20261124-063015-3fa2; see `kiln sessions list`)",
                query.escape_debug()
            )));
        }
        let matches: Vec<PathBuf> = self
            .list()
            .into_iter()
            .filter(|l| l.id.starts_with(query))
            .map(|l| l.dir)
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(KilnError::BadArgument(format!(
                "no session '{query}' (see `kiln sessions list`)"
            ))),
            many => Err(KilnError::BadArgument(format!(
                "'{query}' matches {} sessions; give more of the id",
                many.len()
            ))),
        }
    }

    /// What `kiln resume` was given: a session id, or a session folder
    /// outside the store (an example in a repository), which is copied in
    /// so that kiln never writes into it. Returns the id to open.
    pub fn resolve_or_import(&self, query: &str) -> Result<String> {
        let as_dir = Path::new(query);
        let is_folder = std::fs::symlink_metadata(as_dir).is_ok_and(|m| m.is_dir())
            && (as_dir.join(session::META).is_file() || as_dir.join(session::EVENTS).is_file());
        match self.resolve(Some(query)) {
            Ok(dir) => Ok(id_of(&dir)),
            Err(_) if is_folder => self.import(as_dir),
            Err(e) => Err(e),
        }
    }

    /// Copy a session folder from outside the store into it; its new id.
    fn import(&self, dir: &Path) -> Result<String> {
        const MAX_IMPORT: u64 = 1 << 30;
        let loaded = self.load(dir)?;
        let events_path = dir.join(session::EVENTS);
        let size = std::fs::metadata(&events_path).map_or(0, |m| m.len());
        if size > MAX_IMPORT {
            return Err(KilnError::BadArgument(format!(
                "{}: {size} bytes, more than the {MAX_IMPORT} a session may have",
                events_path.display()
            )));
        }
        let mut copy = self.create(
            &loaded.meta.model,
            loaded.meta.model_fingerprint.clone(),
            loaded.meta.context_limit,
        )?;
        copy.meta.title = loaded.meta.title.clone();
        copy.meta.renamed = loaded.meta.renamed;
        copy.save_meta()?;
        let events = std::fs::read(&events_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&events);
        copy.append_lines(&text)
            .map_err(|e| KilnError::io(copy.events_path().display(), e))?;
        Ok(copy.meta.id.clone())
    }

    pub fn load(&self, dir: &Path) -> Result<Loaded> {
        let meta = read_meta(dir)?;
        let journal = read_events(&dir.join(session::EVENTS))?;
        let transcript = Transcript::replay(journal.events.iter().map(|(_, e)| e));
        Ok(Loaded {
            meta,
            transcript,
            warnings: journal.warnings,
        })
    }

    /// A new session folder with a fresh id.
    pub fn create(
        &self,
        model: &str,
        fingerprint: Option<String>,
        context_limit: usize,
    ) -> Result<OpenSession> {
        let now = session::now_ms();
        let id = new_id();
        let meta = Meta {
            version: SCHEMA_VERSION,
            id: id.clone(),
            title: "new session".into(),
            renamed: false,
            created_ms: now,
            updated_ms: now,
            model: model.to_string(),
            model_fingerprint: fingerprint,
            context_limit,
            run: None,
        };
        OpenSession::create(self.root.join(id), meta)
    }

    /// A new session with its journal writer running; the system prompt
    /// in force, if any, is its first event.
    pub fn start(
        &self,
        model: &str,
        fingerprint: Option<String>,
        context_limit: usize,
        system_prompt: Option<&str>,
    ) -> Result<(
        journal::JournalHandle,
        tokio::sync::mpsc::UnboundedReceiver<journal::Report>,
    )> {
        let open = self.create(model, fingerprint, context_limit)?;
        let (journal, reports) = journal::spawn(open);
        if let Some(text) = system_prompt {
            journal.event(session::Event::SystemPrompt {
                text: Some(text.to_string()),
            });
        }
        tracing::info!("session {}", journal.id);
        Ok((journal, reports))
    }

    /// A new session that starts with `question`, on disk before anyone
    /// answers it. When the question cannot be kept (a full disk), no
    /// half-made session is left behind; the error says why.
    pub fn start_with_question(
        &self,
        model: &str,
        fingerprint: Option<String>,
        context_limit: usize,
        system_prompt: Option<&str>,
        question: &str,
    ) -> std::result::Result<journal::JournalHandle, String> {
        let (journal, _reports) = self
            .start(model, fingerprint, context_limit, system_prompt)
            .map_err(|e| e.to_string())?;
        if let Err(why) = journal.commit(session::Event::User {
            text: question.to_string(),
        }) {
            journal.close();
            let _ = std::fs::remove_dir_all(&journal.dir);
            return Err(why);
        }
        Ok(journal)
    }

    /// Open a session of this store to continue it.
    pub fn open_for_resume(&self, dir: &Path) -> Result<OpenSession> {
        OpenSession::open(dir.to_path_buf())
    }

    pub fn remove(&self, dir: &Path) -> Result<()> {
        if session::is_locked(dir) {
            return Err(KilnError::Store(format!(
                "{}: the session is open in another kiln process",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir).map_err(|e| KilnError::io(dir.display(), e))
    }

    pub fn rename(&self, dir: &Path, title: &str) -> Result<()> {
        let mut s = OpenSession::open(dir.to_path_buf())?;
        s.meta.title = title.to_string();
        s.meta.renamed = true;
        s.meta.updated_ms = session::now_ms();
        s.save_meta()
    }
}

/// Whether `s` can be a session id: what `new_id` makes, and no more than
/// letters, digits, `-` and `_` (so never a path, `..` or an empty name).
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The id of a session folder of the store.
pub fn id_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Sortable by time, unique enough for one user: `20261124-063015-3fa2`.
fn new_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(time::macros::format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_else(|_| "session".into());
    format!("{stamp}-{:04x}", rand::random::<u16>())
}

/// A time for people: `2026-11-24 06:30 UTC`.
pub fn display_time(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| "?".into())
}
