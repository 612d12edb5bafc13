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
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&stats).expect("serializes")
                );
            } else {
                println!(
                    "{} entries · {} of {} · {}",
                    stats.entries,
                    gib(stats.bytes),
                    gib(stats.cap_bytes),
                    cache.dir.display()
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
