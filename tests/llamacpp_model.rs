//! `LlamaCpp` as a kalosm model on the real SmolLM2: kalosm's own helpers
//! (`complete`, `chat`, parsers) drive it, sessions survive bytes, and the
//! KV cache grows in chunks without changing what the model says.

mod common;

use common::*;
use futures_util::StreamExt;
use kalosm_language_model::kalosm_sample::{Parse, RegexParser};
use kalosm_language_model::{
    ChatModelExt, ChatSession, CreateTextCompletionSession, GenerationParameters,
    StructuredTextCompletionModel, TextCompletionModel, TextCompletionModelExt,
    TextCompletionSession,
};
use kiln::budget::{grown_kv_cells, KvType};
use kiln::engine::llamacpp::{
    DraftSettings, Ended, LlamaCpp, LlamaCppSession, LlamaCppSettings, Sampling, Turn,
};
use kiln::engine::sampler::SamplerSettings;
use kiln::engine::template::ChatTemplate;
use kiln::engine::{CancelFlag, Priority};

async fn load(window: usize) -> LlamaCpp {
    load_with(window, KvType::F16).await
}

async fn load_with(window: usize, kv_type: KvType) -> LlamaCpp {
    let model = model().await;
    let info = &model.info;
    let template = ChatTemplate::for_file(info, None).unwrap();
    let settings = LlamaCppSettings {
        type_k: kv_type,
        type_v: kv_type,
        ..LlamaCppSettings::new(window, Some(template))
    };
    LlamaCpp::load(&model.path, settings).await.unwrap()
}

fn greedy_turn(max_new: usize) -> Turn {
    Turn {
        sampling: Sampling {
            settings: greedy(max_new as u32),
            banned: vec![],
        },
        max_new,
        cancel: CancelFlag::default(),
        turn: 1,
        priority: Priority::Interactive,
    }
}

/// Generate greedily from `session` after adding `text`; the tokens' text.
async fn continue_greedy(llm: &LlamaCpp, session: &mut LlamaCppSession, text: &str) -> Vec<String> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = out.clone();
    llm.stream_text_with_callback(session, text, greedy_turn(16), move |t| {
        sink.lock().unwrap().push(t);
        Ok(())
    })
    .await
    .unwrap();
    let tokens = out.lock().unwrap().clone();
    tokens
}

/// What `session` answers to `text`, sampled as `settings` say, at most
/// `max_new` tokens; and the session after it.
async fn answered(
    llm: &LlamaCpp,
    mut session: LlamaCppSession,
    text: &str,
    settings: SamplerSettings,
    max_new: usize,
) -> (String, LlamaCppSession) {
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    let turn = Turn {
        sampling: Sampling {
            settings,
            banned: vec![],
        },
        ..greedy_turn(max_new)
    };
    llm.stream_text_with_callback(&mut session, text, turn, move |t| {
        sink.lock().unwrap().push_str(&t);
        Ok(())
    })
    .await
    .unwrap();
    let text = out.lock().unwrap().clone();
    (text, session)
}

