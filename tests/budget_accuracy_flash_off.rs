//! The llama.cpp engine's budget with flash attention off, when llama.cpp
//! holds a batch's attention scores in its compute buffer: predicted vs
//! measured RSS, as in `budget_accuracy_llamacpp`. Memory, not time, so it
//! is asserted. Alone in its file: the RSS is this test process's.

mod common;

use common::*;
use kiln::window::FlashAttn;

#[tokio::test(flavor = "multi_thread")]
async fn predicted_rss_is_within_15_percent_with_flash_attention_off() {
    for (line, err) in llamacpp_rss_report(FlashAttn::Off).await {
        assert!(err.abs() <= 0.15, "{line}");
    }
}
