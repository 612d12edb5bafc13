//! The endpoints: OpenAI's chat and completion APIs, the model list, a
//! health check, and the node's telemetry. Each answer runs on a
//! conversation leased from the shared engine, driven by a task of its
//! own that stops the turn when the client goes, reads too slowly, or a
//! stop string is written.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};

use super::admission::{Gate, Ticket};
use super::answer::{Ending, Piece, Shaper};
use super::error::{json_response, ApiError};
use super::ledger::{Entry, Ledger, Served};
use super::openai::{self, ChatRequest, CompletionRequest};
use crate::engine::tool_format::{self, ToolFormat};
use crate::engine::{
    self, EngineCommand, EngineEvent, EngineHandle, FinishReason, GenStats, Lease, ModelInfo,
    SamplerSettings, TurnStream,
};
use crate::store::journal::JournalHandle;
use crate::store::session::Event as Journaled;
use crate::telemetry::remote::NodeReport;
use crate::telemetry::Sample;

/// What every handler shares: the engine and the node's instruments.
pub struct Node {
    pub engine: EngineHandle,
    pub info: ModelInfo,
    /// The node's own sampler settings, under each request's.
    pub sampler: SamplerSettings,
    pub gate: Arc<Gate>,
    pub ledger: Ledger,
    pub samples: watch::Receiver<Sample>,
    pub served: watch::Receiver<Served>,
    /// The machine's name, for the panels of the kiln at the other end.
    pub name: String,
    /// Starts every answer's id, so that ids differ between runs of the
    /// node.
    pub tag: u32,
    /// Where requests are kept, with `--journal-requests`.
    pub journal: Option<crate::store::SessionStore>,
}

pub fn router(node: Arc<Node>) -> Router {
    let limit = node.gate.caps().max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/kiln/v1/telemetry", get(telemetry))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node)
}

type Reply = Result<Response, ApiError>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request body as JSON of type `T`, every failure a 4xx with a JSON
/// error.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than this node takes ([serve] max_body_bytes)",
        ),
        status => ApiError::new(status, format!("the request body could not be read: {e}")),
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the request body is not the JSON expected: {e}")))
}

fn client_label(addr: SocketAddr, user: Option<&str>) -> String {
    match user.filter(|u| !u.is_empty()) {
        Some(u) => format!("{} ({})", addr.ip(), openai::shorten(u)),
        None => addr.ip().to_string(),
    }
}

async fn health(State(node): State<Arc<Node>>) -> Response {
    let (used, limit) = node.engine.seats();
    json_response(
        StatusCode::OK,
        &json!({"status": "ok", "slots_busy": used, "slots": limit}),
    )
}

async fn models(State(node): State<Arc<Node>>, headers: HeaderMap) -> Reply {
    node.gate.authorize(&headers)?;
    let info = &node.info;
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "kiln",
            "meta": {
                "engine": info.engine,
                "architecture": info.architecture,
                "context_length": info.context_limit,
                "tool_format": info.tool_format,
            },
        }]}),
    ))
}

