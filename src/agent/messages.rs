//! What the run says to the model between steps. A live run and one
//! rebuilt from its journal (`resume`) must say the same words, so the
//! conversation goes on as it would have.

use super::tools::{self, ToolCall};
use super::RESULT_FOR_MODEL;

/// The run's first message.
pub fn task(task: &str) -> String {
    format!("Task: {task}")
}

/// A call's result, capped for the model (the journal keeps more).
pub fn result(ok: bool, output: String) -> String {
    let status = if ok { "ok" } else { "error" };
    format!(
        "Tool result ({status}):\n{}",
        tools::cap(output, RESULT_FOR_MODEL)
    )
}

/// A call that was not approved.
pub fn refused(reason: &str) -> String {
    format!("Tool result: {reason}. Try another way, or finish.")
}

/// An answer with no call to act on (`calls::read`'s reason).
pub fn invalid(error: &str, native: bool) -> String {
    match native {
        true => {
            format!("No tool ran: {error}. Call a tool to go on, or finish when the task is done.")
        }
        false => format!(
            "That was not a valid tool call ({error}). Reply with exactly one JSON tool call."
        ),
    }
}

/// The first message after older steps became `summary`.
pub fn compacted(task: &str, summary: &str, message: &str) -> String {
    format!("Task: {task}\n\nProgress so far: {summary}\n\n{message}")
}

/// What "always" remembers of a call: the exact call.
pub fn key(call: &ToolCall) -> String {
    serde_json::to_string(call).expect("calls serialize")
}
