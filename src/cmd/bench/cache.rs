//! `kiln bench --cache`: what the prompt cache and KV snapshots buy.
//! - TTFT with a 1k- and a 4k-token system prompt, cold (prefilled) and on a
//!   cache hit (loaded);
//! - KV snapshot write and read throughput, next to `dd` of the same size on
//!   the same disk;
//! - the time to reopen a 1,000-message session without a KV snapshot.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use super::{build_prompt, one_run, Figure};
use crate::cli::Common;
use crate::engine::{Engine, FinishReason, GenStats};
use crate::error::{KilnError, Result};
use crate::host::launch::launch;
use crate::store::prompt_cache::{PromptCache, DEFAULT_CAP_BYTES};
use crate::store::session::{encode, Event};
use crate::store::transcript::Transcript;
use crate::store::{snapshot, SessionStore};

#[derive(Debug, Serialize)]
pub struct PrefixFigures {
    pub system_prompt_tokens: usize,
    pub cold_ttft_ms: f64,
    pub hit_ttft_ms: Option<Figure>,
    pub speedup: f64,
}

#[derive(Debug, Serialize)]
pub struct IoFigures {
    pub bytes: u64,
    pub snapshot_write_mb_s: f64,
    pub dd_write_mb_s: f64,
    pub snapshot_read_mb_s: f64,
    pub dd_read_mb_s: f64,
    /// Whether the page cache could be dropped before the reads (needs root).
    pub reads_from_disk: bool,
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub prefixes: Vec<PrefixFigures>,
    pub io: Option<IoFigures>,
    pub resume_1000_messages_ms: f64,
}

pub async fn run(runs: usize, json: bool, common: &Common) -> Result<i32> {
    let scratch = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let cache_dir = scratch.path().join("prompts");
    let launched = launch(common, |o| {
        o.sampler.temperature = 0.0;
        o.sampler.max_tokens = 8;
        o.system_prompt = None;
        if let Some((cache, _)) = &mut o.prompt_cache {
            *cache = std::sync::Arc::new(PromptCache::new(cache_dir.clone(), DEFAULT_CAP_BYTES));
        }
    })
    .await?;
    let Some(fingerprint) = launched.fingerprint.clone() else {
        return Err(KilnError::Engine(
            "the model file cannot be fingerprinted".into(),
        ));
    };
    let cache = PromptCache::new(cache_dir, u64::MAX);
    let mut engine = launched.engine;
    let mut prefixes = Vec::new();
    let mut io = None;
    for target in [1024, 4096] {
        let system = build_prompt(&engine, target);
        engine.set_system_prompt(Some(system.clone()));
        engine.reset();
        cache.clear();
        let cold = one_run(&mut engine, 1, "Say hello.").await?;
        let mut hits = Vec::new();
        for run in 0..runs {
            engine.reset();
            let hit = one_run(&mut engine, run as u64 + 2, "Say hello.").await?;
            if hit.cached_tokens == 0 {
                return Err(KilnError::Engine("the prompt cache missed".into()));
            }
            hits.push(hit);
        }
        let figures = prefix_figures(engine.count_tokens(&system), &cold, &hits);
        if !json {
            eprintln!(
                "system prompt {} tok: cold TTFT {:.0} ms, hit TTFT {:.0} ms (median of {runs}), {:.1}x",
                figures.system_prompt_tokens,
                figures.cold_ttft_ms,
                figures.hit_ttft_ms.as_ref().map_or(f64::NAN, |f| f.median),
                figures.speedup
            );
        }
        prefixes.push(figures);
        if target == 4096 {
            io = io_figures(&cache, &fingerprint, scratch.path()).ok();
        }
    }
    let report = CacheReport {
        prefixes,
        io,
        resume_1000_messages_ms: resume_time(scratch.path())?,
    };
    super::emit(&report, json, print_report)
}

fn prefix_figures(tokens: usize, cold: &GenStats, hits: &[GenStats]) -> PrefixFigures {
    let hit = Figure::of(hits.iter().map(|s| s.ttft_ms).collect());
    PrefixFigures {
        system_prompt_tokens: tokens,
        cold_ttft_ms: cold.ttft_ms,
        speedup: hit.as_ref().map_or(f64::NAN, |h| cold.ttft_ms / h.median),
        hit_ttft_ms: hit,
    }
}

/// Drop the page cache so reads come from the disk; only root may.
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn mb_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(1e-9)
}

