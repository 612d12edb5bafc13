//! What arrives from elsewhere does: engine events, telemetry samples and
//! their alarms, an agent's progress; and when a turn should move off
//! this machine.

use std::time::Instant;

use super::*;
use crate::record::Record;

pub(super) fn on_agent(state: &mut State, msg: AgentMsg) -> Vec<Effect> {
    match msg {
        AgentMsg::Progress(p) => {
            let text = crate::agent::line(&p);
            match (&mut state.agent, &p) {
                (Some(a), Progress::Call { step, .. }) => a.step = *step,
                (Some(a), Progress::Confined { sandbox }) => a.sandbox = Some(*sandbox),
                (Some(a), Progress::Calls { native }) => a.calls = Some(*native),
                _ => {}
            }
            match &p {
                Progress::Thought { text, .. } => {
                    let text = crate::visible::visible(text).into_owned();
                    state.push_entry(Entry::new(EntryKind::Thought, text));
                }
                _ => state.push_entry(Entry::new(EntryKind::Notice, text)),
            }
            if let Progress::Result {
                diff: Some(diff), ..
            } = p
            {
                state.push_entry(Entry::new(EntryKind::Diff, diff));
            }
            Vec::new()
        }
        AgentMsg::Approval(question) => {
            if let Some(a) = &mut state.agent {
                a.pending = Some(question);
                a.approval_scroll = 0;
            }
            state.mode = Mode::Approve;
            Vec::new()
        }
        AgentMsg::Apart(session) => {
            if let Some(a) = &mut state.agent {
                state.notice = Some(format!(
                    "the agent runs beside this chat, journaled as session {session}; chat on"
                ));
                a.apart = Some(session);
            }
            Vec::new()
        }
        AgentMsg::Done(outcome) => {
            let text = match &outcome {
                Outcome::Finished(summary) => format!("agent finished: {summary}"),
                Outcome::Failed(why) => format!("agent failed: {why}"),
                Outcome::BudgetExhausted(what) => format!("agent stopped: budget of {what} used"),
                Outcome::Stopped => "agent stopped".to_string(),
            };
            let apart = state.agent.take().and_then(|a| a.apart).is_some();
            if state.mode == Mode::Approve {
                state.mode = Mode::Chat;
            }
            state.notice = Some(text.clone());
            state.push_entry(Entry::new(EntryKind::Notice, text));
            if apart {
                // The chat's conversation was never the agent's.
                return Vec::new();
            }
            vec![Effect::RestoreChat {
                system_prompt: state.system_prompt.clone(),
                history: state.conversation(),
            }]
        }
    }
}

/// An engine event: the journal record it makes (`record::Record`), then
/// whatever else it brings about. An answer's events that arrive with no
/// answer being generated are ignored, record and all.
pub(super) fn on_engine(state: &mut State, event: EngineEvent, at: Instant) -> Vec<Effect> {
    let record = Record::of(&event).map(Effect::from);
    match show(state, event, at) {
        Some(more) => record.into_iter().chain(more).collect(),
        None => Vec::new(),
    }
}

