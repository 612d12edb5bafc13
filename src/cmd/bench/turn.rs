//! `kiln bench --turn`: the path users take. A chat turn at the end of a
//! ~1k-token conversation, sampled with the configured settings (by
//! default temperature 0.7, top-k 40, top-p 0.9, min-p 0.05, repeat
//! penalty 1.1), streamed through the engine's events as the workstation
//! receives them; and llama.cpp's own server beside it, streaming the same
//! chat completion with the same settings, on the same GGUF and threads.
//!
//! The warm-up turn asks about the notes, so it prefills the whole
//! conversation (its TTFT is reported as the cold one); each run after it
//! asks one more question in the same conversation, as a chat goes on:
//! kiln keeps the conversation, and llama-server is sent the whole history
//! each time, as a chat client does, and reuses its cached prefix. Both
//! ignore the end of the answer, so every run decodes the same number of
//! tokens.
//!
//! kiln also reports where a token's time goes outside llama.cpp's decode:
//! in the sampler chain, and in everything else it does per token
//! (detokenising, stop checks, prefix bookkeeping, events).

use std::path::Path;

use serde::Serialize;
use tokio::sync::watch;

use super::parallel::{decode_rate, kiln_side, server_side, Job, Sample, Server, Start};
use super::Figure;
use crate::cli::Common;
use crate::engine;
use crate::error::{KilnError, Result};
use crate::host::launch::launch;

#[derive(Debug, Serialize)]
pub struct Side {
    /// The warm-up run's time to first token: the whole conversation
    /// prefilled.
    pub cold_ttft_ms: f64,
    pub ttft_ms: Figure,
    pub decode_tok_s: Figure,
}

/// Where kiln's time per generated token goes, medians over the runs.
#[derive(Debug, Serialize)]
pub struct PerToken {
    /// A token's time, from the first token to the last.
    pub token_ms: f64,
    /// In the sampler chain.
    pub sampling_ms: f64,
    /// Everything outside llama.cpp's decode, sampling included.
    pub outside_decode_ms: f64,
    /// With --lookup or --draft: tokens drafted over the runs, those kept, and times
    /// drafting rested for not paying.
    pub drafted: usize,
    pub accepted_drafts: usize,
    pub drafting_rested: usize,
}

#[derive(Debug, Serialize)]
pub struct TurnReport {
    pub model: String,
    pub vocabulary: usize,
    pub threads: usize,
    pub runs: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: u32,
    pub kiln: Side,
    pub per_token: Option<PerToken>,
    /// llama-server's runs, when its binary was given.
    pub peer: Option<Side>,
}