/// The node's samples as server-sent events, one a second: memory, swap,
/// heat, the speeds of the last answer and the requests it holds.
async fn telemetry(State(node): State<Arc<Node>>, headers: HeaderMap) -> Reply {
    node.gate.authorize(&headers)?;
    let samples = node.samples.clone();
    let events = futures_util::stream::unfold((true, samples), move |(first, mut samples)| {
        let node = node.clone();
        async move {
            if !first && samples.changed().await.is_err() {
                return None;
            }
            let report = NodeReport {
                node: node.name.clone(),
                model: node.info.name.clone(),
                seats: node.engine.seats(),
                sample: samples.borrow_and_update().clone(),
                served: node.served.borrow().clone(),
            };
            let event = Event::default().data(serde_json::to_string(&report).unwrap_or_default());
            Some((Ok::<_, Infallible>(event), (false, samples)))
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Which API an answer is shaped for.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

/// One request's answer, from its first chunk to its last.
struct Answer {
    api: Api,
    id: String,
    model: String,
    created: u64,
    usage_in_stream: bool,
    calls: Option<ToolFormat>,
    /// Every streamed chunk's JSON up to its choice.
    head: String,
}

impl Answer {
    fn new(
        api: Api,
        id: String,
        model: String,
        usage_in_stream: bool,
        calls: Option<ToolFormat>,
    ) -> Answer {
        let created = unix_now();
        let object = match api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let head = format!(
            r#"{{"id":{},"object":"{object}","created":{created},"model":{},"choices":["#,
            serde_json::Value::from(id.as_str()),
            serde_json::Value::from(model.as_str()),
        );
        Answer {
            api,
            id,
            model,
            created,
            usage_in_stream,
            calls,
            head,
        }
    }
}

/// What a driven turn gives its client.
enum Out {
    Piece(Piece),
    End {
        ending: Ending,
        finish: FinishReason,
        stats: GenStats,
    },
    Failed(String),
}

impl Answer {
    fn finish_reason(ending: &Ending, finish: FinishReason) -> &'static str {
        if !ending.calls.is_empty() {
            return "tool_calls";
        }
        match finish {
            FinishReason::MaxTokens | FinishReason::ContextFull if !ending.stopped => "length",
            _ => "stop",
        }
    }

    fn usage(stats: &GenStats) -> Value {
        let prompt = stats.prompt_tokens + stats.reused_tokens;
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": stats.completion_tokens,
            "total_tokens": prompt + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
        })
    }

    /// The calls' ids are the answer's own: a client keeps its
    /// conversation's calls apart by id, and the same call made in two
    /// answers would otherwise share one.
    fn calls_json(&self, ending: &Ending, streamed: bool) -> Value {
        ending
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut call = json!({
                    "id": tool_format::answer_call_id(&self.id, i),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments.to_string()},
                });
                if streamed {
                    call["index"] = i.into();
                }
                call
            })
            .collect()
    }

    /// One streamed chunk.
    fn chunk(&self, choice: Option<Value>, usage: Option<Value>) -> Value {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choice.into_iter().collect::<Vec<_>>(),
        });
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        chunk
    }

    /// A streamed piece's chunk as JSON text, written straight out: this
    /// runs once a token, and building a `Value` for it costs more than
    /// the rest of the token's path. Equal to `chunk` of `piece_choice`.
    fn piece_chunk(&self, piece: &Piece, first: bool) -> String {
        let text = |t: &str| serde_json::to_string(t).unwrap_or_default();
        let choice = match (self.api, piece) {
            (Api::Completion, Piece::Content(t) | Piece::Reasoning(t)) => {
                format!(
                    r#"{{"index":0,"text":{},"logprobs":null,"finish_reason":null}}"#,
                    text(t)
                )
            }
            (Api::Chat, piece) => {
                let delta = match piece {
                    Piece::Content(t) => format!(r#""content":{}"#, text(t)),
                    Piece::Reasoning(t) => format!(r#""reasoning_content":{}"#, text(t)),
                };
                let role = if first { r#","role":"assistant""# } else { "" };
                format!(
                    r#"{{"index":0,"delta":{{{delta}{role}}},"logprobs":null,"finish_reason":null}}"#
                )
            }
        };
        format!("{}{choice}]}}", self.head)
    }

    fn piece_choice(&self, piece: &Piece, first: bool) -> Value {
        match (self.api, piece) {
            (Api::Completion, Piece::Content(t) | Piece::Reasoning(t)) => {
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null})
            }
            (Api::Chat, piece) => {
                let mut delta = match piece {
                    Piece::Content(t) => json!({"content": t}),
                    Piece::Reasoning(t) => json!({"reasoning_content": t}),
                };
                if first {
                    delta["role"] = "assistant".into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null})
            }
        }
    }

    /// The stream's closing chunks: the calls, the finish reason, usage.
    fn closing(&self, ending: &Ending, finish: FinishReason, stats: &GenStats) -> Vec<Value> {
        let reason = Answer::finish_reason(ending, finish);
        let mut chunks = Vec::new();
        for piece in &ending.pieces {
            chunks.push(self.chunk(Some(self.piece_choice(piece, false)), None));
        }
        let last = match self.api {
            Api::Completion => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
            }
            Api::Chat => {
                let mut delta = json!({});
                if !ending.calls.is_empty() {
                    delta["tool_calls"] = self.calls_json(ending, true);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
        };
        chunks.push(self.chunk(Some(last), None));
        if self.usage_in_stream {
            chunks.push(self.chunk(None, Some(Answer::usage(stats))));
        }
        chunks
    }

    /// The whole answer, for a request that did not stream.
    fn whole(
        &self,
        pieces: &[Piece],
        ending: &Ending,
        finish: FinishReason,
        stats: &GenStats,
    ) -> Value {
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces.iter().chain(&ending.pieces) {
            match piece {
                Piece::Reasoning(t) => reasoning.push_str(t),
                Piece::Content(t) => content.push_str(t),
            }
        }
        let reason = Answer::finish_reason(ending, finish);
        let choice = match self.api {
            Api::Completion => {
                json!({"index": 0, "text": reasoning + &content, "logprobs": null, "finish_reason": reason})
            }
            Api::Chat => {
                let mut message = json!({"role": "assistant", "content": content});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = reasoning.into();
                }
                if !ending.calls.is_empty() {
                    message["tool_calls"] = self.calls_json(ending, false);
                    if content.is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                json!({"index": 0, "message": message, "logprobs": null, "finish_reason": reason})
            }
        };
        json!({
            "id": self.id,
            "object": match self.api { Api::Chat => "chat.completion", Api::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Answer::usage(stats),
        })
    }
}

/// A request let in and seated: its conversation, its ledger entry, the
/// places it holds, and its session where requests are kept.
struct Seated {
    lease: Lease,
    entry: Entry,
    journal: Option<JournalHandle>,
    _seat: OwnedSemaphorePermit,
    _ticket: Ticket,
}

/// A turn on a seated request's conversation.
struct Turn {
    seated: Seated,
    stream: TurnStream,
    shaper: Shaper,
}

impl Turn {
    /// Run the turn, handing what it gives to `emit` until `emit` says the
    /// client is past caring or `gone` resolves (the client left); then
    /// cancel it and wait for its end, so that the conversation is free
    /// when the lease goes back.
    async fn drive(mut self, gone: impl Future<Output = ()>, mut emit: impl FnMut(Out) -> bool) {
        tokio::pin!(gone);
        let mut listening = true;
        let (mut spent, mut tokens) = (std::time::Duration::ZERO, 0u64);
        loop {
            let event = tokio::select! {
                event = self.stream.next() => event,
                _ = &mut gone, if listening => {
                    self.seated.lease.cancel();
                    listening = false;
                    continue;
                }
            };
            let Some(event) = event else { break };
            if !listening {
                continue;
            }
            match event {
                EngineEvent::TurnStarted {
                    prompt_tokens,
                    reused_tokens,
                    ..
                } => self.seated.entry.started(prompt_tokens + reused_tokens),
                EngineEvent::Token { text, .. } => {
                    let handling = thread_cpu_time();
                    self.seated.entry.token();
                    for piece in self.shaper.push(&text) {
                        listening &= emit(Out::Piece(piece));
                    }
                    if self.shaper.stopped() || !listening {
                        self.seated.lease.cancel();
                    }
                    spent += thread_cpu_time().saturating_sub(handling);
                    tokens += 1;
                    if !listening {
                        continue;
                    }
                }
                EngineEvent::TurnFinished {
                    finish,
                    stats,
                    reply,
                    ..
                } => {
                    if let Some(journal) = self.seated.journal.take() {
                        journal.event(Journaled::Answer {
                            text: reply,
                            finish,
                            stats: stats.clone(),
                        });
                        // Closing waits for the disk: not on this task.
                        tokio::task::spawn_blocking(move || journal.close());
                    }
                    self.seated.entry.finished(stats.clone());
                    self.seated.entry.spent(spent, tokens);
                    let ending = self.shaper.finish();
                    emit(Out::End {
                        ending,
                        finish,
                        stats,
                    });
                }
                EngineEvent::TurnFailed { error, .. } => {
                    if let Some(journal) = self.seated.journal.take() {
                        journal.event(Journaled::Error {
                            text: error.clone(),
                        });
                        tokio::task::spawn_blocking(move || journal.close());
                    }
                    emit(Out::Failed(error));
                }
                EngineEvent::ContextTrimmed { .. } => {}
            }
        }
    }
}

/// The request's session, where the node keeps them: its system prompt
/// and input, on disk before it is answered.
async fn journal(
    node: &Node,
    system: Option<&str>,
    input: String,
) -> Result<Option<JournalHandle>, ApiError> {
    let Some(store) = node.journal.clone() else {
        return Ok(None);
    };
    let (model, context) = (node.info.name.clone(), node.info.context_limit);
    let system = system.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        store.start_with_question(&model, None, context, system.as_deref(), &input)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
    .map(Some)
    .map_err(|why| {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the request cannot be journaled: {why}"),
        )
    })
}

