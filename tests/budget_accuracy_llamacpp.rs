//! The memory budget against the real process, for the llama.cpp engine:
//! SmolLM2 in an 8,192-token window at three fills, the last past the first
//! 4,096 KV cells, so the cache has grown once. Predicted vs measured RSS.
//! Memory, not time, so it is asserted. Alone in its file: the RSS is this
//! test process's.

mod common;

use common::*;
use kiln::budget::{KvLayout, KvType, ModelShape};
use kiln::engine::kalosm::EngineOptions;
use kiln::engine::llamacpp::LlamaCppEngine;
use kiln::engine::{CancelFlag, Engine, EngineEvent};

#[tokio::test(flavor = "multi_thread")]
async fn predicted_rss_is_within_15_percent_as_the_cache_grows() {
    let model = model().await;
    let window = 8192;
    let shape = ModelShape::from_gguf(&model.info).with_kv_layout(KvLayout::Gqa {
        window,
        k: KvType::F16,
        v: KvType::F16,
    });
    let mut e = LlamaCppEngine::load(
        &model,
        EngineOptions {
            sampler: greedy(1),
            ignore_eos: true,
            context: Some(window as usize),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut report = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    for fill in [256usize, 2048, 5000] {
        // One growing conversation: each turn adds to the last.
        while e.count_tokens(&text) < fill {
            text.push_str(&format!("{i}: the kiln fires stoneware and glaze. "));
            i += 1;
        }
        e.reset();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        e.chat(1, text.clone(), &tx, &CancelFlag::default()).await;
        drop(tx);
        let mut stats = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                EngineEvent::TurnFinished { stats: s, .. } => stats = Some(s),
                EngineEvent::TurnFailed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        let stats = stats.expect("the turn finished");
        report.push(rss_against_budget(&shape, fill, &stats));
    }
    for (line, err) in &report {
        assert!(err.abs() <= 0.15, "{line}");
    }
}
