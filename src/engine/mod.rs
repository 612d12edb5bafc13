//! The engine: loads a model, keeps a conversation's KV state, streams tokens.
//!
//! An engine runs as a background task. Front ends send it `EngineCommand`s;
//! each turn answers on a stream of its own (`TurnStream`), so nothing lends
//! a shared receiver around. Cancellation takes a side path (an atomic turn
//! number) because the command queue is not read while a turn is generating.
//!
//! An engine task holds one conversation. Engines that can run several on
//! one loaded model (`Engine::open`) give each holder its own: `lease` hands
//! out the first conversation, then opens more (each its own task, sharing
//! the model) up to `Engine::conversations`. A `Lease` is exclusive use of
//! one conversation, given back by dropping it.

pub mod context;
pub mod fake;
pub mod kalosm;
pub mod llamacpp;
pub mod local;
pub mod remote;
pub mod sampler;
pub mod template;
pub mod thinking;
pub mod tool_format;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use crate::chat::{FinishReason, GenStats, KvState, PrefixCache};
pub use context::{Conversation, Message, Role};
pub use sampler::SamplerSettings;

/// What the front ends show about the loaded model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub engine: String,
    pub architecture: String,
    pub path: Option<PathBuf>,
    /// The context window kiln uses: the model's, or less when asked.
    pub context_limit: usize,
    /// What runs differently from the file as given, for the status bar:
    /// rope scaling, a fallback chat template, thinking switched.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The tool-call format the model's chat template speaks, where it
    /// renders `tools` and the engine can hold calls to a grammar.
    #[serde(default)]
    pub tool_format: Option<tool_format::ToolFormat>,
}

/// What constrained decoding holds an answer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// The whole answer matches this regular expression.
    Whole(String),
    /// The answer is free until it writes `trigger`; what follows must
    /// match `pattern` (a tool call), after which it is free again.
    Calls { trigger: String, pattern: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EngineEvent {
    TurnStarted {
        turn: u64,
        prompt_tokens: usize,
        reused_tokens: usize,
    },
    /// Older messages were dropped so the new turn fits the context window.
    ContextTrimmed {
        turn: u64,
        dropped_messages: usize,
        context_tokens: usize,
        limit: usize,
    },
    Token {
        turn: u64,
        text: String,
    },
    TurnFinished {
        turn: u64,
        reply: String,
        finish: FinishReason,
        stats: GenStats,
    },
    TurnFailed {
        turn: u64,
        error: String,
    },
}

#[derive(Debug)]
pub enum EngineCommand {
    /// Add a user message and generate the reply, sending the turn's
    /// events to `out`.
    Chat {
        turn: u64,
        message: String,
        out: EventSink,
    },
    /// Add `input` (a user message, or tool results) and generate the
    /// answer, held to `format` where one is given.
    ChatConstrained {
        turn: u64,
        input: Vec<Message>,
        format: Option<Format>,
        out: EventSink,
    },
    /// Continue the last (cut off) answer.
    Continue {
        turn: u64,
        out: EventSink,
    },
    /// Continue `prompt` as raw text, outside the conversation and its
    /// chat template (`/v1/completions`).
    Complete {
        turn: u64,
        prompt: String,
        out: EventSink,
    },
    SetSystemPrompt(Option<String>),
    /// Replace the conversation (regenerate, resume); the next turn reuses
    /// whatever prefix of the KV cache still matches.
    SetHistory(Vec<Message>),
    SetSampler(SamplerSettings),
    /// The tools the conversation's template lists (OpenAI-style function
    /// schemas); none for a plain chat.
    SetTools(Vec<serde_json::Value>),
    /// Forget the conversation and its KV state.
    Reset,
    /// Serialize the KV state (`None` when it is empty).
    Snapshot(oneshot::Sender<Result<Option<KvState>, String>>),
    /// Load a KV state saved by `Snapshot` (with `SetHistory` for the
    /// conversation it belongs to).
    Restore(KvState, oneshot::Sender<Result<(), String>>),
    /// Who waits on this conversation's turns.
    SetPriority(Priority),
    /// How many tokens a text is in the model's tokenizer, where the
    /// engine knows.
    CountTokens(String, oneshot::Sender<Option<usize>>),
}

/// Whose turns go first when conversations share the model: a terminal's
/// before background agent steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Someone is watching the answer stream in.
    #[default]
    Interactive,
    Background,
}

