//! Runs that go on from their journal: with a scripted engine (budgets,
//! "always" approvals, a call cut by a crash, resuming twice), and on the
//! real model, with the daemon killed by `kill -9` mid-call.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::agent::{
    self, resume, AgentSettings, Approval, Approver, Outcome, Policy, Question, RunSpec, Start,
};
use kiln::engine::fake::FakeEngine;
use kiln::engine::{self, GenStats, SamplerSettings};
use kiln::store::journal;
use kiln::store::session::{read_events, Event, RunHost};
use kiln::store::SessionStore;

/// Answers every question the same way, counting them.
struct Answers(Approval, Arc<AtomicUsize>);

impl Approver for Answers {
    async fn approve(&mut self, _question: &Question) -> Approval {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0
    }
}

const WRITE: &str = r#"{"tool": "write_file", "path": "log.txt", "content": "one line"}"#;
const READ: &str = r#"{"tool": "read_file", "path": "log.txt"}"#;
const FINISH: &str = r#"{"tool": "finish", "summary": "logged"}"#;

/// Run `start` to its end on a scripted engine; its progress and outcome.
async fn drive(
    start: Start,
    script: &[&str],
    journal: journal::JournalHandle,
    approver: Answers,
) -> (Vec<agent::Progress>, Outcome) {
    let engine = engine::spawn(FakeEngine::new(script.iter().copied()));
    common::run_headless(start, engine, journal, approver).await
}

