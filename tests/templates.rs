//! Real chat templates (from llama.cpp's `models/templates/`) rendered by
//! kiln against golden strings that jinja2 renders the way Hugging Face
//! transformers does (`tests/fixtures/templates/render.py`).

mod common;

use std::path::{Path, PathBuf};

use kiln::engine::template::{ChatTemplate, Source};
use kiln::engine::{Message, Role};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

fn json(name: &str) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A case's messages as kiln keeps them: an answer's thinking stays in its
/// text, in the tags the model wrote.
fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("role {other}"),
            };
            let content = m["content"].as_str().unwrap();
            match m["reasoning_content"].as_str() {
                Some(thinking) => {
                    Message::new(role, format!("<think>\n{thinking}\n</think>\n\n{content}"))
                }
                None => Message::new(role, content),
            }
        })
        .collect()
}

#[test]
fn real_templates_render_as_transformers_renders_them() {
    let models = json("models.json");
    let cases = json("cases.json");
    let golden = fixtures().join("golden");
    let mut checked = 0;
    for (name, tokens) in &models {
        let source = std::fs::read_to_string(fixtures().join(format!("{name}.jinja"))).unwrap();
        for (case, spec) in &cases {
            let thinking = spec["kwargs"]["enable_thinking"].as_bool();
            let template = ChatTemplate::new(
                Source::File(&source),
                tokens["bos_token"].as_str(),
                tokens["eos_token"].as_str().unwrap(),
            )
            .unwrap()
            .with_thinking(thinking);
            let tools: Vec<Value> = spec["tools"].as_array().cloned().unwrap_or_default();
            let rendered = template.render_with_tools(
                &messages(spec),
                &tools,
                spec["add_generation_prompt"].as_bool().unwrap(),
            );
            let read =
                |ext: &str| std::fs::read_to_string(golden.join(format!("{name}.{case}.{ext}")));
            let (expected, merged, error) = (read("txt"), read("merged.txt"), read("error"));
            match (expected, merged, error) {
                (Ok(want), _, _) => {
                    assert_eq!(rendered.as_deref(), Ok(want.as_str()), "{name} {case}")
                }
                // The template refuses a system message: kiln sends it in
                // the first user message instead.
                (_, Ok(want), _) => {
                    assert_eq!(rendered.as_deref(), Ok(want.as_str()), "{name} {case}")
                }
                (_, _, Ok(message)) => {
                    let err = rendered.unwrap_err();
                    assert!(err.contains(&message), "{name} {case}: {err}");
                }
                _ => panic!("no golden for {name} {case}: run render.py"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, models.len() * cases.len());
}

#[test]
fn the_goldens_are_what_jinja2_renders() {
    let python = common::jinja_python();
    let out = std::process::Command::new(python)
        .arg(fixtures().join("render.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qwen3_thinking_switch_and_history() {
    let source = std::fs::read_to_string(fixtures().join("Qwen-Qwen3-0.6B.jinja")).unwrap();
    let make = |thinking| {
        ChatTemplate::new(Source::File(&source), None, "<|im_end|>")
            .unwrap()
            .with_thinking(thinking)
    };
    let ask = [Message::new(Role::User, "2+2?")];
    let off = make(Some(false)).render(&ask, true).unwrap();
    assert!(
        off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{off}"
    );
    for on in [None, Some(true)] {
        let text = make(on).render(&ask, true).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    }
    // An earlier answer's thinking does not go back to the model; the
    // answer does.
    let history = [
        Message::new(Role::User, "2+2?"),
        Message::new(Role::Assistant, "<think>\nadd them\n</think>\n\nFour."),
        Message::new(Role::User, "3+3?"),
    ];
    let text = make(None).render(&history, true).unwrap();
    assert!(!text.contains("add them"), "{text}");
    assert!(
        text.contains("<|im_start|>assistant\nFour.<|im_end|>"),
        "{text}"
    );
}
