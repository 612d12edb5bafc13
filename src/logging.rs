//! Logs go to a file, never to the terminal kiln draws on; panics become one
//! line on stderr plus the full report in the log.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Bytes a log file grows to before it is rotated.
pub const LOG_BYTES: u64 = 16 << 20;

/// Start logging into `<logs>/kiln.log`, rotated at `LOG_BYTES`. The level
/// comes from `KILN_LOG` (default `info`). The guard must live as long as
/// the program.
pub fn init(logs: &Path) -> Option<WorkerGuard> {
    std::fs::create_dir_all(logs).ok()?;
    let (writer, guard) = tracing_appender::non_blocking(RotatingLog::new(logs.join("kiln.log")));
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init()
        .ok()?;
    Some(guard)
}

/// A log capped at `LOG_BYTES`: past it, the file becomes `kiln.log.1`
/// (replacing the older one) and a new one starts, so a daemon that runs
/// for weeks keeps two files' worth at most. By hand, not a rotation
/// crate, because several kiln processes (the daemon and its terminals)
/// append to one log: a rename that loses a race to another process is an
/// ignored error, never a panic or a lost process.
pub struct RotatingLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Bytes this process wrote to `file` since it opened it.
    written: u64,
}

impl RotatingLog {
    pub fn new(path: PathBuf) -> RotatingLog {
        RotatingLog {
            path,
            file: None,
            written: 0,
        }
    }

    /// Open the log for appending, moving it aside first when it is full
    /// (by this process's writes or another's). Created 0600, never through
    /// a link.
    fn reopen(&mut self) {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size >= LOG_BYTES {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.path, old);
        }
        self.file = crate::store::atomic::open_append(&self.path).ok();
        self.written = 0;
    }
}

impl std::io::Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() || self.written >= LOG_BYTES {
            self.reopen();
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the log cannot be opened"))?;
        let n = file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

thread_local! {
    static EXPECTING_PANIC: Cell<bool> = const { Cell::new(false) };
}

/// Replace the default panic output (a message plus "run with
/// RUST_BACKTRACE") with one line; the location and backtrace go to the log.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            "panic at {location}: {message}\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        if !EXPECTING_PANIC.with(Cell::get) {
            eprintln!("kiln: internal error: {message} (details in the log)");
        }
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run `f`, turning a panic inside it into an `Err` with the panic message and
/// without printing anything. For third-party parsers that panic on bad input.
pub fn quiet_panics<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    EXPECTING_PANIC.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    EXPECTING_PANIC.with(|c| c.set(false));
    result.map_err(|p| panic_message(&*p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    /// Two processes' worth of writers logging five times the cap each
    /// leave two files of about the cap, private.
    #[test]
    fn logs_rotate_within_their_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.log");
        let mut logs = [RotatingLog::new(path.clone()), RotatingLog::new(path)];
        let line = format!("{}\n", "x".repeat(1023));
        for i in 0..(10 * LOG_BYTES as usize / line.len()) {
            logs[i % 2].write_all(line.as_bytes()).unwrap();
        }
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        for f in &files {
            let meta = f.metadata().unwrap();
            assert!(meta.len() <= 2 * (LOG_BYTES + line.len() as u64), "{f:?}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
    }
}
