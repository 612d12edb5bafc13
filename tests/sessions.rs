//! Sessions on disk as users meet them: killed processes, damaged files, a
//! full disk, two writers, and resuming on the real model.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln::engine::kalosm::EngineOptions;
use kiln::engine::Engine;
use kiln::paths::Paths;
use kiln::store::journal::{self, Report};
use kiln::store::prompt_cache::{PromptCache, DEFAULT_CAP_BYTES};
use kiln::store::session::{Event, OpenSession};
use kiln::store::snapshot::{self, SnapshotError};
use kiln::store::SessionStore;

fn kiln(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_HOME", home)
        .env("KILN_LOG", "info")
        .env_remove("KILN_MODEL");
    c
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sessions")
}

/// A KILN_HOME holding copies of the repository's example sessions.
fn home_with_examples() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    for name in ["example-chat", "example-interrupted"] {
        let dest = home.path().join("data/sessions").join(name);
        std::fs::create_dir_all(&dest).unwrap();
        for file in ["meta.json", "events.jsonl"] {
            std::fs::copy(examples().join(name).join(file), dest.join(file)).unwrap();
        }
    }
    home
}

fn export_json(home: &Path, id: &str) -> serde_json::Value {
    let out = kiln(home)
        .args(["sessions", "export", id, "--format", "json"])
        .output()
        .unwrap();
    common::json_stdout(&out)
}

#[tokio::test]
async fn kill_9_mid_stream_keeps_every_committed_message() {
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let question = "Write a long story about a dragon who runs a pottery kiln.";
    let mut child = kiln(home.path())
        .args(["ask", "--model"])
        .arg(&model.path)
        .args(["--temperature", "0", "--max-tokens", "400", question])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.len() < 80 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "kiln ask ended before the kill");
        seen.extend_from_slice(&buf[..n]);
    }
    // Long enough for a chunk batch to reach the disk, far shorter than the
    // 400-token answer.
    std::thread::sleep(Duration::from_millis(600));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    seen.extend_from_slice(&rest);
    let streamed = String::from_utf8_lossy(&seen).into_owned();

    let store = SessionStore::new(&Paths::under(home.path()));
    let listing = store.list();
    assert_eq!(listing.len(), 1);
    let doc = export_json(home.path(), &listing[0].id);
    let entries = doc["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{doc:#}");
    assert_eq!(entries[0]["kind"], "user");
    assert_eq!(entries[0]["text"], question);
    assert_eq!(entries[1]["kind"], "assistant");
    assert_eq!(entries[1]["interrupted"], true);
    let kept = entries[1]["text"].as_str().unwrap();
    assert!(
        kept.len() >= 40,
        "at most a fraction of a second is lost: {kept:?}"
    );
    assert!(streamed.starts_with(kept), "{kept:?} vs {streamed:?}");
    // The killed process no longer holds the lock.
    assert!(!listing[0].open_elsewhere);
}

