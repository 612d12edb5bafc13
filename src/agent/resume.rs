//! A run rebuilt from its journal, to go on after its process died (the
//! OOM killer, a crash, a reboot) or after it was stopped: its settings,
//! the conversation since its last compaction, the budgets it spent, the
//! calls approved with "always", and where it was cut. A pure reading of
//! the events; `Agent::resume` acts on it.

use std::time::Duration;

use crate::engine::{Message, Role};
use crate::error::{KilnError, Result};
use crate::store::session::{read_events, Event, OpenSession, RunHost};
use crate::store::{id_of, SessionStore};

use super::tools::ToolCall;
use super::{messages, Outcome, RunSpec, RunState};

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
    /// A call journaled with no result: it was running, or waiting for its
    /// yes, when the process died. It is reported back, never re-run.
    pub interrupted: Option<Interrupted>,
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
                self.call.name()
            ),
            false => format!(
                "interrupted: kiln stopped while {} waited for approval; it did not run.",
                self.call.name()
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

/// Where the journal's last step stopped.
enum Tail {
    /// No step yet.
    Start,
    /// The model was asked, and never answered.
    Asked(String),
    /// It answered; no call was journaled from the answer.
    Answered(String),
    /// The call was journaled (and maybe approved), with no result: the
    /// call is the one `step_call` holds.
    Called,
    /// The call has its result: the next message says it.
    Result(String),
}

/// The run in `events` (a session's journal): the last one started there,
/// with every resume of it since. `Err` says why there is none.
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
    let mut tail = Tail::Start;
    let mut question: Option<String> = None;
    let mut summary: Option<String> = None;
    let mut step_call: Option<(u32, ToolCall, bool)> = None;
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
                state.step += 1;
                question = Some(text.clone());
                summary = None;
                step_call = None;
                context_after_result = None;
                tail = Tail::Asked(text.clone());
            }
            Event::Answer { text, stats, .. } => {
                let Some(asked) = question.take() else {
                    continue;
                };
                history.push(Message::new(Role::User, asked));
                history.push(Message::new(Role::Assistant, text.clone()));
                state.tokens += stats.prompt_tokens + stats.completion_tokens;
                last_context = stats.context_tokens;
                state.retries = match serde_json::from_str::<ToolCall>(text.trim()) {
                    Ok(_) => 0,
                    Err(_) => state.retries + 1,
                };
                tail = Tail::Answered(text.clone());
            }
            Event::ToolCall { step, call } => {
                if let Ok(call) = serde_json::from_value::<ToolCall>(call.clone()) {
                    step_call = Some((*step, call, false));
                    tail = Tail::Called;
                }
            }
            Event::Approved { step, always } => {
                if let Some((s, call, approved)) = step_call.as_mut() {
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
                let finished = match &step_call {
                    Some((_, ToolCall::Finish { summary }, _)) => Some(summary.clone()),
                    _ => None,
                };
                if let Some(summary) = finished {
                    ended = Some(Outcome::Finished(summary));
                }
                context_after_result = Some(last_context);
                tail = Tail::Result(match refused {
                    true => messages::refused(output),
                    false => messages::result(*ok, output.clone()),
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
    let mut interrupted = None;
    match tail {
        Tail::Start => state.message = messages::task(&task),
        Tail::Asked(text) => {
            // The step is asked again under its own number, and its
            // question is not journaled twice.
            state.step -= 1;
            state.message = text;
            state.journaled = true;
        }
        Tail::Answered(text) => match serde_json::from_str::<ToolCall>(text.trim()) {
            Err(e) => state.message = messages::invalid(&e),
            Ok(ToolCall::Finish { summary }) => ended = Some(Outcome::Finished(summary)),
            Ok(call) => {
                interrupted = Some(Interrupted {
                    step: state.step,
                    call,
                    journaled: false,
                    may_have_run: false,
                })
            }
        },
        Tail::Called => {
            let (step, call, approved) = step_call.expect("a journaled call is held");
            match call {
                ToolCall::Finish { summary } => ended = Some(Outcome::Finished(summary)),
                call => {
                    let may_have_run = approved
                        || !spec.policy.needs_approval(&call)
                        || state.always.contains(&messages::key(&call));
                    interrupted = Some(Interrupted {
                        step,
                        call,
                        journaled: true,
                        may_have_run,
                    });
                }
            }
        }
        Tail::Result(text) => {
            state.message = match &summary {
                Some(summary) => messages::compacted(&task, summary, &text),
                None => text,
            }
        }
    }
    let compact_first = context_after_result
        .filter(|&c| interrupted.is_none() && c as f64 > super::COMPACT_AT * context_limit as f64);
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
        assert_eq!(r.state.message, "Tool result (ok):\nthe file's text");
        assert!(!r.state.journaled);
        assert_eq!(
            (r.interrupted, r.ended, r.compact_first),
            (None, None, None)
        );
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
        let i = waiting.interrupted.unwrap();
        assert!(i.journaled && !i.may_have_run, "{i:?}");
        assert!(i.output().contains("did not run"));
        events.push(Event::Approved {
            step: 1,
            always: true,
        });
        let running = replay(&at(0, events), 4096).unwrap();
        let i = running.interrupted.unwrap();
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
        assert!(read.interrupted.unwrap().may_have_run);
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
        assert_eq!(r.state.message, "Tool result (ok):\nx");
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
        assert!(r
            .state
            .message
            .starts_with("That was not a valid tool call"));
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
        assert!(r.state.message.contains("Progress so far: read a.txt"));
        assert!(r.state.message.ends_with("Tool result (ok):\nbig"));
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
