//! The daemon: a private socket, robust framing, and agent runs that go on
//! when the terminal following them hangs up.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::protocol::{self, Reply, Request};

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
        let socket = kiln::daemon::socket_path(&kiln::paths::Paths::under(home));
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
    assert_eq!(daemon.request(&Request::List), Reply::Runs { runs: vec![] });

    // SIGTERM: a clean stop that removes the socket.
    daemon.terminate();
    assert!(!daemon.socket.exists());
}

/// Start a run, follow it in a terminal, drop that terminal (SIGHUP), follow
/// it again from a new one: the run went on, and every step was seen and
/// journaled exactly once.
#[tokio::test]
async fn an_agent_run_survives_its_terminal_hanging_up() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("notes.txt"), "Glaze firing on Friday.\n").unwrap();
    let daemon = Daemon::start(home.path()).await;
    let Reply::Started { id } = daemon.request(&Request::StartAgent {
        task: "List the folder, read every file in it, and search for the word glaze.".into(),
        workspace: ws.path().to_path_buf(),
        policy: kiln::agent::Policy::AutoRead,
        max_steps: 10,
        max_minutes: 10,
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
        // One call line and one result line per step, no gap, no repeat.
        assert!(
            calls == 2 || (calls == 0 && screen.contains("finished:")),
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
