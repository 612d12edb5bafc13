//! The memory budget against the real process, for the llama.cpp engine:
//! SmolLM2 in an 8,192-token window at three fills, the last past the first
//! 4,096 KV cells, so the cache has grown once. Predicted vs measured RSS.
//! Memory, not time, so it is asserted. Alone in its file: the RSS is this
//! test process's.

mod common;

use common::*;
use kiln::window::FlashAttn;

#[tokio::test(flavor = "multi_thread")]
async fn predicted_rss_is_within_15_percent_as_the_cache_grows() {
    for (line, err) in llamacpp_rss_report(FlashAttn::Auto).await {
        assert!(err.abs() <= 0.15, "{line}");
    }
}
