//! `kiln serve` as its users meet it: the official `openai` Python client
//! (streaming, usage, a tool call, a JSON schema, a closed stream, eight
//! clients at once), kiln's own remote engine and `kiln ps` at the other
//! end, and hostile input, each answered with a status and a JSON error
//! while the node goes on serving. All on the real model.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::KilnNode;

const KEY: &str = "sk-kiln-test-0123456789abcdef";

/// SmolLM2 with Qwen2.5's chat template, which lists tools.
async fn tool_model() -> std::path::PathBuf {
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates/Qwen-Qwen2.5-7B-Instruct.jinja");
    common::retemplated_model(Some(&template)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_client_streams_calls_a_tool_holds_a_schema_cancels_and_serves_eight() {
    let _turn = common::one_engine_at_a_time().await;
    let node = KilnNode::start(&tool_model().await, Some(KEY), &[]).await;
    let python = tokio::task::spawn_blocking(common::openai_python)
        .await
        .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/serve/openai_client.py");
    let base = node.base_url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([&base, KEY])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen:#}");

    let whole = &seen["whole"];
    assert!(!whole["content"].as_str().unwrap().is_empty(), "{whole}");
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let streamed = &seen["streamed"];
    assert!(
        !streamed["content"].as_str().unwrap().is_empty(),
        "{streamed}"
    );
    assert!(streamed["chunks"].as_u64().unwrap() > 3, "{streamed}");
    assert!(
        streamed["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{streamed}"
    );
    // The resent conversation's prefix came from the KV cache.
    let cached = seen["again_usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 10, "{}", seen["again_usage"]);

    let tool = &seen["tool"];
    assert_eq!(tool["finish"], "tool_calls", "{tool}");
    assert_eq!(tool["calls"][0]["name"], "get_weather", "{tool}");
    assert!(tool["calls"][0]["arguments"]["city"].is_string(), "{tool}");
    assert!(seen["after_tool"]["finish"].is_string(), "{seen}");

    assert_eq!(seen["schema"]["valid"], true, "{}", seen["schema"]);

    // The closed stream's turn stopped within moments, not 400 tokens on.
    let cancel = &seen["cancel"];
    assert_eq!(cancel["busy"], 0, "{cancel}");
    assert!(cancel["idle_after_s"].as_f64().unwrap() < 2.0, "{cancel}");

    let eight = seen["eight"].as_array().unwrap();
    assert_eq!(eight.len(), 8);
    assert!(
        eight.iter().all(|f| f == "stop" || f == "length"),
        "{eight:?}"
    );

    assert_eq!(seen["wrong_key"], 401);
    assert_eq!(seen["unknown_model"], 404);
    assert!(!node.log().contains(KEY));
}

/// A tool round trip on every template with a call format (Hermes,
/// Llama 3.1, Mistral): the call comes back with an id of the answer's own
/// (two answers making one call give two ids), and the history goes back
/// with that id or with any a client makes up (OpenAI's `call_…`, another
/// server's long ones, odd characters) without the template refusing it.
#[tokio::test(flavor = "multi_thread")]
async fn a_tool_round_trip_holds_on_every_call_format_whatever_the_clients_ids() {
    let _turn = common::one_engine_at_a_time().await;
    for template in [
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/templates")
            .join(template);
        let node = KilnNode::start(&common::retemplated_model(Some(&path)).await, None, &[]).await;
        let port = node.port;
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }}]);
        let ask = serde_json::json!({"role": "user", "content": "What is the weather in Paris?"});
        let chat = |messages: serde_json::Value, choice: &str| {
            let body = serde_json::json!({
                "messages": messages, "tools": tools, "tool_choice": choice,
                "max_tokens": 40, "temperature": 0,
            });
            post(
                port,
                "/v1/chat/completions",
                None,
                body.to_string().as_bytes(),
            )
        };
        let log = || format!("{template}: {}", node.log());
        let call = |reply: &(u16, serde_json::Value)| {
            assert_eq!(reply.0, 200, "{}\n{}", reply.1, log());
            let choice = &reply.1["choices"][0];
            assert_eq!(
                choice["finish_reason"], "tool_calls",
                "{template}: {choice}"
            );
            let call = choice["message"]["tool_calls"][0].clone();
            assert_eq!(
                call["function"]["name"], "get_weather",
                "{template}: {call}"
            );
            let id = call["id"].as_str().unwrap().to_string();
            assert!(
                id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{template}: {id}"
            );
            (call, id)
        };
        let (made, first) = call(&chat(serde_json::json!([ask]), "required"));
        let (_, second) = call(&chat(serde_json::json!([ask]), "required"));
        assert_ne!(first, second, "{template}: two answers, one id");

        for id in [
            first.as_str(),
            "call_Zt4mQ8xv2LkP0aWn7RcJ1bYe",
            "0123456789abcdef0123456789abcdef",
            "x",
            "id with spaces, \"quotes\" and ünïcode",
        ] {
            let mut call = made.clone();
            call["id"] = id.into();
            let history = serde_json::json!([
                ask,
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": id, "content": "Sunny, 21 C."},
            ]);
            let reply = chat(history, "auto");
            assert_eq!(
                reply.0,
                200,
                "{template}, id {id:?}: {}\n{}",
                reply.1,
                log()
            );
            assert!(
                reply.1["choices"][0]["finish_reason"].is_string(),
                "{}",
                reply.1
            );
        }
    }
}

