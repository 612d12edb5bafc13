//! Agents that call tools in the model's own format: a scripted model that
//! thinks before it calls, makes two calls in one answer, is cut by its
//! token limit, and answers with no call; such a run resumed from its
//! journal; and the real model through a Qwen2.5 template, end to end.

mod common;

use std::time::Duration;

use kiln::agent::{self, resume, AgentSettings, Nobody, Outcome, Policy, Progress, RunSpec, Start};
use kiln::engine::fake::FakeEngine;
use kiln::engine::tool_format::ToolFormat;
use kiln::engine::{self, EngineHandle, Role, SamplerSettings};
use kiln::store::journal;
use kiln::store::session::{read_events, Event, RunHost};
use kiln::store::SessionStore;

fn call(name: &str, arguments: &str) -> String {
    format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {arguments}}}\n</tool_call>")
}

/// Run `start` on `engine` to its end, nobody to approve; its progress
/// and outcome.
async fn drive(
    start: Start,
    engine: EngineHandle,
    journal: journal::JournalHandle,
) -> (Vec<Progress>, Outcome) {
    common::run_headless(start, engine, journal, Nobody).await
}

fn spec(ws: &std::path::Path, steps: u32) -> RunSpec {
    let settings = AgentSettings {
        max_steps: steps,
        ..AgentSettings::default()
    };
    RunSpec::new(
        "Say what notes.txt holds.",
        ws.to_path_buf(),
        Policy::Auto,
        &settings,
        &SamplerSettings::default(),
        &Default::default(),
    )
}

