//! Several conversations on one llama.cpp context, on the real SmolLM2:
//! runs in flight at once are decoded in the same batches and say what each
//! says alone; one cancelled leaves the other whole; a prefix one sequence
//! holds is copied to another, not computed again; and the KV budget is
//! shared, with a run that does not fit waiting for another to end.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use kalosm_language_model::{CreateTextCompletionSession, TextCompletionModel};
use kiln::engine::llamacpp::{
    Ended, LlamaCpp, LlamaCppSession, LlamaCppSettings, RunReport, Sampling, Turn,
};
use kiln::engine::template::ChatTemplate;
use kiln::engine::{CancelFlag, EngineEvent, Priority};

/// Tokens the batched and the lone runs must agree on. A sequence's cells
/// lie elsewhere in a cache shared with others, and flash attention sums
/// them in other tiles, so a near-tie can tip another way late in a long
/// answer (seen here after about 100 tokens of a 120-token story); the
/// first 40 agree token for token.
const AGREE: usize = 40;

async fn load(window: usize, sequences: usize, kv_budget: Option<usize>) -> LlamaCpp {
    let model = model().await;
    let template = ChatTemplate::for_file(&model.info, None).unwrap();
    let settings = LlamaCppSettings {
        sequences,
        kv_budget,
        ..LlamaCppSettings::new(window, Some(template))
    };
    LlamaCpp::load(&model.path, settings).await.unwrap()
}

fn prompt(question: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
}

fn turn(max_new: usize, cancel: &CancelFlag, banned: Vec<u32>) -> Turn {
    Turn {
        sampling: Sampling {
            settings: greedy(max_new as u32),
            banned,
        },
        max_new,
        cancel: cancel.clone(),
        turn: 1,
        priority: Priority::Interactive,
    }
}

/// What one run streamed, and its report (or error).
struct Out {
    pieces: Vec<String>,
    report: Result<RunReport, String>,
    ended: std::time::Instant,
}

/// Run `text` greedily on a new session; `on_piece` sees each piece's
/// index as it streams.
async fn run(
    llm: &LlamaCpp,
    text: &str,
    max_new: usize,
    cancel: &CancelFlag,
    on_piece: impl Fn(usize) + Send + Sync + 'static,
) -> Out {
    run_with(llm, text, max_new, cancel, vec![], on_piece).await
}

/// `run` past the end of the answer: exactly `max_new` tokens.
async fn run_all(llm: &LlamaCpp, text: &str, max_new: usize) -> Out {
    let none = CancelFlag::default();
    run_with(llm, text, max_new, &none, llm.end_tokens(), |_| {}).await
}

async fn run_with(
    llm: &LlamaCpp,
    text: &str,
    max_new: usize,
    cancel: &CancelFlag,
    banned: Vec<u32>,
    on_piece: impl Fn(usize) + Send + Sync + 'static,
) -> Out {
    let mut session: LlamaCppSession = llm.new_session().unwrap();
    let pieces = Arc::new(Mutex::new(Vec::new()));
    let sink = pieces.clone();
    let result = llm
        .stream_text_with_callback(
            &mut session,
            text,
            turn(max_new, cancel, banned),
            move |t| {
                let mut p = sink.lock().unwrap();
                p.push(t);
                on_piece(p.len());
                Ok(())
            },
        )
        .await;
    let report = result
        .map_err(|e| e.to_string())
        .map(|()| session.last_run().expect("a report"));
    let pieces = pieces.lock().unwrap().clone();
    Out {
        pieces,
        report,
        ended: std::time::Instant::now(),
    }
}

fn report(out: &Out) -> RunReport {
    *out.report.as_ref().expect("the run ends well")
}

fn text(out: &Out) -> String {
    out.pieces.concat()
}