/// One HTTP/1.1 exchange on a fresh connection: the status and body.
fn exchange(port: u16, head: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    // The node may answer before it has read it all; a refused rest is fine.
    let _ = s.write_all(body);
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> (u16, serde_json::Value) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|len| got.len() >= end + 4 + len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn post(port: u16, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, serde_json::Value) {
    let auth = auth.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    exchange(port, &head, body)
}

/// The error body every refusal carries.
fn assert_error(reply: &(u16, serde_json::Value), status: u16, case: &str) {
    assert_eq!(reply.0, status, "{case}: {}", reply.1);
    let message = reply.1["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{case}: no JSON error: {}", reply.1);
}

fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_a_status_and_a_json_error_and_the_node_keeps_serving() {
    let _turn = common::one_engine_at_a_time().await;
    raise_open_files();
    let model = common::model().await.path;
    let node = KilnNode::start(&model, Some(KEY), &[]).await;
    let port = node.port;
    let good = br#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}"#;
    let served = move || post(port, "/v1/chat/completions", Some(KEY), good);
    tokio::task::spawn_blocking(move || {
        assert_eq!(served().0, 200, "a good request first");
        let chat = "/v1/chat/completions";
        let cases: Vec<(&str, (u16, serde_json::Value), u16)> = vec![
            ("malformed JSON", post(port, chat, Some(KEY), b"{\"messages\": [}"), 400),
            ("non-UTF-8 bytes", post(port, chat, Some(KEY), b"\xff\xfe{\"m\xc3\x28\": 1}"), 400),
            ("no messages", post(port, chat, Some(KEY), b"{\"messages\": []}"), 400),
            ("the wrong shape", post(port, chat, Some(KEY), b"[1, 2, 3]"), 400),
            (
                "an unknown model",
                post(port, chat, Some(KEY), br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}"#),
                404,
            ),
            ("no key", post(port, chat, None, good), 401),
            ("a wrong key", post(port, chat, Some("sk-kiln-test-0123456789abcdeX"), good), 401),
            ("a wrong key on the telemetry", exchange(port, "GET /kiln/v1/telemetry HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b""), 401),
            ("an unknown path", post(port, "/v1/embeddings", Some(KEY), good), 404),
        ];
        for (case, reply, status) in &cases {
            assert_error(reply, *status, case);
        }

        // A 100 MB body: refused from its length, whatever of it is sent.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST {chat} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            100 << 20
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut writer = s.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..100 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert_error(&read_response(&mut s), 413, "a 100 MB body");
        drop(s);
        let _ = sending.join();

        // A thousand connections opened and left idle.
        let idle: Vec<TcpStream> = (0..1000)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let started = Instant::now();
        assert_eq!(served().0, 200, "served beside 1,000 idle connections");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(idle);

        assert_eq!(served().0, 200, "still serving after it all");
    })
    .await
    .unwrap();
    // No transcript of what was served is kept unasked.
    assert_eq!(sessions(&node), 0);
    // The key is in no log, journal or listing.
    let mut logged = node.log();
    for entry in walk(node.home.path()) {
        logged.push_str(&String::from_utf8_lossy(
            &std::fs::read(entry).unwrap_or_default(),
        ));
    }
    assert!(!logged.contains(KEY), "the API key was written down");
}

/// The sessions kept in the node's data folder.
fn sessions(node: &KilnNode) -> usize {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", node.home.path())
        .args(["sessions", "list", "--json"])
        .output()
        .unwrap();
    let listed = common::json_stdout(&out);
    listed.as_array().map_or(0, Vec::len)
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files.extend(walk(&path)),
            Ok(t) if t.is_file() && !path.to_string_lossy().contains("models") => files.push(path),
            _ => {}
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn another_kiln_asks_the_node_journals_on_request_and_kiln_ps_lists_what_it_serves() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await.path;
    let node = KilnNode::start(&model, None, &["--journal-requests"]).await;
    let id = reqwest::get(format!("{}/models", node.base_url()))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // kiln's own remote engine, at the other end.
    let client = client_home(&node, &id);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", client.path())
        .args([
            "--engine",
            "remote:studio",
            "--max-tokens",
            "12",
            "ask",
            "--ephemeral",
        ])
        .arg("Name a colour.")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // Asked to, the node kept the request and its answer as a session.
    assert_eq!(sessions(&node), 1);

    // A long streamed answer shows in `kiln ps` while it runs, under the
    // client's address and name.
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", node.base_url()))
        .json(&serde_json::json!({
            "messages": [{"role": "user", "content": "Count from 1 to 300."}],
            "max_tokens": 300, "stream": true, "user": "editor",
        }))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    use futures_util::StreamExt;
    body.next().await.unwrap().unwrap();
    let ps = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", node.home.path())
        .arg("ps")
        .output()
        .await
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout).to_string();
    assert!(
        ps.contains("127.0.0.1 (editor)") && ps.contains("chat"),
        "{ps}"
    );
    drop(body);
}

/// No listener other machines can reach without a key: refused before
/// the model loads, in one line.
#[test]
fn a_reachable_listener_without_a_key_is_refused_at_start() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .args([
            "--model",
            "/nonexistent.gguf",
            "serve",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no API key") && err.contains("--api-key-env"),
        "{err}"
    );
}

/// The client's config naming the node as endpoint `studio`.
fn client_home(node: &KilnNode, model: &str) -> tempfile::TempDir {
    let client = tempfile::tempdir().unwrap();
    std::fs::write(
        client.path().join("config.toml"),
        format!(
            "[endpoints.studio]\nbase_url = \"{}\"\nmodel = \"{model}\"\n\n[endpoints.plain]\nbase_url = \"{}\"\nmodel = \"{model}\"\n",
            node.base_url(),
            // Not a kiln node: the same server under a path with no telemetry.
            node.base_url().replace("/v1", "/other/v1"),
        ),
    )
    .unwrap();
    client
}

/// The workstation on `--engine remote:studio` shows the node's memory,
/// swap and heat under the node's name beside its own panels, and answers
/// through it; pointed at an endpoint with no kiln telemetry, the panel
/// says the figures are not available.
#[tokio::test(flavor = "multi_thread")]
async fn the_workstation_on_a_kiln_node_shows_the_nodes_panels_in_a_real_terminal() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await.path;
    let node = KilnNode::start(&model, None, &[]).await;
    let id: serde_json::Value = reqwest::get(format!("{}/models", node.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let client = client_home(&node, id["data"][0]["id"].as_str().unwrap());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let home = client.path().to_path_buf();
    let run = move |engine: &str| {
        format!(
            "KILN_HOME={} {} --no-daemon --engine {engine}",
            home.display(),
            env!("CARGO_BIN_EXE_kiln")
        )
    };
    let blocking = tokio::task::spawn_blocking(move || {
        let tmux = common::Tmux::start("node", 160, 48, &run("remote:studio"));
        let title = format!("node {}", host.chars().take(24).collect::<String>());
        tmux.wait_for("the node's panel", 30, |s| {
            s.contains(&title) && s.contains("seats")
        });
        tmux.send(&["Name a colour.", "Enter"]);
        let screen = tmux.wait_for("an answer through the node", 60, |s| {
            s.contains("TTFT") && s.contains("decode") && !s.contains("answering")
        });
        assert!(screen.contains(&title), "{screen}");
        drop(tmux);

        let tmux = common::Tmux::start("plain", 160, 48, &run("remote:plain"));
        tmux.wait_for("the panel to say the figures are not available", 30, |s| {
            s.contains("not a kiln node")
        });
    });
    blocking.await.unwrap();
    drop(client);
}
