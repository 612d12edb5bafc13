//! A session on disk: a folder with `meta.json` (replaced atomically) and
//! `events.jsonl` (append-only, fsynced at every committed event), held by a
//! lock so two processes never write one session.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::{open_append, sync_dir, write_atomic};
use crate::chat::AlarmKind;
use crate::chat::{FinishReason, GenStats};
use crate::error::{KilnError, Result};

/// Written into every file; a reader skips what is newer than it knows.
pub const SCHEMA_VERSION: u32 = 1;
pub const META: &str = "meta.json";
pub const EVENTS: &str = "events.jsonl";
const LOCK: &str = "lock";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub version: u32,
    pub id: String,
    pub title: String,
    /// Set by `kiln sessions rename`; otherwise the title follows the first
    /// message.
    #[serde(default)]
    pub renamed: bool,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Preset name or file name of the model the session ran on.
    pub model: String,
    /// Identifies the model file's contents (see `fingerprint`).
    #[serde(default)]
    pub model_fingerprint: Option<String>,
    pub context_limit: usize,
    /// Set when the session is an agent run's journal: who hosts it, and
    /// whether it ended (a run that did not end was interrupted and can be
    /// resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunMark>,
}

/// Who hosts an agent run: `kiln agent` in a terminal, the daemon
/// (`--detach`, resumed by the daemon on start where asked), or the
/// workstation's `/agent`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunHost {
    Headless,
    Daemon,
    Workstation,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunMark {
    pub host: RunHost,
    /// How it ended, in a word (`finished`, `stopped`…); `None` while it
    /// runs, or when its process died.
    #[serde(default)]
    pub ended: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    User {
        text: String,
    },
    /// Part of the answer being streamed, journaled in small batches.
    Chunk {
        text: String,
    },
    /// The answer is complete (or was stopped): this commits it.
    Answer {
        text: String,
        finish: FinishReason,
        stats: GenStats,
    },
    /// The answer failed.
    Error {
        text: String,
    },
    Notice {
        text: String,
    },
    Alarm {
        kind: AlarmKind,
        raised: bool,
        message: String,
    },
    SystemPrompt {
        text: Option<String>,
    },
    /// The last answer was discarded, to be generated again.
    Regenerate,
    /// The last answer, cut off, is being continued: the chunks and the
    /// answer that follow extend it.
    Continue,
    /// An agent's tool call, journaled before it runs.
    ToolCall {
        step: u32,
        call: serde_json::Value,
    },
    /// What the call did (or why it did not run), and what a write
    /// changed, as a unified diff.
    ToolResult {
        step: u32,
        ok: bool,
        refused: bool,
        output: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
        /// The call was running (or waiting for its yes) when its process
        /// died: written when the run resumes, never re-run.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        interrupted: bool,
    },
    /// An agent run starts, or goes on from its journal (`resumed`): what
    /// makes it (the agent's `RunSpec`), and who hosts it.
    RunStarted {
        spec: serde_json::Value,
        host: RunHost,
        #[serde(default)]
        resumed: bool,
    },
    /// The run ended with this outcome (the agent's `Outcome`).
    RunEnded {
        outcome: serde_json::Value,
    },
    /// A call that needed a yes got one; `always`: and its repeats too.
    Approved {
        step: u32,
        always: bool,
    },
    /// The run's older steps became this summary: the conversation starts
    /// again from here.
    Compacted {
        summary: String,
        context_tokens: usize,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    v: u32,
    at_ms: u64,
    #[serde(flatten)]
    event: Event,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One journal line for `event`, ending in a newline.
pub fn encode(event: &Event) -> String {
    let record = Record {
        v: SCHEMA_VERSION,
        at_ms: now_ms(),
        event: event.clone(),
    };
    let mut line = serde_json::to_string(&record).expect("events serialize");
    line.push('\n');
    line
}

/// The events of a journal, with one warning per line that was skipped.
pub struct Journal {
    pub events: Vec<(u64, Event)>,
    pub warnings: Vec<String>,
}

pub fn read_events(path: &Path) -> Result<Journal> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(KilnError::io(path.display(), e)),
    };
    let mut journal = Journal {
        events: Vec::new(),
        warnings: Vec::new(),
    };
    let ends_cleanly = text.is_empty() || text.ends_with('\n');
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.v <= SCHEMA_VERSION => journal.events.push((r.at_ms, r.event)),
            Ok(r) => journal.warnings.push(format!(
                "{} line {}: written by a newer kiln (schema {}); skipped",
                path.display(),
                i + 1,
                r.v
            )),
            Err(_) if i + 1 == lines.len() && !ends_cleanly => journal.warnings.push(format!(
                "{} line {}: the last line was cut off (kiln stopped while writing it); ignored",
                path.display(),
                i + 1
            )),
            Err(e) => journal.warnings.push(format!(
                "{} line {}: not a valid event ({e}); skipped",
                path.display(),
                i + 1
            )),
        }
    }
    Ok(journal)
}

pub fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(|e| KilnError::io(path.display(), e))?;
    let meta: Meta = serde_json::from_slice(&bytes)
        .map_err(|e| KilnError::Store(format!("{}: damaged: {e}", path.display())))?;
    if meta.version > SCHEMA_VERSION {
        return Err(KilnError::Store(format!(
            "{}: written by a newer kiln (schema {})",
            path.display(),
            meta.version
        )));
    }
    Ok(meta)
}

