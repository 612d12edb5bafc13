//! The workstation as a person uses it: the real binary on the real model in
//! tmux, read through `capture-pane`.

mod common;

fn decode_rate(screen: &str) -> Option<f64> {
    let at = screen.find("decode ")?;
    let rest = &screen[at + "decode ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn chat_cancel_and_quit_in_a_real_terminal() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    // The wrapper reports the exit code and whether the terminal is back in
    // cooked mode (raw mode clears icanon).
    let cmd = format!(
        "KILN_HOME={} KILN_LOG=info {} --model {} --temperature 0 --max-tokens 400; \
         echo EXIT=$?; stty -a | grep -o -- '-\\?icanon' | sed 's/^/MODE=/'; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display()
    );
    let tmux = common::Tmux::start("tui", 120, 40, &cmd);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "1",
        "runs on the alternate screen"
    );

    tmux.send(&["Name three colours.", "Enter"]);
    let screen = tmux.wait_for("the first answer and its stats", 120, |s| {
        s.contains(" tok · ") && s.contains("idle")
    });
    assert!(screen.contains("Name three colours."), "{screen}");
    let rate = decode_rate(&screen).unwrap_or_else(|| panic!("no decode rate:\n{screen}"));
    assert!(rate > 0.0, "decode rate {rate}:\n{screen}");
    assert!(screen.contains("ctx "), "{screen}");

    tmux.send(&[
        "Write a very long story about a dragon who runs a pottery kiln.",
        "Enter",
    ]);
    tmux.wait_for("the second answer to stream", 60, |s| s.contains("live "));
    tmux.send(&["Escape"]);
    let screen = tmux.wait_for("the cancelled answer", 60, |s| s.contains("· stopped"));
    assert!(screen.contains("idle"), "{screen}");

    tmux.send(&["C-q"]);
    let screen = tmux.wait_for("kiln to exit", 30, |s| s.contains("MODE="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(
        screen.contains("MODE=icanon"),
        "the terminal is restored: {screen}"
    );
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "0",
        "back on the main screen"
    );
    // Logs went to the file, not the screen.
    let log = std::fs::read_to_string(home.path().join("logs/kiln.log")).unwrap();
    assert!(log.contains("turn 1:"), "{log}");
}

#[tokio::test]
async fn resume_an_interrupted_example_then_the_last_session() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    // A short session on a 135M model re-reads in well under the second a
    // snapshot must save by default: ask for every snapshot.
    std::fs::write(
        home.path().join("config.toml"),
        "snapshot_min_saved_s = 0\n",
    )
    .unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sessions/example-interrupted");
    let before = std::fs::read(example.join("events.jsonl")).unwrap();
    let run = |args: &str| {
        format!(
            "KILN_HOME={} {} --model {} --temperature 0 --max-tokens 40 {args}; echo EXIT=$?; sleep 60",
            home.path().display(),
            env!("CARGO_BIN_EXE_kiln"),
            model.path.display()
        )
    };

    let tmux = common::Tmux::start(
        "resume1",
        160,
        40,
        &run(&format!("resume {}", example.display())),
    );
    let screen = tmux.wait_for("the interrupted example", 60, |s| {
        s.contains("interrupted: kiln")
    });
    assert!(screen.contains("Why does my glaze crawl?"), "{screen}");
    assert!(
        screen.contains("1 damaged journal line skipped"),
        "{screen}"
    );
    // Answer the cut question again.
    tmux.send(&["C-r"]);
    tmux.wait_for("the new answer", 120, |s| {
        s.contains(" tok · ") && s.contains("idle")
    });
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));
    drop(tmux);
    assert_eq!(
        std::fs::read(example.join("events.jsonl")).unwrap(),
        before,
        "the repository's example is never written to"
    );

    let tmux = common::Tmux::start("resume2", 160, 40, &run("resume --last"));
    let screen = tmux.wait_for("the resumed session", 60, |s| s.contains("resumed"));
    assert!(screen.contains("Why does my glaze crawl?"), "{screen}");
    assert!(screen.contains("KV snapshot loaded"), "{screen}");
    assert!(
        !screen.contains("interrupted: kiln"),
        "regenerated: {screen}"
    );
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));
}

/// Agent mode in the workstation: the approval question is answered by
/// keys, yes then no, and Ctrl-C stops the run; the journal has the calls.
#[tokio::test]
async fn agent_mode_asks_before_each_call() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let a = AgentTerminal::start("agent", &model.path);
    let (tmux, home) = (&a.tmux, &a.home);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    tmux.send(&[
        "/agent List the folder, read every file in it, and search for the word glaze.",
        "Enter",
    ]);
    let screen = tmux.wait_for("the first approval question", 60, |s| {
        s.contains("The agent wants to run")
    });
    assert!(screen.contains("approve?"), "{screen}");
    tmux.send(&["y"]);
    tmux.wait_for("the first result", 60, |s| {
        s.contains("step 1: ok") || s.contains("step 1: error")
    });
    tmux.wait_for("the second approval question", 60, |s| {
        s.contains("The agent wants to run") && s.contains("step 2:")
    });
    tmux.send(&["n"]);
    tmux.wait_for("the refusal", 60, |s| s.contains("step 2: refused"));
    tmux.send(&["C-c"]);
    tmux.wait_for("the agent to stop", 60, |s| s.contains("agent stopped"));
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));

    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let listing = store.list();
    assert_eq!(listing.len(), 1);
    let journal = kiln::store::session::read_events(&listing[0].dir.join("events.jsonl")).unwrap();
    let results: Vec<(bool, bool)> = journal
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            kiln::store::session::Event::ToolResult { ok, refused, .. } => Some((*ok, *refused)),
            _ => None,
        })
        .collect();
    assert!(results.len() >= 2, "{results:?}");
    assert!(!results[0].1, "the first call was approved");
    assert!(results[1].1, "the second was refused");
}

