//! `RemoteEngine`: a session on an OpenAI-compatible chat endpoint (a
//! llama.cpp or vLLM server, a bigger machine in the closet).
//!
//! kalosm 0.4's OpenAI-compatible model was the first choice, but it does
//! not fit: it reports no token usage, files the reply as a user message in
//! its session, has no timeouts, and ends at the first `finish_reason`
//! before the usage chunk arrives. This engine speaks the same streaming API
//! with reqwest and `eventsource-stream`, asks for usage
//! (`stream_options.include_usage`), and turns every failure into a clear
//! `TurnFailed`.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;

use super::context::{Conversation, Message, Role};
use super::sampler::SamplerSettings;
use super::{rates, CancelFlag, Engine, EngineEvent, EventSink, FinishReason, GenStats, ModelInfo};
use crate::chat::KvState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for the first token includes the server's prefill.
const FIRST_EVENT_TIMEOUT: Duration = Duration::from_secs(300);
const BETWEEN_EVENTS_TIMEOUT: Duration = Duration::from_secs(60);
/// A cancel is noticed at least this often while waiting for the server.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// A named endpoint from `[endpoints.NAME]` in `config.toml`. The API key
/// is read from the environment variable named here, never written down.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub base_url: String,
    pub model: String,
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The context window the server runs with.
    #[serde(default = "default_context")]
    pub context: usize,
}

fn default_context() -> usize {
    8192
}

/// Secrets an endpoint must never get back onto the screen, into the
/// journal or the log: its API key, and the password in its URL. Servers
/// do echo them (in an error body, in a stream), so every text from the
/// endpoint and every error about it passes through here.
#[derive(Clone, Debug, Default)]
struct Redactor {
    secrets: Vec<String>,
}

const REDACTED: &str = "[redacted]";

impl Redactor {
    fn new(endpoint: &Endpoint) -> Redactor {
        let mut secrets = Vec::new();
        if let Some(key) = endpoint
            .api_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
        {
            secrets.push(key);
        }
        if let Ok(url) = reqwest::Url::parse(&endpoint.base_url) {
            if let Some(p) = url.password() {
                secrets.push(p.to_string());
                // As the URL spells it, and decoded.
                if let Ok(decoded) = percent_encoding::percent_decode_str(p).decode_utf8() {
                    secrets.push(decoded.into_owned());
                }
            }
        }
        // Too short to tell from ordinary text.
        secrets.retain(|s| s.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
        }
        out
    }

    /// How much of `pending` can be let out now: all but a tail that could
    /// still turn into a secret with the next piece of the stream.
    fn safe_len(&self, pending: &str) -> usize {
        let mut keep_from = pending.len();
        for s in &self.secrets {
            for start in pending.len().saturating_sub(s.len() - 1)..pending.len() {
                if pending.is_char_boundary(start) && s.starts_with(&pending[start..]) {
                    keep_from = keep_from.min(start);
                    break;
                }
            }
        }
        keep_from
    }
}

/// The endpoint's URL as it may be shown: any password replaced.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Conversations kiln keeps open on one endpoint at once; the server
/// queues or batches their requests as it is set up to.
const REMOTE_CONVERSATIONS: usize = 8;

pub struct RemoteEngine {
    redactor: Redactor,
    name: String,
    endpoint: Endpoint,
    client: reqwest::Client,
    conv: Conversation,
    sampler: SamplerSettings,
}

