//! The agent's tools, and the workspace they are confined to.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
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
        /// The files the command will change, as the model says: each is
        /// read before and after, and what changed comes back as a diff.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edits: Option<Vec<String>>,
    },
    Finish {
        summary: String,
    },
    /// A tool of one of the run's MCP servers, by the name the model
    /// calls it (`SERVER__tool`), with its arguments as the server takes
    /// them.
    Mcp {
        name: String,
        arguments: serde_json::Value,
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
            // What a server's tool does is the server's to say, and what it
            // says is not trusted: asked like a write unless config.toml
            // marks the tool read-only (`Agent::effect`).
            ToolCall::Mcp { .. } => Effect::Write,
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
            ToolCall::Mcp { .. } => "mcp",
        }
    }

    /// The tool as the model named it: an MCP tool's own name.
    pub fn label(&self) -> String {
        match self {
            ToolCall::Mcp { name, .. } => crate::visible::visible_line(name).into_owned(),
            _ => self.name().to_string(),
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
            ToolCall::Shell { command, .. } => command.clone(),
            ToolCall::Finish { summary } => summary.clone(),
            ToolCall::Mcp { arguments, .. } => arguments.to_string(),
        };
        let arg: String = arg.chars().take(80).collect();
        format!("{} {arg}", self.label())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolResult {
    pub ok: bool,
    pub output: String,
    /// What a write changed, as a unified diff (`diff::unified`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl ToolResult {
    pub(super) fn ok(output: impl Into<String>) -> ToolResult {
        ToolResult {
            ok: true,
            output: output.into(),
            diff: None,
        }
    }

    pub(super) fn err(output: impl Into<String>) -> ToolResult {
        ToolResult {
            ok: false,
            output: output.into(),
            diff: None,
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
    /// What shell commands may do.
    pub sandbox: super::sandbox::Sandbox,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            shell_timeout: Duration::from_secs(60),
            max_output: 16 << 10,
            max_read: 1 << 20,
            sandbox: super::sandbox::Sandbox::default(),
        }
    }
}

/// The folder an agent works in. Every file is opened beneath a handle on
/// it (cap-std: `openat2` with `RESOLVE_BENEATH` on Linux, else a walk
/// with no-follow at each step), so neither `..`, an absolute path, nor a
/// link, even one swapped in while a call runs, leads a tool outside.
#[derive(Clone, Debug)]
pub struct Workspace {
    root: PathBuf,
    dir: std::sync::Arc<cap_std::fs::Dir>,
}

/// A project's instructions as read for a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Instructions {
    pub text: String,
    /// Whether the file was longer than what was read.
    pub cut: bool,
}

/// What a tool may be handed as a file: regular files only (a FIFO or a
/// device would block the run or act when opened), and no bigger than
/// this when a patch reads one whole.
const MAX_PATCH_BYTES: u64 = 8 << 20;