fn steps_called(progress: &[agent::Progress]) -> Vec<u32> {
    progress
        .iter()
        .filter_map(|p| match p {
            agent::Progress::Call { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
}

fn resumed(store: &SessionStore, id: &str, max_steps: u32) -> (Start, journal::JournalHandle) {
    let r = resume::open(store, id).unwrap();
    let mut replay = r.replay;
    replay.spec.budgets.max_steps = max_steps;
    let (journal, _) = journal::spawn(r.session);
    (Start::Resume(Box::new(replay)), journal)
}

/// A run stopped by its step budget goes on where it stopped: its steps
/// number on, its tokens and "always" approvals carry over; a call cut by
/// a crash is reported to the model as interrupted and journaled so,
/// never re-run; resumed twice, every call is in the journal once with
/// one result; a finished run is not resumed.
#[tokio::test]
async fn resumed_runs_keep_their_budgets_approvals_and_every_call_once() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let store = SessionStore {
        root: home.path().to_path_buf(),
    };
    let settings = AgentSettings {
        max_steps: 2,
        ..AgentSettings::default()
    };
    let spec = RunSpec::new(
        "keep a log",
        ws.path().to_path_buf(),
        Policy::Ask,
        &settings,
        &SamplerSettings::default(),
        &Default::default(),
    );
    let (journal, _) = store.start("fake", None, 4096, None).unwrap();
    let id = journal.id.clone();

    // First stretch: the write is approved with "always".
    let asked = Arc::new(AtomicUsize::new(0));
    let (progress, outcome) = drive(
        Start::Fresh(spec),
        &[WRITE, WRITE],
        journal,
        Answers(Approval::Always, asked.clone()),
    )
    .await;
    assert_eq!(outcome, Outcome::BudgetExhausted("2 steps".into()));
    assert_eq!(steps_called(&progress), [1, 2]);
    assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once, then always");
    let tokens_before = resume::open(&store, &id).unwrap().replay.state.tokens;
    assert!(tokens_before > 0);

    // Second stretch, two more steps: the same write needs no yes (the
    // "always" carried over); the read, never approved, is refused.
    let refusing = Arc::new(AtomicUsize::new(0));
    let (start, journal) = resumed(&store, &id, 4);
    let (progress, outcome) = drive(
        start,
        &[WRITE, READ],
        journal,
        Answers(Approval::No, refusing.clone()),
    )
    .await;
    assert_eq!(outcome, Outcome::BudgetExhausted("4 steps".into()));
    assert_eq!(steps_called(&progress), [3, 4]);
    assert_eq!(refusing.load(Ordering::SeqCst), 1, "only the read asked");
    // The engine was given the conversation so far: the first resumed
    // turn's context holds more than its own message.
    let first_context = progress
        .iter()
        .find_map(|p| match p {
            agent::Progress::Call { context_tokens, .. } => Some(*context_tokens),
            _ => None,
        })
        .unwrap();
    assert!(first_context > 20, "{first_context}");
    let replay = resume::open(&store, &id).unwrap().replay;
    assert!(replay.state.tokens > tokens_before);

    // A third stretch dies in step 5, its shell command running: what the
    // journal writer had put on disk is all that is left.
    {
        let r = resume::open(&store, &id).unwrap();
        let (journal, _) = journal::spawn(r.session);
        journal.event(Event::RunStarted {
            spec: serde_json::to_value(&r.replay.spec).unwrap(),
            host: RunHost::Headless,
            resumed: true,
        });
        let shell = r#"{"tool": "shell", "command": "echo twice >> log.txt"}"#;
        journal.event(Event::User {
            text: "Tool result: refused".into(),
        });
        journal.event(Event::Answer {
            text: shell.into(),
            finish: kiln::engine::FinishReason::Stop,
            stats: GenStats::default(),
        });
        journal.event(Event::ToolCall {
            step: 5,
            call: serde_json::from_str(shell).unwrap(),
        });
        journal.event(Event::Approved {
            step: 5,
            always: false,
        });
        journal.close();
    }
    let interrupted = store.interrupted_runs();
    assert_eq!(interrupted.len(), 1, "the cut run is listed for resuming");
    assert_eq!(interrupted[0].0.id, id);

    let (start, journal) = resumed(&store, &id, 8);
    let (progress, outcome) = drive(
        start,
        &[FINISH],
        journal,
        Answers(Approval::No, Arc::new(AtomicUsize::new(0))),
    )
    .await;
    assert_eq!(outcome, Outcome::Finished("logged".into()));
    let cut = progress
        .iter()
        .find_map(|p| match p {
            agent::Progress::Result {
                step: 5, output, ..
            } => Some(output.clone()),
            _ => None,
        })
        .expect("the cut call is reported");
    assert!(cut.contains("not known whether it completed"), "{cut}");
    assert_eq!(steps_called(&progress), [6]);
    assert!(
        !ws.path().join("log.txt").exists()
            || !std::fs::read_to_string(ws.path().join("log.txt"))
                .unwrap()
                .contains("twice"),
        "the cut shell command is never re-run"
    );

    // The whole journal: every call once, each with one result, the cut
    // one marked; three resumes, and the run's end.
    let events = read_events(&home.path().join(&id).join("events.jsonl")).unwrap();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    let mut starts = Vec::new();
    let mut ends = 0;
    for (_, e) in &events.events {
        match e {
            Event::ToolCall { step, .. } => calls.push(*step),
            Event::ToolResult {
                step, interrupted, ..
            } => results.push((*step, *interrupted)),
            Event::RunStarted { resumed, .. } => starts.push(*resumed),
            Event::RunEnded { .. } => ends += 1,
            _ => {}
        }
    }
    assert_eq!(calls, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        results,
        [
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (5, true),
            (6, false)
        ]
    );
    assert_eq!(starts, [false, true, true, true]);
    assert_eq!(ends, 3, "each stretch but the one that died ended");
    assert!(store.interrupted_runs().is_empty());
    let finished = resume::open(&store, &id).err().unwrap().to_string();
    assert!(finished.contains("the run finished"), "{finished}");
    // A session held by another kiln is not resumed from under it.
    let (held, _) = store.start("fake", None, 4096, None).unwrap();
    let busy = resume::open(&store, &held.id).err().unwrap().to_string();
    assert!(busy.contains("open in another kiln process"), "{busy}");
}

/// The real model in a detached run; the daemon is killed with `kill -9`
/// while a shell command runs (a `sh` on the PATH that waits while a flag
/// file is there, then runs the real one). `kiln ps` lists the run as
/// interrupted; `kiln agent --resume`, in tmux, goes on to the run's end.
/// Every call is journaled once, with one result, and the cut one is
/// marked interrupted and was not run again.
#[tokio::test]
async fn a_run_cut_by_kill_9_mid_call_resumes_on_the_real_model() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "Glaze firing on Friday.\n").unwrap();
    let bin = tempfile::tempdir().unwrap();
    let hold = bin.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let shim = bin.path().join("sh");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nwhile [ -e {} ]; do sleep 0.1; done\nexec /bin/sh \"$@\"\n",
            hold.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let _daemon = common::DaemonGuard::new(home.path());
    let flags = [
        "--temperature",
        "0",
        "--max-reply-tokens",
        "64",
        "--approval",
        "auto",
        "--sandbox",
        "off",
    ];
    // The task SmolLM2 answers, at temperature 0, with `shell ls -la` by
    // its third step.
    let detach = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .env("PATH", &path)
        .arg("--model")
        .arg(&model.path)
        .args(flags)
        .args(["--max-steps", "6", "--workspace"])
        .arg(ws.path())
        .args([
            "agent",
            "--detach",
            "--task",
            "Run the shell command sleep 20.",
        ])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&detach.stdout).trim().to_string();
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    let store = SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let events_of = || {
        read_events(&store.resolve(Some(&id)).unwrap().join("events.jsonl"))
            .unwrap()
            .events
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    let cut_step = loop {
        let events = events_of();
        if let Some((_, Event::ToolCall { step, call })) = events.last() {
            if call["tool"] == "shell" {
                break *step;
            }
        }
        assert!(
            !events
                .iter()
                .any(|(_, e)| matches!(e, Event::RunEnded { .. })),
            "the run ended before it ran a shell command: {events:?}"
        );
        assert!(Instant::now() < deadline, "no shell call: {events:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid = common::daemon_pid(home.path()).expect("the daemon's process");
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    std::fs::remove_file(&hold).unwrap();
    // The shim's child may linger a moment after its daemon is gone.
    std::thread::sleep(Duration::from_millis(300));

    let ps = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .arg("ps")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.status.success(), "{listing}");
    let row = listing
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("the run is listed as interrupted: {listing}"));
    assert!(row.contains("daemon"), "{listing}");
    assert!(listing.contains("kiln agent --resume"), "{listing}");

    let resume_line = format!(
        "KILN_HOME={} PATH={path} {} --model {} {} --max-steps {} agent --resume {id}; echo EXIT=$?; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display(),
        flags.join(" "),
        cut_step + 2
    );
    let tmux = common::Tmux::start("resume", 160, 50, &resume_line);
    let screen = tmux.wait_for("the resumed run's end", 240, |s| s.contains("EXIT="));
    assert!(
        screen.contains("EXIT=0") || screen.contains("EXIT=3"),
        "{screen}"
    );
    assert!(
        screen.contains("not known whether it completed"),
        "{screen}"
    );

    let events = events_of();
    let calls: Vec<u32> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ToolCall { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    let results: Vec<(u32, bool)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ToolResult {
                step, interrupted, ..
            } => Some((*step, *interrupted)),
            _ => None,
        })
        .collect();
    assert_eq!(calls, (1..=calls.len() as u32).collect::<Vec<_>>());
    assert_eq!(
        results.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        calls,
        "one result a call"
    );
    assert_eq!(
        results.iter().filter(|(_, i)| *i).collect::<Vec<_>>(),
        [&(cut_step, true)]
    );
    assert!(calls.len() as u32 > cut_step, "the run went on: {events:?}");
    assert!(
        matches!(events.last(), Some((_, Event::RunEnded { .. }))),
        "{events:?}"
    );
}