#[test]
fn a_torn_last_line_is_a_warning_and_the_file_is_left_alone() {
    let home = home_with_examples();
    let events = home
        .path()
        .join("data/sessions/example-interrupted/events.jsonl");
    let before = std::fs::read(&events).unwrap();
    let out = kiln(home.path())
        .args(["sessions", "show", "example-interrupted"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("example-interrupted/events.jsonl line 4: the last line was cut off"),
        "{stderr}"
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("or a glaze applied too thick\n\n*(interrupted)*"),
        "{shown}"
    );
    assert_eq!(std::fs::read(&events).unwrap(), before);
}

#[test]
fn a_damaged_meta_is_listed_as_damaged_and_others_still_work() {
    let home = home_with_examples();
    let bad = home.path().join("data/sessions/20261124-000000-dead");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("meta.json"), b"{\"version\": 1, \"id\": \"2026").unwrap();
    let out = kiln(home.path())
        .args(["sessions", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("20261124-000000-dead   DAMAGED: ") && text.contains("meta.json: damaged"),
        "{text}"
    );
    assert!(
        text.contains("Firing bisque ware") && text.contains("Glaze crawling"),
        "{text}"
    );
    // Nothing rewrote it.
    assert_eq!(
        std::fs::read(bad.join("meta.json")).unwrap(),
        b"{\"version\": 1, \"id\": \"2026"
    );
    let out = kiln(home.path())
        .args(["sessions", "show", "20261124-000000-dead"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("meta.json: damaged"), "{err}");
}

#[test]
fn rename_rm_and_a_second_writer() {
    let home = home_with_examples();
    let ok = |args: &[&str]| {
        let out = kiln(home.path()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["sessions", "rename", "example-chat", "Bisque notes"]);
    assert!(ok(&["sessions", "list"]).contains("Bisque notes"));

    // Another process holds the session: a clear error, nothing changes.
    let dir = home.path().join("data/sessions/example-chat");
    let held = OpenSession::open(dir.clone()).unwrap();
    let out = kiln(home.path())
        .args(["sessions", "rename", "example-chat", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the session is open in another kiln process (pid "),
        "{err}"
    );
    assert!(ok(&["sessions", "list"]).contains("[open]"));
    drop(held);

    ok(&["sessions", "rm", "--yes", "example-chat"]);
    assert!(!dir.exists());
    let out = kiln(home.path())
        .args(["sessions", "show", "example-chat"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// On a real full filesystem (a tmpfs, where this test may mount one):
/// the failed write is reported with the file, kept, and written once
/// space returns.
#[tokio::test]
async fn a_full_disk_is_reported_and_writing_resumes_when_space_returns() {
    let Some(fs) = common::SmallFs::mount(1 << 20) else {
        eprintln!("skipping: no tmpfs can be mounted here (needs root)");
        return;
    };
    let store = SessionStore {
        root: fs.path().join("sessions"),
    };
    let created = store.create("m", None, 2048).unwrap();
    let session_dir = created.dir.clone();
    let events = created.events_path();
    drop(created);
    let (journal, mut reports) = journal::spawn(OpenSession::open(session_dir).unwrap());
    fs.leave(0);
    let big = "written while the disk is full ".repeat(2000);
    let committed = journal.commit(Event::User { text: big.clone() });
    let why = committed.unwrap_err();
    assert!(why.contains("No space left on device"), "{why}");
    let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .unwrap()
        .unwrap();
    let Report::Failed(message) = report else {
        panic!("{report:?}")
    };
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("events.jsonl"), "{message}");
    // Space returns.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report, Report::Recovered);
    journal.close();
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("written while the disk is full"), "{text}");
}

/// The KV snapshot path on the real model: a restored state is reused, a
/// damaged one never reaches kalosm.
#[tokio::test]
async fn kv_snapshots_restore_on_the_real_model_and_damage_is_refused() {
    let handle = common::spawned(EngineOptions {
        sampler: common::greedy(24),
        ..Default::default()
    })
    .await;
    let first = common::ask(&handle, "Name three metals.").await;
    assert!(first.error.is_none());
    let (tx, reply) = tokio::sync::oneshot::channel();
    handle.send(kiln::engine::EngineCommand::Snapshot(tx));
    let kv = reply.await.unwrap().unwrap().unwrap();
    assert_eq!(kv.kv_tokens, first.stats.context_tokens);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.snapshot");
    snapshot::write(&path, "fp", &kv).unwrap();

    // A second engine, as after a restart: restore, then only the new
    // message is prefilled.
    let mut engine = common::engine(EngineOptions {
        sampler: common::greedy(24),
        ..Default::default()
    })
    .await;
    engine.set_history(vec![
        kiln::engine::Message::new(kiln::engine::Role::User, "Name three metals."),
        kiln::engine::Message::new(kiln::engine::Role::Assistant, first.reply.clone()),
    ]);
    engine
        .restore(snapshot::read(&path, "fp").unwrap())
        .unwrap();
    let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .chat(1, "And two gases?".into(), &etx, &Default::default())
        .await;
    let turn = common::collect(&mut erx, 1).await;
    assert!(turn.error.is_none(), "{:?}", turn.error);
    assert_eq!(turn.stats.reused_tokens, kv.kv_tokens);
    assert!(turn.stats.prompt_tokens < 20, "{:?}", turn.stats);

    // Damage: refused by kiln's header before kalosm sees a byte.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        snapshot::read(&path, "fp"),
        Err(SnapshotError::Checksum(_))
    ));
    std::fs::write(&path, &bytes[..n / 3]).unwrap();
    assert!(matches!(
        snapshot::read(&path, "fp"),
        Err(SnapshotError::Truncated(..))
    ));
}

/// Options with a long system prompt that the prompt cache keeps.
fn cached_system_prompt(cache: &PromptCache, fingerprint: &str) -> EngineOptions {
    EngineOptions {
        context: Some(2048),
        sampler: common::greedy(8),
        system_prompt: Some("You are a careful assistant for potters. ".repeat(20)),
        prompt_cache: Some((std::sync::Arc::new(cache.clone()), fingerprint.to_string())),
        ..Default::default()
    }
}

/// A long system prompt is prefilled once; the next session loads it.
#[tokio::test]
async fn the_prompt_cache_skips_the_system_prompt_prefill() {
    let model = common::model().await;
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = snapshot::fingerprint(&model.path, "kalosm", 2048).unwrap();
    let cache = PromptCache::new(dir.path().to_path_buf(), DEFAULT_CAP_BYTES);
    let options = || cached_system_prompt(&cache, &fingerprint);
    let h1 = common::spawned(options()).await;
    let cold = common::ask(&h1, "Hello.").await;
    assert_eq!(cold.stats.cached_tokens, 0);
    assert_eq!(cache.stats().entries, 1);

    let h2 = common::spawned(options()).await;
    let warm = common::ask(&h2, "Hello.").await;
    assert!(warm.stats.cached_tokens > 150, "{:?}", warm.stats);
    assert_eq!(warm.stats.reused_tokens, warm.stats.cached_tokens);
    assert!(warm.stats.prompt_tokens < 20, "{:?}", warm.stats);
    // Same model, same prompt, greedy: the same answer either way.
    assert_eq!(warm.reply, cold.reply);
}

/// A prompt-cache entry whose llama.cpp state llama.cpp refuses (cut
/// short, its kiln checksum made anew) is prefilled instead, and the turn
/// reports no cache hit.
#[tokio::test]
async fn a_refused_prompt_cache_state_is_not_a_hit() {
    use kiln::engine::local::Backend;
    let _turn = common::one_engine_at_a_time().await;
    let model = common::model().await;
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = snapshot::fingerprint(&model.path, "llamacpp-v2-f16", 2048).unwrap();
    let cache = PromptCache::new(dir.path().to_path_buf(), DEFAULT_CAP_BYTES);
    let options = || cached_system_prompt(&cache, &fingerprint);
    let h1 = common::spawned_on(Backend::LlamaCpp, options()).await;
    let cold = common::ask(&h1, "Hello.").await;
    assert_eq!(cold.stats.cached_tokens, 0);
    let entries = cache.entries();
    assert_eq!(entries.len(), 1);
    let key = entries[0].key.clone();
    let mut state = cache.get(&key, &fingerprint).unwrap();
    let cut = state.bytes.len() - 1000;
    state.bytes.truncate(cut);
    cache.put(&key, &fingerprint, &state).unwrap();

    let h2 = common::spawned_on(Backend::LlamaCpp, options()).await;
    let warm = common::ask(&h2, "Hello.").await;
    assert_eq!(warm.error, None);
    assert_eq!(warm.stats.cached_tokens, 0, "{:?}", warm.stats);
    assert_eq!(warm.reply, cold.reply);
}

/// One disk budget for the KV states kiln keeps: a prompt-cache entry
/// written by the real `kiln ask` pushes the oldest session snapshots out
/// (the entry itself stays), a link in the sessions folder is never
/// followed, and `kiln cache stats` reports both kinds against the budget.
#[tokio::test]
async fn session_snapshots_and_the_prompt_cache_share_one_disk_budget() {
    let model = common::model().await;
    let home = tempfile::tempdir().unwrap();
    let sessions = home.path().join("data/sessions");
    let old = |id: &str, age_s: u64| {
        let dir = sessions.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.snapshot");
        std::fs::write(&path, vec![0u8; 300 << 10]).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        path
    };
    let oldest = old("20260101-000000-aaaa", 3600);
    let older = old("20260102-000000-bbbb", 1800);
    let outside = home.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("kv.snapshot"), vec![0u8; 300 << 10]).unwrap();
    std::os::unix::fs::symlink(&outside, sessions.join("20260103-000000-cccc")).unwrap();
    // A budget a few snapshots of this size can share: the new prompt-cache
    // entry (a couple of MB) overflows it.
    std::fs::write(home.path().join("config.toml"), "kv_disk_gib = 0.0005\n").unwrap();
    let kiln = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", home.path())
            .arg("--model")
            .arg(&model.path)
            .args(args)
            .output()
            .unwrap()
    };
    let system = "You are a careful assistant for potters. ".repeat(20);
    let out = kiln(&[
        "--no-daemon",
        "--max-tokens",
        "4",
        "--system",
        &system,
        "ask",
        "hi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = std::fs::read_dir(home.path().join("cache/prompts"))
        .unwrap()
        .count();
    assert_eq!(entries, 1, "the prompt cache kept its new entry");
    assert!(
        !oldest.exists() && !older.exists(),
        "the old snapshots went"
    );
    assert!(outside.join("kv.snapshot").exists(), "never through a link");
    let stats = kiln(&["cache", "stats"]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("KV on disk:"), "{text}");
    assert!(text.contains("0 session snapshots"), "{text}");
    assert!(text.contains("1 prompt-cache entries"), "{text}");
}
