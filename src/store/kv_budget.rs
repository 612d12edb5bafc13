//! One disk budget for every KV state kiln keeps: the sessions' snapshots
//! (`kv.snapshot`, written on close for a fast resume) and the prompt
//! cache's entries. On a 32B model a snapshot holds 256 KiB a token, so a
//! 20k-token session leaves 5 GB: without a budget, weeks of sessions fill
//! the disk. Past the budget the least recently used go first; the
//! snapshot of a session some process has open is never deleted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::session::is_locked;
use super::SNAPSHOT;

/// The budget when the config names none.
pub const DEFAULT_BYTES: u64 = 16 << 30;

/// A snapshot is written only when loading it beats re-reading its tokens
/// by this much (by default; `snapshot_min_saved_s`): below it the snapshot
/// costs disk and SSD wear for a saving no one feels.
pub const MIN_SAVED: Duration = Duration::from_secs(1);
/// The read speed assumed for a snapshot: kiln's own read, checksum and
/// all, measured 1.5 GB/s on this Linux box (`kiln bench --cache`); Apple
/// SSDs read faster, so this errs towards writing fewer.
const READ_BYTES_PER_S: f64 = 1.0e9;
/// Without a measured prefill speed, the tokens a snapshot must hold for
/// each second it must save.
const UNMEASURED_MIN_TOKENS: usize = 2048;

/// Whether a snapshot of `kv_tokens` tokens in `bytes` saves at least
/// `min_saved` of prefill over re-reading the transcript at
/// `prefill_tok_s` (the session's measured prefill speed, when there is
/// one). A zero `min_saved` writes every snapshot.
pub fn worth_writing(
    kv_tokens: usize,
    bytes: u64,
    prefill_tok_s: Option<f64>,
    min_saved: Duration,
) -> bool {
    if min_saved.is_zero() {
        return true;
    }
    match prefill_tok_s.filter(|r| r.is_finite() && *r > 0.0) {
        Some(rate) => {
            let reread = kv_tokens as f64 / rate;
            let load = bytes as f64 / READ_BYTES_PER_S;
            reread - load >= min_saved.as_secs_f64()
        }
        None => kv_tokens as f64 >= UNMEASURED_MIN_TOKENS as f64 * min_saved.as_secs_f64(),
    }
}

#[derive(Clone, Debug)]
pub struct KvBudget {
    /// The sessions folder (a `kv.snapshot` in each session's folder).
    pub sessions: PathBuf,
    /// The prompt cache's folder.
    pub cache: PathBuf,
    pub bytes: u64,
}

/// Whose KV state a file is.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    Session(String),
    PromptCache,
}

#[derive(Clone, Debug, Serialize)]
pub struct KvFile {
    pub path: PathBuf,
    pub owner: Owner,
    pub bytes: u64,
    /// When it was last written or loaded.
    #[serde(skip)]
    pub used: SystemTime,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub budget_bytes: u64,
    pub session_snapshots: usize,
    pub session_bytes: u64,
    pub cache_entries: usize,
    pub cache_bytes: u64,
}

impl KvBudget {
    /// Every KV file under the budget. Only plain files count: a link
    /// planted in the sessions folder is never followed, or deleted through.
    pub fn files(&self) -> Vec<KvFile> {
        let plain = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .filter(|m| m.file_type().is_file())
        };
        let mut out = Vec::new();
        for dir in read_dir(&self.sessions) {
            let Some(id) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !super::is_id(id) || !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let path = dir.join(SNAPSHOT);
            if let Some(meta) = plain(&path) {
                out.push(KvFile {
                    owner: Owner::Session(id.to_string()),
                    bytes: meta.len(),
                    used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    path,
                });
            }
        }
        for path in read_dir(&self.cache) {
            if path
                .extension()
                .is_some_and(|e| e == super::prompt_cache::EXT)
            {
                if let Some(meta) = plain(&path) {
                    out.push(KvFile {
                        owner: Owner::PromptCache,
                        bytes: meta.len(),
                        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        path,
                    });
                }
            }
        }
        out
    }

    pub fn usage(&self) -> Usage {
        let files = self.files();
        let sum = |session: bool| {
            let of: Vec<&KvFile> = files
                .iter()
                .filter(|f| matches!(f.owner, Owner::Session(_)) == session)
                .collect();
            (of.len(), of.iter().map(|f| f.bytes).sum::<u64>())
        };
        let (session_snapshots, session_bytes) = sum(true);
        let (cache_entries, cache_bytes) = sum(false);
        Usage {
            budget_bytes: self.bytes,
            session_snapshots,
            session_bytes,
            cache_entries,
            cache_bytes,
        }
    }

    /// Delete the least recently used KV files until the rest fit the
    /// budget; `keep` (the file just written) and the snapshots of open
    /// sessions stay. What was deleted.
    pub fn enforce(&self, keep: Option<&Path>) -> Vec<KvFile> {
        let mut files = self.files();
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        files.sort_by_key(|f| f.used);
        let mut evicted = Vec::new();
        for f in files {
            if total <= self.bytes {
                break;
            }
            if Some(f.path.as_path()) == keep {
                continue;
            }
            if let Owner::Session(_) = f.owner {
                if f.path.parent().is_some_and(is_locked) {
                    continue;
                }
            }
            if std::fs::remove_file(&f.path).is_ok() {
                tracing::info!(
                    "KV disk budget: removed {} ({} bytes, {:?})",
                    f.path.display(),
                    f.bytes,
                    f.owner
                );
                total -= f.bytes;
                evicted.push(f);
            }
        }
        evicted
    }
}

