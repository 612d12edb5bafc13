//! The machine's memory bandwidth, the physical limit of decode speed:
//! every generated token reads the active weights and the KV cache once.
//! Measured once by a short probe and cached per machine; on Apple Silicon
//! the chip's published figure, since its CPU cores alone cannot draw what
//! its GPU does.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Bytes the probe reads per pass: far past any cache.
const PROBE_BYTES: usize = 128 << 20;
const PROBE_PASSES: usize = 3;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Cached {
    machine: String,
    bytes_per_s: f64,
}

fn cache_file(cache_dir: &Path) -> PathBuf {
    cache_dir.join("memory-bandwidth.json")
}

/// What identifies this machine's memory system: CPU model, core count and
/// memory size. A new machine (or a memory upgrade) measures again.
fn machine() -> String {
    let Ok(mut sys) = sysinfo::System::new() else {
        return String::new();
    };
    sys.refresh_memory();
    sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let brand = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    format!(
        "{brand} · {} cores · {} bytes",
        sys.cpus().len(),
        sys.total_memory()
    )
}

/// This machine's figure in bytes per second: Apple's published one for
/// its chip, else the cached probe, else a probe now (then cached).
pub fn figure(cache_dir: &Path) -> f64 {
    published()
        .or_else(|| cached(cache_dir))
        .unwrap_or_else(|| measure(cache_dir))
}

/// The published figure for this Mac's chip.
fn published() -> Option<f64> {
    #[cfg(target_os = "macos")]
    {
        let soc = macmon::sources::get_soc_info().ok()?;
        crate::machines::published_bandwidth_gbs(&soc.chip_name, soc.gpu_cores).map(|g| g * 1e9)
    }
    #[cfg(not(target_os = "macos"))]
    None
}

/// The cached figure for this machine, in bytes per second, if there is one.
pub fn cached(cache_dir: &Path) -> Option<f64> {
    let text = read_small(&cache_file(cache_dir))?;
    let c: Cached = serde_json::from_str(&text).ok()?;
    (c.machine == machine() && c.bytes_per_s.is_finite() && c.bytes_per_s > 0.0)
        .then_some(c.bytes_per_s)
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    f.take(4096).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Measure (about a second of reading memory on every core) and cache it.
pub fn measure(cache_dir: &Path) -> f64 {
    let bytes_per_s = probe();
    let c = Cached {
        machine: machine(),
        bytes_per_s,
    };
    let json = serde_json::to_string(&c).expect("serializes");
    let written = std::fs::create_dir_all(cache_dir)
        .and_then(|_| crate::store::atomic::write_atomic(&cache_file(cache_dir), json.as_bytes()));
    if let Err(e) = written {
        tracing::warn!("memory bandwidth: cannot cache the figure: {e}");
    }
    bytes_per_s
}

/// Read `PROBE_BYTES` on every core at once, a few times; the best pass.
pub fn probe() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let words = PROBE_BYTES / 8;
    // Written first, so the pages are resident and not the zero page.
    let data: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..PROBE_PASSES {
        let started = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            parts
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        let secs = started.elapsed().as_secs_f64();
        if secs > 0.0 {
            best = best.max(PROBE_BYTES as f64 / secs);
        }
    }
    best
}

/// Decode speed as a share of the bandwidth bound: the bytes one token
/// reads times tokens per second, over what memory can deliver.
pub fn share_of_bound(bytes_per_token: u64, tok_s: f64, bytes_per_s: f64) -> Option<f64> {
    (bytes_per_s > 0.0 && tok_s.is_finite() && tok_s > 0.0)
        .then(|| bytes_per_token as f64 * tok_s / bytes_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_is_bytes_times_rate_over_bandwidth() {
        // 18.5 GiB a token at 9.6 tok/s on 273 GB/s is 70% of the bound.
        let share = share_of_bound(37 << 29, 9.6, 273e9).unwrap();
        assert!((share - 0.6985).abs() < 1e-3, "{share}");
        assert_eq!(share_of_bound(1, 0.0, 1e9), None);
        assert_eq!(share_of_bound(1, 5.0, 0.0), None);
    }

    #[test]
    fn the_probe_measures_and_the_figure_is_cached_for_this_machine_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cached(dir.path()), None);
        let measured = measure(dir.path());
        // Any machine that runs kiln reads memory faster than 100 MB/s.
        assert!(measured > 1e8, "{measured}");
        assert_eq!(cached(dir.path()), Some(measured));
        let other = Cached {
            machine: "another machine".into(),
            bytes_per_s: 1e12,
        };
        std::fs::write(
            cache_file(dir.path()),
            serde_json::to_string(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(cached(dir.path()), None);
        std::fs::write(cache_file(dir.path()), "{not json").unwrap();
        assert_eq!(cached(dir.path()), None);
    }
}
