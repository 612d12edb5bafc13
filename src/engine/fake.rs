//! `FakeEngine`: a scripted engine for UI and state tests. It streams the
//! scripted replies word by word, honours cancellation, and reports stats
//! whose counts are consistent (one token per word).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::context::{Conversation, Message, Role};
use super::sampler::SamplerSettings;
use super::tool_format::ToolFormat;
use super::{
    rates, CancelFlag, Engine, EngineEvent, EventSink, FinishReason, Format, GenStats, ModelInfo,
};
use crate::chat::KvState;

pub struct FakeEngine {
    script: VecDeque<String>,
    delay: Duration,
    context_limit: usize,
    max_tokens: u32,
    pub conversation: Conversation,
    kv_tokens: usize,
    /// How many conversations it lets be open at once.
    conversations: usize,
    /// The tool-call format it claims its template speaks.
    tool_format: Option<ToolFormat>,
}

impl FakeEngine {
    /// Replies are given out in order; after the last, it echoes the message.
    pub fn new(replies: impl IntoIterator<Item = impl Into<String>>) -> Self {
        FakeEngine {
            script: replies.into_iter().map(Into::into).collect(),
            delay: Duration::ZERO,
            context_limit: 4096,
            max_tokens: SamplerSettings::default().max_tokens,
            conversation: Conversation::default(),
            kv_tokens: 0,
            conversations: 1,
            tool_format: None,
        }
    }

    /// Claim a chat template that speaks `format`, so scripted replies in
    /// it are read back as calls.
    pub fn with_tool_format(mut self, format: ToolFormat) -> Self {
        self.tool_format = Some(format);
        self
    }

    /// Stream `text` word by word as turn `turn`; `TurnFinished` carries
    /// `earlier` and the streamed text. Returns the streamed text.
    async fn stream(
        &mut self,
        turn: u64,
        prompt_tokens: usize,
        text: &str,
        earlier: &str,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> String {
        let started = Instant::now();
        let _ = out.send(EngineEvent::TurnStarted {
            turn,
            prompt_tokens,
            reused_tokens: self.kv_tokens,
        });
        let mut reply = String::new();
        let mut finish = FinishReason::Stop;
        let mut first_at = None;
        for (i, word) in text.split_inclusive(' ').enumerate() {
            if cancel.is_cancelled(turn) {
                finish = FinishReason::Cancelled;
                break;
            }
            if i as u32 >= self.max_tokens {
                finish = FinishReason::MaxTokens;
                break;
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            first_at.get_or_insert_with(Instant::now);
            reply.push_str(word);
            let _ = out.send(EngineEvent::Token {
                turn,
                text: word.to_string(),
            });
        }
        let total_s = started.elapsed().as_secs_f64();
        let ttft_s = first_at.map_or(total_s, |t: Instant| (t - started).as_secs_f64());
        let completion_tokens = words(&reply);
        let (prefill_tok_s, decode_tok_s) =
            rates(prompt_tokens, completion_tokens, ttft_s, total_s);
        let stats = GenStats {
            ttft_ms: ttft_s * 1000.0,
            prompt_tokens,
            reused_tokens: self.kv_tokens,
            completion_tokens,
            prefill_tok_s,
            decode_tok_s,
            total_ms: total_s * 1000.0,
            context_tokens: self.kv_tokens + prompt_tokens + completion_tokens,
            cached_tokens: 0,
            ..GenStats::default()
        };
        self.kv_tokens = stats.context_tokens;
        let _ = out.send(EngineEvent::TurnFinished {
            turn,
            reply: format!("{earlier}{reply}"),
            finish,
            stats,
        });
        reply
    }

    /// The next scripted reply to `input` (its echo once the script is
    /// done), streamed and kept with its calls read out where tools are
    /// listed.
    async fn answer(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) {
        let message = super::as_one_message(&input);
        let text = self
            .script
            .pop_front()
            .unwrap_or_else(|| format!("echo: {message}"));
        let reply = self
            .stream(turn, words(&message), &text, "", out, cancel)
            .await;
        let _ = self.conversation.record(input, Ok(reply), self.tool_format);
    }

    /// A smaller context window, to make context pressure easy to reach.
    pub fn with_context_limit(mut self, tokens: usize) -> Self {
        self.context_limit = tokens;
        self
    }

    /// Let `n` conversations be open at once, each starting from what is
    /// left of the script.
    pub fn with_conversations(mut self, n: usize) -> Self {
        self.conversations = n;
        self
    }

    /// Pause between streamed words, to test cancellation and live rates.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

impl Engine for FakeEngine {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: "fake".into(),
            engine: "fake".into(),
            architecture: "scripted".into(),
            path: None,
            context_limit: self.context_limit,
            notes: Vec::new(),
            tool_format: self.tool_format,
        }
    }

    async fn chat(&mut self, turn: u64, message: String, out: &EventSink, cancel: &CancelFlag) {
        let input = vec![Message::new(Role::User, message)];
        self.answer(turn, input, out, cancel).await
    }

    /// The scripted reply, unconstrained: what tests script is what the
    /// grammar would have let through.
    async fn chat_constrained(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        _format: Option<Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) {
        self.answer(turn, input, out, cancel).await
    }

    fn set_tools(&mut self, tools: Vec<serde_json::Value>) {
        self.conversation.tools = tools;
    }

    /// The next scripted reply as the prompt's continuation, outside the
    /// conversation.
    async fn complete(&mut self, turn: u64, prompt: String, out: &EventSink, cancel: &CancelFlag) {
        let text = self
            .script
            .pop_front()
            .unwrap_or_else(|| format!("echo: {prompt}"));
        self.stream(turn, words(&prompt), &text, "", out, cancel)
            .await;
    }

    async fn continue_last(&mut self, turn: u64, out: &EventSink, cancel: &CancelFlag) {
        let earlier = match self.conversation.messages.last() {
            Some(m) if m.role == Role::Assistant => m.content.clone(),
            _ => {
                let _ = out.send(EngineEvent::TurnFailed {
                    turn,
                    error: "there is no answer to continue".into(),
                });
                return;
            }
        };
        let text = self
            .script
            .pop_front()
            .unwrap_or_else(|| "and so on.".into());
        let more = self.stream(turn, 0, &text, &earlier, out, cancel).await;
        if let Some(m) = self.conversation.messages.last_mut() {
            m.content.push_str(&more);
        }
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        self.conversation.system = prompt;
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        self.kv_tokens = messages.iter().map(|m| words(&m.content)).sum();
        self.conversation.messages = messages;
    }

    /// The fake's "KV state" is its token count, so tests can check that a
    /// snapshot goes to disk and comes back.
    fn snapshot(&self) -> Result<Option<KvState>, String> {
        Ok((self.kv_tokens > 0).then(|| KvState {
            fed: String::new(),
            kv_tokens: self.kv_tokens,
            bytes: (self.kv_tokens as u64).to_le_bytes().to_vec(),
        }))
    }

    fn restore(&mut self, state: KvState) -> Result<(), String> {
        let bytes: [u8; 8] = state
            .bytes
            .as_slice()
            .try_into()
            .map_err(|_| "not a fake state")?;
        self.kv_tokens = u64::from_le_bytes(bytes) as usize;
        Ok(())
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        self.max_tokens = settings.max_tokens;
    }

    fn reset(&mut self) {
        self.conversation = Conversation::default();
        self.kv_tokens = 0;
    }

    fn open(&self) -> Option<Self> {
        (self.conversations > 1).then(|| FakeEngine {
            script: self.script.clone(),
            conversation: Conversation::default(),
            kv_tokens: 0,
            ..*self
        })
    }

    fn conversations(&self) -> usize {
        self.conversations
    }
}

#[cfg(test)]
mod tests {
    use super::super::spawn;
    use super::*;