/// kalosm 0.4.1's completion builder never polls its task when awaited
/// as a future (its `IntoFuture` sets `result` and then only runs the task
/// when `result` is unset), so completions are read as the stream it also
/// is; its chat builder awaits fine.
#[tokio::test(flavor = "multi_thread")]
async fn kalosm_helpers_complete_chat_and_parse() {
    let _turn = one_engine_at_a_time().await;
    let llm = load(2048).await;

    let mut stream = llm.complete("The three primary colours are").with_sampler(
        GenerationParameters::default()
            .with_max_length(12)
            .with_seed(1),
    );
    let mut text = String::new();
    while let Some(token) = stream.next().await {
        text.push_str(&token);
    }
    assert!(!text.trim().is_empty(), "{text:?}");

    // A typed answer: kalosm's own number parser, and the value it read.
    let mut session = llm.new_session().unwrap();
    let n: u32 = llm
        .stream_text_with_callback_and_parser(
            &mut session,
            "Question: how many legs does a cat have? Answer (a number): ",
            GenerationParameters::default().with_seed(1),
            u32::new_parser(),
            |_| Ok(()),
        )
        .await
        .unwrap();
    assert!(
        session.text().ends_with(&n.to_string()),
        "{n} {:?}",
        session.text()
    );

    let mut chat = llm
        .chat()
        .with_system_prompt("You answer in one short sentence.");
    let first = chat("What colour is the sky on a clear day?")
        .with_sampler(
            GenerationParameters::default()
                .with_max_length(24)
                .with_seed(1),
        )
        .await
        .unwrap();
    assert!(!first.trim().is_empty());
    let second = chat("And at night?")
        .with_sampler(
            GenerationParameters::default()
                .with_max_length(24)
                .with_seed(1),
        )
        .await
        .unwrap();
    assert!(!second.trim().is_empty());
    let history = chat.session().unwrap().history();
    let contents: Vec<&str> = history.iter().map(|m| m.content()).collect();
    assert_eq!(history.len(), 5, "{contents:?}");
    assert_eq!(contents[2], first);
    assert_eq!(contents[4], second);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_constrained_run_returns_what_its_parser_read() {
    let _turn = one_engine_at_a_time().await;
    let llm = load(2048).await;
    let mut session = llm.new_session().unwrap();
    let parser = RegexParser::new(r"(yes|no)\.").unwrap();
    let prompt =
        "<|im_start|>user\nIs water wet? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n";
    let streamed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = streamed.clone();
    llm.stream_text_with_callback_and_parser(
        &mut session,
        prompt,
        greedy_turn(8),
        parser,
        move |t| {
            sink.lock().unwrap().push_str(&t);
            Ok(())
        },
    )
    .await
    .unwrap();
    let answer = streamed.lock().unwrap().clone();
    assert!(answer == "yes." || answer == "no.", "{answer:?}");
    assert_eq!(session.last_run().unwrap().ended, Ended::Complete);
}

/// A session written to bytes and read back in another model instance
/// loads llama.cpp's saved state instead of prefilling, and goes on
/// exactly as the original does.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_from_bytes_goes_on_where_it_was() {
    let _turn = one_engine_at_a_time().await;
    let prompt =
        "<|im_start|>user\nTell me about pottery kilns.<|im_end|>\n<|im_start|>assistant\n";
    let llm = load(2048).await;
    let mut session = llm.new_session().unwrap();
    llm.stream_text_with_callback(
        &mut session,
        prompt,
        GenerationParameters::default().with_max_length(0),
        |_| Ok(()),
    )
    .await
    .unwrap();
    let held = session.token_count();
    assert!(held > 10);
    let bytes = session.to_bytes().unwrap();
    let original = continue_greedy(&llm, &mut session, "").await;

    let other = load(2048).await;
    let mut restored = LlamaCppSession::from_bytes(&bytes).unwrap();
    assert_eq!(restored.token_count(), held);
    let again = continue_greedy(&other, &mut restored, "").await;
    assert_eq!(original, again);
    let run = restored.last_run().unwrap();
    // Everything but the last token (decoded again for its logits) came
    // from the saved state.
    assert_eq!((run.reused, run.prefilled), (held - 1, 1), "{run:?}");

    // A state cut short is refused by llama.cpp: the session is prefilled
    // instead and goes on the same.
    other.forget(&restored);
    let mut damaged = LlamaCppSession::from_bytes(&bytes[..bytes.len() - 1000]).unwrap();
    assert_eq!(continue_greedy(&other, &mut damaged, "").await, original);
    assert_eq!(damaged.last_run().unwrap().reused, 0);

    // Cut bytes are refused with a reason, not loaded half.
    let err = LlamaCppSession::from_bytes(&bytes[..20]).err().unwrap();
    assert!(err.to_string().contains("not a llama.cpp session"), "{err}");
}

