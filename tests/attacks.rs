//! kiln attacked as a hostile local user, a hostile repository and a
//! hostile model or endpoint would attack it. Each test covers a class of
//! defect, with several variants of it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::agent::tools::{execute, Limits, ToolCall, ToolResult, Workspace};
use kiln::paths::Paths;
use kiln::store::SessionStore;

fn kiln(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_HOME", home)
        .env("KILN_LOG", "info")
        .env_remove("KILN_MODEL")
        .stdin(Stdio::null());
    c
}

fn run(home: &Path, args: &[&str]) -> Output {
    kiln(home).args(args).output().expect("kiln runs")
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Session ids are ids: a path, an empty id, `.`/`..`, a link planted in
/// the sessions folder, each refused in one line with nothing outside the
/// data folder deleted, renamed or locked. Removing needs a yes.
#[test]
fn session_commands_take_ids_and_touch_nothing_outside() {
    let home = tempfile::tempdir().unwrap();
    let store = SessionStore::new(&Paths::under(home.path()));
    let mine = store.create("m", None, 2048).unwrap();
    let id = mine.meta.id.clone();
    drop(mine);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("meta.json"), "{}").unwrap();
    std::fs::write(victim.join("events.jsonl"), "").unwrap();
    std::fs::write(victim.join("precious.txt"), "keep").unwrap();
    // A link with an id's name, pointing out of the store.
    let planted = store.root.join("20990101-000000-beef");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let sessions = store.root.display().to_string();
    let victim_s = victim.display().to_string();
    let relative = format!(
        "{sessions}/../../../{}",
        victim.strip_prefix("/").unwrap().display()
    );
    let queries = [
        victim_s.as_str(),
        relative.as_str(),
        "",
        ".",
        "..",
        "/",
        "20990101-000000-beef",
        "../victim",
        "a/b",
        " ",
        "*",
    ];
    for q in queries {
        for args in [
            vec!["sessions", "rm", "--yes", q],
            vec!["sessions", "rename", q, "pwned"],
            vec!["sessions", "show", q],
        ] {
            let out = run(home.path(), &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
    }
    assert_eq!(std::fs::read(victim.join("precious.txt")).unwrap(), b"keep");
    assert!(!victim.join("lock").exists(), "nothing was locked outside");
    assert_eq!(std::fs::read(victim.join("meta.json")).unwrap(), b"{}");
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());

    // No terminal to answer and no --yes: refused, the session stays.
    let out = run(home.path(), &["sessions", "rm", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(store.root.join(&id).exists());
    // A prefix of a real id, with --yes: removed.
    let out = run(home.path(), &["sessions", "rm", "--yes", &id[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!store.root.join(&id).exists());
}

/// kiln's data is its user's alone: folders an older kiln left open are
/// closed on start, everything new is 0700/0600, and another local user
/// (made with useradd where this runs as root) cannot read a transcript.
#[tokio::test]
async fn private_data_is_private() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    // Open to all, as under an ordinary umask: the other user can walk in.
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = home.path().join("data/sessions/20200101-000000-0001");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("events.jsonl"), "{}\n").unwrap();
    for d in [
        home.path().join("data"),
        home.path().join("data/sessions"),
        old.clone(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        old.join("events.jsonl"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run(
        home.path(),
        &[
            "ask",
            "--model",
            model.path.to_str().unwrap(),
            "--max-tokens",
            "8",
            "A secret about glazes.",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen_files = 0;
    let mut stack = vec![
        home.path().join("data"),
        home.path().join("logs"),
        home.path().join("cache"),
    ];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
            seen_files += 1;
        }
    }
    assert!(
        seen_files >= 4,
        "the session, its meta, its lock and the log"
    );

    // Another user, where this test may make one.
    let is_root = unsafe { libc::geteuid() } == 0;
    let runuser = Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists();
    if !is_root || !runuser {
        eprintln!("skipping the second-user check: needs root and runuser");
        return;
    }
    let _ = Command::new("useradd")
        .args(["--no-create-home", "--shell", "/bin/false", "kilnother"])
        .stderr(Stdio::null())
        .status();
    let sessions = kiln::store::SessionStore::new(&Paths::under(home.path())).list();
    let newest = sessions
        .iter()
        .find(|l| l.id != "20200101-000000-0001")
        .unwrap();
    for target in [
        newest.dir.join("events.jsonl"),
        old.join("events.jsonl"),
        home.path().join("data/sessions"),
    ] {
        let out = Command::new("runuser")
            .args(["-u", "kilnother", "--", "cat"])
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the other user read {}",
            target.display()
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("secret"),
            "{}",
            target.display()
        );
    }
}

/// A full disk never loses a question silently: at every amount of space
/// left, `kiln ask` either has the question on disk before answering, or
/// says it could not save it and does not answer; no damaged or empty
/// session is left behind.
#[tokio::test]
async fn a_full_disk_never_loses_a_question_silently() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let (mut tried, mut refused) = (0, 0);
    for free in [0u64, 1 << 10, 4 << 10, 12 << 10, 64 << 10] {
        let Some(fs) = common::SmallFs::mount(1 << 20) else {
            eprintln!("skipping: no tmpfs can be mounted here (needs root)");
            return;
        };
        tried += 1;
        // The folders exist first, as on a disk that filled up later.
        std::fs::create_dir_all(fs.path().join("data/sessions")).unwrap();
        std::fs::create_dir_all(fs.path().join("logs")).unwrap();
        fs.leave(free);
        let question = format!("Is this question kept with {free} bytes free?");
        let out = kiln(fs.path())
            .args([
                "ask",
                "--model",
                model.path.to_str().unwrap(),
                "--max-tokens",
                "4",
            ])
            .arg(&question)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let store = SessionStore::new(&Paths::under(fs.path()));
        let listed = store.list();
        assert!(
            listed.iter().all(|l| l.meta.is_some()),
            "{free} bytes free: a damaged session: {:?}",
            listed.iter().map(|l| &l.problem).collect::<Vec<_>>()
        );
        if out.status.success() {
            let kept = listed.iter().any(|l| {
                std::fs::read_to_string(l.dir.join("events.jsonl"))
                    .is_ok_and(|t| t.contains(&question))
            });
            assert!(
                kept,
                "{free} bytes free: answered, but the question is not on disk: {err}"
            );
        } else {
            refused += 1;
            assert!(
                err.contains("could not be saved, so it was not answered"),
                "{free} bytes free: {err}"
            );
            assert!(
                out.stdout.is_empty(),
                "{free} bytes free: it answered anyway"
            );
            assert!(
                listed.is_empty(),
                "{free} bytes free: a session without its question"
            );
        }
    }
    assert!(tried > 0);
    assert!(
        refused > 0,
        "no amount of space was too little: the test tests nothing"
    );
}

fn tools() -> (tempfile::TempDir, tempfile::TempDir, Workspace) {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.txt"), "inside\n").unwrap();
    std::fs::write(outside.path().join("victim"), "keep").unwrap();
    let ws = Workspace::new(root.path()).unwrap();
    (root, outside, ws)
}

async fn call(ws: &Workspace, json: &str) -> ToolResult {
    let call: ToolCall = serde_json::from_str(json).unwrap();
    execute(&call, ws, &Limits::default(), &AtomicBool::new(false)).await
}

fn write(path: &str, content: &str) -> String {
    serde_json::json!({"tool": "write_file", "path": path, "content": content}).to_string()
}

/// Links a repository ships, at the names an atomic write used for its
/// temporary file and at the target: nothing outside is written.
#[tokio::test]
async fn planted_links_are_never_written_through() {
    let (root, outside, ws) = tools();
    let victim = outside.path().join("victim");
    for name in [
        format!(".notes.txt.tmp-{}", std::process::id()),
        ".notes.txt.tmp".into(),
        ".new.txt.tmp-1".into(),
    ] {
        std::os::unix::fs::symlink(&victim, root.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink(&victim, root.path().join("link.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
    for (path, content) in [
        ("notes.txt", "new"),
        ("new.txt", "new"),
        ("link.txt", "new"),
        ("out/victim", "new"),
        ("out/fresh.txt", "new"),
    ] {
        let _ = call(&ws, &write(path, content)).await;
    }
    let patch = serde_json::json!({"tool": "write_file", "path": "out/victim", "find": "keep", "replace": "pwned"});
    assert!(!call(&ws, &patch.to_string()).await.ok);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(!outside.path().join("fresh.txt").exists());
    assert_eq!(
        std::fs::read(root.path().join("notes.txt")).unwrap(),
        b"new"
    );
}

/// A process swaps a folder of the workspace for a link out of it while
/// the agent writes into that folder, again and again: nothing lands
/// outside.
#[tokio::test(flavor = "multi_thread")]
async fn a_link_swapped_in_mid_call_leads_nowhere() {
    let (root, outside, ws) = tools();
    let sub = root.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (sub, stop) = (sub.clone(), stop.clone());
        let real = root.path().join("sub-real");
        let target = outside.path().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = std::fs::rename(&sub, &real);
                let _ = std::os::unix::fs::symlink(&target, &sub);
                std::thread::yield_now();
                let _ = std::fs::remove_file(&sub);
                let _ = std::fs::rename(&real, &sub);
            }
        })
    };
    for i in 0..300 {
        let _ = call(&ws, &write(&format!("sub/f{i}.txt"), "x")).await;
        let _ = call(
            &ws,
            &serde_json::json!({"tool": "read_file", "path": "sub/../../victim"}).to_string(),
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    swapper.join().unwrap();
    let escaped: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "victim")
        .collect();
    assert!(escaped.is_empty(), "written outside: {escaped:?}");
}

/// Paths are taken as written; new folders are made; what is not a
/// regular file is refused without blocking; patches and searches are
/// bounded and say what they skipped; listings cannot be misread.
#[tokio::test]
async fn workspace_files_are_taken_exactly_and_safely() {
    let (root, _outside, ws) = tools();
    let r = root.path();
    // Exact names: no trimming.
    let newline = call(&ws, &write("x\n", "newline")).await;
    assert!(newline.ok, "{newline:?}");
    assert_eq!(std::fs::read(r.join("x\n")).unwrap(), b"newline");
    assert!(!r.join("x").exists());
    std::fs::write(r.join("secret"), "the real secret").unwrap();
    let read = call(&ws, r#"{"tool": "read_file", "path": " secret"}"#).await;
    assert!(
        !read.ok && !read.output.contains("the real secret"),
        "{read:?}"
    );
    // New nested folders.
    assert!(
        call(&ws, &write("src/newdir/deeper/file.rs", "fn main() {}"))
            .await
            .ok
    );
    assert!(r.join("src/newdir/deeper/file.rs").is_file());
    // A FIFO: refused at once, for reading and for patching.
    let fifo = std::ffi::CString::new(r.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let started = Instant::now();
    let fifo_read = call(&ws, r#"{"tool": "read_file", "path": "pipe"}"#).await;
    let fifo_patch = call(
        &ws,
        r#"{"tool": "write_file", "path": "pipe", "find": "a", "replace": "b"}"#,
    )
    .await;
    let fifo_search = call(&ws, r#"{"tool": "search", "query": "zzz"}"#).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !fifo_read.ok && fifo_read.output.contains("not a regular file"),
        "{fifo_read:?}"
    );
    assert!(!fifo_patch.ok, "{fifo_patch:?}");
    assert!(fifo_search.ok, "{fifo_search:?}");
    // A huge sparse file: a patch refuses it without reading it.
    let big = std::fs::File::create(r.join("big.log")).unwrap();
    big.set_len(2 << 30).unwrap();
    let started = Instant::now();
    let patch = call(
        &ws,
        r#"{"tool": "write_file", "path": "big.log", "find": "a", "replace": "b"}"#,
    )
    .await;
    assert!(!patch.ok && patch.output.contains("bytes"), "{patch:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A name with a newline cannot pass for two entries.
    std::fs::write(r.join("evil\nnotes.txt"), "x").unwrap();
    let list = call(&ws, r#"{"tool": "list_dir", "path": "."}"#).await;
    assert!(
        list.output.contains(r#""evil\nnotes.txt""#),
        "{}",
        list.output
    );
    assert_eq!(list.output.lines().filter(|l| *l == "notes.txt").count(), 1);
    // Binary and non-UTF-8 files are reported, not skipped silently.
    std::fs::write(r.join("blob.bin"), b"needle\0\xff\xfe").unwrap();
    std::fs::write(r.join("latin1.txt"), b"caf\xe9 needle").unwrap();
    let found = call(&ws, r#"{"tool": "search", "query": "needle"}"#).await;
    assert!(found.output.contains("latin1.txt:1:"), "{}", found.output);
    assert!(found.output.contains("1 binary files"), "{}", found.output);
}

/// Dead, or a zombie waiting for a parent that may never reap it (a
/// container's first process often does not).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn pids(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A shell call's processes end with it (background, `nohup`, `setsid`
/// and double-forked children too), its pipes do not hold it open, and a
/// stop is honoured within a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_shell_call_takes_its_processes_with_it() {
    let (root, _outside, ws) = tools();
    let r = root.path();
    let limits = Limits {
        shell_timeout: Duration::from_secs(20),
        ..Limits::default()
    };
    for (name, command) in [
        ("bg", "sleep 30 & echo $! > bg.pid"),
        (
            "nohup",
            "nohup sleep 30 > /dev/null 2>&1 & echo $! > nohup.pid",
        ),
        (
            "setsid",
            "setsid sh -c 'echo $$ > setsid.pid; exec sleep 30' & while [ ! -s setsid.pid ]; do sleep 0.05; done",
        ),
        (
            "double",
            "(sh -c 'sleep 30 & echo $! > double.pid' &) ; while [ ! -s double.pid ]; do sleep 0.05; done",
        ),
        (
            "holder",
            "setsid sleep 30 & echo $! > holder.pid; echo done",
        ),
    ] {
        let started = Instant::now();
        let c = ToolCall::Shell {
            command: command.into(),
            edits: None,
        };
        let result = execute(&c, &ws, &limits, &AtomicBool::new(false)).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            started.elapsed()
        );
        assert!(
            result.output.starts_with("exit code 0"),
            "{name}: {result:?}"
        );
        let file = r.join(format!("{name}.pid"));
        let found = pids(&file);
        assert!(!found.is_empty(), "{name}: no pid written");
        std::thread::sleep(Duration::from_millis(200));
        for pid in found {
            assert!(gone(pid), "{name}: process {pid} outlived its call");
        }
    }
    // A stop, mid-command.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        flag.store(true, Ordering::SeqCst);
    });
    let started = Instant::now();
    let c = ToolCall::Shell {
        command: "setsid sleep 60 & sleep 60".into(),
        edits: None,
    };
    let result = execute(&c, &ws, &limits, &stop).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "stopped after {took:?}");
    assert!(
        result.output.starts_with("stopped by the user"),
        "{result:?}"
    );
}

/// A stub OpenAI-compatible endpoint that answers every request with
/// `response` (raw HTTP).
async fn stub(response: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

fn sse(pieces: &[&str]) -> String {
    let mut body = String::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
    for p in pieces {
        let chunk = serde_json::json!({"choices": [{"delta": {"content": p}}]});
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body.push_str(
        "data: {\"choices\": [{\"delta\": {}, \"finish_reason\": \"stop\"}]}\n\ndata: [DONE]\n\n",
    );
    body
}

const KEY: &str = "sk-kiln-test-4f1c9e27d3";

fn endpoint_home(name: &str, base_url: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "[endpoints.{name}]\nbase_url = \"{base_url}\"\nmodel = \"m\"\napi_key_env = \"KILN_TEST_KEY\"\n"
        ),
    )
    .unwrap();
    home
}

fn everything_written(home: &Path) -> String {
    let mut all = String::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.file_name().is_some_and(|n| n == "config.toml") {
            // The user's own file, which names the endpoint.
        } else if let Ok(bytes) = std::fs::read(&p) {
            all.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    all
}

/// An endpoint that sends escape sequences (retitle, clipboard, cursor
/// moves, 8-bit CSI, bidi overrides) and echoes the API key, split across
/// chunks, in its stream and in an error body: the terminal's title and
/// screen stay kiln's, and the key reaches neither the screen, the journal
/// nor the log.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_endpoint_text_is_shown_not_obeyed_and_secrets_are_redacted() {
    let (a, b) = KEY.split_at(9);
    let stream = stub(sse(&[
        "hello \x1b]2;PWNED-TITLE\x07",
        "\x1b]52;c;cHduZWQ=\x07 \x1b[2J\x1b[H fake$ ",
        "\u{9b}31m red \u{202e}txt.exe ",
        "your key is ",
        a,
        b,
        " bye",
    ]))
    .await;
    let home = endpoint_home("evil", &stream);
    let cmd = format!(
        "KILN_HOME={} KILN_TEST_KEY={KEY} {} ask --engine remote:evil 'hi'; echo EXIT=$?; sleep 30",
        home.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
    );
    let tmux = common::Tmux::start("hostile", 120, 30, &cmd);
    let before = tmux.format("#{pane_title}");
    let screen = tmux.wait_for("the answer", 30, |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("hello ␛]2;PWNED-TITLE␇"), "{screen}");
    assert!(
        screen.contains("[redacted]") && !screen.contains(KEY),
        "{screen}"
    );
    assert!(
        screen.contains("<U+202E>") && screen.contains("<U+009B>"),
        "{screen}"
    );
    let title = tmux.format("#{pane_title}");
    assert!(!title.contains("PWNED"), "retitled: {title} (was {before})");
    let buffers = tmux.tmux().args(["list-buffers"]).output().unwrap();
    assert!(buffers.stdout.is_empty(), "the clipboard was written");
    drop(tmux);
    assert!(!everything_written(home.path()).contains(KEY));

    // The key echoed in an error body, and a password in the URL.
    let failing = stub(format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\n\r\ninvalid key {KEY}\x1b]2;x\x07"
    ))
    .await;
    let with_password = "http://user:hunter2-pw@127.0.0.1:1/v1".to_string();
    for (name, url, secret) in [
        ("failing", failing, KEY),
        ("pw", with_password, "hunter2-pw"),
    ] {
        let home = endpoint_home(name, &url);
        let out = kiln(home.path())
            .env("KILN_TEST_KEY", KEY)
            .args(["ask", "--engine", &format!("remote:{name}"), "hi"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(!err.contains(secret) && !err.contains('\x1b'), "{err}");
        assert!(!everything_written(home.path()).contains(secret));
    }
}

/// The workstation on a full disk: a message that cannot be saved is not
/// sent to the model, the screen says why, and one whose session exists is
/// written once space returns.
#[tokio::test]
async fn the_workstation_does_not_send_a_message_it_could_not_save() {
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let Some(fs) = common::SmallFs::mount(2 << 20) else {
        eprintln!("skipping: no tmpfs can be mounted here (needs root)");
        return;
    };
    std::fs::create_dir_all(fs.path().join("data/sessions")).unwrap();
    std::fs::create_dir_all(fs.path().join("logs")).unwrap();
    let cmd = format!(
        "KILN_HOME={} {} --no-daemon --model {} --max-tokens 16; echo EXIT=$?; sleep 30",
        fs.path().display(),
        env!("CARGO_BIN_EXE_kiln"),
        model.path.display()
    );
    let tmux = common::Tmux::start("fulldisk", 160, 40, &cmd);
    tmux.wait_for("the welcome screen", 60, |s| s.contains("Type a message"));
    // The first message makes the session; then the disk fills up.
    tmux.send(&["Say hi.", "Enter"]);
    tmux.wait_for("the first answer", 60, |s| s.contains(" tok · "));
    fs.leave(0);
    // Longer than what is left of the journal's last page, so that it needs
    // space the disk does not have.
    let question = format!("Is this question kept? {}", "glaze ".repeat(800));
    let pasted = fs.path().join("../question.txt");
    std::fs::write(&pasted, &question).unwrap();
    tmux.paste(&pasted);
    std::thread::sleep(Duration::from_millis(500));
    tmux.send(&["Enter"]);
    let screen = tmux.wait_for("the refusal", 90, |s| s.contains("could not be saved"));
    assert!(screen.contains("not sent to the model"), "{screen}");
    std::thread::sleep(Duration::from_secs(2));
    let store = SessionStore::new(&Paths::under(fs.path()));
    let dir = store.list()[0].dir.clone();
    let events = || std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(!events().contains("Is this question kept?"));
    // Space returns: the queued message is written.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events().contains("Is this question kept?") {
        assert!(
            Instant::now() < deadline,
            "the kept message was never written"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let answers = events().matches("\"type\":\"answer\"").count();
    assert_eq!(answers, 1, "only the first message was answered");
    tmux.send(&["C-q"]);
    tmux.wait_for("kiln to exit", 30, |s| s.contains("EXIT=0"));
}
