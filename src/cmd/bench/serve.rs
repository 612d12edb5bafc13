//! `kiln bench --serve 1,4,16`: `kiln serve` and llama.cpp's own
//! `llama-server` on the same GGUF and thread count, each driven through
//! its OpenAI-compatible API by N concurrent streaming clients, with the
//! same client code for both (`parallel::server_side`): the configured
//! sampling, streamed, a fresh connection a request, as an editor or a
//! script talks to a local server.
//!
//! For each N: requests per second, time to first token (p50 and p90, as
//! the client sees it), and aggregate decode tokens/s (tokens over the
//! round's wall time, pauses included); and kiln serve's
//! own time per streamed token, as the node measures it between the
//! engine and the client's buffer.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::parallel::{launch_for, server_side, Job, Sample, Server, Start, CONTEXT_PER_STREAM};
use crate::cli::Common;
use crate::engine;
use crate::error::{KilnError, Result};
use crate::serve::{self, Caps, ServeConfig};

/// Tokens each answer decodes (the end of the answer is ignored, so both
/// sides decode as many).
const GEN_TOKENS: u32 = 64;
/// Requests each client sends, one after another.
const REQUESTS_PER_CLIENT: usize = 6;
/// Clients start this far apart, and pause this long between requests, as
/// people and tools do: clients that all start at once, with answers of one
/// length, stay in lockstep, and every request would then wait on all the
/// others' prefills.
const STAGGER: Duration = Duration::from_millis(150);
const PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
pub struct ServeRound {
    pub clients: usize,
    pub requests: usize,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub aggregate_tok_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ServeReport {
    pub model: String,
    pub threads: usize,
    pub gen_tokens: u32,
    pub kiln: Vec<ServeRound>,
    pub peer: Option<Vec<ServeRound>>,
    /// kiln serve's time per streamed token, in microseconds.
    pub overhead_us_per_token: Option<f64>,
}

pub async fn run(
    counts: &[usize],
    peer: Option<&Path>,
    json: bool,
    common: &Common,
) -> Result<i32> {
    let (launched, threads) =
        launch_for(counts, "--serve takes client counts", "1,4,16", common).await?;
    let most = counts.iter().copied().max().unwrap_or(1);
    let sampler = launched.config.sampling.clone();
    let path = launched.model.path.clone();
    let model = launched.model.info.display_name();
    let handle = engine::spawn(launched.engine);
    let listening = serve::bind(&ServeConfig {
        listen: Some("127.0.0.1:0".into()),
        api_key_env: None,
        journal_requests: false,
        limits: Caps {
            max_per_client: most,
            max_queued: most,
            ..Caps::default()
        },
    })?;
    let url = format!("http://{}", listening.addr);
    let (_samples_tx, samples) = watch::channel(Default::default());
    let serving = serve::start(listening, handle, sampler.clone(), samples, None)?;
    let kiln = server_side(url, sampler.clone());
    let mut rounds = Vec::new();
    warm_up(&kiln).await?;
    for &n in counts {
        if !json {
            eprintln!("bench: kiln serve, {n} client(s)");
        }
        rounds.push(round(&kiln, n).await?);
    }
    let overhead = serving.served.borrow().overhead_us_per_token();
    drop(kiln);
    serving.stop();
    let peer_rounds = match peer {
        None => None,
        Some(binary) => {
            let server = Server::start(binary, &path, most, threads, CONTEXT_PER_STREAM).await?;
            let side = server_side(server.url.clone(), sampler.clone());
            warm_up(&side).await?;
            let mut peer_rounds = Vec::new();
            for &n in counts {
                if !json {
                    eprintln!("bench: llama-server --parallel {most}, {n} client(s)");
                }
                peer_rounds.push(round(&side, n).await?);
            }
            Some(peer_rounds)
        }
    };
    let report = ServeReport {
        model,
        threads,
        gen_tokens: GEN_TOKENS,
        kiln: rounds,
        peer: peer_rounds,
        overhead_us_per_token: overhead,
    };
    super::emit(&report, json, print_table)
}

fn job(client: usize, request: usize, stop: &watch::Receiver<bool>) -> Job {
    Job {
        earlier: Vec::new(),
        prompt: format!(
            "Client {client}, request {request}: describe a pottery technique in detail."
        ),
        max_tokens: GEN_TOKENS,
        background: false,
        first: None,
        stop: stop.clone(),
    }
}

async fn warm_up(side: &Start) -> Result<()> {
    let (_stop_tx, stop) = watch::channel(false);
    side(job(999, 0, &stop)).await.map_err(KilnError::Engine)?;
    Ok(())
}

/// `n` clients at once, each sending its requests one after another.
async fn round(side: &Start, n: usize) -> Result<ServeRound> {
    let (_stop_tx, stop) = watch::channel(false);
    let clients = (0..n).map(|c| {
        let (side, stop) = (side.clone(), stop.clone());
        async move {
            tokio::time::sleep(STAGGER * c as u32).await;
            let mut samples = Vec::new();
            for r in 0..REQUESTS_PER_CLIENT {
                if r > 0 {
                    tokio::time::sleep(PAUSE).await;
                }
                samples.push(side(job(c, r, &stop)).await?);
            }
            Ok::<_, String>(samples)
        }
    });
    let samples: Vec<Sample> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(KilnError::Engine)?
        .into_iter()
        .flatten()
        .collect();
    let start = samples.iter().map(|s| s.sent).min().expect("a request");
    let end = samples.iter().map(|s| s.end).max().expect("a request");
    let wall = (end - start).as_secs_f64().max(1e-9);
    let mut ttft: Vec<f64> = samples
        .iter()
        .map(|s| s.first.unwrap_or(s.end) - s.sent)
        .map(|d: Duration| d.as_secs_f64() * 1000.0)
        .collect();
    ttft.sort_by(f64::total_cmp);
    let at = |q: f64| ttft[((ttft.len() - 1) as f64 * q).round() as usize];
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    Ok(ServeRound {
        clients: n,
        requests: samples.len(),
        requests_per_s: samples.len() as f64 / wall,
        ttft_p50_ms: at(0.5),
        ttft_p90_ms: at(0.9),
        aggregate_tok_s: tokens as f64 / wall,
    })
}

fn print_table(r: &ServeReport) {
    println!(
        "kiln bench --serve · {} · {} threads · {} tokens an answer, sampled, streamed over HTTP",
        r.model, r.threads, r.gen_tokens
    );
    println!(
        "{:<14}{:>8}{:>10}{:>10}{:>12}{:>12}{:>12}",
        "", "clients", "requests", "req/s", "TTFT p50", "TTFT p90", "agg tok/s"
    );
    let print = |name: &str, rounds: &[ServeRound]| {
        for x in rounds {
            println!(
                "{name:<14}{:>8}{:>10}{:>10.2}{:>10.0}ms{:>10.0}ms{:>12.1}",
                x.clients,
                x.requests,
                x.requests_per_s,
                x.ttft_p50_ms,
                x.ttft_p90_ms,
                x.aggregate_tok_s
            );
        }
    };
    print("kiln serve", &r.kiln);
    if let Some(peer) = &r.peer {
        print("llama-server", peer);
        println!();
        println!(
            "{:<10}{:>16}{:>18}{:>14}",
            "clients", "TTFT p50 × peer", "agg tok/s × peer", "req/s × peer"
        );
        for (k, p) in r.kiln.iter().zip(peer) {
            println!(
                "{:<10}{:>16.2}{:>18.2}{:>14.2}",
                k.clients,
                k.ttft_p50_ms / p.ttft_p50_ms.max(1e-9),
                k.aggregate_tok_s / p.aggregate_tok_s.max(1e-9),
                k.requests_per_s / p.requests_per_s.max(1e-9)
            );
        }
    }
    match r.overhead_us_per_token {
        Some(us) => println!("\nkiln serve's own time per streamed token: {us:.1} µs"),
        None => println!("\nkiln serve's own time per streamed token: n/a (no tokens)"),
    }
}
