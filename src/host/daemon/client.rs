//! The client side: reaching the daemon, starting one when none runs,
//! and one request with its reply.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::launch;
use crate::host::protocol::{self, Reply, Request, Settings};
use crate::paths::Paths;

use super::socket::socket_path;

/// Connect to the daemon, starting one in the background when none runs.
pub async fn connect(common: &Common, start: bool) -> Result<UnixStream> {
    let (paths, _) = launch::paths_and_config(common)?;
    let path = socket_path(&paths);
    if let Ok(s) = UnixStream::connect(&path).await {
        return Ok(s);
    }
    if !start {
        return Err(KilnError::Store(format!(
            "no kiln daemon runs ({}); `kiln agent --detach` starts one",
            path.display()
        )));
    }
    let exe = std::env::current_exe().map_err(|e| KilnError::io("kiln", e))?;
    let mut cmd = std::process::Command::new(exe);
    // It exits a minute after its last conversation and run end, so a
    // model no one uses does not stay in memory.
    // The client's settings, whole, on the daemon's stdin: the daemon
    // runs as this client was asked to, with nothing rebuilt from flags.
    cmd.args(["daemon", "--idle-exit", "60", "--settings-stdin"]);
    use std::os::unix::process::CommandExt;
    // Its one-line error (a bad model, a bad config) is kept for the client.
    let stderr = std::fs::create_dir_all(&paths.logs)
        .and_then(|_| crate::store::atomic::open_private(&startup_log(&paths), true))
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    // A session of its own, so the terminal hanging up does not reach it.
    // SAFETY: setsid in the child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| KilnError::io("kiln daemon", e))?;
    let settings = serde_json::to_vec(&Settings::of(common)).expect("settings serialize");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        // A daemon that died at once says why below.
        let _ = stdin.write_all(&settings);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = UnixStream::connect(&path).await {
            // Reap it whenever it exits.
            std::thread::spawn(move || child.wait());
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(KilnError::Store(
                why_it_stopped(common)
                    .unwrap_or_else(|| format!("the kiln daemon exited ({status})")),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(KilnError::Store(format!(
                "the kiln daemon did not start (see the log); {}",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a daemon a client started writes its stderr.
fn startup_log(paths: &Paths) -> PathBuf {
    paths.logs.join("daemon-stderr.log")
}

/// Why the daemon went away: the last line it wrote, when a client
/// started it.
pub fn why_it_stopped(common: &Common) -> Option<String> {
    let (paths, _) = launch::paths_and_config(common).ok()?;
    let text = std::fs::read_to_string(startup_log(&paths)).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.contains("daemon listening"))
        .map(|l| l.trim_start_matches("kiln: ").to_string())
}

/// One request, one reply.
pub async fn ask(stream: &mut UnixStream, req: &Request) -> Result<Reply> {
    protocol::write(stream, req)
        .await
        .map_err(|e| KilnError::io("daemon", e))?;
    protocol::read(stream)
        .await
        .map_err(|e| KilnError::Store(format!("daemon: {e}")))
}

/// The settings a client that started this daemon wrote to its stdin.
pub fn settings_from_stdin() -> Result<Settings> {
    use std::io::Read;
    let mut text = Vec::new();
    std::io::stdin()
        .take(protocol::MAX_FRAME as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| KilnError::io("stdin", e))?;
    if text.len() > protocol::MAX_FRAME {
        return Err(KilnError::BadArgument(format!(
            "stdin: the settings are over {} bytes",
            protocol::MAX_FRAME
        )));
    }
    serde_json::from_slice(&text)
        .map_err(|e| KilnError::BadArgument(format!("stdin: the settings do not parse: {e}")))
}