fn read_dir(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::session::OpenSession;

    fn budget(root: &Path, bytes: u64) -> KvBudget {
        KvBudget {
            sessions: root.join("sessions"),
            cache: root.join("cache"),
            bytes,
        }
    }

    fn session(root: &Path, id: &str) -> PathBuf {
        let dir = root.join("sessions").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn file(path: &Path, bytes: usize, age_s: u64) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn the_oldest_go_first_and_open_sessions_and_the_new_file_stay() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let b = budget(root, 2500);
        let old = session(root, "s-old").join(SNAPSHOT);
        file(&old, 1000, 500);
        let open_dir = session(root, "s-open");
        file(&open_dir.join(SNAPSHOT), 1000, 400);
        let cache_old = root.join("cache/a.kv");
        file(&cache_old, 1000, 300);
        let newest = session(root, "s-new").join(SNAPSHOT);
        file(&newest, 1000, 0);
        // Not KV files: never counted, never deleted.
        file(&root.join("cache/notes.txt"), 5000, 900);
        file(&open_dir.join("events.jsonl"), 5000, 900);
        let meta = crate::store::session::meta("s-open");
        std::fs::write(
            open_dir.join("meta.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        let _held = OpenSession::open(open_dir.clone()).unwrap();
        assert_eq!(b.usage().session_bytes, 3000);
        let evicted: Vec<PathBuf> = b
            .enforce(Some(&newest))
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(evicted, [old.clone(), cache_old.clone()]);
        assert!(open_dir.join(SNAPSHOT).exists() && newest.exists());
        let u = b.usage();
        assert_eq!((u.session_snapshots, u.cache_entries), (2, 0));
        assert!(root.join("cache/notes.txt").exists());
    }

    #[test]
    fn a_link_in_the_sessions_folder_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let outside = root.join("outside");
        file(&outside.join(SNAPSHOT), 1000, 100);
        std::fs::create_dir_all(root.join("sessions")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sessions/s-link")).unwrap();
        let b = budget(root, 0);
        assert!(b.files().is_empty());
        b.enforce(None);
        assert!(outside.join(SNAPSHOT).exists());
    }

    #[test]
    fn a_snapshot_is_worth_writing_only_when_it_saves_a_second() {
        // A 32B session of 20k tokens at 400 tok/s prefill: 50 s to re-read,
        // 5 GB (5 s) to load.
        let s = MIN_SAVED;
        assert!(worth_writing(20_000, 5 << 30, Some(400.0), s));
        // SmolLM2 at 2,000 tok/s: 500 tokens re-read in a quarter second.
        assert!(!worth_writing(500, 12 << 20, Some(2000.0), s));
        // Unless every snapshot is asked for.
        assert!(worth_writing(500, 12 << 20, Some(2000.0), Duration::ZERO));
        // A snapshot slower to load than the prefill it saves.
        assert!(!worth_writing(4000, 40 << 30, Some(2000.0), s));
        assert!(!worth_writing(1000, 1 << 20, None, s));
        assert!(worth_writing(4096, 1 << 20, None, s));
        // An unusable rate counts as none.
        assert!(worth_writing(4096, 1 << 20, Some(f64::NAN), s));
    }
}
