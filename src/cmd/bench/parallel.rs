//! `kiln bench --parallel 1,2,4,8`: N conversations streaming at once on
//! one loaded model, and llama.cpp's own server (`--parallel N`, continuous
//! batching) on the same GGUF and thread count, driven the same way by N
//! concurrent streaming requests.
//!
//! Each round measures, for both:
//! - aggregate tokens/s: every stream's tokens over the round's wall time;
//! - per-stream tokens/s (median), from each stream's first token to its end;
//! - the KV cache the streams held;
//! - an interactive turn's time to first token and time per token while
//!   N−1 background streams decode (kiln runs those as agents do, at
//!   background priority; the server has no priorities).
//!
//! Both sides sample with the configured settings (the path users take,
//! not greedy) and ignore the end of the answer, so every stream decodes
//! the same number of tokens. Times are taken where a client sees them:
//! from sending the request to the first streamed text.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::cli::Common;
use crate::engine::{
    self, EngineCommand, EngineEvent, EngineHandle, GenStats, Priority, SamplerSettings,
};
use crate::error::{KilnError, Result};
use crate::host::launch::{launch, Launched};

/// Tokens each stream decodes.
const GEN_TOKENS: u32 = 200;
/// A background stream decodes this many times as long, so it is still
/// decoding when the interactive turn ends.
const BACKGROUND_FACTOR: u32 = 4;
/// Tokens of context each conversation gets.
pub(super) const CONTEXT_PER_STREAM: usize = 2048;

#[derive(Debug, Serialize)]
pub struct Round {
    pub streams: usize,
    pub aggregate_tok_s: f64,
    pub per_stream_tok_s: f64,
    /// Tokens the streams held in the KV cache at their ends.
    pub kv_tokens: usize,
    pub kv_mib: Option<f64>,
    /// The interactive turn beside N−1 background streams.
    pub interactive_ttft_ms: f64,
    pub interactive_ms_per_token: f64,
}

#[derive(Debug, Serialize)]
pub struct ParallelReport {
    pub model: String,
    pub threads: usize,
    pub gen_tokens: u32,
    pub kiln: Vec<Round>,
    /// llama-server's rounds, when its binary was given.
    pub peer: Option<Vec<Round>>,
}

/// One stream as a client saw it.
pub(super) struct Sample {
    pub(super) sent: Instant,
    pub(super) first: Option<Instant>,
    pub(super) end: Instant,
    pub(super) tokens: usize,
    /// Tokens the stream's conversation held in the KV cache at its end.
    pub(super) context: usize,
    /// kiln's own figures for the turn.
    pub(super) stats: Option<GenStats>,
    pub(super) reply: String,
}

pub(super) struct Job {
    /// The conversation's earlier questions and answers: empty for a new
    /// conversation, else the stream goes on with the one it had.
    pub(super) earlier: Vec<(String, String)>,
    pub(super) prompt: String,
    pub(super) max_tokens: u32,
    pub(super) background: bool,
    /// Told when the first text arrives.
    pub(super) first: Option<oneshot::Sender<()>>,
    /// Stop early when this turns true.
    pub(super) stop: watch::Receiver<bool>,
}

/// Starts one streaming request on a side of the benchmark.
pub(super) type Start =
    Arc<dyn Fn(Job) -> BoxFuture<'static, std::result::Result<Sample, String>> + Send + Sync>;

pub async fn run(
    counts: &[usize],
    peer: Option<&Path>,
    json: bool,
    common: &Common,
) -> Result<i32> {
    let (launched, threads) =
        launch_for(counts, "--parallel takes counts", "1,2,4,8", common).await?;
    let sampler = launched.config.sampling.clone();
    let kv_per_token = launched.shape().kv_per_token_engine();
    let path = launched.model.path.clone();
    let model = launched.model.info.display_name();
    let handle = engine::spawn(launched.engine);
    let kiln = kiln_side(handle, sampler.clone());
    let mut rounds = Vec::new();
    for &n in counts {
        if !json {
            eprintln!("bench: kiln, {n} stream(s)");
        }
        rounds.push(round(&kiln, n, Some(kv_per_token)).await?);
    }
    drop(kiln);
    let peer_rounds = match peer {
        None => None,
        Some(server) => {
            let mut peer_rounds = Vec::new();
            for &n in counts {
                if !json {
                    eprintln!("bench: llama-server --parallel {n}");
                }
                let server = Server::start(server, &path, n, threads, CONTEXT_PER_STREAM).await?;
                let side = server_side(server.url.clone(), sampler.clone());
                peer_rounds.push(round(&side, n, None).await?);
            }
            Some(peer_rounds)
        }
    };
    let report = ParallelReport {
        model,
        threads,
        gen_tokens: GEN_TOKENS,
        kiln: rounds,
        peer: peer_rounds,
    };
    super::emit(&report, json, print_table)
}