/// Cancels turns up to a number. A number rather than a flag, so that a
/// cancel that arrives just after a turn ended cannot cancel the next one.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicU64>);

impl CancelFlag {
    pub fn cancel_through(&self, turn: u64) {
        self.0.fetch_max(turn, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self, turn: u64) -> bool {
        self.0.load(Ordering::SeqCst) >= turn
    }
}

pub type EventSink = mpsc::UnboundedSender<EngineEvent>;

/// A model behind kiln's conversation semantics. Implementations own their
/// conversation, so they can keep the KV state in step with it.
pub trait Engine: Send + 'static {
    fn info(&self) -> ModelInfo;

    /// Run one turn, sending its events to `out`. Never panics on bad input;
    /// failures become `TurnFailed`.
    fn chat(
        &mut self,
        turn: u64,
        message: String,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = ()> + Send;

    /// Like `chat` with `input` (a user message, or tool results in the
    /// template's tool role), the answer held to `format` by constrained
    /// decoding where one is given. Engines that cannot constrain, or hold
    /// no tools, take the input as one user message and generate freely;
    /// callers validate either way.
    fn chat_constrained(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        format: Option<Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = ()> + Send {
        let _ = format;
        self.chat(turn, as_one_message(&input), out, cancel)
    }

    /// The tools the conversation's template lists; ignored by engines
    /// that report no `tool_format`.
    fn set_tools(&mut self, tools: Vec<serde_json::Value>) {
        let _ = tools;
    }

    /// Continue the conversation's last answer, which was cut off, from
    /// where it stopped. `TurnFinished` carries the whole answer.
    fn continue_last(
        &mut self,
        turn: u64,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = ()> + Send;

    /// Continue `prompt` as raw text, without the chat template; the
    /// conversation is left as it was.
    fn complete(
        &mut self,
        turn: u64,
        prompt: String,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = ()> + Send {
        let _ = (prompt, cancel);
        let _ = out.send(EngineEvent::TurnFailed {
            turn,
            error: format!("the {} engine completes chats only", self.info().engine),
        });
        std::future::ready(())
    }

    fn set_system_prompt(&mut self, prompt: Option<String>);
    fn set_history(&mut self, messages: Vec<Message>);
    /// The KV state, for a snapshot on disk.
    fn snapshot(&self) -> Result<Option<KvState>, String>;
    /// Continue from a saved KV state; on failure the cache starts empty.
    fn restore(&mut self, state: KvState) -> Result<(), String>;
    fn set_sampler(&mut self, settings: SamplerSettings);
    fn reset(&mut self);

    /// Another conversation on the same loaded model, empty, with this
    /// one's settings; `None` where the engine holds only one.
    fn open(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }

    /// How many conversations can be open at once.
    fn conversations(&self) -> usize {
        1
    }

    fn set_priority(&mut self, priority: Priority) {
        let _ = priority;
    }

    /// Tokens `text` is in the model's tokenizer; `None` where the engine
    /// cannot say (an endpoint, the scripted engine).
    fn tokens_in(&self, text: &str) -> Option<usize> {
        let _ = text;
        None
    }
}

/// The front ends' side of a running engine.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<EngineCommand>,
    cancel: CancelFlag,
    next_turn: Arc<AtomicU64>,
    info: ModelInfo,
    /// One permit: whoever holds it has this conversation.
    exclusive: Arc<Semaphore>,
    pool: Arc<Pool>,
}

/// The conversations of one loaded model.
struct Pool {
    /// A permit per conversation leased.
    leases: Arc<Semaphore>,
    limit: usize,
    /// Spawns another conversation, where the engine can.
    open: Option<OpenFn>,
}

type OpenFn = Box<dyn Fn(&Arc<Pool>) -> Option<EngineHandle> + Send + Sync>;

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("limit", &self.limit)
            .field("leased", &(self.limit - self.leases.available_permits()))
            .finish()
    }
}

/// One turn's events, from `TurnStarted` to `TurnFinished` or `TurnFailed`.
#[derive(Debug)]
pub struct TurnStream {
    pub turn: u64,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    ended: bool,
}

impl TurnStream {
    /// The turn's next event; `None` after its last. A turn whose engine
    /// went away ends with a `TurnFailed` saying so.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().await.unwrap_or(EngineEvent::TurnFailed {
            turn: self.turn,
            error: "the engine stopped unexpectedly".into(),
        });
        Some(self.seen(event))
    }

    /// The next event if one is already here.
    pub fn try_next(&mut self) -> Option<EngineEvent> {
        if self.ended {
            return None;
        }
        let event = self.events.try_recv().ok()?;
        Some(self.seen(event))
    }

    /// Note the turn's end when `event` is its last.
    fn seen(&mut self, event: EngineEvent) -> EngineEvent {
        self.ended = matches!(
            event,
            EngineEvent::TurnFinished { .. } | EngineEvent::TurnFailed { .. }
        );
        event
    }
}

