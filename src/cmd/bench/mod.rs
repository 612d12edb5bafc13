//! `kiln bench`: time to first token and prefill speed on a ~1k-token prompt,
//! decode speed over a fixed number of tokens, and peak memory.
//!
//! Each run starts from an empty KV cache, decodes greedily and ignores the
//! end-of-turn token so every run decodes the same number of tokens: a
//! kernel comparison with llama-bench. One warm-up run is made and not
//! counted. `--turn` measures the path users take instead.

mod cache;
mod daemon;
mod parallel;
mod render;
mod sampler;
mod serve;
mod soak;
mod turn;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::cli::{BenchArgs, Common};
use crate::engine::local::LocalEngine;
use crate::engine::{CancelFlag, Engine, EngineEvent, GenStats};
use crate::error::{KilnError, Result};
use crate::host::launch::launch;
use crate::procinfo::peak_rss_bytes;

#[derive(Debug, Serialize)]
pub struct Figure {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Figure {
    pub fn of(mut values: Vec<f64>) -> Option<Figure> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Figure {
            min: values[0],
            median,
            max: values[n - 1],
        })
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub engine: String,
    pub threads: usize,
    pub runs: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_s: f64,
    pub ttft_ms: Option<Figure>,
    pub prefill_tok_s: Option<Figure>,
    pub decode_tok_s: Option<Figure>,
    pub peak_rss_mb: Option<f64>,
    /// KV cache bytes per token as the engine stores them.
    pub kv_bytes_per_token: u64,
    pub architecture: String,
    /// Tokens in the context after the last run.
    pub context_tokens: usize,
    /// RSS after the last run, and what the memory budget predicts for
    /// the same context.
    pub rss_mb: Option<f64>,
    pub predicted_rss_mb: f64,
    /// The machine's energy per generated token over each run (prefill
    /// included) and its mean power, where it reports energy (RAPL, Apple's
    /// SoC); absent, never 0, where it does not.
    pub joules_per_token: Option<Figure>,
    pub watts: Option<Figure>,
    /// The machine's memory bandwidth (bytes/s), and the median decode as a
    /// share of the bound it sets: bytes a token reads (active weights plus
    /// the KV cache at the context) times tok/s, over the bandwidth.
    pub memory_bandwidth: f64,
    pub decode_share_of_bound: Option<f64>,
}