pub async fn run(
    runs: usize,
    prompt_tokens: usize,
    gen_tokens: u32,
    peer: Option<&Path>,
    json: bool,
    common: &Common,
) -> Result<i32> {
    if runs == 0 || gen_tokens < 2 || prompt_tokens == 0 {
        return Err(KilnError::BadArgument(
            "bench --turn needs --runs >= 1, --gen-tokens >= 2 and --prompt-tokens >= 1".into(),
        ));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The notes, then each turn's question and answer.
    let context = prompt_tokens + (runs + 1) * (gen_tokens as usize + 64) + 256;
    let launched = launch(common, |o| {
        o.context = Some(context);
        o.ignore_eos = true;
        o.system_prompt = None;
    })
    .await?;
    let sampler = launched.config.sampling.clone();
    let path = launched.model.path.clone();
    let model = launched.model.info.display_name();
    let vocabulary = launched.model.info.vocab_size;
    let notes = super::build_prompt(&launched.engine, prompt_tokens);
    let handle = engine::spawn(launched.engine);
    let kiln = kiln_side(handle, sampler.clone());
    if !json {
        eprintln!("bench --turn: kiln, {runs} runs after a warm-up");
    }
    let samples = turns(&kiln, &notes, runs, gen_tokens).await?;
    drop(kiln);
    let per_token = per_token(&samples[1..]);
    let kiln = side(&samples)?;
    let peer = match peer {
        None => None,
        Some(binary) => {
            if !json {
                eprintln!("bench --turn: llama-server, {runs} runs after a warm-up");
            }
            // Answers sent back as text can take more tokens than they were
            // (a random model's noise splits into bytes).
            let server = Server::start(binary, &path, 1, threads, context * 2).await?;
            let server_side = server_side(server.url.clone(), sampler);
            Some(side(&turns(&server_side, &notes, runs, gen_tokens).await?)?)
        }
    };
    let report = TurnReport {
        model,
        vocabulary,
        threads,
        runs,
        prompt_tokens,
        gen_tokens,
        kiln,
        per_token,
        peer,
    };
    super::emit(&report, json, print_table)
}

/// Follow-up questions, one a turn.
const QUESTIONS: &[&str] = &[
    "Which of these notes matters most to a potter, and why?",
    "Explain the note about thermal shock in more detail.",
    "How would you teach the note about cones to a beginner?",
    "What would go wrong if the damper were left open?",
    "Summarise what we discussed so far in a few sentences.",
];

/// A warm-up turn about `notes`, and `runs` follow-up turns in the same
/// conversation.
async fn turns(side: &Start, notes: &str, runs: usize, gen_tokens: u32) -> Result<Vec<Sample>> {
    let (_stop_tx, stop) = watch::channel(false);
    let mut samples = Vec::new();
    let mut earlier: Vec<(String, String)> = Vec::new();
    for run in 0..=runs {
        let prompt = match run {
            0 => notes.to_string(),
            n => QUESTIONS[(n - 1) % QUESTIONS.len()].to_string(),
        };
        let sample = side(Job {
            earlier: earlier.clone(),
            prompt: prompt.clone(),
            max_tokens: gen_tokens,
            background: false,
            first: None,
            stop: stop.clone(),
        })
        .await
        .map_err(KilnError::Engine)?;
        earlier.push((prompt, sample.reply.clone()));
        samples.push(sample);
    }
    Ok(samples)
}

fn ttft_ms(s: &Sample) -> f64 {
    (s.first.unwrap_or(s.end) - s.sent).as_secs_f64() * 1000.0
}

/// A side's figures: the warm-up's TTFT, and the measured runs'.
fn side(samples: &[Sample]) -> Result<Side> {
    let measured = &samples[1..];
    let none = || KilnError::Engine("no run streamed two tokens".into());
    Ok(Side {
        cold_ttft_ms: ttft_ms(&samples[0]),
        ttft_ms: Figure::of(measured.iter().map(ttft_ms).collect()).ok_or_else(none)?,
        decode_tok_s: Figure::of(measured.iter().filter_map(decode_rate).collect())
            .ok_or_else(none)?,
    })
}

/// kiln's time per token outside the decode, from the engine's own
/// figures: the turn's time less its decode calls, over its tokens.
fn per_token(samples: &[Sample]) -> Option<PerToken> {
    let median = |values: Vec<f64>| Figure::of(values).map(|f| f.median);
    let stats: Vec<_> = samples
        .iter()
        .filter_map(|s| s.stats.as_ref().filter(|s| s.completion_tokens > 0))
        .collect();
    let per = |f: &dyn Fn(&crate::engine::GenStats) -> Option<f64>| {
        median(
            stats
                .iter()
                .filter_map(|s| f(s).map(|ms| ms / s.completion_tokens as f64))
                .collect(),
        )
    };
    Some(PerToken {
        token_ms: median(
            samples
                .iter()
                .filter_map(decode_rate)
                .map(|r| 1000.0 / r)
                .collect(),
        )?,
        sampling_ms: per(&|s| s.sample_ms)?,
        outside_decode_ms: per(&|s| s.decode_ms.map(|d| (s.total_ms - d).max(0.0)))?,
        drafted: stats.iter().map(|s| s.drafted).sum(),
        accepted_drafts: stats.iter().map(|s| s.accepted_drafts).sum(),
        drafting_rested: stats.iter().map(|s| s.drafting_rested).sum(),
    })
}

fn print_table(r: &TurnReport) {
    println!(
        "kiln bench --turn · {} · vocabulary {} · {} threads · {} runs · ~{} tok conversation · {} tok answers, sampled, streamed",
        r.model, r.vocabulary, r.threads, r.runs, r.prompt_tokens, r.gen_tokens
    );
    println!(
        "{:<14}{:>14}{:>12}{:>16}",
        "", "cold TTFT ms", "TTFT ms", "decode tok/s"
    );
    let row = |name: &str, s: &Side| {
        println!(
            "{name:<14}{:>14.0}{:>12.0}{:>16.1}",
            s.cold_ttft_ms, s.ttft_ms.median, s.decode_tok_s.median
        );
    };
    row("kiln", &r.kiln);
    if let Some(peer) = &r.peer {
        row("llama-server", peer);
        println!(
            "{:<14}{:>14.2}{:>12.2}{:>16.2}",
            "kiln × peer",
            r.kiln.cold_ttft_ms / peer.cold_ttft_ms.max(1e-9),
            r.kiln.ttft_ms.median / peer.ttft_ms.median.max(1e-9),
            r.kiln.decode_tok_s.median / peer.decode_tok_s.median.max(1e-9)
        );
    }
    if let Some(p) = &r.per_token {
        let share = |ms: f64| ms * 100.0 / p.token_ms.max(1e-9);
        println!(
            "per token (kiln): {:.2} ms · sampling {:.3} ms ({:.1}%) · outside llama.cpp's decode {:.3} ms ({:.1}%)",
            p.token_ms,
            p.sampling_ms,
            share(p.sampling_ms),
            p.outside_decode_ms,
            share(p.outside_decode_ms)
        );
        if p.drafted > 0 {
            println!(
                "drafts: {} drafted, {} kept ({:.0}%), rested {} time(s) for not paying",
                p.drafted,
                p.accepted_drafts,
                p.accepted_drafts as f64 * 100.0 / p.drafted as f64,
                p.drafting_rested
            );
        }
    }
}
