//! The plain types of a conversation that the engine and the store share:
//! messages, how a turn ended and what it cost, an engine's KV state, the
//! alarms a session records, and the prompt cache's interface. Below both, so neither imports the other.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, in the template's tool-result role.
    Tool,
}

impl Role {
    /// The name chat templates and chat APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// An answer's tool calls, in the model's own format's terms; its
    /// `content` is then the text the model wrote around them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallMessage>,
    /// A tool result's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One call in an answer, as chat templates and chat APIs take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallMessage {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A tool's result for the call `id`.
    pub fn tool(id: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            tool_call_id: Some(id.into()),
            ..Message::new(Role::Tool, content)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// The answer reached `max_tokens`.
    MaxTokens,
    /// The answer filled the context window.
    ContextFull,
    /// The user cancelled.
    Cancelled,
}

/// Figures for one turn. Token counts come from the model's tokenizer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenStats {
    /// Time from sending the turn to the first streamed text.
    pub ttft_ms: f64,
    /// Tokens prefilled for this turn (the new part of the prompt).
    pub prompt_tokens: usize,
    /// Tokens already in the KV cache and reused, not recomputed.
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens per second of prefill; `None` when nothing was prefilled.
    pub prefill_tok_s: Option<f64>,
    /// Generated tokens per second after the first; `None` below two tokens.
    pub decode_tok_s: Option<f64>,
    pub total_ms: f64,
    /// Tokens in the context after the turn.
    pub context_tokens: usize,
    /// Tokens of the system prompt loaded from the prompt cache instead of
    /// prefilled (included in `reused_tokens`).
    #[serde(default)]
    pub cached_tokens: usize,
    /// Time in the engine's decode calls and in its sampler, where the
    /// engine measures them (llama.cpp's does): what is left of the turn is
    /// kiln's own work per token.
    #[serde(default)]
    pub decode_ms: Option<f64>,
    #[serde(default)]
    pub sample_ms: Option<f64>,
    /// Tokens drafted (prompt lookup, `--lookup`, or a draft model,
    /// `--draft`), how many of them the model chose too, and how often drafting rested for not paying.
    #[serde(default)]
    pub drafted: usize,
    #[serde(default)]
    pub accepted_drafts: usize,
    #[serde(default)]
    pub drafting_rested: usize,
    /// Whether drafting rested when the turn ended (since this turn or an
    /// earlier one).
    #[serde(default)]
    pub drafting_resting: bool,
}

impl GenStats {
    /// The one-line summary `kiln ask` prints on stderr.
    pub fn summary(&self, finish: FinishReason) -> String {
        let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |v| format!("{v:.1} tok/s"));
        let mut line = format!(
            "{} tokens · TTFT {:.2} s · prefill {} ({} tok, {} reused) · decode {} · context {}",
            self.completion_tokens,
            self.ttft_ms / 1000.0,
            rate(self.prefill_tok_s),
            self.prompt_tokens,
            self.reused_tokens,
            rate(self.decode_tok_s),
            self.context_tokens,
        );
        if self.cached_tokens > 0 {
            line.push_str(&format!(" · prompt cache hit ({} tok)", self.cached_tokens));
        }
        if self.drafted > 0 {
            line.push_str(&format!(
                " · drafts kept {} of {} ({:.0}%)",
                self.accepted_drafts,
                self.drafted,
                self.accepted_drafts as f64 * 100.0 / self.drafted as f64
            ));
        }
        if self.drafting_rested > 0 {
            line.push_str(&format!(
                " · drafting rested {} time(s): it did not pay",
                self.drafting_rested
            ));
        } else if self.drafting_resting {
            line.push_str(" · drafting rests: it did not pay");
        }
        if finish != FinishReason::Stop {
            line.push_str(&format!(" · stopped: {finish:?}"));
        }
        line
    }
}

/// An engine's KV state: the text it holds (so a later prompt can be checked
/// for a shared prefix), its token count, and the engine's serialized cache.
#[derive(Clone, Debug, PartialEq)]
pub struct KvState {
    pub fed: String,
    pub kv_tokens: usize,
    pub bytes: Vec<u8>,
}

/// What a telemetry alarm that a session records was about.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    SwapStorm,
    ThermalThrottling,
}

/// System prompts shorter than this are cheaper to prefill than to load.
pub const PREFIX_CACHE_MIN_TOKENS: usize = 64;

/// Where an engine finds and keeps the KV state of a system prompt, so a
/// new conversation with the same prompt starts without its prefill. The
/// host hands one (the store's prompt cache) to the engine.
pub trait PrefixCache: Send + Sync + std::fmt::Debug {
    /// The state kept for `prefix` under `fingerprint`, if it is there and
    /// intact.
    fn lookup(&self, fingerprint: &str, prefix: &str) -> Option<KvState>;
    /// Keep `state` for `prefix`; the bytes written.
    fn keep(&self, fingerprint: &str, prefix: &str, state: &KvState) -> std::io::Result<u64>;
}