/// Exclusive use of one of an engine's conversations, held by the
/// workstation or an agent run and given back by dropping it.
#[derive(Debug)]
pub struct Lease {
    engine: EngineHandle,
    _permit: OwnedSemaphorePermit,
    _seat: OwnedSemaphorePermit,
}

impl std::ops::Deref for Lease {
    type Target = EngineHandle;
    fn deref(&self) -> &EngineHandle {
        &self.engine
    }
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokens `text` is in the model's tokenizer, where the engine knows.
    pub async fn count_tokens(&self, text: &str) -> Option<usize> {
        let (tx, rx) = oneshot::channel();
        self.send(EngineCommand::CountTokens(text.to_string(), tx));
        rx.await.ok().flatten()
    }

    /// A conversation for this holder alone: this one while it is free,
    /// else a new one on the same model; `None` when every conversation the
    /// engine can hold is taken.
    pub fn lease(&self) -> Option<Lease> {
        let seat = self.pool.leases.clone().try_acquire_owned().ok()?;
        let (engine, permit) = match self.exclusive.clone().try_acquire_owned() {
            Ok(permit) => (self.clone(), permit),
            Err(_) => {
                let engine = (self.pool.open.as_ref()?)(&self.pool)?;
                let permit = engine.exclusive.clone().try_acquire_owned().ok()?;
                (engine, permit)
            }
        };
        Some(Lease {
            engine,
            _permit: permit,
            _seat: seat,
        })
    }

    /// Whether anyone holds a conversation of this model.
    pub fn leased(&self) -> bool {
        self.pool.leases.available_permits() < self.pool.limit
    }

    /// Conversations leased now, and how many the model can hold.
    pub fn seats(&self) -> (usize, usize) {
        let limit = self.pool.limit;
        (limit - self.pool.leases.available_permits(), limit)
    }

    fn turn(&self, command: impl FnOnce(u64, EventSink) -> EngineCommand) -> TurnStream {
        let turn = self.next_turn.fetch_add(1, Ordering::SeqCst) + 1;
        let (out, events) = mpsc::unbounded_channel();
        self.send(command(turn, out));
        TurnStream {
            turn,
            events,
            ended: false,
        }
    }

    /// Send a user message; its answer streams on the returned turn.
    pub fn chat(&self, message: impl Into<String>) -> TurnStream {
        let message = message.into();
        self.turn(|turn, out| EngineCommand::Chat { turn, message, out })
    }

    /// Send a message whose answer must match `pattern`.
    pub fn chat_constrained(
        &self,
        message: impl Into<String>,
        pattern: impl Into<String>,
    ) -> TurnStream {
        self.respond(
            vec![Message::new(Role::User, message)],
            Some(Format::Whole(pattern.into())),
        )
    }

    /// Send `input` (a user message, or tool results); the answer is held
    /// to `format` where one is given.
    pub fn respond(&self, input: Vec<Message>, format: Option<Format>) -> TurnStream {
        self.turn(|turn, out| EngineCommand::ChatConstrained {
            turn,
            input,
            format,
            out,
        })
    }

    /// Continue the last answer.
    pub fn continue_last(&self) -> TurnStream {
        self.turn(|turn, out| EngineCommand::Continue { turn, out })
    }

    /// Continue `prompt` as raw text.
    pub fn complete(&self, prompt: impl Into<String>) -> TurnStream {
        let prompt = prompt.into();
        self.turn(|turn, out| EngineCommand::Complete { turn, prompt, out })
    }

