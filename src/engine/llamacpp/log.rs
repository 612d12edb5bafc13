//! llama.cpp's log, kept off the terminal (it is the TUI's screen) and
//! read for what kiln needs from it: the reason a load failed, and the
//! context parameters llama.cpp really applied.
//!
//! llama.cpp logs on the thread that does the work, so each thread keeps
//! its own recent lines: a load on one thread never reads another's. The
//! lines also go to kiln's log file through `tracing`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr};

use llama_cpp_sys_2 as sys;

/// Lines kept per thread, and the longest line kept.
const KEEP: usize = 256;
const LINE: usize = 1024;

#[derive(Default)]
struct Lines {
    /// A line still being written (llama.cpp sends some in pieces).
    partial: String,
    partial_level: sys::ggml_log_level,
    done: VecDeque<(bool, String)>,
}

thread_local! {
    static LINES: RefCell<Lines> = RefCell::new(Lines::default());
}

unsafe extern "C" fn on_log(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the
    // call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    LINES.with(|l| {
        let mut l = l.borrow_mut();
        if level != sys::GGML_LOG_LEVEL_CONT {
            l.partial_level = level;
        }
        for (i, piece) in text.split('\n').enumerate() {
            if i > 0 {
                let line = std::mem::take(&mut l.partial);
                let is_error = l.partial_level == sys::GGML_LOG_LEVEL_ERROR;
                if l.partial_level == sys::GGML_LOG_LEVEL_DEBUG {
                    // Per-tensor chatter: the log file's at most.
                    tracing::trace!(target: "llama.cpp", "{line}");
                } else if !line.trim().is_empty() {
                    if is_error {
                        tracing::warn!(target: "llama.cpp", "{line}");
                    } else {
                        tracing::debug!(target: "llama.cpp", "{line}");
                    }
                    if l.done.len() == KEEP {
                        l.done.pop_front();
                    }
                    l.done.push_back((is_error, line));
                }
            }
            let mut cut = LINE.saturating_sub(l.partial.len()).min(piece.len());
            while !piece.is_char_boundary(cut) {
                cut -= 1;
            }
            l.partial.push_str(&piece[..cut]);
        }
    });
}

/// Route llama.cpp's and ggml's logs here (once, before the first load).
pub(super) fn install() {
    // SAFETY: a callback with the signature llama.cpp expects, which does
    // not unwind.
    unsafe { sys::llama_log_set(Some(on_log), std::ptr::null_mut()) };
}

/// Forget this thread's lines: what is read next is from what follows.
pub(super) fn mark() {
    LINES.with(|l| l.borrow_mut().done.clear());
}

/// This thread's lines since `mark`.
pub(super) fn lines() -> Vec<String> {
    LINES.with(|l| l.borrow().done.iter().map(|(_, s)| s.clone()).collect())
}

/// The reason in this thread's last error lines since `mark`: llama.cpp
/// says why a load failed there (an unknown architecture, a missing
/// tensor, a wrong shape), prefixed with the function that said it.
pub(super) fn last_error() -> Option<String> {
    LINES.with(|l| {
        let l = l.borrow();
        let errors: Vec<&str> = l
            .done
            .iter()
            .filter(|(e, _)| *e)
            .map(|(_, s)| s.as_str())
            .collect();
        // The most specific line is the first of the last run of errors
        // ("error loading model: …"); what follows repeats it.
        let line = errors
            .iter()
            .find(|s| s.contains("error loading model"))
            .or(errors.first())?;
        Some(reason(line))
    })
}

/// `llama_model_load: error loading model: error loading model
/// architecture: unknown model architecture: 'x'` → its last, most
/// specific clauses.
fn reason(line: &str) -> String {
    let parts: Vec<&str> = line.trim().split(": ").collect();
    let skip = parts
        .iter()
        .take(parts.len().saturating_sub(1))
        .take_while(|p| !p.contains(' ') || p.starts_with("error loading model"))
        .count();
    parts[skip..].join(": ")
}

/// A value llama.cpp printed as `name = value` in `lines` (the context's
/// own report of what it applied: `n_ctx`, `freq_scale`, `flash_attn`).
pub fn reported<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().rev().find_map(|l| {
        let (_, rest) = l.split_once(": ")?;
        let (key, value) = rest.split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_lose_their_prefixes() {
        assert_eq!(
            reason("llama_model_load: error loading model: error loading model architecture: unknown model architecture: 'kiln9'"),
            "unknown model architecture: 'kiln9'"
        );
        assert_eq!(
            reason("llama_model_load: error loading model: missing tensor 'blk.0.attn_q.weight'"),
            "missing tensor 'blk.0.attn_q.weight'"
        );
    }

    #[test]
    fn reported_values_are_read_back() {
        let lines = vec![
            "llama_context: n_ctx                 = 4096".to_string(),
            "llama_context: freq_scale            = 0.25".to_string(),
        ];
        assert_eq!(reported(&lines, "freq_scale"), Some("0.25"));
        assert_eq!(reported(&lines, "n_ctx"), Some("4096"));
        assert_eq!(reported(&lines, "n_batch"), None);
    }
}
