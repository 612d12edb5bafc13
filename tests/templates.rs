//! Real chat templates (from llama.cpp's `models/templates/`) rendered by
//! kiln against golden strings that jinja2 renders the way Hugging Face
//! transformers does (`tests/fixtures/templates/render.py`).

mod common;

use std::path::{Path, PathBuf};

use kiln::chat::ToolCallMessage;
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
                "tool" => Role::Tool,
                other => panic!("role {other}"),
            };
            let content = m["content"].as_str().unwrap();
            let mut message = match m["reasoning_content"].as_str() {
                Some(thinking) => {
                    Message::new(role, format!("<think>\n{thinking}\n</think>\n\n{content}"))
                }
                None => Message::new(role, content),
            };
            message.tool_call_id = m["tool_call_id"].as_str().map(str::to_string);
            message.tool_calls = m["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ToolCallMessage {
                    id: c["id"].as_str().unwrap().into(),
                    name: c["function"]["name"].as_str().unwrap().into(),
                    arguments: c["function"]["arguments"].clone(),
                })
                .collect();
            message
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
            // As render.py chooses: tool-call cases for the templates
            // that speak them, tool-use templates only with tools.
            let only = |v: &Value, key: &str| {
                v.as_array()
                    .is_none_or(|names| names.iter().any(|n| n == key))
            };
            if !only(&spec["only"], name) || !only(&tokens["cases"], case) {
                continue;
            }
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
    assert_eq!(
        checked,
        std::fs::read_dir(&golden)
            .unwrap()
            .filter(|f| !f
                .as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".error"))
            .count()
    );
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

fn kiln(data: &Path, model: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--data-dir")
        .arg(data)
        .arg("--model")
        .arg(model)
        .args(args)
        .env_remove("KILN_MODEL")
        .output()
        .unwrap()
}