pub async fn run(args: BenchArgs, common: &Common) -> Result<i32> {
    if args.sampler {
        return sampler::run(args.runs, args.json);
    }
    if args.render {
        return render::run(args.runs, args.json);
    }
    if args.daemon {
        let mut all = Vec::new();
        let mut screens = Vec::new();
        for clients in [1, 10] {
            all.push(daemon::bench_delivery(clients, 2000).await?);
            screens.push(daemon::bench_screens(clients, 100).await?);
        }
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "agent_events": all,
                    "workstation_screens": screens,
                }))
                .expect("serializes")
            );
        } else {
            println!(
                "kiln bench --daemon · events from the actor to attached clients over the socket"
            );
            println!(
                "{:<10}{:>14}{:>14}{:>22}",
                "clients", "p50 µs", "p99 µs", "events/s per client"
            );
            for f in &all {
                println!(
                    "{:<10}{:>14.0}{:>14.0}{:>22.0}",
                    f.clients, f.latency_p50_us, f.latency_p99_us, f.throughput_per_client
                );
            }
            println!();
            println!(
                "workstation screens · key echo to every terminal, a 500-token answer streamed"
            );
            println!(
                "{:<10}{:>14}{:>14}{:>22}",
                "clients", "echo p50 ms", "echo p99 ms", "tokens/s per client"
            );
            for f in &screens {
                println!(
                    "{:<10}{:>14.2}{:>14.2}{:>22.0}",
                    f.clients, f.echo_p50_ms, f.echo_p99_ms, f.tokens_per_s_per_client
                );
            }
        }
        return Ok(0);
    }
    if args.cache {
        return cache::run(args.runs, args.json, common).await;
    }
    if args.soak {
        return soak::run(args.steps, args.minutes, args.real_model, args.json, common).await;
    }
    if !args.serve.is_empty() {
        return serve::run(&args.serve, args.peer_server.as_deref(), args.json, common).await;
    }
    if !args.parallel.is_empty() {
        return parallel::run(
            &args.parallel,
            args.peer_server.as_deref(),
            args.json,
            common,
        )
        .await;
    }
    if args.turn {
        return turn::run(
            args.runs,
            args.prompt_tokens,
            args.gen_tokens,
            args.peer_server.as_deref(),
            args.json,
            common,
        )
        .await;
    }
    if args.runs == 0 || args.gen_tokens < 2 || args.prompt_tokens == 0 {
        return Err(KilnError::BadArgument(
            "bench needs --runs >= 1, --gen-tokens >= 2 and --prompt-tokens >= 1".into(),
        ));
    }
    let gen_tokens = args.gen_tokens;
    let launched = launch(common, |o| {
        o.sampler.temperature = 0.0;
        o.sampler.repeat_penalty = 1.0;
        o.sampler.max_tokens = gen_tokens;
        o.ignore_eos = true;
        o.system_prompt = None;
    })
    .await?;
    let shape = launched.shape();
    let kv_bytes_per_token = shape.kv_per_token_engine();
    let mut engine = launched.engine;
    let prompt = build_prompt(&engine, args.prompt_tokens);

    let mut measured = Vec::new();
    let mut energy = Vec::new();
    let mut sampler = crate::telemetry::Sampler::new();
    for run in 0..=args.runs {
        engine.reset();
        let before = sampler.sample().energy_j;
        let stats = one_run(&mut engine, run as u64 + 1, &prompt).await?;
        if let (Some(a), Some(b)) = (before, sampler.sample().energy_j) {
            if run > 0 && stats.completion_tokens > 0 && stats.total_ms > 0.0 {
                energy.push((
                    (b - a) / stats.completion_tokens as f64,
                    (b - a) * 1000.0 / stats.total_ms,
                ));
            }
        }
        if run > 0 {
            if !args.json {
                eprintln!(
                    "run {run}: TTFT {:.0} ms, prefill {:.1} tok/s ({} tok), decode {:.1} tok/s ({} tok)",
                    stats.ttft_ms,
                    stats.prefill_tok_s.unwrap_or(f64::NAN),
                    stats.prompt_tokens,
                    stats.decode_tok_s.unwrap_or(f64::NAN),
                    stats.completion_tokens
                );
            }
            measured.push(stats);
        }
    }
    let last = measured.last().expect("at least one run");
    // After the runs, so the probe does not disturb them.
    let bandwidth = crate::bandwidth::figure(&launched.paths.cache);
    let decode_median =
        Figure::of(measured.iter().filter_map(|s| s.decode_tok_s).collect()).map(|f| f.median);
    let report = BenchReport {
        model: engine.info().name,
        engine: engine.info().engine,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        runs: measured.len(),
        prompt_tokens: measured[0].prompt_tokens,
        gen_tokens: measured[0].completion_tokens,
        load_s: launched.load_seconds,
        ttft_ms: Figure::of(measured.iter().map(|s| s.ttft_ms).collect()),
        prefill_tok_s: Figure::of(measured.iter().filter_map(|s| s.prefill_tok_s).collect()),
        decode_tok_s: Figure::of(measured.iter().filter_map(|s| s.decode_tok_s).collect()),
        peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        kv_bytes_per_token,
        architecture: launched.model.info.architecture.clone(),
        context_tokens: last.context_tokens,
        rss_mb: crate::procinfo::current_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        predicted_rss_mb: crate::budget::steady_bytes(
            &shape,
            last.context_tokens as u64,
            last.prompt_tokens as u64,
        ) as f64
            / (1 << 20) as f64,
        memory_bandwidth: bandwidth,
        decode_share_of_bound: decode_median.and_then(|tok_s| {
            crate::bandwidth::share_of_bound(
                // The cache cells in use, not those allocated: attention
                // reads only the tokens held.
                shape.active_weight_bytes() + shape.own_kv_per_token() * last.context_tokens as u64,
                tok_s,
                bandwidth,
            )
        }),
        joules_per_token: Figure::of(energy.iter().map(|e| e.0).collect()),
        watts: Figure::of(energy.iter().map(|e| e.1).collect()),
    };
    emit(&report, args.json, print_table)
}