impl Workspace {
    pub fn new(root: &Path) -> std::io::Result<Workspace> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a folder",
                root.display()
            )));
        }
        let dir = cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority())?;
        Ok(Workspace {
            root,
            dir: std::sync::Arc::new(dir),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` as a path relative to the workspace, or why not. Absolute
    /// paths and `..` are refused outright; the path is taken exactly as
    /// written (no trimming: `" secret"` is not `secret`). Links are
    /// checked where the file is opened.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        let shown = crate::visible::visible_line(path);
        if path.is_empty() {
            return Err("the path is empty".into());
        }
        if path.contains('\0') {
            return Err(format!("{shown}: a path cannot hold a NUL byte"));
        }
        let rel = Path::new(path);
        if rel.is_absolute() {
            return Err(format!("{shown}: absolute paths are outside the workspace"));
        }
        let mut out = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir => return Err(format!("{shown}: '..' leaves the workspace")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("{shown}: absolute paths are outside the workspace"))
                }
            }
        }
        Ok(out)
    }

    /// `rel` as the workspace's handle opens it ("." for the root).
    fn at(rel: &Path) -> &Path {
        if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        }
    }

    /// Open a regular file for reading, without blocking on a FIFO or a
    /// device, and its size; refuses anything else.
    fn open_regular(&self, path: &str, rel: &Path) -> Result<(cap_std::fs::File, u64), String> {
        use cap_std::fs::OpenOptionsExt;
        let mut options = cap_std::fs::OpenOptions::new();
        options
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = self
            .dir
            .open_with(Self::at(rel), &options)
            .map_err(|e| why(path, &e))?;
        let meta = file.metadata().map_err(|e| why(path, &e))?;
        if meta.is_dir() {
            return Err(format!("{}: a folder; use list_dir", shown(path)));
        }
        if !meta.is_file() {
            return Err(format!(
                "{}: not a regular file (a FIFO, socket or device); not opened for reading",
                shown(path)
            ));
        }
        Ok((file, meta.len()))
    }

    /// The file `name` at the workspace's root as text for a prompt: `None`
    /// where there is none, its first `max` bytes (cut at a line where it
    /// can be) where it is longer, invalid UTF-8 replaced.
    pub fn instructions(&self, name: &str, max: usize) -> Result<Option<Instructions>, String> {
        use std::io::Read;
        let rel = Path::new(name);
        match self.dir.symlink_metadata(rel) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        let (file, _) = self.open_regular(name, rel)?;
        let mut bytes = Vec::new();
        file.take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| why(name, &e))?;
        let cut = bytes.len() > max;
        if cut {
            bytes.truncate(max);
            if let Some(end) = bytes.iter().rposition(|&b| b == b'\n') {
                bytes.truncate(end + 1);
            }
        }
        Ok(Some(Instructions {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            cut,
        }))
    }

    /// Up to `max` bytes of a regular file; a larger one is refused.
    fn read_bytes(&self, path: &str, rel: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let (file, len) = self.open_regular(path, rel)?;
        if len > max {
            return Err(format!(
                "{}: {len} bytes, more than the {max} bytes {what} takes",
                shown(path)
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        // The size can change after the check; never read past the bound.
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| why(path, &e))?;
        if bytes.len() as u64 > max {
            return Err(format!("{}: grew past {max} bytes while read", shown(path)));
        }
        Ok(bytes)
    }

    /// The text of the file at `rel`, `None` where there is none; an
    /// error where it is not UTF-8 text or is too big to patch or diff.
    fn text_if_any(&self, path: &str, rel: &Path) -> Result<Option<String>, String> {
        match self.dir.symlink_metadata(Self::at(rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        let bytes = self.read_bytes(path, rel, MAX_PATCH_BYTES, "a patch or a diff")?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("{}: not UTF-8 text", shown(path)))
    }

    /// Replace the file at `rel` with `bytes`: a temporary file with a
    /// random name made exclusively beside it, then renamed over it, all
    /// beneath the workspace handle. Missing folders are made. A file that
    /// existed keeps its permissions.
    fn write_atomic(&self, path: &str, rel: &Path, bytes: &[u8]) -> Result<(), String> {
        use cap_std::fs::{OpenOptionsExt, PermissionsExt};
        let name = rel
            .file_name()
            .ok_or_else(|| format!("{}: no file name", shown(path)))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if !parent.as_os_str().is_empty() {
            // Followed beneath the workspace: a link to a folder inside
            // is used, one leading out is refused.
            match self.dir.metadata(parent) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{}: its folder is a file", shown(path))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.dir.create_dir_all(parent).map_err(|e| why(path, &e))?
                }
                Err(e) => return Err(why(path, &e)),
            }
        }
        let mode = match self.dir.symlink_metadata(Self::at(rel)) {
            Ok(m) if m.is_dir() => return Err(format!("{}: a folder", shown(path))),
            Ok(m) if m.is_file() => m.permissions().mode() & 0o7777,
            _ => crate::private::user_file_mode(),
        };
        let tmp = parent.join(format!(
            ".{}.{:016x}.tmp",
            name.to_string_lossy(),
            rand::random::<u64>()
        ));
        let mut options = cap_std::fs::OpenOptions::new();
        options.write(true).create_new(true).mode(mode);
        let result = (|| {
            let mut f = self.dir.open_with(&tmp, &options)?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()?;
            // The umask may have taken bits the old file had.
            f.set_permissions(cap_std::fs::Permissions::from_mode(mode))?;
            self.dir.rename(&tmp, &self.dir, rel)?;
            // The rename survives a crash once the folder is synced (a
            // directory handle cap-std opens for walking cannot be).
            let mut folder = cap_std::fs::OpenOptions::new();
            folder.read(true).custom_flags(libc::O_DIRECTORY);
            self.dir.open_with(Self::at(parent), &folder)?.sync_all()
        })();
        if result.is_err() {
            let _ = self.dir.remove_file(&tmp);
        }
        result.map_err(|e| why(path, &e))
    }
}

/// A path as it may be shown: control characters made visible.
fn shown(path: &str) -> std::borrow::Cow<'_, str> {
    crate::visible::visible_line(path)
}

/// An I/O error on `path`, said plainly; a link that leads out of the
/// workspace says so.
fn why(path: &str, e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("outside of the filesystem") || e.raw_os_error() == Some(libc::EXDEV) {
        format!("{}: a link that leads outside the workspace", shown(path))
    } else if e.raw_os_error() == Some(libc::ELOOP) {
        format!(
            "{}: too many links, or a link where none may be",
            shown(path)
        )
    } else {
        format!("{}: {text}", shown(path))
    }
}

/// A file name as the model sees it in a listing: plain when it is plain,
/// else quoted with escapes, so a newline or an odd byte in a name can
/// never read as two entries or another name.
fn listed(name: &std::ffi::OsStr) -> String {
    match name.to_str() {
        Some(n) if !n.chars().any(|c| c.is_control() || c == '"') && n.trim() == n => n.to_string(),
        _ => format!("{name:?}"),
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

/// Run `call`; `stop` (the run's stop flag) ends a shell call early.
pub async fn execute(
    call: &ToolCall,
    ws: &Workspace,
    limits: &Limits,
    stop: &AtomicBool,
) -> ToolResult {
    match call {
        ToolCall::ReadFile { path } => read_file(ws, path, limits),
        ToolCall::WriteFile {
            path,
            content,
            find,
            replace,
        } => {
            let planned = plan(
                ws,
                path,
                content.as_deref(),
                find.as_deref(),
                replace.as_deref(),
            );
            write_file(ws, path, planned)
        }
        ToolCall::ListDir { path } => list_dir(ws, path, limits),
        ToolCall::Search { query } => search(ws, query, limits),
        ToolCall::Shell { command, edits } => {
            let watched = Watched::before(ws, edits.as_deref().unwrap_or_default());
            let mut result = shell(ws, command, limits, stop).await;
            result.diff = watched.diff(ws);
            result
        }
        ToolCall::Finish { summary } => ToolResult::ok(summary.clone()),
        ToolCall::Mcp { name, .. } => ToolResult::err(format!(
            "{}: MCP calls go to the run's servers",
            crate::visible::visible_line(name)
        )),
    }
}

fn read_file(ws: &Workspace, path: &str, limits: &Limits) -> ToolResult {
    let result = ws
        .resolve(path)
        .and_then(|rel| ws.read_bytes(path, &rel, limits.max_read, "read_file"));
    match result {
        Ok(bytes) => ToolResult::ok(cap(
            String::from_utf8_lossy(&bytes).into_owned(),
            limits.max_output,
        )),
        Err(e) => ToolResult::err(e),
    }
}

/// A write as it would be made now: the file's text before it (`None`
/// where there is no file yet; why not, where it cannot be diffed) and
/// after it.
struct Planned {
    rel: PathBuf,
    old: Result<Option<String>, String>,
    new: String,
}

impl Planned {
    fn diff(&self) -> String {
        let path = self.rel.to_string_lossy();
        match &self.old {
            Ok(old) => super::diff::unified(&path, old.as_deref(), &self.new),
            Err(why) => format!("{why}: no diff; the file is replaced whole\n"),
        }
    }
}

/// The write a `write_file` call with these arguments would make now:
/// what its approval shows, and what it writes.
fn plan(
    ws: &Workspace,
    path: &str,
    content: Option<&str>,
    find: Option<&str>,
    replace: Option<&str>,
) -> Result<Planned, String> {
    let rel = ws.resolve(path)?;
    match (content, find, replace) {
        (Some(c), None, None) => {
            // What it replaces, for the diff; a file that is not text, or
            // too big to diff, is replaced all the same.
            let old = ws.text_if_any(path, &rel);
            Ok(Planned {
                rel,
                old,
                new: c.to_string(),
            })
        }
        (None, Some(""), Some(_)) => Err("the text to find is empty".into()),
        (None, Some(f), Some(r)) => {
            let old = ws
                .text_if_any(path, &rel)?
                .ok_or_else(|| format!("{}: no such file to patch", shown(path)))?;
            let new = match old.matches(f).take(2).count() {
                1 => old.replacen(f, r, 1),
                0 => return Err(format!("{}: the text to find is not there", shown(path))),
                _ => {
                    return Err(format!(
                        "{}: the text to find occurs more than once; give more of it",
                        shown(path)
                    ))
                }
            };
            Ok(Planned {
                rel,
                old: Ok(Some(old)),
                new,
            })
        }
        _ => Err("write_file takes either content, or find and replace".to_string()),
    }
}

/// What `call` would change if it ran now, for its approval: a write's
/// unified diff (or why it would fail); `None` for the other tools.
pub fn preview(call: &ToolCall, ws: &Workspace) -> Option<String> {
    let ToolCall::WriteFile {
        path,
        content,
        find,
        replace,
    } = call
    else {
        return None;
    };
    let planned = plan(
        ws,
        path,
        content.as_deref(),
        find.as_deref(),
        replace.as_deref(),
    );
    Some(match planned {
        Ok(planned) => planned.diff(),
        Err(e) => format!("this write would fail: {e}\n"),
    })
}

fn write_file(ws: &Workspace, path: &str, planned: Result<Planned, String>) -> ToolResult {
    let planned = match planned {
        Ok(p) => p,
        Err(e) => return ToolResult::err(e),
    };
    match ws.write_atomic(path, &planned.rel, planned.new.as_bytes()) {
        Ok(()) => ToolResult {
            diff: Some(planned.diff()),
            ..ToolResult::ok(format!(
                "wrote {} bytes to {}",
                planned.new.len(),
                listed(planned.rel.as_os_str())
            ))
        },
        Err(e) => ToolResult::err(e),
    }
}

fn list_dir(ws: &Workspace, path: &str, limits: &Limits) -> ToolResult {
    let path = if path.is_empty() { "." } else { path };
    let rel = match ws.resolve(path) {
        Ok(p) => p,
        Err(e) => return ToolResult::err(e),
    };
    let entries = match ws.dir.read_dir(Workspace::at(&rel)) {
        Ok(e) => e,
        Err(e) => return ToolResult::err(why(path, &e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .take(100_000)
        .map(|e| {
            let mut name = listed(&e.file_name());
            match e.file_type() {
                Ok(t) if t.is_dir() => name.push('/'),
                Ok(t) if t.is_symlink() => name.push('@'),
                Ok(t) if !t.is_file() => name.push('|'),
                _ => {}
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

/// Lines containing `query` (case-insensitive) in the workspace's text
/// files. Links are not followed; binary files, files over the read limit
/// and unreadable ones are counted in a closing note, never skipped
/// silently.
fn search(ws: &Workspace, query: &str, limits: &Limits) -> ToolResult {
    const MAX_FILES: usize = 100_000;
    if query.trim().is_empty() {
        return ToolResult::err("search needs a query");
    }
    let needle = query.to_lowercase();
    let mut hits = Vec::new();
    let mut stack = vec![PathBuf::new()];
    let mut out_len = 0;
    let (mut binary, mut large, mut unreadable, mut seen) = (0usize, 0usize, 0usize, 0usize);
    'walk: while let Some(dir) = stack.pop() {
        let Ok(entries) = ws.dir.read_dir(Workspace::at(&dir)) else {
            unreadable += 1;
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            seen += 1;
            if seen > MAX_FILES {
                break 'walk;
            }
            let Ok(kind) = e.file_type() else { continue };
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let rel = dir.join(&name);
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() {
                let shown_name = listed(rel.as_os_str());
                let bytes = match ws.read_bytes(&shown_name, &rel, limits.max_read, "search") {
                    Ok(b) => b,
                    Err(_) if e.metadata().is_ok_and(|m| m.len() > limits.max_read) => {
                        large += 1;
                        continue;
                    }
                    Err(_) => {
                        unreadable += 1;
                        continue;
                    }
                };
                if bytes.iter().take(8192).any(|&b| b == 0) {
                    binary += 1;
                    continue;
                }
                let text = String::from_utf8_lossy(&bytes);
                for (n, line) in text.lines().enumerate() {
                    if line.to_lowercase().contains(&needle) {
                        let hit = format!("{shown_name}:{}: {}", n + 1, line.trim());
                        out_len += hit.len() + 1;
                        hits.push(hit);
                        if out_len > limits.max_output {
                            break 'walk;
                        }
                    }
                }
            }
        }
    }
    let mut notes = Vec::new();
    if binary > 0 {
        notes.push(format!("{binary} binary files"));
    }
    if large > 0 {
        notes.push(format!("{large} files over {} bytes", limits.max_read));
    }
    if unreadable > 0 {
        notes.push(format!("{unreadable} unreadable files or folders"));
    }
    if seen > MAX_FILES {
        notes.push(format!("everything after the first {MAX_FILES} entries"));
    }
    let mut text = if hits.is_empty() {
        format!("no line contains '{query}'")
    } else {
        cap(hits.join("\n"), limits.max_output)
    };
    if !notes.is_empty() {
        text.push_str(&format!("\n[not searched: {}]", notes.join(", ")));
    }
    ToolResult::ok(text)
}

/// How a shell call ended, when it did not exit by itself.
enum Cut {
    TimedOut,
    Stopped,
}

/// Run `command` with `sh -c` in the workspace. The call's processes die
/// with it: at its end (a timeout, a stop, or the shell exiting while
/// something it started in the background still runs), its process group
/// and every process carrying its tag are killed, `setsid` and `nohup`
/// children included, and the pipes are read no further. Output beyond the
/// cap is read and dropped, so a chatty command cannot fill memory or block
/// on a full pipe. A stop is honoured within about 100 ms.
/// Files a shell command says it edits, at most this many, are diffed.
const MAX_WATCHED: usize = 16;

/// The files a shell command said it would edit, as they were before it
/// ran (`None`: there was none): text files beneath the workspace, each
/// bounded like a patch's. A path that is not such a file is left out.
struct Watched(Vec<(String, Option<String>)>);

impl Watched {
    fn before(ws: &Workspace, paths: &[String]) -> Watched {
        Watched(
            paths
                .iter()
                .take(MAX_WATCHED)
                .filter_map(|p| {
                    let rel = ws.resolve(p).ok()?;
                    Some((p.clone(), ws.text_if_any(p, &rel).ok()?))
                })
                .collect(),
        )
    }

    /// What the command changed in them, as one unified diff; `None` when
    /// it changed nothing (or none was named).
    fn diff(&self, ws: &Workspace) -> Option<String> {
        let mut out = String::new();
        for (path, old) in &self.0 {
            let Some(new) = ws
                .resolve(path)
                .and_then(|rel| ws.text_if_any(path, &rel))
                .ok()
            else {
                continue;
            };
            match (old, new) {
                (old, Some(new)) => out.push_str(&super::diff::unified(path, old.as_deref(), &new)),
                (Some(old), None) => out.push_str(&super::diff::removed(path, old)),
                (None, None) => {}
            }
        }
        (!out.is_empty()).then(|| super::diff::bounded(&out))
    }
}

async fn shell(ws: &Workspace, command: &str, limits: &Limits, stop: &AtomicBool) -> ToolResult {
    let tag = format!("{:032x}", rand::random::<u128>());
    // The one folder outside the workspace a sandboxed call may write.
    let temp = match tempfile::Builder::new().prefix("kiln-call-").tempdir() {
        Ok(t) => t,
        Err(e) => return ToolResult::err(format!("cannot make the call's temporary folder: {e}")),
    };
    let sandboxed = limits.sandbox.mode != super::sandbox::SandboxMode::Off;
    let args = [std::ffi::OsStr::new("-c"), std::ffi::OsStr::new(command)];
    let mut cmd = match super::sandbox::command(&limits.sandbox, &ws.root, temp.path(), "sh", &args)
    {
        Ok(c) => c,
        Err(e) => return ToolResult::err(super::sandbox::refusal(&e)),
    };
    cmd.current_dir(&ws.root)
        .env(CALL_TAG, &tag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let umask = crate::private::user_umask();
    // SAFETY: umask(2) in the child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // What the sandbox's set-up in the child said.
        Err(e) if sandboxed => return ToolResult::err(super::sandbox::refusal(&e.to_string())),
        Err(e) => return ToolResult::err(format!("cannot run sh: {e}")),
    };
    let pid = child.id();
    let (close, closed) = tokio::sync::watch::channel(false);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out = tokio::spawn(read_capped(stdout, limits.max_output, closed.clone()));
    let err = tokio::spawn(read_capped(stderr, limits.max_output, closed));
    let deadline = tokio::time::Instant::now() + limits.shell_timeout;
    let ended = loop {
        tokio::select! {
            status = child.wait() => break Ok(status.ok()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break Err(Cut::Stopped);
                }
                if tokio::time::Instant::now() >= deadline {
                    break Err(Cut::TimedOut);
                }
            }
        }
    };
    if let Some(pid) = pid {
        kill_call(pid, &tag);
    }
    if ended.is_err() {
        let _ = child.wait().await;
    }
    // What is still in the pipes comes out at once (the readers end at
    // their pipes' end); a process that escaped the kill and holds them is
    // not waited for past a moment.
    let readers = async { tokio::join!(out, err) };
    tokio::pin!(readers);
    let (out, err) = tokio::select! {
        both = &mut readers => both,
        _ = tokio::time::sleep(Duration::from_millis(50)) => {
            let _ = close.send(true);
            readers.await
        }
    };
    let (out, out_total) = out.unwrap_or_default();
    let (err, err_total) = err.unwrap_or_default();
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
    match ended {
        Ok(Some(s)) => {
            let code = s
                .code()
                .map_or("killed by a signal".into(), |c| c.to_string());
            ToolResult {
                ok: s.success(),
                output: format!("exit code {code}\n{text}"),
                diff: None,
            }
        }
        Ok(None) => ToolResult::err(format!("the shell's status was lost\n{text}")),
        Err(Cut::TimedOut) => ToolResult::err(format!(
            "timed out after {} s and was killed\n{text}",
            limits.shell_timeout.as_secs()
        )),
        Err(Cut::Stopped) => ToolResult::err(format!("stopped by the user and killed\n{text}")),
    }
}

/// The variable that tags every process a shell call starts; it survives
/// `setsid`, `nohup` and double forks, which leave the process group.
const CALL_TAG: &str = "KILN_TOOL_CALL";

/// Kill a shell call's process group, then every process that carries its
/// tag (found in `/proc` where there is one), twice over to catch forks
/// made meanwhile.
fn kill_call(pgid: u32, tag: &str) {
    // SAFETY: kill(2) on the process group the call leads.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
    let needle = format!("{CALL_TAG}={tag}");
    for _ in 0..2 {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.filter_map(|e| e.ok()) {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(environ) = std::fs::read(p.path().join("environ")) else {
                continue;
            };
            if environ
                .split(|&b| b == 0)
                .any(|var| var == needle.as_bytes())
            {
                // SAFETY: kill(2) on a process of this call.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Read `r` until its end or until `close` turns true, keeping the first
/// `max` bytes; returns them and the total.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    max: usize,
    mut close: tokio::sync::watch::Receiver<bool>,
) -> (Vec<u8>, usize) {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            // Close first: a process that escaped and writes on and on
            // must not keep the call open.
            biased;
            _ = close.wait_for(|c| *c) => break,
            n = r.read(&mut buf) => n,
        };
        match n {
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