    pub fn send(&self, command: EngineCommand) {
        // A closed channel means the engine task ended; each turn's stream
        // says so.
        let _ = self.commands.send(command);
    }

    /// Cancel the running turn and any queued before this call.
    pub fn cancel(&self) {
        self.cancel
            .cancel_through(self.next_turn.load(Ordering::SeqCst));
    }
}

/// Start `engine` as a background task.
pub fn spawn<E: Engine>(engine: E) -> EngineHandle {
    let limit = engine.conversations().max(1);
    // A blank conversation kept aside to open more from: the first may
    // be mid-turn when another is wanted.
    let open: Option<OpenFn> = match limit {
        1 => None,
        _ => engine.open().map(|blank| {
            let blank = std::sync::Mutex::new(blank);
            Box::new(move |pool: &Arc<Pool>| {
                let engine = blank.lock().ok()?.open()?;
                Some(run(engine, pool.clone()))
            }) as OpenFn
        }),
    };
    let pool = Arc::new(Pool {
        leases: Arc::new(Semaphore::new(limit)),
        limit,
        open,
    });
    run(engine, pool)
}

/// Run one conversation of `pool` as a task, until its handles are gone.
fn run<E: Engine>(mut engine: E, pool: Arc<Pool>) -> EngineHandle {
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let cancel = CancelFlag::default();
    let handle = EngineHandle {
        commands: cmd_tx,
        cancel: cancel.clone(),
        next_turn: Arc::new(AtomicU64::new(0)),
        info: engine.info(),
        exclusive: Arc::new(Semaphore::new(1)),
        pool,
    };
    tokio::spawn(async move {
        while let Some(command) = cmd_rx.recv().await {
            match command {
                EngineCommand::Chat { turn, message, out } => {
                    if cancel.is_cancelled(turn) {
                        let _ = out.send(EngineEvent::TurnFinished {
                            turn,
                            reply: String::new(),
                            finish: FinishReason::Cancelled,
                            stats: GenStats::default(),
                        });
                        continue;
                    }
                    engine.chat(turn, message, &out, &cancel).await
                }
                EngineCommand::ChatConstrained {
                    turn,
                    input,
                    format,
                    out,
                } => {
                    engine
                        .chat_constrained(turn, input, format, &out, &cancel)
                        .await
                }
                EngineCommand::Continue { turn, out } => {
                    engine.continue_last(turn, &out, &cancel).await
                }
                EngineCommand::Complete { turn, prompt, out } => {
                    engine.complete(turn, prompt, &out, &cancel).await
                }
                EngineCommand::SetSystemPrompt(p) => engine.set_system_prompt(p),
                EngineCommand::SetHistory(m) => engine.set_history(m),
                EngineCommand::SetSampler(s) => engine.set_sampler(s),
                EngineCommand::SetTools(t) => engine.set_tools(t),
                EngineCommand::SetPriority(p) => engine.set_priority(p),
                EngineCommand::Reset => engine.reset(),
                EngineCommand::Snapshot(reply) => {
                    let _ = reply.send(engine.snapshot());
                }
                EngineCommand::Restore(state, reply) => {
                    let _ = reply.send(engine.restore(state));
                }
                EngineCommand::CountTokens(text, reply) => {
                    let _ = reply.send(engine.tokens_in(&text));
                }
            }
        }
    });
    handle
}