fn io_figures(cache: &PromptCache, fingerprint: &str, scratch: &Path) -> Result<IoFigures> {
    let io = |e| KilnError::io("bench", e);
    let entry = cache
        .entries()
        .into_iter()
        .next()
        .ok_or_else(|| KilnError::Engine("the prompt cache is empty".into()))?;
    let state = cache
        .get(&entry.key, fingerprint)
        .ok_or_else(|| KilnError::Engine("the prompt cache entry did not read".into()))?;
    let path = scratch.join("bench.snapshot");
    let t = Instant::now();
    let bytes = snapshot::write(&path, fingerprint, &state).map_err(io)?;
    let snapshot_write = mb_s(bytes, t.elapsed().as_secs_f64());

    let dd_path = scratch.join("bench.dd");
    let mib = bytes.div_ceil(1 << 20);
    let t = Instant::now();
    let ok = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "conv=fsync", "status=none"])
        .arg(format!("of={}", dd_path.display()))
        .arg(format!("count={mib}"))
        .status()
        .map_err(io)?
        .success();
    let dd_write = mb_s(mib << 20, t.elapsed().as_secs_f64());

    let from_disk = drop_page_cache();
    let t = Instant::now();
    snapshot::read(&path, fingerprint).map_err(|e| KilnError::Engine(e.to_string()))?;
    let snapshot_read = mb_s(bytes, t.elapsed().as_secs_f64());
    drop_page_cache();
    let t = Instant::now();
    let ok = ok
        && Command::new("dd")
            .args(["of=/dev/null", "bs=1M", "status=none"])
            .arg(format!("if={}", dd_path.display()))
            .status()
            .map_err(io)?
            .success();
    let dd_read = mb_s(mib << 20, t.elapsed().as_secs_f64());
    if !ok {
        return Err(KilnError::Engine("dd failed".into()));
    }
    Ok(IoFigures {
        bytes,
        snapshot_write_mb_s: snapshot_write,
        dd_write_mb_s: dd_write,
        snapshot_read_mb_s: snapshot_read,
        dd_read_mb_s: dd_read,
        reads_from_disk: from_disk,
    })
}

/// Open a 1,000-message session and rebuild its conversation, as `kiln
/// resume` does before anything is drawn.
fn resume_time(scratch: &Path) -> Result<f64> {
    let store = SessionStore {
        root: scratch.join("sessions"),
    };
    let mut session = store.create("bench", None, 8192)?;
    let mut lines = String::new();
    for i in 0..500 {
        lines.push_str(&encode(&Event::User {
            text: format!("Question {i}: how should I fire a piece this size?"),
        }));
        for part in [
            "A slow ramp to 600 °C, ",
            "then full speed to cone 6, ",
            "then a slow cool.",
        ] {
            lines.push_str(&encode(&Event::Chunk { text: part.into() }));
        }
        lines.push_str(&encode(&Event::Answer {
            text: "A slow ramp to 600 °C, then full speed to cone 6, then a slow cool.".into(),
            finish: FinishReason::Stop,
            stats: GenStats::default(),
        }));
    }
    session
        .append_lines(&lines)
        .map_err(|e| KilnError::io("bench session", e))?;
    let dir = session.dir.clone();
    drop(session);
    let t = Instant::now();
    let loaded = store.load(&dir)?;
    let messages = Transcript::messages(&loaded.transcript.entries);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if messages.len() != 1000 {
        return Err(KilnError::Engine(format!(
            "{} messages read back",
            messages.len()
        )));
    }
    Ok(ms)
}

fn print_report(r: &CacheReport) {
    println!("kiln bench --cache");
    println!(
        "{:<22}{:>14}{:>14}{:>10}",
        "system prompt", "cold TTFT ms", "hit TTFT ms", "speedup"
    );
    for p in &r.prefixes {
        println!(
            "{:<22}{:>14.0}{:>14.0}{:>9.1}x",
            format!("{} tokens", p.system_prompt_tokens),
            p.cold_ttft_ms,
            p.hit_ttft_ms.as_ref().map_or(f64::NAN, |f| f.median),
            p.speedup
        );
    }
    match &r.io {
        Some(io) => {
            println!(
                "KV snapshot {:.0} MB: write {:.0} MB/s (dd {:.0} MB/s, {:.0} %), read {:.0} MB/s (dd {:.0} MB/s, {:.0} %){}",
                io.bytes as f64 / 1e6,
                io.snapshot_write_mb_s,
                io.dd_write_mb_s,
                io.snapshot_write_mb_s / io.dd_write_mb_s * 100.0,
                io.snapshot_read_mb_s,
                io.dd_read_mb_s,
                io.snapshot_read_mb_s / io.dd_read_mb_s * 100.0,
                if io.reads_from_disk { "" } else { " (reads from the page cache: dropping it needs root)" }
            );
        }
        None => println!("KV snapshot I/O: not measured"),
    }
    println!(
        "reopen a 1,000-message session without KV: {:.1} ms (the model re-reads it on the next message)",
        r.resume_1000_messages_ms
    );
}
