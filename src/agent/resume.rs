//! A run rebuilt from its journal, to go on after its process died (the
//! OOM killer, a crash, a reboot) or after it was stopped: its settings,
//! the conversation since its last compaction, the budgets it spent, the
//! calls approved with "always", and where it was cut. A pure reading of
//! the events; `Agent::resume` acts on it.

use std::time::Duration;

use crate::engine::context::answer_message;
use crate::engine::{Message, Role};
use crate::error::{KilnError, Result};
use crate::store::session::{read_events, Event, OpenSession, RunHost};
use crate::store::{id_of, SessionStore};

use super::tools::ToolCall;
use super::{calls, messages, Outcome, RunSpec, RunState};

/// What the journal says of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    /// As its latest start or resume journaled it.
    pub spec: RunSpec,
    pub host: RunHost,
    /// The system prompt the run had, `AGENTS.md` and all as it was then.
    pub system: Option<String>,
    /// The conversation the engine held: every question and its answer
    /// since the last compaction.
    pub history: Vec<Message>,
    /// What it spent, and what goes to the model next.
    pub state: RunState,
    /// The last answer's calls with no result: one was running, or
    /// waiting for its yes, when the process died, and those after it
    /// never started. They are reported back, never re-run.
    pub interrupted: Vec<Interrupted>,
    /// The last step's result filled the context past the compaction mark
    /// (at this many tokens), and the compaction never happened: do it
    /// before going on.
    pub compact_first: Option<usize>,
    /// How the run ended, when it did.
    pub ended: Option<Outcome>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Interrupted {
    pub step: u32,
    pub call: ToolCall,
    /// Its id in the template's terms (native calls), for its result.
    pub id: Option<String>,
    /// Whether its ToolCall event is in the journal (it is not when the
    /// process died between the model's answer and the call's record).
    pub journaled: bool,
    /// Whether it may have run: it was approved, or needed no yes. One
    /// still waiting for its yes never started.
    pub may_have_run: bool,
}

impl Interrupted {
    /// What the model is told of it.
    pub fn output(&self) -> String {
        match self.may_have_run {
            true => format!(
                "interrupted: kiln stopped while {} ran; not known whether it completed. Check before repeating it.",
                self.call.label()
            ),
            false => format!(
                "interrupted: kiln stopped while {} waited for approval; it did not run.",
                self.call.label()
            ),
        }
    }
}

/// A run to go on with: its session, held by this process (so no other
/// kiln resumes it at the same time), and its replay.
pub struct Resumable {
    pub session: OpenSession,
    pub replay: Replay,
    /// Journal lines that were skipped (a torn last line, damage).
    pub warnings: Vec<String>,
}

/// The run journaled in session `query` of `store`, ready to go on. Refused
/// with one line when the session is held by another kiln, holds no run,
/// or its run finished.
pub fn open(store: &SessionStore, query: &str) -> Result<Resumable> {
    let dir = store.resolve(Some(query))?;
    let session = store.open_for_resume(&dir)?;
    let journal = read_events(&session.events_path())?;
    let replay = replay(&journal.events, session.meta.context_limit)
        .map_err(|e| KilnError::BadArgument(format!("session {}: {e}", id_of(&dir))))?;
    if let Some(Outcome::Finished(summary)) = &replay.ended {
        return Err(KilnError::BadArgument(format!(
            "session {}: the run finished ({}); there is nothing to resume",
            id_of(&dir),
            crate::visible::visible_line(summary)
        )));
    }
    Ok(Resumable {
        session,
        replay,
        warnings: journal.warnings,
    })
}