/// Admit the request, wait for a seat, lease a conversation, and keep
/// `system` and `input` where requests are kept.
async fn seat(
    node: &Node,
    addr: SocketAddr,
    user: Option<&str>,
    endpoint: &'static str,
    (system, input): (Option<&str>, String),
) -> Result<Seated, ApiError> {
    let ticket = node.gate.admit(addr.ip())?;
    let entry = node.ledger.open(client_label(addr, user), endpoint);
    let seat = node.gate.seat().await?;
    let lease = node.engine.lease().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "every conversation of the model is in use (the workstation and agent runs hold some); try again shortly",
        )
    })?;
    let journal = journal(node, system, input).await?;
    Ok(Seated {
        lease,
        entry,
        journal,
        _seat: seat,
        _ticket: ticket,
    })
}

impl Seated {
    /// Answer the client with `stream`'s turn, shaped by `shaper` as
    /// `answer` says.
    async fn answer(
        self,
        stream: TurnStream,
        shaper: Shaper,
        answer: Answer,
        streaming: bool,
        buffer: usize,
    ) -> Reply {
        let turn = Turn {
            seated: self,
            stream,
            shaper,
        };
        match streaming {
            true => Ok(streamed(turn, answer, buffer)),
            false => whole(turn, answer).await,
        }
    }
}

