//! `kiln bench --soak`: an unattended agent run as users leave one going
//! overnight — detached in the daemon's actor, journaled, its shell
//! commands sandboxed, followed by an attached client over the socket —
//! for thousands of steps, with a scripted engine or the loaded model.
//! Does anything grow or slow down: memory, descriptors, step time, the
//! journal, the log?

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UnixStream;

use crate::agent::Progress;
use crate::cli::{AgentFlags, Common};
use crate::engine::EngineHandle;
use crate::error::{KilnError, Result};
use crate::host::daemon::{bench_actor, bind, Model};
use crate::host::protocol::{self, Reply, Request, Settings};
use crate::paths::Paths;
use crate::procinfo::{current_rss_bytes, open_fds};

/// Steps not counted in the slope and the first latency window: caches,
/// the allocator and the journal's first pages settle.
const WARM_UP_SHARE: f64 = 0.1;
/// Steps in each latency window.
const WINDOW: usize = 1000;
/// Steps between samples of RSS and descriptors.
const SAMPLE_EVERY: u32 = 50;

/// The calls the scripted engine makes, in turn: every tool, the shell
/// under the sandbox.
const CALLS: [&str; 5] = [
    r#"{"tool": "list_dir", "path": "."}"#,
    r#"{"tool": "read_file", "path": "notes.txt"}"#,
    r#"{"tool": "search", "query": "glaze"}"#,
    r#"{"tool": "write_file", "path": "log.txt", "content": "one more step"}"#,
    r#"{"tool": "shell", "command": "echo step"}"#,
];

#[derive(Debug, Serialize)]
pub struct SoakFigures {
    pub engine: String,
    pub steps: u32,
    pub runs: u32,
    pub seconds: f64,
    pub rss_start_mb: f64,
    pub rss_end_mb: f64,
    /// Least-squares slope of RSS over the steps after warm-up, and over
    /// the last half alone (once the daemon's bounded per-run event log is
    /// full, growth there is growth without a bound).
    pub rss_bytes_per_step: f64,
    pub rss_bytes_per_step_last_half: f64,
    pub fds_start: usize,
    pub fds_end: usize,
    /// Step time (result to result), over the first window after warm-up
    /// and over the last.
    pub step_p50_ms_start: f64,
    pub step_p99_ms_start: f64,
    pub step_p50_ms_end: f64,
    pub step_p99_ms_end: f64,
    pub journal_bytes_per_step: f64,
    /// KV snapshot bytes left on disk per run closed (`kv.snapshot` files
    /// in the soak's sessions).
    pub snapshot_bytes_per_run: f64,
    /// What kiln.log grew by over the soak (it rotates at
    /// `logging::LOG_BYTES`, one old file kept).
    pub log_bytes: u64,
}

/// One sample: step, RSS bytes, open descriptors.
type Sample = (u32, u64, usize);

/// `kiln bench --soak`: `steps` steps (or `minutes`, whichever ends first)
/// on the scripted engine, or on the model `common` names with `real`.
pub async fn run(
    steps: u32,
    minutes: Option<u64>,
    real: bool,
    json: bool,
    common: &Common,
) -> Result<i32> {
    let figures = soak(steps, minutes, real, common).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).expect("figures serialize")
        );
    } else {
        print(&figures);
    }
    Ok(0)
}