/// The model loaded for as many streams at once as the most of `counts`
/// (1 to 64; `what` and `example` say so otherwise), each a conversation
/// of its own of `CONTEXT_PER_STREAM` tokens, the end of the answer
/// ignored so every stream decodes as many tokens; and the threads.
pub(super) async fn launch_for(
    counts: &[usize],
    what: &str,
    example: &str,
    common: &Common,
) -> Result<(Launched, usize)> {
    let most = counts.iter().copied().max().unwrap_or(1);
    if counts.is_empty() || counts.contains(&0) || most > 64 {
        return Err(KilnError::BadArgument(format!(
            "{what} from 1 to 64, as {example}"
        )));
    }
    let mut common = common.clone();
    common.window.conversations = common.window.conversations.max(most as u32);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let launched = launch(&common, |o| {
        o.context = Some(CONTEXT_PER_STREAM);
        o.ignore_eos = true;
        o.system_prompt = None;
    })
    .await?;
    Ok((launched, threads))
}

/// A question per stream, each starting differently so no stream reuses
/// another's prompt.
fn prompt(round: usize, stream: usize) -> String {
    const TOPICS: &[&str] = &[
        "how a wood-fired kiln is loaded",
        "why glazes craze as they cool",
        "the history of stoneware in China",
        "how to wedge clay by hand",
        "what cones measure in a firing",
        "how raku firing differs from others",
        "why bisque firing comes first",
        "how potters mix their own glazes",
    ];
    format!(
        "Question {round}.{stream}: explain {} in detail.",
        TOPICS[(round + stream) % TOPICS.len()]
    )
}

/// One round of `n` streams: all at once, then an interactive turn beside
/// `n - 1` background ones.
async fn round(side: &Start, n: usize, kv_per_token: Option<u64>) -> Result<Round> {
    let (_stop_tx, stop) = watch::channel(false);
    let jobs = (0..n).map(|i| {
        side(Job {
            earlier: Vec::new(),
            prompt: prompt(n, i),
            max_tokens: GEN_TOKENS,
            background: false,
            first: None,
            stop: stop.clone(),
        })
    });
    let samples: Vec<Sample> = futures_util::future::join_all(jobs)
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(KilnError::Engine)?;
    let start = samples.iter().map(|s| s.sent).min().expect("a stream");
    let end = samples.iter().map(|s| s.end).max().expect("a stream");
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let kv_tokens: usize = samples.iter().map(|s| s.context).sum();
    let mut per_stream: Vec<f64> = samples.iter().filter_map(decode_rate).collect();
    per_stream.sort_by(f64::total_cmp);

    // The interactive turn, once every background stream is decoding.
    let (stop_tx, stop) = watch::channel(false);
    let mut background = Vec::new();
    let mut decoding = Vec::new();
    for i in 1..n {
        let (first, started) = oneshot::channel();
        decoding.push(started);
        background.push(tokio::spawn(side(Job {
            earlier: Vec::new(),
            prompt: prompt(n + 100, i),
            max_tokens: GEN_TOKENS * BACKGROUND_FACTOR,
            background: true,
            first: Some(first),
            stop: stop.clone(),
        })));
    }
    for started in decoding {
        let _ = started.await;
    }
    let interactive = side(Job {
        earlier: Vec::new(),
        prompt: prompt(n + 200, 0),
        max_tokens: GEN_TOKENS,
        background: false,
        first: None,
        stop: stop.clone(),
    })
    .await
    .map_err(KilnError::Engine)?;
    let _ = stop_tx.send(true);
    for b in background {
        let _ = b.await;
    }
    let first = interactive.first.unwrap_or(interactive.end);
    Ok(Round {
        streams: n,
        aggregate_tok_s: tokens as f64 / (end - start).as_secs_f64().max(1e-9),
        per_stream_tok_s: per_stream.get(per_stream.len() / 2).copied().unwrap_or(0.0),
        kv_tokens,
        kv_mib: kv_per_token.map(|b| (b * kv_tokens as u64) as f64 / (1 << 20) as f64),
        interactive_ttft_ms: (first - interactive.sent).as_secs_f64() * 1000.0,
        interactive_ms_per_token: (interactive.end - first).as_secs_f64() * 1000.0
            / (interactive.tokens.saturating_sub(1).max(1)) as f64,
    })
}