/// The real model under DeepSeek-R1's template, which ends its prompt inside
/// `<think>`: the answer is thinking from the first token, kept in its tags,
/// and `kiln ask` writes it to stderr, not to stdout; `--think off` closes
/// the block in the prompt and the answer is plain text.
#[tokio::test]
async fn a_prompt_that_opens_thinking_streams_it_apart() {
    let _turn = common::one_engine_at_a_time().await;
    let r1 = fixtures().join("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja");
    let model = common::retemplated_model(Some(&r1)).await;
    let data = tempfile::tempdir().unwrap();
    let args = ["--temperature", "0", "--max-tokens", "12", "--think", "on"];
    let events = kiln(
        data.path(),
        &model,
        &[&["ask", "--json", "What is 2+2?"][..], &args[..]].concat(),
    );
    assert!(
        events.status.success(),
        "{}",
        String::from_utf8_lossy(&events.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = events.iter().find(|e| e["event"] == "token").unwrap();
    assert!(
        first["text"].as_str().unwrap().starts_with("<think>"),
        "{first}"
    );
    let reply = events
        .iter()
        .find(|e| e["event"] == "turn_finished")
        .unwrap()["reply"]
        .as_str()
        .unwrap()
        .to_string();
    let split = kiln::engine::thinking::split(&reply);
    let thought = split.thinking.unwrap().trim();
    assert!(!thought.is_empty(), "{reply}");

    let plain = kiln(
        data.path(),
        &model,
        &[&["ask", "What is 2+2?"][..], &args[..]].concat(),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&plain.stdout),
        String::from_utf8_lossy(&plain.stderr),
    );
    assert!(stderr.contains(thought), "{stderr}");
    assert!(!stdout.contains(thought), "{stdout}");
    assert_eq!(
        stdout.trim(),
        split.answer.trim(),
        "stdout is the answer alone"
    );

    let off = kiln(
        data.path(),
        &model,
        &[
            "ask",
            "--json",
            "What is 2+2?",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--think",
            "off",
        ],
    );
    let first: Value = String::from_utf8_lossy(&off.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event"] == "token")
        .unwrap();
    assert!(
        !first["text"].as_str().unwrap().starts_with("<think>"),
        "{first}"
    );
}

/// A file without a template gets llama.cpp's built-in for its vocabulary
/// (SmolLM2's has ChatML's markers), and the status bar says so.
#[tokio::test]
async fn a_file_without_a_template_gets_llama_cpps_builtin() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::retemplated_model(None).await;
    let info = kiln::gguf::inspect(&model).unwrap();
    assert_eq!(info.chat_template, None);
    assert_eq!(info.builtin_template, Some("chatml"));
    let home = tempfile::tempdir().unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let cmd = format!(
        "KILN_HOME={} {} --model {} --temperature 0 --max-tokens 24; sleep 30",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.display()
    );
    let tmux = common::Tmux::start("builtin", 160, 40, &cmd);
    tmux.wait_for("the status bar's note", 90, |s| {
        s.contains("llama.cpp's chatml template (the file has none)")
    });
    tmux.send(&["Name a colour.", "Enter"]);
    let screen = tmux.wait_for("an answer", 120, |s| s.contains(" tok · "));
    assert!(!screen.contains("<|im_start|>"), "{screen}");
    tmux.send(&["C-q"]);
}

/// Each template that speaks tools: kiln reads which format it is, the
/// call grammar lets the model write its own call text, that text reads
/// back as the call, and the template renders the call and its result in
/// its own terms when the conversation goes on.
#[test]
fn native_tool_calls_round_trip_through_each_template() {
    use kiln::engine::context::answer_message;
    use kiln::engine::tool_format::{json as j, ToolFormat};
    let models = json("models.json");
    let tools = json("cases.json")["tools"]["tools"]
        .as_array()
        .unwrap()
        .clone();
    let cases = [
        ("Qwen-Qwen2.5-7B-Instruct", ToolFormat::Hermes),
        ("Qwen-Qwen3-0.6B", ToolFormat::Hermes),
        (
            "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
            ToolFormat::Hermes,
        ),
        ("meta-llama-Llama-3.1-8B-Instruct", ToolFormat::Llama3),
        ("mistralai-Mistral-Nemo-Instruct-2407", ToolFormat::Mistral),
    ];
    for (name, format) in cases {
        let source = std::fs::read_to_string(fixtures().join(format!("{name}.jinja"))).unwrap();
        assert_eq!(ToolFormat::detect(&source), Some(format), "{name}");
        let tokens = &models[name];
        let template = ChatTemplate::new(
            Source::File(&source),
            tokens["bos_token"].as_str(),
            tokens["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(template.tool_format(), Some(format), "{name}");
        let native = match format {
            ToolFormat::Hermes => "I will read it first.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}\n</tool_call>",
            ToolFormat::Llama3 => "{\"name\": \"read_file\", \"parameters\": {\"path\": \"notes.txt\"}}",
            ToolFormat::Mistral => "[TOOL_CALLS] [{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}]",
        };
        let grammar = format.after_trigger(&[
            format.call_json("read_file", r#"\{"path": "[a-z.]+"\}"#),
            format.call_json("shell", &format!(r#"\{{"command": {}\}}"#, j::string())),
        ]);
        let re = regex::Regex::new(&format!("^(?:{grammar})$")).unwrap();
        let at = native.find(format.trigger()).unwrap() + format.trigger().len();
        assert!(re.is_match(&native[at..]), "{name}: {}", &native[at..]);
        let answer = answer_message(native.to_string(), Some(format));
        assert_eq!(answer.tool_calls.len(), 1, "{name}");
        let call = &answer.tool_calls[0];
        assert_eq!(call.name, "read_file");
        assert_eq!(call.arguments, serde_json::json!({"path": "notes.txt"}));
        let conversation = [
            Message::new(Role::System, "You edit files."),
            Message::new(Role::User, "What is in notes.txt?"),
            answer.clone(),
            Message::tool(call.id.clone(), "Tool result (ok):\nGlazes craze."),
        ];
        let text = template
            .render_with_tools(&conversation, &tools, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains("\"name\": \"read_file\""), "{name}: {text}");
        assert!(text.contains("Glazes craze."), "{name}: {text}");
        let shown_call = match format {
            ToolFormat::Hermes => "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}\n</tool_call>".to_string(),
            ToolFormat::Llama3 => "{\"name\": \"read_file\", \"parameters\": {\"path\": \"notes.txt\"}}".to_string(),
            ToolFormat::Mistral => format!("[TOOL_CALLS][{{\"name\": \"read_file\", \"arguments\": {{\"path\": \"notes.txt\"}}, \"id\": \"{}\"}}]", call.id),
        };
        assert!(text.contains(&shown_call), "{name}: {text}");
    }
}