async fn chat(
    State(node): State<Arc<Node>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    node.gate.authorize(&headers)?;
    let request: ChatRequest = parse(body)?;
    let plan = request.plan(&node.info, &node.sampler)?;
    let input = engine::as_one_message(&plan.input);
    let seated = seat(
        &node,
        addr,
        request.user.as_deref(),
        "chat",
        (plan.system.as_deref(), input),
    )
    .await?;
    let lease = &seated.lease;
    lease.send(EngineCommand::SetSystemPrompt(plan.system));
    lease.send(EngineCommand::SetSampler(plan.sampler));
    lease.send(EngineCommand::SetTools(plan.tools));
    lease.send(EngineCommand::SetHistory(plan.history));
    let stream = lease.respond(plan.input, plan.format);
    let answer = Answer::new(
        Api::Chat,
        format!("chatcmpl-{:08x}{}", node.tag, seated.entry.id()),
        node.info.name.clone(),
        request.stream_options.is_some_and(|o| o.include_usage),
        plan.calls,
    );
    let shaper = match (plan.forced, answer.calls) {
        (true, Some(format)) => Shaper::calls_only(plan.stops, format),
        _ => Shaper::new(plan.stops, answer.calls, true),
    };
    let buffer = node.gate.caps().stream_buffer;
    seated
        .answer(stream, shaper, answer, request.stream, buffer)
        .await
}

