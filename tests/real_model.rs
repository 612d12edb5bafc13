//! Both local engines (llama.cpp, kalosm) on the real SmolLM2 model: each
//! test below runs once per engine.

mod common;

use common::*;
use kiln::engine::kalosm::EngineOptions;
use kiln::engine::local::Backend;
use kiln::engine::{EngineEvent, FinishReason, SamplerSettings};

macro_rules! on_each_engine {
    ($($test:ident),* $(,)?) => {
        mod llamacpp {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $test() {
                let _turn = super::one_engine_at_a_time().await;
                super::$test(kiln::engine::local::Backend::LlamaCpp).await
            })*
        }
        mod kalosm {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $test() {
                let _turn = super::one_engine_at_a_time().await;
                super::$test(kiln::engine::local::Backend::Kalosm).await
            })*
        }
    };
}

on_each_engine!(
    answers_a_question,
    stats_are_consistent,
    same_seed_same_answer,
    second_turn_reuses_the_first_turns_kv_cache,
    cancel_stops_the_stream_within_two_tokens,
    a_full_context_drops_the_oldest_turns,
    a_cut_answer_is_continued_where_it_stopped,
    constrained_answers_match_their_pattern,
);

async fn answers_a_question(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            sampler: greedy(24),
            ..Default::default()
        },
    )
    .await;
    let t = ask(&h, "What is the capital of France?").await;
    assert_eq!(t.error, None);
    assert!(!t.reply.trim().is_empty());
    assert_eq!(t.reply, t.streamed(), "the reply is exactly what streamed");
    assert!(matches!(
        t.events[0],
        EngineEvent::TurnStarted {
            reused_tokens: 0,
            ..
        }
    ));
}

async fn stats_are_consistent(backend: Backend) {
    let mut e = local_engine(
        backend,
        EngineOptions {
            sampler: greedy(32),
            ..Default::default()
        },
    )
    .await;
    let t = {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = kiln::engine::CancelFlag::default();
        kiln::engine::Engine::chat(&mut e, 1, "Name three colours.".into(), &tx, &cancel).await;
        drop(tx);
        collect(&mut rx, 1).await
    };
    let s = &t.stats;
    assert!(s.prompt_tokens > 0 && s.completion_tokens > 1, "{s:?}");
    assert_eq!(
        s.completion_tokens,
        e.count_tokens(&t.reply),
        "completion tokens come from the tokenizer"
    );
    assert!(s.ttft_ms > 0.0 && s.ttft_ms <= s.total_ms, "{s:?}");
    for rate in [s.prefill_tok_s, s.decode_tok_s] {
        let r = rate.expect("measurable");
        assert!(r.is_finite() && r > 0.0, "{s:?}");
    }
    let stopped = t.finish == Some(FinishReason::Stop);
    // kalosm runs the end-of-turn token through the model too; llama.cpp
    // computes a token's KV only when the next one needs it, so an answer
    // cut at its limit has its last token outside the cache.
    let in_cache = match backend {
        Backend::Kalosm => s.completion_tokens + usize::from(stopped),
        Backend::LlamaCpp => s.completion_tokens - usize::from(!stopped),
    };
    assert_eq!(s.context_tokens, s.prompt_tokens + in_cache, "{s:?}");
}

async fn same_seed_same_answer(backend: Backend) {
    let options = EngineOptions {
        sampler: SamplerSettings {
            temperature: 0.9,
            seed: Some(1234),
            max_tokens: 24,
            ..Default::default()
        },
        ..Default::default()
    };
    let h = spawned_on(backend, options.clone()).await;
    let a = ask(&h, "Tell me something about cats.").await;
    h.send(kiln::engine::EngineCommand::Reset);
    let b = ask(&h, "Tell me something about cats.").await;
    assert!(!a.reply.is_empty());
    assert_eq!(a.reply, b.reply);
}

async fn second_turn_reuses_the_first_turns_kv_cache(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            sampler: greedy(16),
            ..Default::default()
        },
    )
    .await;
    let first = ask(&h, "My name is Ada and I keep a pottery kiln in my garden.").await;
    let second = ask(&h, "What is my name?").await;
    assert_eq!(second.error, None);
    let (s1, s2) = (&first.stats, &second.stats);
    assert_eq!(
        s2.reused_tokens, s1.context_tokens,
        "everything from turn 1 is reused"
    );
    // Only the new message and its template wrapping are prefilled.
    assert!(
        s2.prompt_tokens < 20,
        "turn 2 prefilled {} tokens",
        s2.prompt_tokens
    );
    assert!(s2.prompt_tokens < s1.prompt_tokens);
}