/// The workstation in tmux on `model`, greedy, with a workspace holding
/// notes.txt; its daemon is stopped when this is dropped. Fields drop in
/// order: the terminal, then the daemon, then its home.
struct AgentTerminal {
    tmux: common::Tmux,
    _ws: tempfile::TempDir,
    _daemon: common::DaemonGuard,
    home: tempfile::TempDir,
}

impl AgentTerminal {
    fn start(name: &str, model: &std::path::Path) -> AgentTerminal {
        let home = tempfile::tempdir().unwrap();
        let daemon = common::DaemonGuard::new(home.path());
        let ws = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("notes.txt"), "Glaze firing on Friday.\n").unwrap();
        let cmd = format!(
            "KILN_HOME={} {} --model {} --temperature 0 --max-tokens 128 --workspace {}; echo EXIT=$?; sleep 60",
            home.path().display(),
            env!("CARGO_BIN_EXE_kiln"),
            model.display(),
            ws.path().display()
        );
        AgentTerminal {
            tmux: common::Tmux::start(name, 160, 45, &cmd),
            _ws: ws,
            _daemon: daemon,
            home,
        }
    }
}

/// The native path in a real terminal: SmolLM2 with Qwen2.5's chat
/// template. The run says it calls tools in the model's own format, the
/// status bar keeps saying so, and its call is asked before it runs.
#[tokio::test]
async fn a_native_agent_run_says_its_call_format_in_a_real_terminal() {
    let _turn = common::one_engine_at_a_time().await;
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates/Qwen-Qwen2.5-7B-Instruct.jinja");
    let model = common::retemplated_model(Some(&template)).await;
    let a = AgentTerminal::start("native", &model);
    let tmux = &a.tmux;
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    tmux.send(&["/agent Read notes.txt and say what it holds.", "Enter"]);
    let screen = tmux.wait_for("the first approval question", 120, |s| {
        s.contains("The agent wants to run")
    });
    assert!(
        screen.contains("tool calls: native <tool_call>"),
        "{screen}"
    );
    tmux.send(&["y"]);
    let screen = tmux.wait_for("the call's result", 120, |s| {
        s.contains(": ok ") || s.contains(": error ")
    });
    assert!(
        screen.contains("calls native <tool_call>") || screen.contains("approve?"),
        "{screen}"
    );
    tmux.send(&["C-c"]);
    tmux.wait_for("the agent to stop", 60, |s| {
        s.contains("agent stopped") || s.contains("agent finished") || s.contains("agent failed")
    });
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 60, |s| s.contains("EXIT=0"));
}

/// A 10 MB paste through tmux's bracketed paste: the screen stays live, the
/// editor keeps 1 MiB and says so.
#[tokio::test]
async fn a_ten_megabyte_paste_is_cut_with_a_notice() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let cmd = format!(
        "KILN_HOME={} {} --model {}; echo EXIT=$?; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display()
    );
    let tmux = common::Tmux::start("paste", 120, 40, &cmd);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    let line = "The quick brown fox jumps over the lazy dog. ".repeat(20) + "\n";
    let text = line.repeat(10 * 1024 * 1024 / line.len());
    let file = home.path().join("paste.txt");
    std::fs::write(&file, &text).unwrap();
    tmux.paste(&file);
    let screen = tmux.wait_for("the paste notice", 60, |s| s.contains("paste cut to"));
    assert!(
        screen.contains("paste cut to 1.0 MiB of 10.0 MiB"),
        "{screen}"
    );
    // Still responsive: the help opens at once.
    tmux.send(&["F1"]);
    tmux.wait_for("the help", 10, |s| s.contains("toggle_panels"));
    tmux.send(&["Escape", "C-q"]);
    tmux.wait_for("kiln to exit", 30, |s| s.contains("EXIT=0"));
}

/// Without the daemon, the SSH connection dropping mid-answer (tmux
/// kill-session hangs up the terminal) ends the conversation: the stopped
/// answer is committed and the KV snapshot saved.
#[tokio::test]
async fn a_hangup_mid_answer_saves_the_session() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        "snapshot_min_saved_s = 0\n",
    )
    .unwrap();
    let cmd = format!(
        "KILN_HOME={} {} --no-daemon --model {} --temperature 0 --max-tokens 400",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display()
    );
    let tmux = common::Tmux::start("hangup", 120, 40, &cmd);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    tmux.send(&[
        "Write a long story about a dragon who runs a pottery kiln.",
        "Enter",
    ]);
    tmux.wait_for("the answer to stream", 60, |s| s.contains("live "));
    drop(tmux);

    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let dir = loop {
        let listing = store.list();
        if let Some(l) = listing.first() {
            if l.dir.join("kv.snapshot").exists() && !l.open_elsewhere {
                break l.dir.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot after the hangup"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let loaded = store.load(&dir).unwrap();
    let answer = loaded.transcript.entries.last().unwrap();
    assert_eq!(answer.finish, Some(kiln::engine::FinishReason::Cancelled));
    assert!(!answer.text.is_empty());
    let log = std::fs::read_to_string(home.path().join("logs/kiln.log")).unwrap();
    assert!(!log.contains("panic"), "{log}");
}
