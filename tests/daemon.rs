//! The daemon: a private socket, robust framing, and agent runs that go on
//! when the terminal following them hangs up.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::host::protocol::{self, Reply, Request};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    async fn start(home: &Path) -> Daemon {
        let model = common::model().await;
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", home)
            .args(["daemon", "--temperature", "0", "--model"])
            .arg(&model.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = kiln::host::daemon::socket_path(&kiln::paths::Paths::under(home));
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        Daemon { child, socket }
    }

    fn request(&self, req: &Request) -> Reply {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.write_all(&protocol::encode(req)).unwrap();
        read_reply(&mut s)
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_reply(s: &mut UnixStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((reply, _)) = protocol::decode::<Reply>(&buf).unwrap() {
            return reply;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the daemon closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn the_socket_is_private_and_bad_frames_close_only_their_client() {
    let _turn = common::one_engine_at_a_time().await;
    let home = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(home.path()).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&daemon.socket), 0o600);

    // Garbage: an error reply, then that connection is closed.
    let mut bad = UnixStream::connect(&daemon.socket).unwrap();
    bad.write_all(&[0, 0, 0, 5, b'n', b'o', b'p', b'e', b'!'])
        .unwrap();
    assert!(
        matches!(read_reply(&mut bad), Reply::Error { message } if message.starts_with("malformed frame"))
    );
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0);

    // An oversized length is refused before anything is read.
    let mut big = UnixStream::connect(&daemon.socket).unwrap();
    big.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(
        matches!(read_reply(&mut big), Reply::Error { message } if message.contains("over the"))
    );

    // The daemon goes on serving others.
    assert_eq!(
        daemon.request(&Request::List),
        Reply::Runs {
            runs: vec![],
            workstations: vec![],
            served: vec![]
        }
    );

    // SIGTERM: a clean stop that removes the socket.
    daemon.terminate();
    assert!(!daemon.socket.exists());
}

/// Start a run, follow it in a terminal, drop that terminal (SIGHUP), follow
/// it again from a new one: the run went on, and every step was seen and
/// journaled exactly once.
#[tokio::test]
async fn an_agent_run_survives_its_terminal_hanging_up() {
    let _turn = common::one_engine_at_a_time().await;
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "Glaze firing on Friday.\n").unwrap();
    let daemon = Daemon::start(home.path()).await;
    let Reply::Started { id } = daemon.request(&Request::StartAgent {
        task: "List the folder, read every file in it, and search for the word glaze.".into(),
        settings: kiln::host::protocol::Settings {
            common: kiln::cli::Common {
                agent: kiln::cli::AgentFlags {
                    max_steps: Some(10),
                    max_minutes: Some(10),
                    ..Default::default()
                },
                workspace: Some(ws.path().to_path_buf()),
                approval: kiln::agent::Policy::AutoRead,
                ..Default::default()
            },
            ..Default::default()
        },
    }) else {
        panic!("no run started");
    };
    let attach = format!(
        "KILN_HOME={} {} attach {id}; echo EXIT=$?; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln")
    );
    let first = common::Tmux::start("attach1", 120, 50, &attach);
    first.wait_for("the run's first step", 60, |s| s.contains("step 1:"));
    drop(first); // kill-session: the attached client gets SIGHUP

    let second = common::Tmux::start("attach2", 120, 50, &attach);
    let screen = second.wait_for("the run to end", 120, |s| s.contains("EXIT="));
    assert!(
        screen.contains("budget exhausted: 10 steps") || screen.contains("finished:"),
        "{screen}"
    );
    for step in 1..=10 {
        let calls = screen
            .lines()
            .filter(|l| l.starts_with(&format!("step {step}: ")))
            .count();
        let finish = screen.contains(&format!("step {step}: finish"));
        // One call line and one result line per step (the finishing call
        // has no result), no gap, no repeat.
        assert!(
            calls == 2 || (finish && calls == 1) || (calls == 0 && screen.contains("finished:")),
            "step {step}: {screen}"
        );
    }

    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let dir = store.resolve(Some(&id)).unwrap();
    let journal = kiln::store::session::read_events(&dir.join("events.jsonl")).unwrap();
    let steps: Vec<u32> = journal
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            kiln::store::session::Event::ToolCall { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    let expected: Vec<u32> = (1..=steps.len() as u32).collect();
    assert_eq!(steps, expected, "each call journaled once, in order");
    assert!(!steps.is_empty());
}

