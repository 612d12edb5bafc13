//! The memory budget against the real process: SmolLM2 at three context
//! fills, predicted vs measured RSS. Memory, not time, so it is asserted.
//! Alone in its file: the RSS is this test process's.

mod common;

use common::*;
use kiln::budget::ModelShape;
use kiln::engine::kalosm::EngineOptions;
use kiln::engine::{CancelFlag, Engine, EngineEvent};

#[tokio::test(flavor = "multi_thread")]
async fn predicted_rss_is_within_15_percent_at_three_fills() {
    let model = model().await;
    let shape = ModelShape::from_gguf(&model.info);
    let mut e = kiln::engine::kalosm::KalosmEngine::load(
        &model,
        EngineOptions {
            sampler: greedy(1),
            ignore_eos: true,
            ..Default::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    let mut report = Vec::new();
    for fill in [256usize, 1024, 2048] {
        e.reset();
        let mut text = String::new();
        let mut i = 0;
        while e.count_tokens(&text) < fill {
            text.push_str(&format!("{i}: the kiln fires stoneware and glaze. "));
            i += 1;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        e.chat(1, text, &tx, &CancelFlag::default()).await;
        drop(tx);
        let mut stats = None;
        while let Some(ev) = rx.recv().await {
            if let EngineEvent::TurnFinished { stats: s, .. } = ev {
                stats = Some(s);
            }
        }
        let stats = stats.expect("the turn finished");
        report.push(rss_against_budget(&shape, fill, &stats));
    }
    for (line, err) in &report {
        assert!(err.abs() <= 0.15, "{line}");
    }
}
