//! The client side: reaching the daemon, starting one when none runs,
//! and one request with its reply.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::launch;
use crate::host::protocol::{self, Reply, Request};
use crate::paths::Paths;

use super::settings::on_off;
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
    cmd.args(["daemon", "--idle-exit", "60"]);
    cmd.args(daemon_args(common));
    use std::os::unix::process::CommandExt;
    // Its one-line error (a bad model, a bad config) is kept for the client.
    let stderr = std::fs::create_dir_all(&paths.logs)
        .and_then(|_| crate::store::atomic::open_private(&startup_log(&paths), true))
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    cmd.stdin(std::process::Stdio::null())
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

fn daemon_args(common: &Common) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut pair = |flag: &str, value: Option<std::ffi::OsString>| {
        if let Some(v) = value {
            args.push(flag.into());
            args.push(v);
        }
    };
    pair("--model", common.model.clone().map(Into::into));
    pair("--data-dir", common.data_dir.clone().map(Into::into));
    pair("--config", common.config.clone().map(Into::into));
    pair("--ctx", common.ctx.map(|c| c.to_string().into()));
    pair("--system", common.system.clone().map(Into::into));
    pair("--engine", Some(common.engine.clone().into()));
    pair("--kv-type", Some(common.kv_type.name().into()));
    for (flag, value) in common.window.flags() {
        pair(flag, Some(value.into()));
    }
    pair(
        "--workspace",
        common
            .workspace
            .as_ref()
            .map(|w| w.canonicalize().unwrap_or_else(|_| w.clone()).into()),
    );
    let policy = clap::ValueEnum::to_possible_value(&common.approval)
        .map(|v| v.get_name().to_string().into());
    pair("--approval", policy);
    let s = &common.sampling;
    pair("--temperature", s.temperature.map(|v| v.to_string().into()));
    pair("--top-p", s.top_p.map(|v| v.to_string().into()));
    pair(
        "--repeat-penalty",
        s.repeat_penalty.map(|v| v.to_string().into()),
    );
    pair("--seed", s.seed.map(|v| v.to_string().into()));
    pair("--max-tokens", s.max_tokens.map(|v| v.to_string().into()));
    pair("--think", s.think.map(|v| on_off(v).into()));
    if common.allow_swap {
        args.push("--allow-swap".into());
    }
    args
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
