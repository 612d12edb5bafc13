//! Logs go to a file, never to the terminal kiln draws on; panics become one
//! line on stderr plus the full report in the log.

use std::cell::Cell;
use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Start logging into `<logs>/kiln.log`. The level comes from `KILN_LOG`
/// (default `info`). The guard must live as long as the program.
pub fn init(logs: &Path) -> Option<WorkerGuard> {
    std::fs::create_dir_all(logs).ok()?;
    let appender = tracing_appender::rolling::never(logs, "kiln.log");
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init()
        .ok()?;
    Some(guard)
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