impl RemoteEngine {
    pub fn new(
        name: &str,
        endpoint: Endpoint,
        sampler: SamplerSettings,
        system_prompt: Option<String>,
    ) -> Result<RemoteEngine, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("endpoint {name}: {e}"))?;
        Ok(RemoteEngine {
            redactor: Redactor::new(&endpoint),
            name: name.to_string(),
            endpoint,
            client,
            conv: Conversation {
                system: system_prompt,
                messages: Vec::new(),
                tools: Vec::new(),
            },
            sampler,
        })
    }

    fn body(&self, messages: &[Message]) -> serde_json::Value {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| {
                // An answer goes back without its thinking, as the API has it.
                let content = match m.role {
                    super::Role::Assistant => super::thinking::split(&m.content).shown_answer(),
                    _ => &m.content,
                };
                serde_json::json!({ "role": m.role.as_str(), "content": content })
            })
            .collect();
        let s = &self.sampler;
        let mut body = serde_json::json!({
            "model": self.endpoint.model,
            "messages": messages,
            "stream": true,
            "stream_options": { "include_usage": true },
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        });
        // Only OpenAI's own fields: its API refuses others (top-k, min-p and
        // the repeat penalty are the server's to set).
        if s.frequency_penalty != 0.0 {
            body["frequency_penalty"] = s.frequency_penalty.into();
        }
        if s.presence_penalty != 0.0 {
            body["presence_penalty"] = s.presence_penalty.into();
        }
        if let Some(seed) = s.seed {
            body["seed"] = seed.into();
        }
        if let Some(on) = s.thinking {
            // llama.cpp's server and vLLM pass these to the chat template.
            body["chat_template_kwargs"] = serde_json::json!({ "enable_thinking": on });
        }
        body
    }

    /// One streamed completion of `messages`; sends the turn's events.
    /// Returns the reply, or the one-line reason it failed.
    async fn stream(
        &self,
        turn: u64,
        messages: &[Message],
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> Result<String, String> {
        let name = &self.name;
        let url = format!(
            "{}/chat/completions",
            self.endpoint.base_url.trim_end_matches('/')
        );
        let shown = shown_url(&url);
        let mut request = self.client.post(&url).json(&self.body(messages));
        if let Some(var) = &self.endpoint.api_key_env {
            let key = std::env::var(var)
                .map_err(|_| format!("endpoint {name}: the API key variable {var} is not set"))?;
            request = request.bearer_auth(key);
        }
        let _ = out.send(EngineEvent::TurnStarted {
            turn,
            prompt_tokens: 0,
            reused_tokens: 0,
        });
        let started = Instant::now();
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                format!(
                    "endpoint {name}: cannot connect to {shown}: {}",
                    root_cause(&e)
                )
            } else if e.is_timeout() {
                format!("endpoint {name}: {shown} timed out")
            } else {
                format!("endpoint {name}: {}", root_cause(&e))
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
            let body: String = body.chars().take(300).collect();
            return Err(format!("endpoint {name}: HTTP {status}: {body}"));
        }

        let mut events = response.bytes_stream().eventsource();
        let mut reply = String::new();
        let mut finish = None;
        let mut done = false;
        let mut usage: Option<Usage> = None;
        let mut first_at = None;
        let mut chunks = 0usize;
        let mut last_event = Instant::now();
        // Streamed text not let out yet: it could be the start of a secret.
        let mut held = String::new();
        // Inside a thinking block the server sent as `reasoning_content`.
        let mut reasoning = false;
        loop {
            if cancel.is_cancelled(turn) {
                finish = Some(FinishReason::Cancelled);
                break;
            }
            let limit = if first_at.is_none() {
                FIRST_EVENT_TIMEOUT
            } else {
                BETWEEN_EVENTS_TIMEOUT
            };
            if last_event.elapsed() > limit {
                return Err(format!(
                    "endpoint {name}: no data for {} s; the server may be stuck",
                    limit.as_secs()
                ));
            }
            let event = match tokio::time::timeout(CANCEL_POLL, events.next()).await {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(format!("endpoint {name}: the stream broke: {e}")),
                Ok(Some(Ok(event))) => event,
            };
            last_event = Instant::now();
            if event.data.trim() == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk = serde_json::from_str(&event.data).map_err(|e| {
                let data: String = event.data.chars().take(120).collect();
                format!("endpoint {name}: malformed stream data ({e}): {data}")
            })?;
            if let Some(u) = chunk.usage {
                usage = Some(u);
            }
            for choice in chunk.choices {
                let text = with_thinking_tags(&mut reasoning, choice.delta.unwrap_or_default());
                if !text.is_empty() {
                    first_at.get_or_insert_with(Instant::now);
                    chunks += 1;
                    held.push_str(&text);
                    let held_text = self.redactor.redact(&held);
                    let safe = self.redactor.safe_len(&held_text);
                    held = held_text[safe..].to_string();
                    let text = held_text[..safe].to_string();
                    if !text.is_empty() {
                        reply.push_str(&text);
                        let _ = out.send(EngineEvent::Token { turn, text });
                    }
                }
                if let Some(reason) = choice.finish_reason {
                    finish = Some(match reason.as_str() {
                        "length" => FinishReason::MaxTokens,
                        _ => FinishReason::Stop,
                    });
                }
            }
        }
        if reasoning {
            held.push_str(super::thinking::CLOSE);
        }
        if !held.is_empty() {
            let text = self.redactor.redact(&held);
            reply.push_str(&text);
            let _ = out.send(EngineEvent::Token { turn, text });
        }
        let finish = match (finish, done) {
            (Some(f), _) => f,
            (None, true) => FinishReason::Stop,
            (None, false) => {
                return Err(format!(
                    "endpoint {name}: the server closed the stream in the middle of the answer"
                ))
            }
        };
        let total_s = started.elapsed().as_secs_f64();
        let ttft_s = first_at.map_or(total_s, |t| (t - started).as_secs_f64());
        let (prompt_tokens, completion_tokens) = match &usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            // Servers that report no usage: one streamed chunk is one token
            // on llama.cpp and vLLM.
            None => (0, chunks),
        };
        let (prefill_tok_s, decode_tok_s) =
            rates(prompt_tokens, completion_tokens, ttft_s, total_s);
        let stats = GenStats {
            ttft_ms: ttft_s * 1000.0,
            prompt_tokens,
            reused_tokens: 0,
            completion_tokens,
            prefill_tok_s,
            decode_tok_s,
            total_ms: total_s * 1000.0,
            context_tokens: prompt_tokens + completion_tokens,
            cached_tokens: 0,
            ..GenStats::default()
        };
        tracing::info!("remote {name} turn {turn}: {}", stats.summary(finish));
        let _ = out.send(EngineEvent::TurnFinished {
            turn,
            reply: reply.clone(),
            finish,
            stats,
        });
        Ok(reply)
    }
}