async fn cancel_stops_the_stream_within_two_tokens(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            sampler: greedy(400),
            ignore_eos: true,
            ..Default::default()
        },
    )
    .await;
    let mut turn = h.chat("Write a long story about a dragon who learns to make pottery.");
    let mut before = 0;
    while before < 3 {
        if let Some(EngineEvent::Token { .. }) = turn.next().await {
            before += 1;
        }
    }
    // Tokens already queued were generated before the cancel; take them
    // first so only what came after it is counted.
    while let Some(ev) = turn.try_next() {
        assert!(matches!(ev, EngineEvent::Token { .. }), "{ev:?}");
    }
    h.cancel();
    let t = finish(turn).await;
    let after = t
        .events
        .iter()
        .filter(|e| matches!(e, EngineEvent::Token { .. }))
        .count();
    assert_eq!(t.finish, Some(FinishReason::Cancelled));
    assert!(after <= 2, "{after} tokens arrived after the cancel");

    // The conversation goes on, and still reuses the cache.
    let next = ask(&h, "Now say hi.").await;
    assert_eq!(next.finish, Some(FinishReason::MaxTokens));
    assert_eq!(next.stats.reused_tokens, t.stats.context_tokens);
}

async fn a_full_context_drops_the_oldest_turns(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            context: Some(256),
            sampler: greedy(40),
            ..Default::default()
        },
    )
    .await;
    let message =
        "Tell me one fact about clay, glazes, kilns, firing schedules, cones and pottery wheels.";
    let mut trimmed = false;
    for _ in 0..8 {
        let t = ask(&h, message).await;
        assert_eq!(t.error, None);
        assert!(t.stats.context_tokens <= 256, "{:?}", t.stats);
        if t.events
            .iter()
            .any(|e| matches!(e, EngineEvent::ContextTrimmed { .. }))
        {
            trimmed = true;
            // kalosm's cache cannot be cut, so a trimmed conversation is
            // prefilled again from the start; llama.cpp's keeps the prefix
            // the new prompt shares with it.
            if backend == Backend::Kalosm {
                assert_eq!(t.stats.reused_tokens, 0);
            }
            break;
        }
    }
    assert!(trimmed, "eight turns overflow a 256-token window");

    let huge = "pottery ".repeat(400);
    let t = ask(&h, &huge).await;
    let err = t
        .error
        .expect("a message larger than the window fails cleanly");
    assert!(err.contains("context window holds 256"), "{err}");
    // and the engine is still usable afterwards
    assert_eq!(ask(&h, "Hi").await.error, None);
}

async fn a_cut_answer_is_continued_where_it_stopped(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            sampler: greedy(8),
            ..Default::default()
        },
    )
    .await;
    let first = ask(&h, "Count from one to twenty in words.").await;
    assert_eq!(first.finish, Some(FinishReason::MaxTokens));
    let turn = h.continue_last();
    let more = finish(turn).await;
    assert_eq!(more.error, None);
    assert!(
        more.reply.starts_with(&first.reply) && more.reply.len() > first.reply.len(),
        "{:?} then {:?}",
        first.reply,
        more.reply
    );
    // What streamed is only the new part.
    assert_eq!(format!("{}{}", first.reply, more.streamed()), more.reply);
    assert!(more.stats.completion_tokens > 0);
}

async fn constrained_answers_match_their_pattern(backend: Backend) {
    let h = spawned_on(
        backend,
        EngineOptions {
            sampler: greedy(40),
            ..Default::default()
        },
    )
    .await;
    let pattern = r#"\{"colour": "(red|green|blue)", "why": "[a-z ]{1,40}"\}"#;
    let turn = h.chat_constrained("Pick a colour and say why, as JSON.", pattern);
    let t = finish(turn).await;
    assert_eq!(t.error, None);
    let v: serde_json::Value =
        serde_json::from_str(&t.reply).unwrap_or_else(|e| panic!("{e}: {:?}", t.reply));
    assert!(
        ["red", "green", "blue"].contains(&v["colour"].as_str().unwrap()),
        "{v}"
    );
    // The next free-form turn still reuses the KV cache.
    let next = ask(&h, "Thanks.").await;
    assert_eq!(next.error, None);
    assert!(
        next.stats.reused_tokens >= t.stats.context_tokens,
        "{:?}",
        next.stats
    );
}