pub(super) fn decode_rate(s: &Sample) -> Option<f64> {
    let first = s.first?;
    let secs = (s.end - first).as_secs_f64();
    (s.tokens >= 2 && secs > 0.0).then(|| (s.tokens - 1) as f64 / secs)
}

/// kiln's side: each stream leases a conversation of the loaded model.
pub(super) fn kiln_side(handle: EngineHandle, sampler: SamplerSettings) -> Start {
    Arc::new(move |job: Job| {
        let (handle, sampler) = (handle.clone(), sampler.clone());
        Box::pin(async move {
            let lease = handle
                .lease()
                .ok_or("no free conversation: raise --conversations")?;
            let priority = match job.background {
                true => Priority::Background,
                false => Priority::Interactive,
            };
            if job.earlier.is_empty() {
                lease.send(EngineCommand::Reset);
            }
            lease.send(EngineCommand::SetPriority(priority));
            lease.send(EngineCommand::SetSampler(SamplerSettings {
                max_tokens: job.max_tokens,
                ..sampler
            }));
            let mut stop = job.stop;
            let mut first_tx = job.first;
            let sent = Instant::now();
            let mut first = None;
            let mut turn = lease.chat(job.prompt);
            loop {
                let event = tokio::select! {
                    event = turn.next() => event,
                    _ = stop.changed() => {
                        lease.cancel();
                        continue;
                    }
                };
                match event {
                    Some(EngineEvent::Token { .. }) => {
                        first.get_or_insert_with(Instant::now);
                        if let Some(tx) = first_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Some(EngineEvent::TurnFinished { stats, reply, .. }) => {
                        return Ok(Sample {
                            sent,
                            first,
                            end: Instant::now(),
                            tokens: stats.completion_tokens,
                            context: stats.context_tokens,
                            stats: Some(stats),
                            reply,
                        });
                    }
                    Some(EngineEvent::TurnFailed { error, .. }) => return Err(error),
                    Some(_) => {}
                    None => return Err("the turn ended without a result".into()),
                }
            }
        })
    })
}

/// llama-server's side: a streaming chat completion per stream, with the
/// same sampling, through its OpenAI-compatible API.
pub(super) fn server_side(url: String, sampler: SamplerSettings) -> Start {
    // A fresh connection per request: llama-server closes one after a
    // streamed answer, and a pooled one can be reused as it closes.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("a plain HTTP client builds");
    Arc::new(move |job: Job| {
        let (client, url, s) = (client.clone(), url.clone(), sampler.clone());
        Box::pin(async move {
            let mut messages = Vec::new();
            for (question, answer) in &job.earlier {
                messages.push(serde_json::json!({ "role": "user", "content": question }));
                messages.push(serde_json::json!({ "role": "assistant", "content": answer }));
            }
            messages.push(serde_json::json!({ "role": "user", "content": job.prompt }));
            let body = serde_json::json!({
                "messages": messages,
                "stream": true,
                "stream_options": { "include_usage": true },
                "max_tokens": job.max_tokens,
                "ignore_eos": true,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
                "min_p": s.min_p,
                "repeat_penalty": s.repeat_penalty,
                "repeat_last_n": s.repeat_last_n,
                "frequency_penalty": s.frequency_penalty,
                "presence_penalty": s.presence_penalty,
                "cache_prompt": true,
            });
            let sent = Instant::now();
            let response = client
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("llama-server: {e}"))?;
            if !response.status().is_success() {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let body: String = crate::visible::visible_line(&body)
                    .chars()
                    .take(200)
                    .collect();
                return Err(format!("llama-server answered {status}: {body}"));
            }
            let mut bytes = response.bytes_stream();
            let (mut stop, mut first_tx) = (job.stop, job.first);
            let (mut first, mut chunks, mut usage) = (None, 0usize, None);
            let mut reply = String::new();
            let mut pending = Vec::new();
            'read: loop {
                let chunk = tokio::select! {
                    chunk = bytes.next() => chunk,
                    _ = stop.changed() => break 'read,
                };
                let Some(chunk) = chunk else { break };
                pending.extend_from_slice(&chunk.map_err(|e| format!("llama-server: {e}"))?);
                while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=at).collect();
                    let Some(data) = line.strip_prefix(b"data: ") else {
                        continue;
                    };
                    let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else {
                        continue;
                    };
                    let text = event["choices"][0]["delta"]["content"].as_str();
                    if let Some(text) = text.filter(|t| !t.is_empty()) {
                        reply.push_str(text);
                        chunks += 1;
                        first.get_or_insert_with(Instant::now);
                        if let Some(tx) = first_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                        usage = Some((
                            u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                            u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                        ));
                    }
                }
            }
            let (tokens, prompt) = usage.unwrap_or((chunks, 0));
            Ok(Sample {
                sent,
                first,
                end: Instant::now(),
                tokens,
                context: prompt + tokens,
                stats: None,
                reply,
            })
        })
    })
}