/// A session this process holds: its lock, and its journal open for append.
pub struct OpenSession {
    pub dir: PathBuf,
    pub meta: Meta,
    journal: Option<File>,
    _lock: File,
}

impl OpenSession {
    /// Create the folder of a new session.
    /// A session is made whole or not at all: when the disk cannot take
    /// its folder, lock, meta and journal, nothing is left behind (no
    /// damaged session).
    pub fn create(dir: PathBuf, meta: Meta) -> Result<OpenSession> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| KilnError::io(parent.display(), e))?;
        }
        // A new id's folder: one that exists already is not taken over.
        std::fs::create_dir(&dir).map_err(|e| KilnError::io(dir.display(), e))?;
        let made = (|| {
            let lock = lock(&dir)?;
            let mut session = OpenSession {
                dir: dir.clone(),
                meta,
                journal: None,
                _lock: lock,
            };
            session.save_meta()?;
            session.reopen_journal()?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent).map_err(|e| KilnError::io(parent.display(), e))?;
            }
            Ok(session)
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// Open an existing session for writing; fails when another process
    /// holds it.
    pub fn open(dir: PathBuf) -> Result<OpenSession> {
        let lock = lock(&dir)?;
        let meta = read_meta(&dir)?;
        let mut session = OpenSession {
            dir,
            meta,
            journal: None,
            _lock: lock,
        };
        session.reopen_journal()?;
        Ok(session)
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.join(EVENTS)
    }

    pub fn reopen_journal(&mut self) -> Result<()> {
        let path = self.events_path();
        self.journal = Some(open_append(&path).map_err(|e| KilnError::io(path.display(), e))?);
        Ok(())
    }

    /// Append whole lines and fsync them. On failure the journal is reopened
    /// on the next call, so writing resumes once the disk has room again.
    pub fn append_lines(&mut self, lines: &str) -> std::io::Result<()> {
        if self.journal.is_none() {
            self.journal = Some(open_append(&self.events_path())?);
        }
        let file = self.journal.as_mut().expect("journal open");
        let before = file.metadata()?.len();
        let result = file
            .write_all(lines.as_bytes())
            .and_then(|_| file.sync_data());
        if result.is_err() {
            // A full disk can take part of the lines: cut them off again, so
            // the journal never holds half an event (shrinking needs no
            // space), and the whole lines are written on the next try.
            let _ = file.set_len(before).and_then(|_| file.sync_data());
            self.journal = None;
        }
        result
    }

    pub fn save_meta(&mut self) -> Result<()> {
        let path = self.dir.join(META);
        let bytes = serde_json::to_vec_pretty(&self.meta).expect("meta serializes");
        write_atomic(&path, &bytes).map_err(|e| KilnError::io(path.display(), e))
    }
}

/// How long `lock` waits for a lock that was just let go.
const LOCK_TRIES: u32 = 20;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Take the session's lock, or say who holds it. The lock is an advisory
/// file lock, so a killed process releases it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let mut file =
        super::atomic::open_private(&path, false).map_err(|e| KilnError::io(path.display(), e))?;
    // A lock just let go can stay held a moment longer: a child this
    // process forks (a shell call, an MCP server) shares the lock's open
    // file until it execs. A lock still held after that is really held.
    let mut tries = 0;
    let taken = loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if tries < LOCK_TRIES => {
                tries += 1;
                std::thread::sleep(LOCK_RETRY);
            }
            taken => break taken,
        }
    };
    match taken {
        Ok(()) => {
            let _ = file.set_len(0);
            let _ = write!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(KilnError::Store(format!(
                "{}: the session is open in another kiln process{}",
                dir.display(),
                match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                }
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(KilnError::io(path.display(), e)),
    }
}

/// Whether some process holds the session's lock now.
pub fn is_locked(dir: &Path) -> bool {
    match File::open(dir.join(LOCK)) {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// A session's meta with placeholder values, for the store's tests.
#[cfg(test)]
pub(crate) fn meta(id: &str) -> Meta {
    Meta {
        version: SCHEMA_VERSION,
        id: id.into(),
        title: "t".into(),
        renamed: false,
        created_ms: 1,
        updated_ms: 1,
        model: "m".into(),
        model_fingerprint: None,
        context_limit: 2048,
        run: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s1");
        let _first = OpenSession::create(path.clone(), meta("s1")).unwrap();
        assert!(is_locked(&path));
        let err = OpenSession::open(path.clone()).err().unwrap().to_string();
        assert!(err.contains("open in another kiln process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(_first);
        assert!(!is_locked(&path));
        OpenSession::open(path).unwrap();
    }

    #[test]
    fn torn_and_garbled_lines_are_skipped_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(EVENTS);
        let good = encode(&Event::User { text: "hi".into() });
        let newer = good.replace("\"v\":1", "\"v\":99");
        std::fs::write(&p, format!("{good}not json\n{newer}{good}{{\"v\":1,\"at")).unwrap();
        let j = read_events(&p).unwrap();
        assert_eq!(j.events.len(), 2);
        assert_eq!(j.warnings.len(), 3, "{:?}", j.warnings);
        assert!(j.warnings[0].contains("line 2: not a valid event"));
        assert!(j.warnings[1].contains("line 3: written by a newer kiln"));
        assert!(j.warnings[2].contains("line 5: the last line was cut off"));
        // Reading never rewrites the file.
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .ends_with("{\"v\":1,\"at"));
    }
}