    async fn finish_of(rx: &mut super::super::TurnStream) -> (Vec<EngineEvent>, EngineEvent) {
        let mut seen = Vec::new();
        while let Some(ev) = rx.next().await {
            if matches!(
                ev,
                EngineEvent::TurnFinished { .. } | EngineEvent::TurnFailed { .. }
            ) {
                return (seen, ev);
            }
            seen.push(ev);
        }
        panic!("engine task ended");
    }

    #[tokio::test]
    async fn streams_in_order_and_reports_consistent_stats() {
        let handle = spawn(FakeEngine::new(["one two three"]));
        let mut rx = handle.chat("hello there");
        let turn = rx.turn;
        let (seen, fin) = finish_of(&mut rx).await;
        assert!(
            matches!(seen[0], EngineEvent::TurnStarted { turn: t, prompt_tokens: 2, .. } if t == turn)
        );
        let streamed: String = seen
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        let EngineEvent::TurnFinished {
            reply,
            finish,
            stats,
            ..
        } = fin
        else {
            unreachable!()
        };
        assert_eq!(streamed, "one two three");
        assert_eq!(reply, streamed);
        assert_eq!(finish, FinishReason::Stop);
        assert_eq!(stats.completion_tokens, 3);
        assert_eq!(stats.context_tokens, 5);
    }

    #[tokio::test]
    async fn cancel_stops_a_running_turn_but_not_the_next() {
        let slow = FakeEngine::new(["a b c d e f g h i j k l m n o p", "next reply"])
            .with_delay(Duration::from_millis(20));
        let handle = spawn(slow);
        let mut rx = handle.chat("go");
        // Wait for the first token, then cancel.
        loop {
            if let Some(EngineEvent::Token { .. }) = rx.next().await {
                break;
            }
        }
        handle.cancel();
        let (_, fin) = finish_of(&mut rx).await;
        let EngineEvent::TurnFinished { finish, stats, .. } = fin else {
            unreachable!()
        };
        assert_eq!(finish, FinishReason::Cancelled);
        assert!(stats.completion_tokens < 16);

        let mut rx = handle.chat("again");
        let (_, fin) = finish_of(&mut rx).await;
        let EngineEvent::TurnFinished { finish, reply, .. } = fin else {
            unreachable!()
        };
        assert_eq!(finish, FinishReason::Stop);
        assert_eq!(reply, "next reply");
    }
}