/// The cache starts at 4,096 cells and doubles when a session outgrows it;
/// the tokens in it are copied across, so the model's next tokens are the
/// same as from a cache that was already big enough.
#[tokio::test(flavor = "multi_thread")]
async fn the_kv_cache_grows_without_changing_the_answer() {
    let _turn = one_engine_at_a_time().await;
    let lines: Vec<String> = (1..=420)
        .map(|i| format!("Log line {i}: the kiln reached cone {}.\n", i % 11))
        .collect();
    let head = lines[..250].concat();
    let tail = lines[250..].concat() + "Log line 421: the kiln reached cone";

    // Grown in the middle of a session: 250 lines fit in 4,096 cells, the
    // rest do not.
    let llm = load(8192).await;
    let mut session = llm.new_session().unwrap();
    let prefill = || GenerationParameters::default().with_max_length(0);
    llm.stream_text_with_callback(&mut session, &head, prefill(), |_| Ok(()))
        .await
        .unwrap();
    let before = session.last_run().unwrap();
    assert_eq!(before.kv_cells, 4096, "{before:?}");
    let grown = continue_greedy(&llm, &mut session, &tail).await;
    let after = session.last_run().unwrap();
    assert!(session.token_count() > 4096, "{}", session.token_count());
    assert_eq!(
        after.kv_cells as u64,
        grown_kv_cells(session.token_count() as u64, 8192)
    );
    assert_eq!(after.kv_cells, 8192);
    assert_eq!(after.reused, before.reused + before.prefilled);

    // Already big: another model grows its cache with a throwaway text,
    // then reads the same text in the same two steps (the same batches),
    // into cells it already has.
    let big = load(8192).await;
    let mut filler = big.new_session().unwrap();
    let throwaway = "pottery ".repeat(4500);
    big.stream_text_with_callback(&mut filler, &throwaway, prefill(), |_| Ok(()))
        .await
        .unwrap();
    assert_eq!(filler.last_run().unwrap().kv_cells, 8192);
    let mut fresh = big.new_session().unwrap();
    big.stream_text_with_callback(&mut fresh, &head, prefill(), |_| Ok(()))
        .await
        .unwrap();
    assert_eq!(fresh.last_run().unwrap().reused, 0);
    let reference = continue_greedy(&big, &mut fresh, &tail).await;
    assert_eq!(fresh.last_run().unwrap().kv_cells, 8192);
    assert_eq!(grown, reference);
}

/// `--kv-type q8_0`: the saved state (which is the KV cache's rows) takes
/// about 12,240 bytes a token where f16 takes 23,040, and the model still
/// answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_q8_0_cache_takes_about_half_the_bytes() {
    let _turn = one_engine_at_a_time().await;
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let mut sizes = Vec::new();
    for kv in [KvType::F16, KvType::Q8_0] {
        let llm = load_with(2048, kv).await;
        let mut session = llm.new_session().unwrap();
        let answer = continue_greedy(&llm, &mut session, prompt).await.concat();
        assert!(answer.contains("Paris"), "{kv:?}: {answer:?}");
        sizes.push(session.to_bytes().unwrap().len() as f64);
    }
    let ratio = sizes[1] / sizes[0];
    assert!((0.5..0.6).contains(&ratio), "{sizes:?}");
}

/// llama.cpp's sampler chain on the real model: a seed draws the same
/// answer again (and another seed another one), and top-k 1 at any
/// temperature is the greedy answer.
#[tokio::test(flavor = "multi_thread")]
async fn native_sampling_is_seeded_and_top_k_one_is_greedy() {
    let _turn = one_engine_at_a_time().await;
    let llm = load(2048).await;
    let prompt =
        "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n";
    let answer = |settings: SamplerSettings| {
        let llm = &llm;
        async move {
            let session = llm.new_session().unwrap();
            answered(llm, session, prompt, settings, 40).await.0
        }
    };
    let hot = |seed| SamplerSettings {
        temperature: 1.2,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(seed),
        ..SamplerSettings::default()
    };
    let a = answer(hot(11)).await;
    assert_eq!(a, answer(hot(11)).await, "one seed, one answer");
    let others = [answer(hot(12)).await, answer(hot(13)).await];
    assert!(
        others.iter().any(|o| *o != a),
        "other seeds: {a:?} {others:?}"
    );

    let greedy = answer(SamplerSettings {
        temperature: 0.0,
        ..SamplerSettings::default()
    })
    .await;
    let k1 = answer(SamplerSettings {
        temperature: 1.5,
        top_k: 1,
        seed: Some(5),
        ..SamplerSettings::default()
    })
    .await;
    assert!(!greedy.trim().is_empty());
    assert_eq!(k1, greedy);
}

/// Prompt lookup drafts from the context and verifies in one decode; what
/// the model writes is the same token for token as without it (greedy), on
/// prompts that quote their context and ones that do not. A session that
/// went on through rejected drafts then continues as the plain one does
/// (its cache and tokens agree), and a cancel lands within a token.
#[tokio::test(flavor = "multi_thread")]
async fn prompt_lookup_changes_nothing_but_the_decodes() {
    let _turn = one_engine_at_a_time().await;
    let llm = load(4096).await;
    let lookup = SamplerSettings {
        lookup: 8,
        ..greedy(48)
    };
    drafts_change_nothing_but_the_decodes(&llm, &llm, lookup).await;
}