/// The innermost error, which says what actually went wrong.
pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A delta's text, with thinking a server sent apart (`reasoning_content`:
/// llama.cpp's server, vLLM, DeepSeek's) put back in its tags, the way kiln
/// keeps an answer. `reasoning` says whether a thinking block is open.
fn with_thinking_tags(reasoning: &mut bool, delta: Delta) -> String {
    let mut text = String::new();
    if let Some(r) = delta.reasoning_content.filter(|r| !r.is_empty()) {
        if !std::mem::replace(reasoning, true) {
            text.push_str(super::thinking::OPEN);
        }
        text.push_str(&r);
    }
    if let Some(c) = delta.content.filter(|c| !c.is_empty()) {
        if std::mem::take(reasoning) {
            text.push_str(super::thinking::CLOSE);
            text.push_str("\n\n");
        }
        text.push_str(&c);
    }
    text
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Engine for RemoteEngine {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: format!("{} @ {}", self.endpoint.model, self.name),
            engine: format!("remote:{}", self.name),
            architecture: "remote".into(),
            path: None,
            context_limit: self.endpoint.context,
            notes: Vec::new(),
            tool_format: None,
        }
    }

    async fn chat(&mut self, turn: u64, message: String, out: &EventSink, cancel: &CancelFlag) {
        let question = Message::new(Role::User, message);
        let messages = self.conv.with_new(0, std::slice::from_ref(&question));
        let result = self.stream(turn, &messages, out, cancel).await;
        self.conv.messages.push(question);
        match result {
            Ok(reply) => self
                .conv
                .messages
                .push(Message::new(Role::Assistant, reply)),
            Err(error) => {
                let error = self.redactor.redact(&error);
                tracing::warn!("{error}");
                let _ = out.send(EngineEvent::TurnFailed { turn, error });
            }
        }
    }

    async fn continue_last(&mut self, turn: u64, out: &EventSink, _cancel: &CancelFlag) {
        let _ = out.send(EngineEvent::TurnFailed {
            turn,
            error: format!(
                "endpoint {}: continuing a cut answer needs a local engine; answer again instead",
                self.name
            ),
        });
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        self.conv.system = prompt;
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        self.conv.messages = messages;
    }

    fn snapshot(&self) -> Result<Option<KvState>, String> {
        // The KV cache lives on the server.
        Ok(None)
    }

    fn restore(&mut self, _state: KvState) -> Result<(), String> {
        Err("a remote endpoint keeps no local KV state".into())
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        self.sampler = settings;
    }

    fn reset(&mut self) {
        self.conv.messages.clear();
    }

    /// Another conversation over the same client: the endpoint keeps no
    /// state between requests, so conversations are independent.
    fn open(&self) -> Option<Self> {
        Some(RemoteEngine {
            redactor: self.redactor.clone(),
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            conv: Conversation {
                system: self.conv.system.clone(),
                messages: Vec::new(),
                tools: Vec::new(),
            },
            sampler: self.sampler.clone(),
        })
    }

    fn conversations(&self) -> usize {
        REMOTE_CONVERSATIONS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Endpoint {
            base_url: url.into(),
            model: "m".into(),
            api_key_env: None,
            context: 8192,
        }
    }

    #[test]
    fn thinking_sent_apart_is_kept_in_its_tags() {
        let deltas = [
            (Some("Let me"), None),
            (Some(" add."), Some("")),
            (None, Some("Four")),
            (None, Some(".")),
        ];
        let mut reasoning = false;
        let text: String = deltas
            .into_iter()
            .map(|(r, c)| {
                let delta = Delta {
                    reasoning_content: r.map(String::from),
                    content: c.map(String::from),
                };
                with_thinking_tags(&mut reasoning, delta)
            })
            .collect();
        assert_eq!(text, "<think>Let me add.</think>\n\nFour.");
        assert!(!reasoning);
        let split = crate::engine::thinking::split(&text);
        assert_eq!(split.thinking, Some("Let me add."));
        let body = RemoteEngine::new(
            "e",
            endpoint("http://127.0.0.1:9/v1"),
            SamplerSettings {
                thinking: Some(false),
                ..SamplerSettings::default()
            },
            None,
        )
        .unwrap()
        .body(&[
            Message::new(Role::User, "2+2?"),
            Message::new(Role::Assistant, text),
        ]);
        assert_eq!(body["messages"][1]["content"], "Four.");
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
    }

    /// A secret is caught whole, across any split of a stream, and in the
    /// URL as spelled and as decoded.
    #[test]
    fn secrets_never_pass_whatever_the_split() {
        let r = Redactor::new(&endpoint("http://user:p%40ss-w0rd@host:1/v1"));
        assert_eq!(
            shown_url("http://user:p%40ss-w0rd@host:1/v1"),
            "http://user:***@host:1/v1"
        );
        let secret = "sk-test-0123456789";
        let r = Redactor {
            secrets: [r.secrets, vec![secret.to_string()]].concat(),
        };
        assert_eq!(r.redact("bad key p@ss-w0rd"), "bad key [redacted]");
        let text = format!("echo {secret} and p%40ss-w0rd done");
        for cut in 1..text.len() {
            // The stream as the engine handles it, split into pieces.
            let mut held = String::new();
            let mut out = String::new();
            for piece in [&text[..cut], &text[cut..]] {
                held.push_str(piece);
                let h = r.redact(&held);
                let safe = r.safe_len(&h);
                out.push_str(&h[..safe]);
                held = h[safe..].to_string();
            }
            out.push_str(&r.redact(&held));
            assert_eq!(out, "echo [redacted] and [redacted] done", "cut at {cut}");
        }
    }
}