/// Reasoning before two calls in one answer, the calls run in order and
/// their results go back in the tool role under their ids; an answer with
/// no call is asked again; a call cut by the token limit is said to be
/// so; the reasoning is reported and journaled with the answer.
#[tokio::test]
async fn a_scripted_model_thinks_calls_twice_in_one_answer_and_is_asked_again_for_a_call() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "glaze at cone 6\n").unwrap();
    let store = SessionStore {
        root: home.path().to_path_buf(),
    };
    let two = format!(
        "I will look at the folder, then read the notes.\n{}\n{}",
        call("list_dir", r#"{"path": "."}"#),
        call("read_file", r#"{"path": "notes.txt"}"#)
    );
    let cut = "Now I write it down.\n<tool_call>\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"out.txt\", \"content\": \"glaze";
    let script = [
        two.as_str(),
        "The notes say to glaze at cone 6. That is all.",
        cut,
        &call("finish", r#"{"summary": "notes.txt says glaze at cone 6"}"#),
    ];
    let fake = FakeEngine::new(script.iter().copied()).with_tool_format(ToolFormat::Hermes);
    let engine = engine::spawn(fake);
    let (journal, _) = store.start("fake", None, 4096, None).unwrap();
    let id = journal.id.clone();
    let (progress, outcome) = drive(Start::Fresh(spec(ws.path(), 10)), engine, journal).await;
    assert_eq!(
        outcome,
        Outcome::Finished("notes.txt says glaze at cone 6".into()),
        "{progress:#?}"
    );
    assert!(progress.contains(&Progress::Calls {
        native: Some(ToolFormat::Hermes)
    }));
    let thought = progress.iter().find_map(|p| match p {
        Progress::Thought { step, text } => Some((*step, text.clone())),
        _ => None,
    });
    assert_eq!(
        thought,
        Some((
            1,
            "I will look at the folder, then read the notes.".to_string()
        ))
    );
    let calls: Vec<(u32, String)> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Call { step, call, .. } => Some((*step, call.name().to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        calls,
        [
            (1, "list_dir".to_string()),
            (2, "read_file".to_string()),
            (5, "finish".to_string())
        ]
    );
    let invalid: Vec<(u32, String)> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Invalid { step, error, .. } => Some((*step, error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(invalid.len(), 2, "{invalid:?}");
    assert!(invalid[0].1.contains("called no tool"), "{invalid:?}");
    assert!(invalid[1].1.contains("cut"), "{invalid:?}");

    // The journal keeps the answer whole, reasoning and calls.
    let dir = store.resolve(Some(&id)).unwrap();
    let events = read_events(&dir.join("events.jsonl")).unwrap();
    let answers: Vec<&str> = events
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Answer { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(answers[0], two);
    // The resumed run's view of it is the live one's: the conversation
    // holds the two calls and then two tool results under their ids.
    let replay = resume::replay(&events.events, 4096).unwrap();
    let first_answer = replay
        .history
        .iter()
        .position(|m| m.role == Role::Assistant)
        .unwrap();
    let answer = &replay.history[first_answer];
    assert_eq!(
        answer.content,
        "I will look at the folder, then read the notes."
    );
    let ids: Vec<&str> = answer.tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    let results: Vec<Option<&str>> = replay.history[first_answer + 1..first_answer + 3]
        .iter()
        .map(|m| {
            assert_eq!(m.role, Role::Tool);
            m.tool_call_id.as_deref()
        })
        .collect();
    assert_eq!(results, [Some(ids[0]), Some(ids[1])]);
    assert!(replay.history[first_answer + 2]
        .content
        .contains("glaze at cone 6"));
    assert_eq!(
        replay.ended,
        Some(Outcome::Finished("notes.txt says glaze at cone 6".into()))
    );
}

/// A run cut between its two calls goes on: the call that finished keeps
/// its result, the one never reached is reported as not run, both under
/// their ids, and the model answers on.
#[tokio::test]
async fn a_native_run_cut_between_two_calls_resumes_without_running_either_again() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "cone 6\n").unwrap();
    let store = SessionStore {
        root: home.path().to_path_buf(),
    };
    let two = format!(
        "Two looks.\n{}\n{}",
        call("read_file", r#"{"path": "notes.txt"}"#),
        call("shell", r#"{"command": "touch ran.txt"}"#)
    );
    // The process died after the read's result: its journal as it was.
    let mut spec = spec(ws.path(), 10);
    spec.native = Some(ToolFormat::Hermes);
    let (journal, _) = store.start("fake", None, 4096, None).unwrap();
    let id = journal.id.clone();
    journal.event(Event::RunStarted {
        spec: serde_json::to_value(&spec).unwrap(),
        host: RunHost::Headless,
        resumed: false,
    });
    journal.event(Event::User {
        text: "Task: Say what notes.txt holds.".into(),
    });
    journal.event(Event::Answer {
        text: two.clone(),
        finish: kiln::chat::FinishReason::Stop,
        stats: kiln::engine::GenStats::default(),
    });
    journal.event(Event::ToolCall {
        step: 1,
        call: serde_json::json!({"tool": "read_file", "path": "notes.txt"}),
    });
    journal.event(Event::ToolResult {
        step: 1,
        ok: true,
        refused: false,
        output: "cone 6\n".into(),
        diff: None,
        interrupted: false,
    });
    tokio::task::spawn_blocking(move || journal.close())
        .await
        .unwrap();

    let r = resume::open(&store, &id).unwrap();
    assert_eq!(r.replay.interrupted.len(), 1);
    let cut = &r.replay.interrupted[0];
    assert_eq!(
        (cut.step, cut.journaled, cut.may_have_run),
        (2, false, false)
    );
    let ids: Vec<String> = r.replay.history[1]
        .tool_calls
        .iter()
        .map(|c| c.id.clone())
        .collect();
    assert_eq!(cut.id.as_deref(), Some(ids[1].as_str()));
    let (journal, _) = journal::spawn(r.session);
    let fake = FakeEngine::new([call("finish", r#"{"summary": "cone 6"}"#)])
        .with_tool_format(ToolFormat::Hermes);
    let (progress, outcome) = drive(
        Start::Resume(Box::new(r.replay)),
        engine::spawn(fake),
        journal,
    )
    .await;
    assert_eq!(outcome, Outcome::Finished("cone 6".into()), "{progress:#?}");
    assert!(
        !ws.path().join("ran.txt").exists(),
        "the shell call never ran"
    );
    let dir = store.resolve(Some(&id)).unwrap();
    let events = read_events(&dir.join("events.jsonl")).unwrap();
    let replay = resume::replay(&events.events, 4096).unwrap();
    let tools: Vec<(Option<&str>, bool)> = replay
        .history
        .iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| (m.tool_call_id.as_deref(), m.content.contains("did not run")))
        .collect();
    assert_eq!(
        tools,
        [
            (Some(ids[0].as_str()), false),
            (Some(ids[1].as_str()), true)
        ]
    );
}

/// The lazy grammar on llama.cpp: the answer is free until it writes the
/// trigger, then held to the call, then free again; the model's own words
/// before and after the call stay its own. A trigger the model is sure to
/// write (" the") stands in for `<tool_call>`, which a 135M model does not
/// write unprompted.
#[tokio::test(flavor = "multi_thread")]
async fn llama_cpp_holds_a_call_to_its_grammar_only_once_it_opens() {
    let _turn = common::one_engine_at_a_time().await;
    let options = kiln::engine::kalosm::EngineOptions {
        sampler: common::greedy(60),
        ..Default::default()
    };
    let engine = common::spawned_on(kiln::engine::local::Backend::LlamaCpp, options).await;
    let pattern = r#" \{"name": "read_file", "arguments": \{"path": "[a-z]{1,12}\.txt"\}\}"#;
    let turn = engine.respond(
        vec![kiln::engine::Message::new(
            Role::User,
            "Tell me about the sky and the sea.",
        )],
        Some(kiln::engine::Format::Calls {
            trigger: " the".into(),
            pattern: pattern.into(),
        }),
    );
    let reply = common::finish(turn).await;
    assert_eq!(reply.error, None);
    let (text, finish) = (reply.reply, reply.finish);
    let at = text
        .find(" the")
        .unwrap_or_else(|| panic!("no trigger in {text:?}"));
    let after = &text[at + " the".len()..];
    let call = regex::Regex::new(&format!("^{pattern}")).unwrap();
    let m = call
        .find(after)
        .unwrap_or_else(|| panic!("not held to the call: {text:?}"));
    // Free before the trigger, and free again after the call: the answer
    // goes on in the model's words (or ends) rather than stopping at it.
    assert!(!text[..at].contains("read_file"), "{text:?}");
    let rest = &after[m.end()..];
    assert!(
        !rest.is_empty() || finish == Some(kiln::chat::FinishReason::Stop),
        "{finish:?} {text:?}"
    );
}

/// SmolLM2 with Qwen2.5's chat template: the template lists the tools, the
/// run speaks `<tool_call>`, and every call the model opens is held to the
/// grammar, so each reads back as a valid call and runs. A model this small
/// may answer with no call at first; the next answer is then held to a
/// call from its first token, so the run makes calls either way.
#[tokio::test(flavor = "multi_thread")]
async fn smollm2_with_a_qwen_template_calls_tools_natively_end_to_end() {
    let _turn = common::one_engine_at_a_time().await;
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates/Qwen-Qwen2.5-7B-Instruct.jinja");
    let path = common::retemplated_model(Some(&template)).await;
    let paths = kiln::paths::Paths::resolve(None);
    let model = kiln::models::resolve(&kiln::models::ModelSpec::Local(path), &paths)
        .await
        .unwrap();
    let options = kiln::engine::kalosm::EngineOptions {
        sampler: SamplerSettings {
            max_tokens: 160,
            seed: Some(7),
            ..common::greedy(160)
        },
        ..Default::default()
    };
    let engine = engine::spawn(
        kiln::engine::llamacpp::LlamaCppEngine::load(&model, options)
            .await
            .unwrap(),
    );
    assert_eq!(engine.info().tool_format, Some(ToolFormat::Hermes));
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "glaze at cone 6\n").unwrap();
    let store = SessionStore {
        root: home.path().to_path_buf(),
    };
    let (journal, _) = store.start("smollm2-qwen", None, 4096, None).unwrap();
    let id = journal.id.clone();
    let mut spec = spec(ws.path(), 4);
    spec.sampler = engine::SamplerSettings {
        max_tokens: 160,
        ..common::greedy(160)
    };
    let run = tokio::time::timeout(
        Duration::from_secs(600),
        drive(Start::Fresh(spec), engine, journal),
    );
    let (progress, outcome) = run.await.expect("the run ends");
    for p in &progress {
        eprintln!("{}", agent::line(p));
    }
    assert!(
        progress.contains(&Progress::Calls {
            native: Some(ToolFormat::Hermes)
        }),
        "{progress:#?}"
    );
    assert!(
        !matches!(outcome, Outcome::Failed(_)),
        "{outcome:?} {progress:#?}"
    );
    let dir = store.resolve(Some(&id)).unwrap();
    let events = read_events(&dir.join("events.jsonl")).unwrap();
    let mut opened = 0;
    for (_, e) in &events.events {
        if let Event::Answer { text, finish, .. } = e {
            if text.contains("<tool_call>") && *finish != kiln::chat::FinishReason::MaxTokens {
                opened += 1;
                let parsed = ToolFormat::Hermes.parse(text);
                assert_eq!(parsed.problem, None, "{text}");
                assert!(!parsed.calls.is_empty(), "{text}");
            }
        }
    }
    let calls = events
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ToolCall { .. }))
        .count();
    assert!(opened >= 1 && calls >= 1, "{progress:#?}");
}