/// Turn input for an engine that takes one user message: the messages'
/// texts, in order.
pub fn as_one_message(input: &[Message]) -> String {
    input
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A turn that could not run ends with its reason.
pub(crate) fn end_turn(turn: u64, result: Result<(), String>, out: &EventSink) {
    if let Err(error) = result {
        let _ = out.send(EngineEvent::TurnFailed { turn, error });
    }
}

/// What a turn's token callback saw.
#[derive(Default)]
pub(crate) struct Trace {
    /// The generated text.
    pub reply: String,
    pub chunks: usize,
    pub first_at: Option<Instant>,
    pub stopped: Option<FinishReason>,
    /// The thinking tag the prompt opened, which the answer shown and kept
    /// starts with although the model did not write it.
    opening: Option<&'static str>,
}

impl Trace {
    /// A trace for a new answer to `prompt`: one that opens a thinking
    /// block gets its tag at the start of the answer, so every view sees the
    /// thinking as thinking. Not for a continued or a constrained answer,
    /// whose text is exactly what is generated.
    pub fn for_prompt(prompt: &str, earlier: &str, constrained: bool) -> Trace {
        Trace {
            opening: (earlier.is_empty() && !constrained && thinking::opens(prompt))
                .then_some(thinking::OPEN),
            ..Trace::default()
        }
    }

    /// Note streamed `text` and pass it on.
    pub fn token(&mut self, turn: u64, text: String, out: &EventSink) {
        self.first_at.get_or_insert_with(Instant::now);
        self.chunks += 1;
        self.reply.push_str(&text);
        let text = match self.chunks {
            1 => format!("{}{text}", self.opening.unwrap_or_default()),
            _ => text,
        };
        let _ = out.send(EngineEvent::Token { turn, text });
    }

    /// The answer as shown and recorded.
    pub fn answer(&self) -> String {
        format!("{}{}", self.opening.unwrap_or_default(), self.reply)
    }
}

/// Derive the per-turn rates from the three instants every engine can see:
/// send, first text, end. The first text arrives after the prefill and one
/// decode step, so one average step is taken off the prefill time.
pub fn rates(
    prompt_tokens: usize,
    completion_tokens: usize,
    ttft_s: f64,
    total_s: f64,
) -> (Option<f64>, Option<f64>) {
    let decode_s = (total_s - ttft_s).max(0.0);
    let decode = (completion_tokens >= 2 && decode_s > 0.0)
        .then(|| (completion_tokens - 1) as f64 / decode_s);
    let step = decode.map_or(0.0, |d| 1.0 / d);
    let prefill_s = if ttft_s - step > ttft_s * 0.05 {
        ttft_s - step
    } else {
        ttft_s
    };
    let prefill = (prompt_tokens > 0 && prefill_s > 0.0).then(|| prompt_tokens as f64 / prefill_s);
    (prefill, decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_one_decode_step_off_prefill() {
        // 100 prompt tokens, first text at 1.1 s, 11 tokens by 2.1 s:
        // 10 steps in 1 s, so prefill took 1.0 s.
        let (p, d) = rates(100, 11, 1.1, 2.1);
        assert!((d.unwrap() - 10.0).abs() < 1e-9);
        assert!((p.unwrap() - 100.0).abs() < 1e-6);
    }

    #[test]
    fn rates_are_none_when_unmeasurable() {
        assert_eq!(rates(0, 1, 0.5, 0.5), (None, None));
        let (p, d) = rates(10, 1, 0.5, 0.5);
        assert_eq!(d, None);
        assert!((p.unwrap() - 20.0).abs() < 1e-9);
    }

    /// Each turn's events reach its own stream only, and one lease is
    /// lent at a time.
    #[tokio::test]
    async fn turns_stream_apart_and_the_lease_is_exclusive() {
        let engine = spawn(fake::FakeEngine::new(["one", "two"]));
        let lease = engine.lease().expect("free at first");
        assert!(engine.leased() && engine.lease().is_none());
        let mut first = lease.chat("a");
        let mut second = lease.chat("b");
        let mut replies = Vec::new();
        for stream in [&mut first, &mut second] {
            let mut turns = Vec::new();
            while let Some(ev) = stream.next().await {
                turns.push(event_turn(&ev));
                if let EngineEvent::TurnFinished { reply, .. } = ev {
                    replies.push(reply);
                }
            }
            assert!(turns.iter().all(|t| *t == stream.turn), "{turns:?}");
        }
        assert_eq!(replies, ["one", "two"]);
        drop(lease);
        assert!(!engine.leased() && engine.lease().is_some());
    }

    fn event_turn(ev: &EngineEvent) -> u64 {
        match ev {
            EngineEvent::TurnStarted { turn, .. }
            | EngineEvent::ContextTrimmed { turn, .. }
            | EngineEvent::Token { turn, .. }
            | EngineEvent::TurnFinished { turn, .. }
            | EngineEvent::TurnFailed { turn, .. } => *turn,
        }
    }

    #[test]
    fn cancel_is_by_turn_number() {
        let c = CancelFlag::default();
        c.cancel_through(3);
        assert!(c.is_cancelled(2) && c.is_cancelled(3));
        assert!(!c.is_cancelled(4));
    }
}
