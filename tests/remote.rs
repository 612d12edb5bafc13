//! The remote engine against a real llama.cpp server on loopback
//! (llama-cpp-python), and a small stub for broken streams only.

mod common;

use std::time::Duration;

use common::*;
use kiln::engine::remote::{Endpoint, RemoteEngine};
use kiln::engine::{self, EngineEvent, FinishReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn endpoint(base_url: String) -> Endpoint {
    Endpoint {
        base_url,
        model: "smollm2".into(),
        api_key_env: None,
        context: 4096,
    }
}

fn remote(base_url: String, max_tokens: u32) -> RemoteEngine {
    RemoteEngine::new("box", endpoint(base_url), greedy(max_tokens), None).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_streams_cancels_and_survives_the_server_dying() {
    let mut server = LlamaServer::start().await;

    // Streaming.
    let h = engine::spawn(remote(server.base_url(), 24));
    let t = ask(&h, "Name three colours.").await;
    assert_eq!(t.error, None);
    assert!(!t.reply.trim().is_empty());
    assert_eq!(t.reply, t.streamed());
    assert!(
        t.stats.completion_tokens > 0 && t.stats.decode_tok_s.is_some(),
        "{:?}",
        t.stats
    );
    assert_eq!(h.info().engine, "remote:box");

    // Cancel mid-stream, then the next turn works and sees the history.
    let h = engine::spawn(remote(server.base_url(), 400));
    let mut turn = h.chat("Write a long story about a dragon who runs a pottery kiln.");
    loop {
        match turn.next().await.unwrap() {
            EngineEvent::Token { .. } => break,
            EngineEvent::TurnFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    h.cancel();
    let cut = finish(turn).await;
    assert_eq!(cut.finish, Some(FinishReason::Cancelled));
    let next = ask(&h, "Thanks.").await;
    assert_eq!(next.error, None);

    // The server dies mid-answer: a clear error, and the engine is usable.
    let mut turn = h.chat("Write another long story, about a glaze that crawls.");
    loop {
        if let EngineEvent::Token { .. } = turn.next().await.unwrap() {
            break;
        }
    }
    server.kill();
    let broken = finish(turn).await;
    let error = broken.error.expect("the turn fails");
    assert!(
        error.starts_with("endpoint box: ")
            && (error.contains("stream") || error.contains("connect")),
        "{error}"
    );
    let after = ask(&h, "Still there?").await;
    assert!(
        after
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect")),
        "{:?}",
        after.error
    );
}

#[tokio::test]
async fn a_closed_port_is_a_clear_error() {
    let h = engine::spawn(remote(format!("http://127.0.0.1:{}/v1", free_port()), 8));
    let t = ask(&h, "hello").await;
    let error = t.error.unwrap();
    assert!(
        error.starts_with("endpoint box: cannot connect to http://127.0.0.1:"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1);
}

/// A one-shot HTTP server that answers every request with `response`.
async fn stub(response: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 65536];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

#[tokio::test]
async fn malformed_streams_and_http_errors_are_clear() {
    let garbage = stub(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}\n\ndata: {not json\n\n",
    )
    .await;
    let h = engine::spawn(remote(garbage, 8));
    let t = ask(&h, "hello").await;
    assert_eq!(t.streamed(), "hi");
    let error = t.error.unwrap();
    assert!(
        error.starts_with("endpoint box: malformed stream data"),
        "{error}"
    );

    let cut = stub(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {\"choices\": [{\"delta\": {\"content\": \"par\"}}]}\n\n",
    )
    .await;
    let h = engine::spawn(remote(cut, 8));
    let t = ask(&h, "hello").await;
    assert_eq!(
        t.error.unwrap(),
        "endpoint box: the server closed the stream in the middle of the answer"
    );

    let failing = stub(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 29\r\n\r\n{\"error\": \"model is loading\"}",
    )
    .await;
    let h = engine::spawn(remote(failing, 8));
    let t = ask(&h, "hello").await;
    let error = t.error.unwrap();
    assert!(
        error.starts_with(
            "endpoint box: HTTP 503 Service Unavailable: {\"error\": \"model is loading\"}"
        ),
        "{error}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The workstation on the local model, with `config` (which names the
/// server as endpoint `box`) and `args`, in tmux, past its welcome screen.
async fn workstation(
    server: &LlamaServer,
    config: &str,
    args: &str,
    name: &str,
) -> (tempfile::TempDir, Tmux) {
    let model = model().await;
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "{config}\n[endpoints.box]\nbase_url = \"{}\"\nmodel = \"smollm2\"\ncontext = 4096\n",
            server.base_url()
        ),
    )
    .unwrap();
    let cmd = format!(
        "KILN_HOME={} {} --model {} --temperature 0 {args}; echo EXIT=$?; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display()
    );
    let tmux = Tmux::start(name, 160, 45, &cmd);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    (home, tmux)
}

/// A session moves from the local model to the endpoint and back, in the
/// workstation; the transcript and journal stay local and hold all of it.
#[tokio::test(flavor = "multi_thread")]
async fn offload_to_the_endpoint_and_back_in_the_workstation() {
    let server = LlamaServer::start().await;
    let (home, tmux) = workstation(&server, "", "--max-tokens 24", "offload").await;
    let answers = |s: &str| s.matches(" tok · ").count();
    tmux.send(&["Name a colour.", "Enter"]);
    tmux.wait_for("the local answer", 60, |s| {
        answers(s) == 1 && s.contains("idle")
    });
    tmux.send(&["/offload box", "Enter"]);
    let screen = tmux.wait_for("the move", 30, |s| s.contains("moved to endpoint box"));
    assert!(
        screen.contains("smollm2 @ box"),
        "the status bar says where: {screen}"
    );
    assert!(screen.contains("offloaded:"), "the memory panel: {screen}");
    tmux.send(&["Name another.", "Enter"]);
    tmux.wait_for("the remote answer", 60, |s| {
        answers(s) == 2 && s.contains("idle")
    });
    tmux.send(&["/local", "Enter"]);
    tmux.wait_for("the move back", 30, |s| {
        s.contains("moved back to the local model")
    });
    tmux.send(&["And one more.", "Enter"]);
    tmux.wait_for("the local answer again", 60, |s| {
        answers(s) == 3 && s.contains("idle")
    });
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));

    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let loaded = store.load(&store.list()[0].dir).unwrap();
    let kinds: Vec<String> = loaded
        .transcript
        .entries
        .iter()
        .map(|e| format!("{:?}", e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            "User",
            "Assistant",
            "Notice",
            "User",
            "Assistant",
            "Notice",
            "User",
            "Assistant"
        ]
    );
    assert!(loaded.transcript.entries[2]
        .text
        .starts_with("moved to endpoint box"));
}

/// `auto_offload`: a turn that would not fit the local context window goes
/// to the endpoint on its own, and is answered there.
#[tokio::test(flavor = "multi_thread")]
async fn a_turn_too_big_for_this_machine_is_offloaded_automatically() {
    let server = LlamaServer::start().await;
    let (_home, tmux) = workstation(
        &server,
        "auto_offload = \"box\"",
        "--ctx 256 --max-tokens 16",
        "autooffload",
    )
    .await;
    let long = "Summarise these kiln notes. ".to_string()
        + &"The bisque firing reached cone 04 after a slow overnight ramp. ".repeat(15);
    tmux.send(&[&long, "Enter"]);
    let screen = tmux.wait_for("the offloaded answer", 90, |s| {
        s.contains(" tok · ") && s.contains("idle")
    });
    assert!(screen.contains("smollm2 @ box"), "{screen}");
    assert!(screen.contains("would outgrow this machine"), "{screen}");
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));
}