async fn completions(
    State(node): State<Arc<Node>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    node.gate.authorize(&headers)?;
    let request: CompletionRequest = parse(body)?;
    openai::check_model(request.model.as_deref(), &node.info)?;
    openai::check_n(request.n)?;
    let prompt = request.prompt()?;
    if request.echo == Some(true) {
        return Err(ApiError::field(
            "echo",
            "kiln serve does not echo the prompt",
        ));
    }
    let sampler = request
        .sampling
        .settings(&node.sampler, node.info.context_limit)?;
    let stops = request.sampling.stops()?;
    let user = request.user.as_deref();
    let seated = seat(&node, addr, user, "completion", (None, prompt.clone())).await?;
    seated.lease.send(EngineCommand::SetSampler(sampler));
    let stream = seated.lease.complete(prompt);
    let answer = Answer::new(
        Api::Completion,
        format!("cmpl-{:08x}{}", node.tag, seated.entry.id()),
        node.info.name.clone(),
        request.stream_options.is_some_and(|o| o.include_usage),
        None,
    );
    let shaper = Shaper::new(stops, None, false);
    let buffer = node.gate.caps().stream_buffer;
    seated
        .answer(stream, shaper, answer, request.stream, buffer)
        .await
}

fn streamed(turn: Turn, answer: Answer, buffer: usize) -> Response {
    let (tx, mut rx) = mpsc::channel::<Event>(buffer.max(4));
    tokio::spawn(async move {
        let gone = {
            let tx = tx.clone();
            async move { tx.closed().await }
        };
        let mut first = true;
        // Full means the client stopped reading: it is dropped.
        let send = |tx: &mpsc::Sender<Event>, value: &Value| {
            tx.try_send(Event::default().data(value.to_string()))
                .is_ok()
        };
        turn.drive(gone, |out| match out {
            Out::Piece(piece) => {
                let chunk = answer.piece_chunk(&piece, std::mem::take(&mut first));
                tx.try_send(Event::default().data(chunk)).is_ok()
            }
            Out::End {
                ending,
                finish,
                stats,
            } => {
                answer
                    .closing(&ending, finish, &stats)
                    .iter()
                    .all(|c| send(&tx, c))
                    && tx.try_send(Event::default().data("[DONE]")).is_ok()
            }
            Out::Failed(error) => {
                let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error);
                send(&tx, &e.body())
            }
        })
        .await;
    });
    let events = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    });
    Sse::new(events).into_response()
}

async fn whole(turn: Turn, answer: Answer) -> Reply {
    let (reply_tx, reply_rx) = oneshot::channel::<Reply>();
    // Dropped with the handler's future, which hyper drops when the
    // client goes.
    let (alive, watched) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let gone = async move {
            let _ = watched.await;
        };
        let mut reply_tx = Some(reply_tx);
        let mut pieces = Vec::new();
        turn.drive(gone, |out| {
            let reply = match out {
                Out::Piece(piece) => {
                    pieces.push(piece);
                    return true;
                }
                Out::End {
                    ending,
                    finish,
                    stats,
                } => Ok(json_response(
                    StatusCode::OK,
                    &answer.whole(&pieces, &ending, finish, &stats),
                )),
                Out::Failed(error) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error)),
            };
            if let Some(tx) = reply_tx.take() {
                let _ = tx.send(reply);
            }
            false
        })
        .await;
    });
    let reply = reply_rx.await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the answer's task ended without an answer",
        ))
    });
    drop(alive);
    reply
}

/// CPU time this thread has used. A token's handling is timed in CPU time,
/// not wall time: it runs without an await, so on one thread, and on a
/// machine whose cores llama.cpp keeps busy, wall time would mostly count
/// the waits for a core.
fn thread_cpu_time() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain call filling a local struct.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    match ok {
        true => std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32),
        false => std::time::Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunk written straight out is the chunk the `Value` path builds,
    /// for each API and kind of piece, with hostile text.
    #[test]
    fn a_streamed_chunk_written_out_is_the_chunk_built() {
        let text = "quote \" back\\slash \u{1b}[2J tab\t é 釉";
        for api in [Api::Chat, Api::Completion] {
            let answer = Answer::new(api, "chatcmpl-\"x".into(), "m\n1".into(), false, None);
            for piece in [Piece::Content(text.into()), Piece::Reasoning(text.into())] {
                for first in [true, false] {
                    let written: Value =
                        serde_json::from_str(&answer.piece_chunk(&piece, first)).unwrap();
                    let built = answer.chunk(Some(answer.piece_choice(&piece, first)), None);
                    assert_eq!(written, built);
                }
            }
        }
    }
}