/// The workstation through the daemon: SSH drops mid-answer, the answer
/// goes on; `kiln ps` shows the session with no terminal; two new terminals
/// attach and see the whole conversation; one detaches with Ctrl-\, and
/// `kiln stop ID` closes the other. The journal has the question and its
/// full answer once.
#[tokio::test]
async fn a_conversation_survives_its_terminal_hanging_up() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        "snapshot_min_saved_s = 3600\n",
    )
    .unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let kiln = |args: &str| kiln_line(home.path(), &model.path, args);
    let first = common::Tmux::start("ws1", 120, 40, &kiln("--temperature 0 --max-tokens 300"));
    first.wait_for("the welcome screen", 120, |s| s.contains("Type a message"));
    first.send(&[
        "Write a very long story about a dragon who runs a pottery kiln.",
        "Enter",
    ]);
    first.wait_for("the answer to stream", 60, |s| s.contains("live "));
    drop(first); // kill-session: the terminal hangs up

    // The hung-up client goes; the conversation stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ps = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", home.path())
            .arg("ps")
            .output()
            .unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
        let row = ps.lines().nth(1).unwrap_or_default().to_string();
        assert!(row.contains("Write a very long story"), "{ps}");
        if row.split_whitespace().nth(1) == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the terminal stays attached: {ps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let second = common::Tmux::start("ws2", 120, 40, &kiln("attach; echo EXIT=$?; sleep 60"));
    let third = common::Tmux::start("ws3", 80, 24, &kiln("attach; echo EXIT=$?; sleep 60"));
    let done = |s: &str| s.contains(" tok · ") && s.contains("idle");
    let screen = second.wait_for("the finished answer", 120, done);
    assert!(screen.contains("dragon"), "{screen}");
    // 80 columns: the panels fold into a summary line without "idle".
    third.wait_for("the same answer at 80x24", 30, |s| s.contains(" tok · "));
    third.send(&["C-\\"]);
    third.wait_for("a detach", 30, |s| {
        s.contains("detached") && s.contains("EXIT=0")
    });
    // `kiln stop ID` saves the session and closes the terminal still on it.
    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let listing = store.list();
    assert_eq!(listing.len(), 1);
    let id = listing[0]
        .dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let stop = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .args(["stop", &id])
        .status()
        .unwrap();
    assert!(stop.success());
    let screen = second.wait_for("kiln to exit", 30, |s| s.contains("EXIT=0"));
    assert!(screen.contains("the session was stopped"), "{screen}");
    // Saved on stop, without a KV snapshot: this home asks a snapshot to
    // save an hour of prefill, and a 300-token session never would.
    assert!(
        !listing[0].dir.join("kv.snapshot").exists(),
        "no snapshot for a session that re-reads in less than it must save"
    );
    let journal = kiln::store::session::read_events(&listing[0].dir.join("events.jsonl")).unwrap();
    use kiln::store::session::Event;
    let users = journal
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::User { .. }))
        .count();
    let answers: Vec<_> = journal
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Answer { text, finish, .. } => Some((text.clone(), *finish)),
            _ => None,
        })
        .collect();
    assert_eq!(users, 1);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_ne!(
        answers[0].1,
        kiln::engine::FinishReason::Cancelled,
        "the hangup did not stop the answer"
    );
    assert!(answers[0].0.len() > 200, "{answers:?}");
}

/// A daemon that cannot load its model tells the terminal that started it
/// why, in one line, instead of leaving it waiting.
#[test]
fn a_bad_model_reaches_the_terminal_through_the_daemon() {
    let home = tempfile::tempdir().unwrap();
    let bad = home.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 truncated").unwrap();
    let cmd = format!(
        "KILN_HOME={} {} --model {}; echo EXIT=$?; sleep 60",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        bad.display()
    );
    let tmux = common::Tmux::start("badmodel", 120, 20, &cmd);
    let screen = tmux.wait_for("the error", 60, |s| s.contains("EXIT="));
    let line = screen
        .lines()
        .find(|l| l.starts_with("kiln: "))
        .unwrap_or_else(|| panic!("{screen}"));
    assert!(line.contains("bad.gguf"), "{screen}");
    assert!(line.contains("GGUF"), "{screen}");
    assert!(!screen.contains("EXIT=0"), "{screen}");
}