async fn soak(
    steps: u32,
    minutes: Option<u64>,
    real: bool,
    common: &Common,
) -> Result<SoakFigures> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| KilnError::io(what.clone(), e)
    };
    let dir = tempfile::tempdir().map_err(io("temporary folder"))?;
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).map_err(io("workspace"))?;
    std::fs::write(ws.join("notes.txt"), "Glaze firing on Friday.\n").map_err(io("workspace"))?;
    let (engine, name) = if real {
        let started = crate::host::launch::start(common).await?;
        let name = started.model_spec.clone();
        let engine: EngineHandle = (*started.engine).clone();
        drop(started.engine);
        (engine, name)
    } else {
        // Room for every step and the summaries of the compactions between.
        let script = (0..steps as usize + steps as usize / 4 + 64).map(|i| CALLS[i % CALLS.len()]);
        let fake = crate::engine::fake::FakeEngine::new(script);
        (crate::engine::spawn(fake), "scripted".to_string())
    };
    let path = dir.path().join("daemon.sock");
    let paths = Paths::under(dir.path());
    bench_actor(
        bind(&path)?,
        engine,
        &paths,
        Some(Model::fake(Common::default(), &paths)),
    );
    let (user_paths, _) = crate::host::launch::paths_and_config(common)?;
    let log_before = folder_bytes(&user_paths.logs);
    let deadline = minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut latencies: Vec<(u32, f64)> = Vec::new();
    let mut done = 0u32;
    let mut runs = 0u32;
    let mut journal_bytes = 0u64;
    let mut snapshot_bytes = 0u64;
    sample(&mut samples, 0);
    // A run that ends early (the model calls finish) is followed by the
    // next, as a daemon's runs follow one another.
    while done < steps && deadline.is_none_or(|d| Instant::now() < d) {
        runs += 1;
        let (id, taken) = one_run(
            &path,
            &ws,
            steps - done,
            deadline,
            done,
            &mut samples,
            &mut latencies,
        )
        .await?;
        done += taken;
        let store = crate::store::SessionStore::new(&paths);
        if let Ok(dir) = store.resolve(Some(&id)) {
            journal_bytes += std::fs::metadata(dir.join("events.jsonl")).map_or(0, |m| m.len());
            snapshot_bytes +=
                std::fs::metadata(dir.join(crate::store::SNAPSHOT)).map_or(0, |m| m.len());
        }
        if taken == 0 {
            break;
        }
    }
    Ok(figures(Measured {
        engine: name,
        steps: done,
        runs,
        seconds: started.elapsed().as_secs_f64(),
        samples,
        latencies,
        journal_bytes,
        snapshot_bytes,
        log_bytes: folder_bytes(&user_paths.logs).saturating_sub(log_before),
    }))
}

/// What a soak saw, before it is summed up.
struct Measured {
    engine: String,
    steps: u32,
    runs: u32,
    seconds: f64,
    samples: Vec<Sample>,
    /// Step number and its time in ms.
    latencies: Vec<(u32, f64)>,
    journal_bytes: u64,
    snapshot_bytes: u64,
    log_bytes: u64,
}

/// One detached run of at most `steps` steps, followed over the socket;
/// its id and the steps it took. Step numbers in `latencies` and
/// `samples` count on from `before`.
async fn one_run(
    path: &Path,
    ws: &Path,
    steps: u32,
    deadline: Option<Instant>,
    before: u32,
    samples: &mut Vec<Sample>,
    latencies: &mut Vec<(u32, f64)>,
) -> Result<(String, u32)> {
    let client_error = |e: std::io::Error| KilnError::io("soak client", e);
    let minutes = deadline.map_or(u64::MAX / 60, |d| {
        d.saturating_duration_since(Instant::now()).as_secs() / 60 + 1
    });
    let settings = Settings {
        common: Common {
            agent: AgentFlags {
                max_steps: Some(steps),
                max_minutes: Some(minutes),
                max_run_tokens: Some(usize::MAX / 2),
                ..Default::default()
            },
            approval: crate::agent::Policy::Auto,
            workspace: Some(ws.to_path_buf()),
            ..Default::default()
        },
        cwd: ws.to_path_buf(),
    };
    let mut s = UnixStream::connect(path).await.map_err(client_error)?;
    let start = Request::StartAgent {
        task: "Keep the notes tidy.".into(),
        settings,
    };
    protocol::write(&mut s, &start)
        .await
        .map_err(client_error)?;
    let id = match protocol::read::<Reply, _>(&mut s).await {
        Ok(Reply::Started { id }) => id,
        other => {
            return Err(KilnError::Engine(format!(
                "the soak run did not start: {other:?}"
            )))
        }
    };
    let mut s = UnixStream::connect(path).await.map_err(client_error)?;
    protocol::write(&mut s, &Request::Attach { id: id.clone() })
        .await
        .map_err(client_error)?;
    let mut last: Option<(u32, Instant)> = None;
    let mut taken = 0u32;
    loop {
        let reply = protocol::read::<Reply, _>(&mut s)
            .await
            .map_err(|e| KilnError::Store(format!("soak client: {e}")))?;
        match reply {
            Reply::Event {
                event: Progress::Result { step, .. } | Progress::Refused { step, .. },
                ..
            } => {
                let now = Instant::now();
                // A client that fell behind is resynced and skips steps;
                // only consecutive ones give a step time.
                if let Some((prev, at)) = last {
                    if step == prev + 1 {
                        latencies.push((before + step, (now - at).as_secs_f64() * 1e3));
                    }
                }
                last = Some((step, now));
                taken = taken.max(step);
                if step % SAMPLE_EVERY == 0 {
                    sample(samples, before + step);
                }
            }
            Reply::Done { .. } => break,
            Reply::Snapshot {
                outcome: Some(_), ..
            } => break,
            _ => {}
        }
    }
    Ok((id, taken))
}