/// A `llama-server` the benchmark started, stopped when dropped.
pub(super) struct Server {
    child: tokio::process::Child,
    pub(super) url: String,
}

impl Server {
    /// `binary` serving `model` to `parallel` streams of `context` tokens
    /// each.
    pub(super) async fn start(
        binary: &Path,
        model: &Path,
        parallel: usize,
        threads: usize,
        context: usize,
    ) -> Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| KilnError::Engine(format!("no free port for llama-server: {e}")))?
            .port();
        let dir = binary.parent().map(PathBuf::from).unwrap_or_default();
        let child = tokio::process::Command::new(binary)
            .env("LD_LIBRARY_PATH", &dir)
            .args(["-m", &model.display().to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["-c", &(context * parallel).to_string()])
            .args(["-np", &parallel.to_string(), "-b", "512", "-ub", "512"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| KilnError::Engine(format!("{}: {e}", binary.display())))?;
        let url = format!("http://127.0.0.1:{port}");
        let server = Server { child, url };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let health = client.get(format!("{}/health", server.url)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(KilnError::Engine(format!(
            "{} did not come up within 2 minutes",
            binary.display()
        )))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn print_table(r: &ParallelReport) {
    println!(
        "kiln bench --parallel · {} · {} threads · {} tokens a stream, sampled, streamed",
        r.model, r.threads, r.gen_tokens
    );
    println!(
        "{:<14}{:>8}{:>12}{:>12}{:>10}{:>10}{:>14}{:>12}",
        "", "streams", "agg tok/s", "each tok/s", "KV tok", "KV MiB", "inter. TTFT", "ms/token"
    );
    let print = |name: &str, rounds: &[Round]| {
        for x in rounds {
            println!(
                "{name:<14}{:>8}{:>12.1}{:>12.1}{:>10}{:>10}{:>12.0}ms{:>12.1}",
                x.streams,
                x.aggregate_tok_s,
                x.per_stream_tok_s,
                x.kv_tokens,
                x.kv_mib.map_or("n/a".into(), |m| format!("{m:.1}")),
                x.interactive_ttft_ms,
                x.interactive_ms_per_token
            );
        }
    };
    print("kiln", &r.kiln);
    if let Some(peer) = &r.peer {
        print("llama-server", peer);
        println!();
        println!(
            "{:<10}{:>18}{:>22}",
            "streams", "aggregate × peer", "interactive TTFT × 1"
        );
        let alone = r.kiln.first().map(|x| x.interactive_ttft_ms);
        for (k, p) in r.kiln.iter().zip(peer) {
            println!(
                "{:<10}{:>18.2}{:>22}",
                k.streams,
                k.aggregate_tok_s / p.aggregate_tok_s.max(1e-9),
                alone.map_or("n/a".into(), |a| format!(
                    "{:.2}",
                    k.interactive_ttft_ms / a
                ))
            );
        }
    }
}
