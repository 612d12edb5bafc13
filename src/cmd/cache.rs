//! `kiln cache …`: the prompt cache's entries, size, and clearing it.

use crate::budget::gib;
use crate::cli::{CacheAction, Common};
use crate::error::Result;
use crate::host::launch::paths_and_config;
use crate::store::display_time;
use crate::store::prompt_cache::PromptCache;

pub fn run(action: CacheAction, common: &Common) -> Result<i32> {
    let (paths, config) = paths_and_config(common)?;
    let cap = config.prompt_cache_bytes();
    let cache = PromptCache::new(paths.prompt_cache(), cap);
    match action {
        CacheAction::List { json } => {
            let entries = cache.entries();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries).expect("serializes")
                );
            } else {
                for e in entries {
                    println!(
                        "{}  {:>10}  last used {}",
                        e.key,
                        gib(e.bytes),
                        display_time(e.last_used * 1000)
                    );
                }
            }
        }
        CacheAction::Stats { json } => {
            let stats = cache.stats();
            let usage = config.kv_budget(&paths).usage();
            if json {
                let both = serde_json::json!({ "prompt_cache": stats, "kv_disk": usage });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&both).expect("serializes")
                );
            } else {
                println!(
                    "prompt cache: {} entries · {} of {} · {}",
                    stats.entries,
                    gib(stats.bytes),
                    gib(stats.cap_bytes),
                    cache.dir.display()
                );
                println!(
                    "KV on disk: {} of the {} budget (kv_disk_gib) · {} session snapshots, {} · {} prompt-cache entries, {}",
                    gib(usage.session_bytes + usage.cache_bytes),
                    gib(usage.budget_bytes),
                    usage.session_snapshots,
                    gib(usage.session_bytes),
                    usage.cache_entries,
                    gib(usage.cache_bytes)
                );
            }
        }
        CacheAction::Clear => {
            let freed = cache.clear();
            eprintln!("kiln: prompt cache cleared ({} freed)", gib(freed));
        }
    }
    Ok(0)
}