/// A benchmark's report as JSON, or as its table for people.
fn emit<T: Serialize>(report: &T, json: bool, table: fn(&T)) -> Result<i32> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialize")
        );
    } else {
        table(report);
    }
    Ok(0)
}

pub(crate) async fn one_run(engine: &mut LocalEngine, turn: u64, prompt: &str) -> Result<GenStats> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine
        .chat(turn, prompt.to_string(), &tx, &CancelFlag::default())
        .await;
    drop(tx);
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::TurnFinished { stats, .. } => return Ok(stats),
            EngineEvent::TurnFailed { error, .. } => return Err(KilnError::Engine(error)),
            _ => {}
        }
    }
    Err(KilnError::Engine("the turn ended without a result".into()))
}

/// A prompt of about `target` tokens: numbered, varied sentences, so the
/// tokenizer sees ordinary prose rather than one repeated token.
pub(crate) fn build_prompt(engine: &LocalEngine, target: usize) -> String {
    const TOPICS: &[&str] = &[
        "the kiln reached its firing temperature after a slow climb through the night",
        "glazes change colour as the oxygen in the chamber is reduced",
        "a potter checks the cones on the shelf to judge the heat work done",
        "stoneware bodies shrink by about twelve percent between wet clay and the final firing",
        "the damper controls how fast the hot gases leave through the chimney",
        "bisque ware is fired once at a lower temperature before it is glazed",
        "thermal shock cracks a pot when one side cools much faster than the other",
    ];
    let mut text = String::from("Read these notes and then summarise them in detail.\n");
    let mut i = 0;
    while engine.count_tokens(&text) < target {
        text.push_str(&format!(
            "{}. Note {}: {}.\n",
            i + 1,
            i / TOPICS.len() + 1,
            TOPICS[i % TOPICS.len()]
        ));
        i += 1;
    }
    text
}

fn print_table(r: &BenchReport) {
    println!(
        "kiln bench · {} ({}) · {} threads · {} runs · prompt {} tok · decode {} tok · load {:.2} s",
        r.model, r.engine, r.threads, r.runs, r.prompt_tokens, r.gen_tokens, r.load_s
    );
    println!("{:<16}{:>12}{:>12}{:>12}", "metric", "min", "median", "max");
    let row = |name: &str, f: &Option<Figure>, p: usize| match f {
        Some(f) => println!(
            "{name:<16}{:>12.p$}{:>12.p$}{:>12.p$}",
            f.min, f.median, f.max
        ),
        None => println!("{name:<16}{:>12}", "n/a"),
    };
    row("TTFT ms", &r.ttft_ms, 1);
    row("prefill tok/s", &r.prefill_tok_s, 1);
    row("decode tok/s", &r.decode_tok_s, 1);
    row("J/token", &r.joules_per_token, 3);
    row("watts", &r.watts, 1);
    match r.peak_rss_mb {
        Some(mb) => println!("{:<16}{:>12.0}", "peak RSS MB", mb),
        None => println!("{:<16}{:>12}", "peak RSS MB", "n/a"),
    }
    if let Some(mb) = r.rss_mb {
        println!(
            "{:<16}{:>12.0}   budget predicts {:.0} at {} tokens ({:+.1}%)",
            "RSS MB",
            mb,
            r.predicted_rss_mb,
            r.context_tokens,
            (r.predicted_rss_mb - mb) * 100.0 / mb
        );
    }
    println!("{:<16}{:>12}", "KV B/token", r.kv_bytes_per_token);
    match r.decode_share_of_bound {
        Some(share) => println!(
            "{:<16}{:>11.0}%   of the bound {:.1} GB/s sets",
            "decode vs bound",
            share * 100.0,
            r.memory_bandwidth / 1e9
        ),
        None => println!("{:<16}{:>12}", "decode vs bound", "n/a"),
    }
}

#[cfg(test)]
mod tests {
    use super::Figure;

    #[test]
    fn figures() {
        let f = Figure::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((f.min, f.median, f.max), (1.0, 2.0, 3.0));
        assert_eq!(Figure::of(vec![4.0, 1.0]).unwrap().median, 2.5);
        assert!(Figure::of(vec![]).is_none());
    }
}