/// CPU time of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime, fields 14 and 15 of stat(5), in clock ticks.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Out of file descriptors, the daemon's accept loop backs off instead of
/// spinning, and serves again once connections close.
#[tokio::test]
async fn out_of_file_descriptors_the_daemon_waits_instead_of_spinning() {
    use std::os::unix::process::CommandExt;
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_HOME", home.path())
        .args(["daemon", "--model"])
        .arg(&model.path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit in the child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let socket = kiln::host::daemon::socket_path(&kiln::paths::Paths::under(home.path()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut daemon = Daemon { child, socket };
    let pid = daemon.child.id();
    // More connections than it has descriptors for; they sit in the
    // listen queue and every accept fails with EMFILE.
    let held: Vec<UnixStream> = (0..100)
        .filter_map(|_| UnixStream::connect(&daemon.socket).ok())
        .collect();
    assert!(held.len() > 64, "only {} connections", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.6,
        "the daemon used {used:.2} s of CPU in 3 s while out of descriptors"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            daemon.request(&Request::List)
        }));
        if matches!(served, Ok(Reply::Runs { .. })) {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon did not serve again");
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.terminate();
}

/// A shell line that runs kiln on `model` with `args` in `home`.
fn kiln_line(home: &Path, model: &Path, args: &str) -> String {
    format!(
        "KILN_HOME={} {} --model {} {args}",
        home.display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.display()
    )
}

/// `kiln ps` as text.
fn ps(home: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home)
        .arg("ps")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The TOK/S column of the `ps` row that starts with `id` (or holds it).
fn speed_of(ps: &str, id: &str) -> Option<f64> {
    let row = ps.lines().find(|l| l.contains(id))?;
    row.split_whitespace().find_map(|w| {
        w.contains('.')
            .then(|| w.parse::<f64>().ok())
            .flatten()
            .filter(|v| *v > 0.0)
    })
}

/// One model, two users at once: a detached agent run steps while a
/// terminal's conversation streams an answer. `kiln ps` shows both with
/// their speeds, and both journals are whole.
#[tokio::test]
async fn a_detached_run_steps_while_a_terminal_chats_with_the_same_model() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "Glaze firing on Friday.\n").unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let flags = format!(
        "--model {} --temperature 0 --max-tokens 300",
        model.path.display()
    );
    let kiln = kiln_line(home.path(), &model.path, "--temperature 0 --max-tokens 300");
    let chat = common::Tmux::start("chat", 120, 40, &kiln);
    chat.wait_for("the welcome screen", 120, |s| s.contains("Type a message"));
    chat.send(&[
        "Write a very long story about a dragon who runs a pottery kiln.",
        "Enter",
    ]);
    chat.wait_for("the answer to stream", 60, |s| s.contains("live "));

    let detach = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .args(flags.split(' '))
        .args(["--max-steps", "6", "--approval", "auto-read", "--workspace"])
        .arg(ws.path())
        .args(["agent", "--detach", "--task"])
        .arg("List the folder, read every file in it, and search for the word glaze.")
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&detach.stdout).trim().to_string();
    assert!(
        detach.status.success() && !id.is_empty(),
        "the run starts while the chat streams: {}",
        String::from_utf8_lossy(&detach.stderr)
    );

    // Both at once: the run steps (with a speed) while the answer is
    // still streaming in the terminal.
    let deadline = Instant::now() + Duration::from_secs(180);
    let both = loop {
        let listing = ps(home.path());
        let answering = listing.contains("answering");
        if answering && speed_of(&listing, &id).is_some() {
            break listing;
        }
        assert!(
            Instant::now() < deadline && (answering || speed_of(&listing, &id).is_none()),
            "the run should step while the answer streams: {listing}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(both.contains(&id), "{both}");

    // Each goes on to its end, and then both show a speed.
    let screen = chat.wait_for("the finished answer", 240, |s| {
        s.contains(" tok · ") && s.contains("idle")
    });
    assert!(screen.contains("dragon"), "{screen}");
    let deadline = Instant::now() + Duration::from_secs(240);
    let after = loop {
        let listing = ps(home.path());
        let run_row = listing
            .lines()
            .find(|l| l.contains(&id))
            .unwrap_or_default();
        if !run_row.contains("running") {
            break listing;
        }
        assert!(Instant::now() < deadline, "the run ends: {listing}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let session_row = after.lines().nth(1).unwrap_or_default();
    assert!(
        session_row.contains("idle") && speed_of(session_row, "idle").is_some(),
        "{after}"
    );

    use kiln::store::session::Event;
    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let run_dir = store.resolve(Some(&id)).unwrap();
    let run = kiln::store::session::read_events(&run_dir.join("events.jsonl")).unwrap();
    let steps: Vec<u32> = run
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ToolCall { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert!(!steps.is_empty());
    assert_eq!(steps, (1..=steps.len() as u32).collect::<Vec<_>>());
    let chat_dir = store
        .list()
        .into_iter()
        .map(|s| s.dir)
        .find(|d| *d != run_dir)
        .expect("the chat's session");
    let journal = kiln::store::session::read_events(&chat_dir.join("events.jsonl")).unwrap();
    let answers: Vec<_> = journal
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Answer { text, finish, .. } => Some((text.len(), *finish)),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].0 > 200, "{answers:?}");
    assert_ne!(answers[0].1, kiln::engine::FinishReason::Cancelled);
}

/// `kill -9` of the daemon while two terminals' conversations stream on
/// the one model: both sessions reopen with every committed message, and
/// each cut answer is marked interrupted.
#[tokio::test]
async fn two_sessions_cut_by_kill_9_reopen_with_their_answers_marked() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let _daemon = common::DaemonGuard::new(home.path());
    let kiln = |args: &str| {
        let args = format!("--temperature 0 --max-tokens 400 {args}");
        kiln_line(home.path(), &model.path, &args)
    };
    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    // The first terminal asks and gets its answer (a committed message),
    // then asks again.
    let first = common::Tmux::start("k1", 120, 40, &kiln(""));
    first.wait_for("the welcome screen", 120, |s| s.contains("Type a message"));
    first.send(&["Say hello.", "Enter"]);
    first.wait_for("the first answer", 120, |s| s.contains(" tok · "));
    let first_id = store.list()[0]
        .dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // A second terminal opens a new conversation of its own beside it.
    let second = common::Tmux::start("k2", 120, 40, &kiln("new"));
    second.wait_for("a second welcome screen", 60, |s| {
        s.contains("Type a message")
    });
    first.send(&[
        "Write a very long story about a dragon and a kiln.",
        "Enter",
    ]);
    second.send(&["Write a very long poem about clay and fire.", "Enter"]);
    first.wait_for("the story to stream", 60, |s| s.contains("live "));
    second.wait_for("the poem to stream", 60, |s| s.contains("live "));
    // Both are streaming: kill the daemon outright.
    let listing = ps(home.path());
    assert_eq!(listing.matches("answering").count(), 2, "{listing}");
    let pid = common::daemon_pid(home.path()).expect("the daemon's process");
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    drop((first, second));

    let sessions = store.list();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    for s in &sessions {
        let loaded = store.load(&s.dir).expect("the session reopens");
        let t = &loaded.transcript;
        let users: Vec<_> = t
            .entries
            .iter()
            .filter(|e| e.kind == kiln::store::transcript::EntryKind::User)
            .collect();
        let last = t.entries.last().expect("entries");
        assert!(last.interrupted, "{:?}", t.entries);
        let id = s.dir.file_name().unwrap().to_string_lossy().into_owned();
        if id == first_id {
            assert_eq!(users.len(), 2, "both questions kept: {:?}", t.entries);
            assert!(!t.entries[1].interrupted, "the first answer was whole");
        } else {
            assert_eq!(users.len(), 1, "{:?}", t.entries);
        }
    }
}

/// `kiln ask` with a daemon holding the same model: the answer comes from
/// the daemon's loaded model on a conversation of its own (no second copy
/// loaded), the daemon journals the exchange, and `--no-daemon` still
/// loads the model here.
#[tokio::test]
async fn kiln_ask_uses_the_daemons_model() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(home.path()).await;
    let ask = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", home.path())
            .args(["--temperature", "0", "--model"])
            .arg(&model.path)
            .args(extra)
            .args([
                "ask",
                "--json",
                "--max-tokens",
                "24",
                "Name a glaze colour.",
            ])
            .output()
            .unwrap()
    };
    let through = ask(&[]);
    let (out, err) = (
        String::from_utf8_lossy(&through.stdout).into_owned(),
        String::from_utf8_lossy(&through.stderr).into_owned(),
    );
    assert!(through.status.success(), "{err}");
    assert!(!err.contains("loading the model here"), "{err}");
    assert!(out.contains("\"event\":\"turn_finished\""), "{out}");
    let store = kiln::store::SessionStore::new(&kiln::paths::Paths::under(home.path()));
    let sessions = store.list();
    assert_eq!(sessions.len(), 1, "the daemon journaled it: {sessions:?}");
    let journal = kiln::store::session::read_events(&sessions[0].dir.join("events.jsonl")).unwrap();
    use kiln::store::session::Event;
    let kinds: Vec<&str> = journal
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::User { .. } => Some("user"),
            Event::Answer { .. } => Some("answer"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["user", "answer"]);
    // Another model setting: the daemon says no, and this process answers.
    let other = ask(&["--ctx", "1024"]);
    let err = String::from_utf8_lossy(&other.stderr).into_owned();
    assert!(other.status.success(), "{err}");
    assert!(err.contains("loading the model here"), "{err}");
    drop(daemon);
}