fn first(out: &Out, n: usize) -> String {
    out.pieces.iter().take(n).cloned().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_conversations_decoded_together_say_what_each_says_alone() {
    let _turn = one_engine_at_a_time().await;
    let (a, b) = (
        prompt("Name three things a potter needs."),
        prompt("Why does clay shrink when it dries?"),
    );
    let none = CancelFlag::default();
    let alone = load(2048, 2, None).await;
    let a_alone = run(&alone, &a, AGREE, &none, |_| {}).await;
    let b_alone = run(&alone, &b, AGREE, &none, |_| {}).await;
    drop(alone);

    let llm = load(2048, 2, None).await;
    let (a_both, b_both) = tokio::join!(
        run(&llm, &a, AGREE, &none, |_| {}),
        run(&llm, &b, AGREE, &none, |_| {})
    );
    let (ra, rb) = (report(&a_both), report(&b_both));
    assert_eq!(ra.generated, report(&a_alone).generated);
    assert_eq!(text(&a_both), text(&a_alone));
    assert_eq!(text(&b_both), text(&b_alone));
    assert_eq!(rb.generated, report(&b_alone).generated);
    // Both were in the cache at once: neither reused the other's cells
    // (their prompts part after the system prompt, under the copy minimum).
    assert!(ra.prefilled > 20 && rb.prefilled > 20, "{ra:?} {rb:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_one_conversation_leaves_the_other_whole() {
    let _turn = one_engine_at_a_time().await;
    let (a, b) = (
        prompt("Describe how a kiln is fired, step by step."),
        prompt("List ten colours of glaze."),
    );
    let llm = load(2048, 2, None).await;
    let none = CancelFlag::default();
    let a_alone = run(&llm, &a, AGREE, &none, |_| {}).await;

    let cancel = CancelFlag::default();
    let stop = cancel.clone();
    let (a_both, b_cut) = tokio::join!(
        run(&llm, &a, AGREE, &none, |_| {}),
        run(&llm, &b, 200, &cancel, move |n| {
            if n == 5 {
                stop.cancel_through(1);
            }
        })
    );
    let cut = b_cut.report.unwrap();
    assert_eq!(cut.ended, Ended::Interrupted);
    assert!(cut.generated < 20, "{cut:?}");
    assert_eq!(report(&a_both).ended, report(&a_alone).ended);
    assert_eq!(text(&a_both), text(&a_alone));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefix_another_sequence_holds_is_copied_not_computed() {
    let _turn = one_engine_at_a_time().await;
    let rules: String = (1..=30)
        .map(|i| format!("Rule {i}: keep the kiln log tidy and dated.\n"))
        .collect();
    let system = format!("<|im_start|>system\n{rules}<|im_end|>\n");
    let ask = |q: &str| format!("{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    let (a, b) = (ask("What is rule 3?"), ask("Summarise the rules."));
    let none = CancelFlag::default();

    let alone = load(2048, 2, None).await;
    let b_alone = run(&alone, &b, 24, &none, |_| {}).await;
    let b_alone_report = b_alone.report.as_ref().unwrap();
    drop(alone);

    // b starts once a is generating, so a's sequence is busy and b gets
    // the other one, which holds nothing: the system prompt is copied.
    let llm = Arc::new(load(2048, 2, None).await);
    let started = Arc::new(tokio::sync::Notify::new());
    let go = started.clone();
    let first_piece = AtomicUsize::new(0);
    let (a_out, b_out) = tokio::join!(
        run(&llm, &a, 48, &none, move |n| {
            if n == 1 && first_piece.fetch_add(1, Ordering::SeqCst) == 0 {
                go.notify_one();
            }
        }),
        async {
            started.notified().await;
            run(&llm, &b, 24, &none, |_| {}).await
        }
    );
    a_out.report.unwrap();
    let rb = b_out.report.as_ref().unwrap();
    assert!(
        rb.reused >= 300 && rb.prefilled + rb.reused == b_alone_report.prefilled,
        "copied {} and prefilled {} of the {} tokens b prefills alone",
        rb.reused,
        rb.prefilled,
        b_alone_report.prefilled
    );
    assert_eq!(text(&b_out), text(&b_alone));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_does_not_fit_the_kv_budget_waits_and_the_others_go_on() {
    let _turn = one_engine_at_a_time().await;
    let questions = [
        prompt("What is stoneware?"),
        prompt("What is porcelain?"),
        prompt("What is earthenware?"),
    ];
    let alone = load(128, 3, None).await;
    let mut lone = Vec::new();
    for q in &questions {
        lone.push(run_all(&alone, q, 60).await);
    }
    drop(alone);
    let need: Vec<usize> = lone
        .iter()
        .map(|o| report(o).prefilled + report(o).generated)
        .collect();
    // Room for the two largest runs at once, not for all three.
    let mut sorted = need.clone();
    sorted.sort();
    let budget = sorted[1] + sorted[2] + 2;
    assert!(
        budget >= 128 && need.iter().sum::<usize>() > budget,
        "{need:?} in {budget}"
    );

    let llm = load(128, 3, Some(budget)).await;
    let (x, y, z) = tokio::join!(
        run_all(&llm, &questions[0], 60),
        run_all(&llm, &questions[1], 60),
        run_all(&llm, &questions[2], 60)
    );
    let runs = [&x, &y, &z];
    for (both, alone) in runs.into_iter().zip(&lone) {
        assert_eq!(first(both, AGREE), first(alone, AGREE));
        assert_eq!(report(both).generated, 60);
    }
    // One waited: its first token came after another run had ended.
    let last_start = runs.iter().map(|o| report(o).first_token.unwrap()).max();
    let first_end = runs.iter().map(|o| o.ended).min();
    assert!(last_start > first_end, "{last_start:?} {first_end:?}");
}

/// A turn a terminal waits on starts before a background one queued
/// earlier for memory, when it fits beside the runs in flight.
#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_turn_passes_a_background_one_waiting_for_memory() {
    let _turn = one_engine_at_a_time().await;
    let llm = Arc::new(load(256, 3, Some(256)).await);
    let background = |text: String, max_new: usize| {
        let llm = llm.clone();
        let none = CancelFlag::default();
        let banned = llm.end_tokens();
        async move {
            let mut session: LlamaCppSession = llm.new_session().unwrap();
            let mut t = turn(max_new, &none, banned);
            t.priority = Priority::Background;
            llm.stream_text_with_callback(&mut session, &text, t, |_| Ok(()))
                .await
                .unwrap();
            (session.last_run().unwrap(), std::time::Instant::now())
        }
    };
    // a runs; b (which may need 226 of the 256 cells) waits for it; c,
    // interactive and small, fits beside a and goes first.
    let started = Arc::new(tokio::sync::Notify::new());
    let go = started.clone();
    let a = tokio::spawn(background(prompt("Write a long story about a kiln."), 120));
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        go.notify_one();
    });
    started.notified().await;
    let b = tokio::spawn(background(prompt("Write a long poem about clay."), 200));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let c = run_all(&llm, &prompt("Name a glaze."), 40).await;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let c_first = report(&c).first_token.unwrap();
    assert_eq!(report(&c).generated, 40);
    assert_eq!((a.0.generated, b.0.generated), (120, 200));
    assert!(
        c_first < b.0.first_token.unwrap(),
        "the interactive turn went first"
    );
    assert!(
        b.0.first_token.unwrap() > a.1.min(c.ended),
        "b waited for room"
    );
}

/// The user's path: two conversations leased from one spawned engine
/// chat at once, each with its own stream.
#[tokio::test(flavor = "multi_thread")]
async fn two_leases_on_one_engine_chat_at_once() {
    let _turn = one_engine_at_a_time().await;
    let options = kiln::engine::kalosm::EngineOptions {
        sampler: greedy(24),
        ..Default::default()
    };
    let handle = spawned_on(kiln::engine::local::Backend::LlamaCpp, options).await;
    let first = handle.lease().expect("a conversation");
    let second = handle
        .lease()
        .expect("another conversation on the same model");
    assert_eq!(handle.seats().0, 2);
    let (a, b) = tokio::join!(
        finish(first.chat("Name a glaze colour.")),
        finish(second.chat("Name a kind of clay."))
    );
    for t in [&a, &b] {
        assert_eq!(t.error, None);
        assert!(!t.reply.trim().is_empty());
        assert!(t
            .events
            .iter()
            .all(|e| !matches!(e, EngineEvent::TurnFailed { .. })));
    }
    assert_ne!(a.reply, b.reply);
    drop((first, second));
    assert!(!handle.leased());
}