fn sample(samples: &mut Vec<Sample>, step: u32) {
    if let (Some(rss), Some(fds)) = (current_rss_bytes(), open_fds()) {
        samples.push((step, rss, fds));
    }
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The `q` quantile of `values` (sorted here).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

fn figures(m: Measured) -> SoakFigures {
    let Measured {
        engine,
        steps,
        runs,
        seconds,
        samples,
        latencies,
        journal_bytes,
        snapshot_bytes,
        log_bytes,
    } = m;
    let warm = (steps as f64 * WARM_UP_SHARE) as u32;
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(step, _, _)| *step >= warm)
        .map(|(step, rss, _)| (*step as f64, *rss as f64))
        .collect();
    let window = |from_end: bool| -> Vec<f64> {
        let warmed: Vec<f64> = latencies
            .iter()
            .filter(|(step, _)| *step >= warm)
            .map(|(_, ms)| *ms)
            .collect();
        let n = warmed.len().min(WINDOW);
        match from_end {
            false => warmed[..n].to_vec(),
            true => warmed[warmed.len() - n..].to_vec(),
        }
    };
    let (mut first, mut last) = (window(false), window(true));
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let at_start = samples
        .iter()
        .find(|(s, _, _)| *s >= warm)
        .or(samples.first());
    SoakFigures {
        engine,
        steps,
        runs,
        seconds,
        rss_start_mb: at_start.map_or(0.0, |s| mb(s.1)),
        rss_end_mb: samples.last().map_or(0.0, |s| mb(s.1)),
        rss_bytes_per_step: slope(&after),
        rss_bytes_per_step_last_half: slope(
            &after
                .iter()
                .copied()
                .filter(|(step, _)| *step >= steps as f64 / 2.0)
                .collect::<Vec<_>>(),
        ),
        fds_start: at_start.map_or(0, |s| s.2),
        fds_end: samples.last().map_or(0, |s| s.2),
        step_p50_ms_start: quantile(&mut first, 0.5),
        step_p99_ms_start: quantile(&mut first, 0.99),
        step_p50_ms_end: quantile(&mut last, 0.5),
        step_p99_ms_end: quantile(&mut last, 0.99),
        journal_bytes_per_step: journal_bytes as f64 / steps.max(1) as f64,
        snapshot_bytes_per_run: snapshot_bytes as f64 / runs.max(1) as f64,
        log_bytes,
    }
}

fn print(f: &SoakFigures) {
    println!(
        "soak: {} steps in {} run(s), {:.0} s, {} engine (detached in the daemon's actor, followed over its socket)",
        f.steps, f.runs, f.seconds, f.engine
    );
    println!(
        "  RSS      {:.1} MiB after warm-up, {:.1} MiB at the end: {:+.0} bytes/step (target under 1024), {:+.0} bytes/step over the last half",
        f.rss_start_mb, f.rss_end_mb, f.rss_bytes_per_step, f.rss_bytes_per_step_last_half
    );
    println!(
        "  fds      {} after warm-up, {} at the end",
        f.fds_start, f.fds_end
    );
    println!(
        "  step     p50 {:.2} ms, p99 {:.2} ms in the first {WINDOW} steps after warm-up; p50 {:.2} ms, p99 {:.2} ms in the last {WINDOW}",
        f.step_p50_ms_start, f.step_p99_ms_start, f.step_p50_ms_end, f.step_p99_ms_end
    );
    println!("  journal  {:.0} bytes/step", f.journal_bytes_per_step);
    println!(
        "  log      {} bytes written (kiln.log rotates at {} MiB, one old file kept)",
        f.log_bytes,
        crate::logging::LOG_BYTES >> 20
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_rate() {
        let line: Vec<(f64, f64)> = (0..100).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 0.99), 5.0);
    }

    /// A short soak through the real actor and socket: every step is
    /// counted, and the figures come from real samples.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_short_soak_counts_every_step() {
        let home = tempfile::tempdir().unwrap();
        let common = Common {
            data_dir: Some(home.path().to_path_buf()),
            ..Default::default()
        };
        let f = soak(120, None, false, &common).await.unwrap();
        assert_eq!((f.steps, f.runs), (120, 1));
        assert!(f.rss_end_mb > 1.0 && f.fds_end > 2, "{f:?}");
        assert!(f.step_p50_ms_end > 0.0, "{f:?}");
        assert!(f.journal_bytes_per_step > 100.0, "{f:?}");
    }
}