/// The run in `events` (a session's journal): the last one started there,
/// with every resume of it since. `Err` says why there is none.
///
/// The conversation is rebuilt as the engine held it: each input (a user
/// message, or the last calls' results in the template's tool role) and
/// the answer to it, its calls read out as the live run read them
/// (`calls::read`, `answer_message`).
pub fn replay(
    events: &[(u64, Event)],
    context_limit: usize,
) -> std::result::Result<Replay, String> {
    let begin = events
        .iter()
        .rposition(|(_, e)| matches!(e, Event::RunStarted { resumed: false, .. }))
        .ok_or("the session holds no agent run")?;
    let mut spec: Option<(RunSpec, RunHost)> = None;
    let mut system = None;
    let mut history = Vec::new();
    let mut state = RunState::default();
    // What went to the model since its last answer.
    let mut pending: Vec<Message> = Vec::new();
    // The input's last user message was journaled and not answered.
    let mut asked = false;
    // The last answer: its calls, and how many of them were journaled;
    // or why it had none to act on.
    let mut calls: Vec<(Option<String>, ToolCall)> = Vec::new();
    let mut taken = 0;
    let mut invalid: Option<String> = None;
    // The call journaled with no result yet, whether it was approved, and
    // its id.
    let mut open_call: Option<(u32, ToolCall, bool, Option<String>)> = None;
    let mut summary: Option<String> = None;
    let mut context_after_result: Option<usize> = None;
    let mut last_context = 0usize;
    let mut ended = None;
    let mut segment: Option<(u64, u64)> = None;
    // The system prompt in force when the run started.
    for (_, e) in &events[..begin] {
        if let Event::SystemPrompt { text } = e {
            system = text.clone();
        }
    }
    for (at, event) in &events[begin..] {
        if let Event::RunStarted { .. } = event {
            if let Some((from, to)) = segment.take() {
                state.spent += Duration::from_millis(to.saturating_sub(from));
            }
            segment = Some((*at, *at));
        } else if let Some((_, to)) = segment.as_mut() {
            *to = (*to).max(*at);
        }
        let native = spec.as_ref().and_then(|(s, _)| s.native);
        match event {
            Event::RunStarted { spec: s, host, .. } => {
                let parsed: RunSpec = serde_json::from_value(s.clone())
                    .map_err(|e| format!("the run's settings are not readable: {e}"))?;
                spec = Some((parsed, *host));
                ended = None;
            }
            Event::RunEnded { outcome } => {
                ended = serde_json::from_value(outcome.clone()).ok();
            }
            Event::SystemPrompt { text } => system = text.clone(),
            Event::User { text } => {
                if summary.take().is_some() {
                    // The message after a compaction folds in the results.
                    pending.clear();
                }
                // A JSON-only run's result is journaled, then sent as this
                // message: it is one message, not two.
                let same = pending
                    .last()
                    .is_some_and(|m| m.role == Role::User && m.content == *text);
                if !same {
                    pending.push(Message::new(Role::User, text.clone()));
                }
                asked = true;
                invalid = None;
                calls.clear();
                context_after_result = None;
            }
            Event::Answer {
                text,
                finish,
                stats,
            } => {
                if pending.is_empty() {
                    continue;
                }
                history.append(&mut pending);
                history.push(answer_message(text.clone(), native));
                asked = false;
                state.tokens += stats.prompt_tokens + stats.completion_tokens;
                last_context = stats.context_tokens;
                taken = 0;
                match calls::read(native, text, *finish) {
                    Ok(answer) => {
                        state.retries = 0;
                        calls = answer.calls;
                        invalid = None;
                    }
                    Err(e) => {
                        state.step += 1;
                        state.retries += 1;
                        calls.clear();
                        invalid = Some(e);
                    }
                }
            }
            Event::ToolCall { step, call } => {
                if let Ok(call) = serde_json::from_value::<ToolCall>(call.clone()) {
                    let id = calls.get(taken).and_then(|(id, _)| id.clone());
                    taken += 1;
                    state.step = state.step.max(*step);
                    open_call = Some((*step, call, false, id));
                }
            }
            Event::Approved { step, always } => {
                if let Some((s, call, approved, _)) = open_call.as_mut() {
                    if s == step {
                        *approved = true;
                        if *always {
                            state.always.insert(messages::key(call));
                        }
                    }
                }
            }
            Event::ToolResult {
                ok,
                refused,
                output,
                ..
            } => {
                state.retries = 0;
                let Some((_, call, _, id)) = open_call.take() else {
                    continue;
                };
                if let ToolCall::Finish { summary } = &call {
                    ended = Some(Outcome::Finished(summary.clone()));
                }
                context_after_result = Some(last_context);
                let said = match refused {
                    true => messages::refused(output),
                    false => messages::result(*ok, output.clone()),
                };
                pending.push(match (native, id) {
                    (Some(_), Some(id)) => Message::tool(id, said),
                    _ => Message::new(Role::User, said),
                });
            }
            Event::Compacted { summary: s, .. } => {
                history.clear();
                summary = Some(s.clone());
                context_after_result = None;
            }
            _ => {}
        }
    }
    if let Some((from, to)) = segment {
        state.spent += Duration::from_millis(to.saturating_sub(from));
    }
    let (spec, host) = spec.expect("the run's first event is its start");
    let task = spec.task.clone();
    // The last answer's calls with no result, in order: the one journaled
    // (it was running or waiting), then those never reached.
    let mut interrupted = Vec::new();
    let unreached = calls.into_iter().skip(taken);
    let open = open_call.map(|(step, call, approved, id)| {
        let may_have_run = approved
            || !spec.policy.needs_approval(&call)
            || state.always.contains(&messages::key(&call));
        (step, call, id, true, may_have_run)
    });
    let unreached = unreached.map(|(id, call)| {
        state.step += 1;
        (state.step, call, id, false, false)
    });
    for (step, call, id, journaled, may_have_run) in open.into_iter().chain(unreached) {
        if let ToolCall::Finish { summary } = &call {
            ended = Some(Outcome::Finished(summary.clone()));
            break;
        }
        interrupted.push(Interrupted {
            step,
            call,
            id,
            journaled,
            may_have_run,
        });
    }
    if let Some(e) = invalid {
        pending.push(Message::new(
            Role::User,
            messages::invalid(&e, spec.native.is_some()),
        ));
    } else if let Some(summary) = &summary {
        let folded = crate::engine::as_one_message(&pending);
        pending = vec![Message::new(
            Role::User,
            messages::compacted(&task, summary, &folded),
        )];
    } else if pending.is_empty() && history.is_empty() && interrupted.is_empty() {
        pending.push(Message::new(Role::User, messages::task(&task)));
    }
    state.journaled = asked;
    state.input = pending;
    let compact_first = context_after_result
        .filter(|&c| interrupted.is_empty() && c as f64 > super::COMPACT_AT * context_limit as f64);
    Ok(Replay {
        spec,
        host,
        system,
        history,
        state,
        interrupted,
        compact_first,
        ended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentSettings, Policy};
    use crate::chat::{FinishReason, GenStats};
    use crate::engine::SamplerSettings;

    fn spec(policy: Policy) -> RunSpec {
        RunSpec::new(
            "tidy up",
            "/tmp/ws".into(),
            policy,
            &AgentSettings::default(),
            &SamplerSettings::default(),
            &Default::default(),
        )
    }

    fn start(policy: Policy, resumed: bool) -> Event {
        Event::RunStarted {
            spec: serde_json::to_value(spec(policy)).unwrap(),
            host: RunHost::Daemon,
            resumed,
        }
    }

    fn user(t: &str) -> Event {
        Event::User { text: t.into() }
    }

    fn answer(t: &str, tokens: usize) -> Event {
        Event::Answer {
            text: t.into(),
            finish: FinishReason::Stop,
            stats: GenStats {
                prompt_tokens: tokens,
                completion_tokens: 10,
                context_tokens: tokens + 10,
                ..GenStats::default()
            },
        }
    }

    fn call(step: u32, json: &str) -> Event {
        Event::ToolCall {
            step,
            call: serde_json::from_str(json).unwrap(),
        }
    }

    fn result(step: u32, output: &str) -> Event {
        Event::ToolResult {
            step,
            ok: true,
            refused: false,
            output: output.into(),
            diff: None,
            interrupted: false,
        }
    }

    /// What goes to the model next, as one text.
    fn input(r: &Replay) -> String {
        crate::engine::as_one_message(&r.state.input)
    }

    const READ: &str = r#"{"tool": "read_file", "path": "a.txt"}"#;
    const SHELL: &str = r#"{"tool": "shell", "command": "make"}"#;

    /// Timed events: one a second from `t0` ms.
    fn at(t0: u64, events: Vec<Event>) -> Vec<(u64, Event)> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, e)| (t0 + 1000 * i as u64, e))
            .collect()
    }

    #[test]
    fn a_run_cut_after_a_result_goes_on_with_that_result() {
        let events = at(
            0,
            vec![
                Event::SystemPrompt {
                    text: Some("sys".into()),
                },
                start(Policy::Auto, false),
                user("Task: tidy up"),
                answer(READ, 100),
                call(1, READ),
                result(1, "the file's text"),
            ],
        );
        let r = replay(&events, 4096).unwrap();
        assert_eq!(r.system.as_deref(), Some("sys"));
        assert_eq!(r.state.step, 1);
        assert_eq!(r.state.tokens, 110);
        assert_eq!(r.state.spent, Duration::from_secs(4));
        assert_eq!(r.history.len(), 2);
        assert_eq!(input(&r), "Tool result (ok):\nthe file's text");
        assert!(!r.state.journaled);
        assert!(r.interrupted.is_empty());
        assert_eq!((r.ended, r.compact_first), (None, None));
    }

    #[test]
    fn a_call_cut_while_running_is_interrupted_and_one_waiting_for_its_yes_did_not_run() {
        let mut events = vec![
            start(Policy::AutoRead, false),
            user("Task"),
            answer(SHELL, 5),
        ];
        events.push(call(1, SHELL));
        let waiting = replay(&at(0, events.clone()), 4096).unwrap();
        let i = waiting.interrupted[0].clone();
        assert!(i.journaled && !i.may_have_run, "{i:?}");
        assert!(i.output().contains("did not run"));
        events.push(Event::Approved {
            step: 1,
            always: true,
        });
        let running = replay(&at(0, events), 4096).unwrap();
        let i = running.interrupted[0].clone();
        assert!(i.may_have_run);
        assert!(i.output().contains("not known whether it completed"));
        // "always" carries over.
        assert!(running
            .state
            .always
            .contains(&messages::key(&serde_json::from_str(SHELL).unwrap())));
        // A read under auto-read needed no yes: it may have run.
        let read = replay(
            &at(
                0,
                vec![
                    start(Policy::AutoRead, false),
                    user("Task"),
                    answer(READ, 5),
                    call(1, READ),
                ],
            ),
            4096,
        )
        .unwrap();
        assert!(read.interrupted[0].may_have_run);
    }

    #[test]
    fn a_question_never_answered_is_asked_again_under_its_own_step() {
        let events = at(
            0,
            vec![
                start(Policy::Auto, false),
                user("Task"),
                answer(READ, 5),
                call(1, READ),
                result(1, "x"),
                user("Tool result (ok):\nx"),
            ],
        );
        let r = replay(&events, 4096).unwrap();
        assert_eq!(r.state.step, 1);
        assert!(r.state.journaled);
        assert_eq!(input(&r), "Tool result (ok):\nx");
        assert_eq!(r.history.len(), 2, "the unanswered question is not history");
    }

    #[test]
    fn an_invalid_answer_is_retried_with_its_count() {
        let events = at(
            0,
            vec![
                start(Policy::Auto, false),
                user("Task"),
                answer("no json", 5),
                user("That was not..."),
                answer("{still not", 5),
            ],
        );
        let r = replay(&events, 4096).unwrap();
        assert_eq!((r.state.step, r.state.retries), (2, 2));
        assert!(input(&r).starts_with("That was not a valid tool call"));
    }

    #[test]
    fn time_spent_adds_each_stretch_the_run_ran_and_not_the_gap_between() {
        let mut events = at(0, vec![start(Policy::Auto, false), user("Task")]);
        // Resumed an hour later, after one second more of work.
        events.extend(at(
            3_600_000,
            vec![start(Policy::Auto, true), answer(READ, 5)],
        ));
        let r = replay(&events, 4096).unwrap();
        assert_eq!(r.state.spent, Duration::from_secs(2));
        assert_eq!(r.host, RunHost::Daemon);
    }

    #[test]
    fn the_conversation_starts_again_at_a_compaction() {
        let events = at(
            0,
            vec![
                start(Policy::Auto, false),
                user("Task"),
                answer(READ, 3100),
                call(1, READ),
                result(1, "big"),
                Event::Compacted {
                    summary: "read a.txt".into(),
                    context_tokens: 3110,
                },
            ],
        );
        let r = replay(&events, 4096).unwrap();
        assert!(r.history.is_empty());
        assert_eq!(r.compact_first, None);
        assert!(input(&r).contains("Progress so far: read a.txt"));
        assert!(input(&r).ends_with("Tool result (ok):\nbig"));
        // Cut before the compaction happened: it happens first.
        let cut = replay(&events[..5], 4096).unwrap();
        assert_eq!(cut.compact_first, Some(3110));
        assert_eq!(cut.history.len(), 2);
    }

    #[test]
    fn a_finished_run_says_so_and_only_the_last_run_of_a_session_counts() {
        let finish = r#"{"tool": "finish", "summary": "done"}"#;
        let events = at(
            0,
            vec![
                start(Policy::Auto, false),
                user("old run"),
                answer(finish, 5),
                call(1, finish),
                result(1, "done"),
                start(Policy::Auto, false),
                user("Task"),
                answer(finish, 5),
            ],
        );
        let r = replay(&events, 4096).unwrap();
        assert_eq!(r.state.step, 1);
        assert_eq!(r.ended, Some(Outcome::Finished("done".into())));
        assert!(replay(&at(0, vec![user("hi")]), 4096)
            .unwrap_err()
            .contains("no agent run"));
    }
}
