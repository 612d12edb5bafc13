//! A client's settings against the daemon's: what differs, and whether
//! a client may join the open conversation.

use crate::cli::Common;
use crate::engine::local::Backend;
use crate::host::protocol::Wanted;

use super::actor::WorkstationLink;

/// What a client wants that the daemon's model and engine settings are
/// not, in words (each setting as its flag).
pub(super) fn differs(wanted: &Wanted, common: &Common) -> Option<String> {
    let mut asked = Vec::new();
    if let Some(m) = wanted
        .model
        .as_ref()
        .filter(|m| Some(*m) != common.model.as_ref())
    {
        asked.push(format!("--model {m}"));
    }
    if let Some(e) = &wanted.engine {
        let same = match (Backend::parse(e), Backend::parse(&common.engine)) {
            (Some(a), Some(b)) => a == b,
            _ => *e == common.engine,
        };
        if !same {
            asked.push(format!("--engine {e}"));
        }
    }
    if let Some(kv) = wanted
        .kv_type
        .as_ref()
        .filter(|kv| **kv != common.kv_type.name())
    {
        asked.push(format!("--kv-type {kv}"));
    }
    let window = wanted.window.clone().unwrap_or_default();
    if window != common.window {
        let theirs = common.window.flags();
        let before = asked.len();
        for (flag, v) in window.flags() {
            if !theirs.contains(&(flag, v.clone())) {
                asked.push(format!("{flag} {v}"));
            }
        }
        if asked.len() == before {
            // Only defaults asked where the daemon has flags.
            asked.push("the default rope, flash-attention and K/V settings".into());
        }
    }
    fn text<T: ToString>(v: Option<T>) -> Option<String> {
        v.map(|v| v.to_string())
    }
    let quoted = |v: &Option<String>| {
        v.as_ref()
            .map(|v| format!("{:?}", crate::visible::visible_line(v)))
    };
    let s = &common.sampling;
    let settings = [
        ("--ctx", text(wanted.ctx), text(common.ctx)),
        ("--system", quoted(&wanted.system), quoted(&common.system)),
        (
            "--temperature",
            text(wanted.temperature),
            text(s.temperature),
        ),
        ("--top-p", text(wanted.top_p), text(s.top_p)),
        (
            "--repeat-penalty",
            text(wanted.repeat_penalty),
            text(s.repeat_penalty),
        ),
        ("--seed", text(wanted.seed), text(s.seed)),
        ("--max-tokens", text(wanted.max_tokens), text(s.max_tokens)),
        ("--think", wanted.think.map(on_off), s.think.map(on_off)),
    ];
    for (flag, mine, theirs) in settings {
        if let Some(v) = mine.filter(|v| Some(v) != theirs.as_ref()) {
            asked.push(format!("{flag} {v}"));
        }
    }
    (!asked.is_empty()).then(|| asked.join(" "))
}

/// Whether a client may join the open conversation: its agents must work
/// where the client said (when it said) and ask at least what it asked.
pub(super) fn joins(w: &WorkstationLink, wanted: &Wanted) -> std::result::Result<(), String> {
    if let Some(ws) = wanted.workspace.as_ref().filter(|ws| **ws != w.workspace) {
        return Err(format!(
            "the open session's agents work in {}, not --workspace {}; `kiln stop ID` closes it first",
            crate::visible::visible_line(&w.workspace.to_string_lossy()),
            crate::visible::visible_line(&ws.to_string_lossy())
        ));
    }
    if !w.approval.asks_at_least(wanted.approval) {
        return Err(format!(
            "the open session runs agents with --approval {}, which asks less than this terminal's --approval {}; attach with --approval {} to accept that",
            w.approval.name(),
            wanted.approval.name(),
            w.approval.name()
        ));
    }
    Ok(())
}

pub(super) fn on_off(v: bool) -> String {
    match v {
        true => "on".into(),
        false => "off".into(),
    }
}
