//! A client's settings against the daemon's: what differs, and whether
//! a client may join the open conversation.

use crate::host::protocol::Settings;

use super::actor::WorkstationLink;

/// What a client wants that the daemon's model and engine settings are
/// not, in words (each setting as its flag).
pub(super) fn differs(client: &Settings, daemon: &Settings) -> Option<String> {
    let theirs = daemon.model_flags();
    let mut asked: Vec<String> = client
        .model_flags()
        .into_iter()
        .filter(|flag| !theirs.contains(flag))
        .map(|(flag, value)| format!("{flag} {value}"))
        .collect();
    let (mine, daemons) = (&client.common.window, &daemon.common.window);
    let window_asked = mine
        .flags()
        .iter()
        .any(|(flag, v)| asked.contains(&format!("{flag} {v}")));
    if mine != daemons && !window_asked {
        // Only defaults asked where the daemon has flags.
        asked.push("the default rope, flash-attention and K/V settings".into());
    }
    (!asked.is_empty()).then(|| asked.join(" "))
}

/// What a client wants of the loaded model itself that the daemon's is
/// not: its sampling and system prompt are its own conversation's (a
/// `kiln ask` question takes them), so only what the load decides counts.
pub(super) fn loads_differently(client: &Settings, daemon: &Settings) -> Option<String> {
    let load_only = |s: &Settings| {
        let mut s = s.clone();
        s.common.sampling = Default::default();
        s.common.system = None;
        s
    };
    differs(&load_only(client), &load_only(daemon))
}

/// Whether a client may join the open conversation: its agents must work
/// where the client said (when it said) and ask at least what it asked.
pub(super) fn joins(w: &WorkstationLink, client: &Settings) -> std::result::Result<(), String> {
    if let Some(ws) = client
        .common
        .workspace
        .as_ref()
        .filter(|ws| **ws != w.workspace)
    {
        return Err(format!(
            "the open session's agents work in {}, not --workspace {}; `kiln stop ID` closes it first",
            crate::visible::visible_line(&w.workspace.to_string_lossy()),
            crate::visible::visible_line(&ws.to_string_lossy())
        ));
    }
    if !w.approval.asks_at_least(client.common.approval) {
        return Err(format!(
            "the open session runs agents with --approval {}, which asks less than this terminal's --approval {}; attach with --approval {} to accept that",
            w.approval.name(),
            client.common.approval.name(),
            w.approval.name()
        ));
    }
    Ok(())
}