#[tokio::test]
async fn a_draft_model_changes_nothing_but_the_decodes() {
    let _turn = one_engine_at_a_time().await;
    let plain = load(4096).await;
    let model = model().await;
    let template = ChatTemplate::for_file(&model.info, None).unwrap();
    // The model as its own draft: its drafts are mostly kept, and the
    // verify still decides every token.
    let settings = LlamaCppSettings {
        draft: Some(model.path.clone()),
        drafting: DraftSettings {
            max: 6,
            min: 0,
            p_min: 0.0,
            always: true,
        },
        ..LlamaCppSettings::new(4096, Some(template))
    };
    let speculative = LlamaCpp::load(&model.path, settings).await.unwrap();
    drafts_change_nothing_but_the_decodes(&plain, &speculative, greedy(48)).await;
}

#[tokio::test]
async fn a_draft_model_with_another_vocabulary_is_refused_in_one_line() {
    let _turn = one_engine_at_a_time().await;
    let model = model().await;
    let other = synthetic_gguf("llama", "spm").await;
    let settings = LlamaCppSettings {
        draft: Some(other.clone()),
        ..LlamaCppSettings::new(2048, None)
    };
    let e = LlamaCpp::load(&model.path, settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains(&other.display().to_string()), "{e}");
    assert!(e.contains(&model.path.display().to_string()), "{e}");
    assert!(e.contains("vocabulary"), "{e}");
}

/// Greedy answers with drafts (`spec`, drafting with `drafting`) are the
/// plain ones token for token, on five prompts and the turn after each,
/// some drafts are kept, and a cancel still lands within two tokens.
async fn drafts_change_nothing_but_the_decodes(
    plain_llm: &LlamaCpp,
    spec: &LlamaCpp,
    drafting: SamplerSettings,
) {
    let chat = |q: &str| format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    let prompts = [
        chat("Repeat this text exactly: the kiln fires stoneware at 1280 degrees, and the glaze melts into glass as it cools slowly overnight."),
        chat("Copy this list: apple, banana, cherry, apple, banana, cherry, apple, banana, cherry."),
        chat("Rewrite this code with better names: fn f(a: i32, b: i32) -> i32 { let c = a + b; c * c }"),
        chat("Write a short poem about the sea."),
        chat("What is the capital of France?"),
    ];
    let run =
        |llm: &LlamaCpp, settings: SamplerSettings, text: String, session: LlamaCppSession| {
            let llm = llm.clone();
            async move { answered(&llm, session, &text, settings, 48).await }
        };
    let plain = greedy(48);
    let (mut drafted, mut accepted) = (0, 0);
    let more = "<|im_end|>\n<|im_start|>user\nSay it again.<|im_end|>\n<|im_start|>assistant\n";
    for prompt in &prompts {
        // Plain first, its cells then dropped, so the drafted runs prefill
        // and go on from their own cells.
        let (a, plain_session) = run(
            plain_llm,
            plain.clone(),
            prompt.clone(),
            plain_llm.new_session().unwrap(),
        )
        .await;
        let plain_text = plain_session.text();
        let (c, plain_session) = run(plain_llm, plain.clone(), more.into(), plain_session).await;
        plain_llm.forget(&plain_session);
        let (b, spec_session) = run(
            spec,
            drafting.clone(),
            prompt.clone(),
            spec.new_session().unwrap(),
        )
        .await;
        assert_eq!(a, b, "{prompt:?}");
        assert_eq!(plain_text, spec_session.text());
        let report = spec_session.last_run().unwrap();
        drafted += report.drafted;
        accepted += report.accepted;
        // The next turn starts from the cells the drafts left.
        let (d, spec_session) = run(spec, drafting.clone(), more.into(), spec_session).await;
        assert_eq!(c, d, "the turn after {prompt:?}");
        spec.forget(&spec_session);
    }
    assert!(
        drafted > 0 && accepted > 0,
        "{drafted} drafted, {accepted} kept"
    );

    // Cancelled after the first streamed text: a token or two more at most.
    let cancel = CancelFlag::default();
    let (flag, streamed) = (
        cancel.clone(),
        std::sync::Arc::new(std::sync::Mutex::new(0usize)),
    );
    let count = streamed.clone();
    let turn = Turn {
        sampling: Sampling {
            settings: SamplerSettings {
                max_tokens: 200,
                ..drafting
            },
            banned: vec![],
        },
        cancel: cancel.clone(),
        ..greedy_turn(200)
    };
    let mut session = spec.new_session().unwrap();
    let _ = spec
        .stream_text_with_callback(&mut session, &prompts[1], turn, move |_| {
            *count.lock().unwrap() += 1;
            flag.cancel_through(1);
            Ok(())
        })
        .await;
    let n = *streamed.lock().unwrap();
    assert!((1..=2).contains(&n), "{n} pieces streamed after the cancel");
}
