//! The agent's tools, and the workspace they are confined to.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// One tool call as the model writes it: `{"tool": "read_file", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolCall {
    ReadFile {
        path: String,
    },
    /// The whole file (`content`), or a patch: replace the one occurrence
    /// of `find` with `replace`.
    WriteFile {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        find: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replace: Option<String>,
    },
    ListDir {
        path: String,
    },
    Search {
        query: String,
    },
    Shell {
        command: String,
    },
    Finish {
        summary: String,
    },
}

/// What a call may do, for the approval policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Read,
    Write,
    Shell,
}

impl ToolCall {
    pub fn effect(&self) -> Effect {
        match self {
            ToolCall::ReadFile { .. }
            | ToolCall::ListDir { .. }
            | ToolCall::Search { .. }
            | ToolCall::Finish { .. } => Effect::Read,
            ToolCall::WriteFile { .. } => Effect::Write,
            ToolCall::Shell { .. } => Effect::Shell,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ToolCall::ReadFile { .. } => "read_file",
            ToolCall::WriteFile { .. } => "write_file",
            ToolCall::ListDir { .. } => "list_dir",
            ToolCall::Search { .. } => "search",
            ToolCall::Shell { .. } => "shell",
            ToolCall::Finish { .. } => "finish",
        }
    }

