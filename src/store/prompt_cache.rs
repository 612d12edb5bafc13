//! The prompt cache: KV states after long shared prefixes (a system prompt,
//! an agent's tool instructions), stored by a key of (model fingerprint,
//! prefix text), capped in size and evicted least recently used first.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::snapshot::{self, KvState};

pub const DEFAULT_CAP_BYTES: u64 = 4 << 30;
pub const EXT: &str = "kv";

#[derive(Clone, Debug)]
pub struct PromptCache {
    pub dir: PathBuf,
    pub cap_bytes: u64,
    /// The disk budget it shares with the sessions' snapshots.
    pub budget: Option<super::kv_budget::KvBudget>,
}

#[derive(Debug, Serialize)]
pub struct CacheEntry {
    pub key: String,
    pub bytes: u64,
    /// Seconds since the epoch of the last hit (or the write).
    pub last_used: u64,
}

#[derive(Debug, Serialize)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub cap_bytes: u64,
}

impl PromptCache {
    pub fn new(dir: PathBuf, cap_bytes: u64) -> PromptCache {
        PromptCache {
            dir,
            cap_bytes,
            budget: None,
        }
    }

    /// Kept within `budget` too, beside the sessions' snapshots.
    pub fn within(mut self, budget: super::kv_budget::KvBudget) -> PromptCache {
        self.budget = Some(budget);
        self
    }

    pub fn key(fingerprint: &str, prefix: &str) -> String {
        let mut h = Sha256::new();
        h.update(fingerprint.as_bytes());
        h.update([0]);
        h.update(prefix.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{EXT}"))
    }

    /// The state cached under `key`, if it is there and intact. A damaged
    /// entry is removed, so the next miss rebuilds it.
    pub fn get(&self, key: &str, fingerprint: &str) -> Option<KvState> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        match snapshot::read(&path, fingerprint) {
            Ok(state) => {
                // The file's mtime is its place in the LRU order.
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(state)
            }
            Err(e) => {
                tracing::warn!("prompt cache: {e}; removing the entry");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store `state`, then evict the least recently used entries over the
    /// cap, and KV files over the shared disk budget.
    pub fn put(&self, key: &str, fingerprint: &str, state: &KvState) -> std::io::Result<u64> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(key);
        let written = snapshot::write(&path, fingerprint, state)?;
        self.evict(Some(key));
        if let Some(budget) = &self.budget {
            budget.enforce(Some(&path));
        }
        Ok(written)
    }

    pub fn entries(&self) -> Vec<CacheEntry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<CacheEntry> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                if path.extension().and_then(|x| x.to_str()) != Some(EXT) {
                    return None;
                }
                let meta = e.metadata().ok()?;
                Some(CacheEntry {
                    key: path.file_stem()?.to_string_lossy().into_owned(),
                    bytes: meta.len(),
                    last_used: meta
                        .modified()
                        .ok()?
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()?
                        .as_secs(),
                })
            })
            .collect();
        out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
        out
    }

    pub fn stats(&self) -> CacheStats {
        let entries = self.entries();
        CacheStats {
            entries: entries.len(),
            bytes: entries.iter().map(|e| e.bytes).sum(),
            cap_bytes: self.cap_bytes,
        }
    }

    /// Remove every entry; returns how many bytes were freed.
    pub fn clear(&self) -> u64 {
        self.entries()
            .into_iter()
            .filter(|e| std::fs::remove_file(self.path(&e.key)).is_ok())
            .map(|e| e.bytes)
            .sum()
    }

    fn evict(&self, keep: Option<&str>) {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        // Oldest last in `entries`.
        while total > self.cap_bytes {
            let Some(oldest) = entries.pop() else { break };
            if Some(oldest.key.as_str()) == keep {
                continue;
            }
            if std::fs::remove_file(self.path(&oldest.key)).is_ok() {
                tracing::info!(
                    "prompt cache: evicted {} ({} bytes)",
                    oldest.key,
                    oldest.bytes
                );
                total -= oldest.bytes;
            }
        }
    }
}

impl crate::chat::PrefixCache for PromptCache {
    fn lookup(&self, fingerprint: &str, prefix: &str) -> Option<KvState> {
        self.get(&PromptCache::key(fingerprint, prefix), fingerprint)
    }

    fn keep(&self, fingerprint: &str, prefix: &str, state: &KvState) -> std::io::Result<u64> {
        self.put(&PromptCache::key(fingerprint, prefix), fingerprint, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> KvState {
        KvState {
            fed: "prefix".into(),
            kv_tokens: 3,
            bytes: vec![7u8; n],
        }
    }

    #[test]
    fn lru_eviction_keeps_the_cap_and_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PromptCache::new(dir.path().to_path_buf(), 2500);
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            cache.put(key, "fp", &state(1000)).unwrap();
            // Make the order unambiguous whatever the clock's resolution.
            let f = std::fs::File::options()
                .write(true)
                .open(cache.path(key))
                .unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        // Each entry is 1000 bytes plus its header: only two fit in 2500.
        let keys: Vec<_> = cache.entries().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["c", "b"]);
        // A hit makes "b" the newest, so "c" goes next.
        assert!(cache.get("b", "fp").is_some());
        cache.put("d", "fp", &state(1000)).unwrap();
        let keys: Vec<_> = cache.entries().into_iter().map(|e| e.key).collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&"d".to_string()) && keys.contains(&"b".to_string()));
        assert!(cache.stats().bytes <= 2500);
        assert!(cache.clear() > 0);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn a_damaged_entry_is_a_miss_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PromptCache::new(dir.path().to_path_buf(), DEFAULT_CAP_BYTES);
        cache.put("k", "fp", &state(5000)).unwrap();
        let p = cache.path("k");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(cache.get("k", "fp"), None);
        assert!(!p.exists());
        assert_eq!(
            PromptCache::key("fp", "system"),
            PromptCache::key("fp", "system")
        );
        assert_ne!(
            PromptCache::key("fp", "system"),
            PromptCache::key("fp2", "system")
        );
    }
}