/// What `event` changes on screen; the effects besides its record, or
/// `None` when it is ignored.
fn show(state: &mut State, event: EngineEvent, at: Instant) -> Option<Vec<Effect>> {
    match event {
        EngineEvent::TurnStarted { prompt_tokens, .. } => {
            // A long prefill (a resumed session re-read from its transcript)
            // would otherwise look like a hang.
            if prompt_tokens >= 512 {
                state.notice = Some(format!(
                    "reading {} tokens of context…",
                    crate::layout::count(prompt_tokens as u64)
                ));
            }
            Some(Vec::new())
        }
        EngineEvent::ContextTrimmed {
            dropped_messages,
            limit,
            ..
        } => {
            let text = crate::record::trimmed_notice(dropped_messages, limit);
            let entry = Entry::new(EntryKind::Notice, text.clone());
            // Before the answer being generated, so the answer stays last.
            match &mut state.generation {
                Some(g) => {
                    state.transcript.insert(g.entry, entry);
                    g.entry += 1;
                }
                None => state.transcript.push(entry),
            }
            Some(Vec::new())
        }
        EngineEvent::Token { text, .. } => {
            let g = state.generation.as_mut()?;
            let first = *g.first_token_at.get_or_insert(at);
            g.tokens += 1;
            let secs = (at - first).as_secs_f64();
            if g.tokens >= 2 && secs > 0.0 {
                g.live_tok_s = Some((g.tokens - 1) as f64 / secs);
            }
            let entry = g.entry;
            state.transcript[entry].text.push_str(&text);
            if g.tokens == 1
                && state
                    .notice
                    .as_deref()
                    .is_some_and(|n| n.starts_with("reading "))
            {
                state.notice = None;
            }
            state.output_arrived();
            Some(Vec::new())
        }
        EngineEvent::TurnFinished {
            reply,
            finish,
            stats,
            ..
        } => {
            let g = state.generation.take()?;
            let entry = &mut state.transcript[g.entry];
            entry.text = reply;
            entry.finish = Some(finish);
            entry.stats = Some(stats.clone());
            if let Some(d) = stats.decode_tok_s {
                push_bounded(&mut state.decode_history, d);
            }
            state.context_tokens = stats.context_tokens;
            state.last_energy = TurnEnergy::of(g.power, &stats);
            if finish == FinishReason::Cancelled {
                state.notice = Some("stopped".into());
            } else if matches!(state.notice.as_deref(), Some("stopping…")) {
                state.notice = None;
            }
            let alarm = state.alarms.on_turn(&stats);
            let effects = alarm.map(|a| on_alarm(state, a)).unwrap_or_default();
            state.last_stats = Some(stats);
            state.output_arrived();
            Some(effects)
        }
        EngineEvent::TurnFailed { error, .. } => {
            if let Some(g) = state.generation.take() {
                if state.transcript[g.entry].text.is_empty() {
                    state.transcript.remove(g.entry);
                }
            }
            state.push_entry(Entry::new(EntryKind::Error, error));
            Some(Vec::new())
        }
    }
}

pub(super) fn on_sample(state: &mut State, sample: Sample) -> Vec<Effect> {
    if let (Some(g), Some(w)) = (state.generation.as_mut(), sample.power_w) {
        g.power = (g.power.0 + w, g.power.1 + 1);
    }
    let rate = sample.swap_rate.map_or(0, |r| r.in_bytes_per_s as u64);
    push_bounded(&mut state.swap_in_history, rate);
    let generating = state.generating();
    let effects = match state.alarms.on_sample(&sample, generating) {
        Some(event) => on_alarm(state, event),
        None => Vec::new(),
    };
    state.telemetry = sample;
    effects
}

pub(super) fn on_alarm(state: &mut State, event: AlarmEvent) -> Vec<Effect> {
    let (kind, raised, message) = match event {
        AlarmEvent::Raised { kind, message } => {
            state.active_alarms.retain(|(k, _)| *k != kind);
            state.active_alarms.push((kind, message.clone()));
            (kind, true, message)
        }
        AlarmEvent::Cleared { kind } => {
            state.active_alarms.retain(|(k, _)| *k != kind);
            let what = match kind {
                AlarmKind::SwapStorm => "swap storm over",
                AlarmKind::ThermalThrottling => "thermal throttling over",
            };
            (kind, false, what.to_string())
        }
    };
    state.push_entry(Entry::new(EntryKind::Notice, message.clone()));
    vec![Effect::Record(Event::Alarm {
        kind,
        raised,
        message,
    })]
}

/// Whether a turn of `message` with an answer of up to `answer_tokens`
/// would outgrow this machine: the context window, or the memory the KV
/// cache can still take. Used to offload to an endpoint before it happens.
pub fn outgrows_local(state: &State, message: &str, answer_tokens: usize) -> bool {
    if state.remote.is_some() {
        return false;
    }
    // About four bytes of text a token; three errs towards moving early.
    let needed = message.len() / 3 + answer_tokens;
    let context = state.context_tokens;
    if context + needed > state.model.context_limit {
        return true;
    }
    match (&state.shape, state.telemetry.memory) {
        (Some(shape), Some(mem)) => {
            let left =
                crate::budget::tokens_before_memory_runs_out(shape, context as u64, mem.available);
            (left as usize) < needed
        }
        _ => false,
    }
}