    /// A short description for progress lines and approval prompts.
    pub fn describe(&self) -> String {
        let arg = match self {
            ToolCall::ReadFile { path } | ToolCall::ListDir { path } => path.clone(),
            ToolCall::WriteFile { path, find, .. } => match find {
                Some(_) => format!("{path} (patch)"),
                None => path.clone(),
            },
            ToolCall::Search { query } => query.clone(),
            ToolCall::Shell { command } => command.clone(),
            ToolCall::Finish { summary } => summary.clone(),
        };
        let arg: String = arg.chars().take(80).collect();
        format!("{} {arg}", self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolResult {
    pub ok: bool,
    pub output: String,
}

impl ToolResult {
    fn ok(output: impl Into<String>) -> ToolResult {
        ToolResult {
            ok: true,
            output: output.into(),
        }
    }

    fn err(output: impl Into<String>) -> ToolResult {
        ToolResult {
            ok: false,
            output: output.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub shell_timeout: Duration,
    /// Bytes of a tool's output that are kept; the rest is cut with a note.
    pub max_output: usize,
    /// A file larger than this is not read whole.
    pub max_read: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            shell_timeout: Duration::from_secs(60),
            max_output: 16 << 10,
            max_read: 1 << 20,
        }
    }
}

/// The folder an agent works in. Every path is resolved inside it.
#[derive(Clone, Debug)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub fn new(root: &Path) -> std::io::Result<Workspace> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a folder",
                root.display()
            )));
        }
        Ok(Workspace { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` inside the workspace, or why not. Absolute paths and `..` are
    /// refused outright; symlinks are followed and must stay inside. A path
    /// that does not exist yet (a new file) is checked through its parent.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        let rel = Path::new(path.trim());
        if rel.is_absolute() {
            return Err(format!("{path}: absolute paths are outside the workspace"));
        }
        if rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("{path}: '..' leaves the workspace"));
        }
        let full = self.root.join(rel);
        let real = match full.canonicalize() {
            Ok(p) => p,
            Err(_) => {
                let parent = full.parent().unwrap_or(&self.root);
                let name = full
                    .file_name()
                    .ok_or_else(|| format!("{path}: no file name"))?;
                parent
                    .canonicalize()
                    .map_err(|e| format!("{path}: {e}"))?
                    .join(name)
            }
        };
        if !real.starts_with(&self.root) {
            return Err(format!("{path}: a link that leads outside the workspace"));
        }
        Ok(real)
    }

    fn shown(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    }
}

/// Cut `text` to `max` bytes (on a character boundary) with a note.
pub fn cap(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("\n[output cut: {total} bytes, first {end} kept]"));
    text
}

pub async fn execute(call: &ToolCall, ws: &Workspace, limits: &Limits) -> ToolResult {
    match call {
        ToolCall::ReadFile { path } => read_file(ws, path, limits),
        ToolCall::WriteFile {
            path,
            content,
            find,
            replace,
        } => write_file(
            ws,
            path,
            content.as_deref(),
            find.as_deref(),
            replace.as_deref(),
        ),
        ToolCall::ListDir { path } => list_dir(ws, path, limits),
        ToolCall::Search { query } => search(ws, query, limits),
        ToolCall::Shell { command } => shell(ws, command, limits).await,
        ToolCall::Finish { summary } => ToolResult::ok(summary.clone()),
    }
}

fn read_file(ws: &Workspace, path: &str, limits: &Limits) -> ToolResult {
    let full = match ws.resolve(path) {
        Ok(p) => p,
        Err(e) => return ToolResult::err(e),
    };
    match std::fs::metadata(&full) {
        Ok(m) if m.is_dir() => return ToolResult::err(format!("{path} is a folder; use list_dir")),
        Ok(m) if m.len() > limits.max_read => {
            return ToolResult::err(format!(
                "{path} is {} bytes, more than the {} bytes read_file takes",
                m.len(),
                limits.max_read
            ))
        }
        Ok(_) => {}
        Err(e) => return ToolResult::err(format!("{path}: {e}")),
    }
    match std::fs::read(&full) {
        Ok(bytes) => ToolResult::ok(cap(
            String::from_utf8_lossy(&bytes).into_owned(),
            limits.max_output,
        )),
        Err(e) => ToolResult::err(format!("{path}: {e}")),
    }
}

fn write_file(
    ws: &Workspace,
    path: &str,
    content: Option<&str>,
    find: Option<&str>,
    replace: Option<&str>,
) -> ToolResult {
    let full = match ws.resolve(path) {
        Ok(p) => p,
        Err(e) => return ToolResult::err(e),
    };
    let new = match (content, find, replace) {
        (Some(c), None, None) => c.to_string(),
        (None, Some(f), Some(r)) => {
            let old = match std::fs::read_to_string(&full) {
                Ok(t) => t,
                Err(e) => return ToolResult::err(format!("{path}: {e}")),
            };
            match old.matches(f).count() {
                1 => old.replacen(f, r, 1),
                0 => return ToolResult::err(format!("{path}: the text to find is not there")),
                n => {
                    return ToolResult::err(format!(
                        "{path}: the text to find occurs {n} times; give more of it"
                    ))
                }
            }
        }
        _ => {
            return ToolResult::err(
                "write_file takes either content, or find and replace".to_string(),
            )
        }
    };
    if let Some(parent) = full.parent() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            return ToolResult::err(format!("{path}: {e}"));
        }
    }
    match crate::store::atomic::write_atomic(&full, new.as_bytes()) {
        Ok(()) => ToolResult::ok(format!("wrote {} bytes to {}", new.len(), ws.shown(&full))),
        Err(e) => ToolResult::err(format!("{path}: {e}")),
    }
}

fn list_dir(ws: &Workspace, path: &str, limits: &Limits) -> ToolResult {
    let path = if path.trim().is_empty() { "." } else { path };
    let full = match ws.resolve(path) {
        Ok(p) => p,
        Err(e) => return ToolResult::err(e),
    };
    let entries = match std::fs::read_dir(&full) {
        Ok(e) => e,
        Err(e) => return ToolResult::err(format!("{path}: {e}")),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let mut name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                name.push('/');
            }
            name
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return ToolResult::ok("(empty)");
    }
    ToolResult::ok(cap(names.join("\n"), limits.max_output))
}

/// Lines containing `query` (case-insensitive) in the workspace's text files.
fn search(ws: &Workspace, query: &str, limits: &Limits) -> ToolResult {
    if query.trim().is_empty() {
        return ToolResult::err("search needs a query");
    }
    let needle = query.to_lowercase();
    let mut hits = Vec::new();
    let mut stack = vec![ws.root.clone()];
    let mut out_len = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(kind) = e.file_type() else { continue };
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            // Links are not followed: they may lead out of the workspace.
            if kind.is_dir() {
                stack.push(e.path());
            } else if kind.is_file() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.len() > limits.max_read {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                for (n, line) in text.lines().enumerate() {
                    if line.to_lowercase().contains(&needle) {
                        let hit = format!("{}:{}: {}", ws.shown(&e.path()), n + 1, line.trim());
                        out_len += hit.len() + 1;
                        hits.push(hit);
                        if out_len > limits.max_output {
                            return ToolResult::ok(cap(hits.join("\n"), limits.max_output));
                        }
                    }
                }
            }
        }
    }
    if hits.is_empty() {
        return ToolResult::ok(format!("no line contains '{query}'"));
    }
    ToolResult::ok(hits.join("\n"))
}

/// Run `command` with `sh -c` in the workspace, in its own process group so
/// a timeout kills everything it started. Output beyond the cap is read and
/// dropped, so a chatty command cannot fill memory or block on a full pipe.
async fn shell(ws: &Workspace, command: &str, limits: &Limits) -> ToolResult {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(&ws.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ToolResult::err(format!("cannot run sh: {e}")),
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out = tokio::spawn(read_capped(stdout, limits.max_output));
    let err = tokio::spawn(read_capped(stderr, limits.max_output));
    let status = match tokio::time::timeout(limits.shell_timeout, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on the process group the child leads.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            let _ = child.wait().await;
            None
        }
    };
    let (out, out_total) = out.await.unwrap_or_default();
    let (err, err_total) = err.await.unwrap_or_default();
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if out_total > out.len() {
        text.push_str(&format!(
            "\n[stdout cut: {out_total} bytes, first {} kept]",
            out.len()
        ));
    }
    if !err.is_empty() {
        text.push_str("\n[stderr]\n");
        text.push_str(&String::from_utf8_lossy(&err));
        if err_total > err.len() {
            text.push_str(&format!(
                "\n[stderr cut: {err_total} bytes, first {} kept]",
                err.len()
            ));
        }
    }
    match status {
        Some(s) => {
            let code = s
                .code()
                .map_or("killed by a signal".into(), |c| c.to_string());
            ToolResult {
                ok: s.success(),
                output: format!("exit code {code}\n{text}"),
            }
        }
        None => ToolResult::err(format!(
            "timed out after {} s and was killed\n{text}",
            limits.shell_timeout.as_secs()
        )),
    }
}

/// Read `r` to its end, keeping the first `max` bytes; returns them and the
/// total.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(mut r: R, max: usize) -> (Vec<u8>, usize) {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, total)
}
