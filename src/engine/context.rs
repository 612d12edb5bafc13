//! The conversation an engine holds, and the policy for a full context window.
//!
//! Policy: before a turn, the whole conversation plus the new message is
//! rendered and counted. If it does not leave room for the answer, the oldest
//! exchanges are dropped (a user message with the reply that followed it),
//! never the system prompt and never the new message. If the new message
//! alone cannot fit, the turn fails with the numbers. During a turn the answer
//! is capped at the room left, so the window never overflows mid-answer.

use std::future::Future;

pub use crate::chat::{Message, Role};

use super::template::ChatTemplate;
use super::{CancelFlag, EventSink, Format};

/// A local engine's turns: planning, trimming and recording are the same for
/// every backend; only how a rendered prompt becomes an answer differs.
pub(crate) trait LocalTurns: Send {
    fn conversation(&self) -> &Conversation;
    fn conversation_mut(&mut self) -> &mut Conversation;
    fn template(&self) -> &ChatTemplate;
    fn count_tokens(&self, text: &str) -> usize;
    /// The context window and the most tokens an answer may take.
    fn window(&self) -> (usize, u32);

    /// Generate from the rendered `prompt` (with its token count), streaming
    /// to `out` and ending with `TurnFinished`, whose reply is `earlier` (the
    /// part of a cut answer already given) plus the new text. Returns the
    /// new text.
    fn generate(
        &mut self,
        turn: u64,
        prompt: (String, usize),
        earlier: &str,
        constraint: Option<&Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = Result<String, String>> + Send;

    /// New messages (a user's, or tool results) and their answer.
    fn run_turn(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        constraint: Option<&Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async move {
            let (limit, max_tokens) = self.window();
            let conv = self.conversation();
            let plan = plan_turn(
                conv,
                &input,
                limit,
                answer_reserve(max_tokens, limit),
                |msgs| self.template().render_with_tools(msgs, &conv.tools, true),
                |text| self.count_tokens(text),
            )
            .map_err(|e| e.to_string())?;
            self.conversation_mut().trim(&plan, turn, limit, out);
            let prompt = (plan.prompt, plan.prompt_tokens);
            let answer = self
                .generate(turn, prompt, "", constraint, out, cancel)
                .await;
            let calls = self.template().tool_format();
            self.conversation_mut().record(input, answer, calls)
        }
    }

    /// Continue the last answer where it was cut: the prompt ends with the
    /// partial answer instead of a new question.
    fn run_continue(
        &mut self,
        turn: u64,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async move {
            let (limit, max_tokens) = self.window();
            let conv = self.conversation();
            let (prompt, so_far, prompt_tokens) = continue_prompt(
                conv,
                limit,
                answer_reserve(max_tokens, limit),
                |msgs| self.template().render_with_tools(msgs, &conv.tools, true),
                |text| self.count_tokens(text),
            )?;
            let more = self
                .generate(turn, (prompt, prompt_tokens), &so_far, None, out, cancel)
                .await?;
            if let Some(m) = self.conversation_mut().messages.last_mut() {
                m.content = so_far + &more;
            }
            Ok(())
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    /// User, assistant and tool messages, oldest first.
    pub messages: Vec<Message>,
    /// The tools the template lists (OpenAI-style function schemas).
    pub tools: Vec<serde_json::Value>,
}

impl Conversation {
    /// Drop the oldest messages `plan` leaves out, telling `out` when any go.
    pub fn trim(&mut self, plan: &TurnPlan, turn: u64, limit: usize, out: &super::EventSink) {
        if plan.drop == 0 {
            return;
        }
        self.messages.drain(..plan.drop);
        let _ = out.send(super::EngineEvent::ContextTrimmed {
            turn,
            dropped_messages: plan.drop,
            context_tokens: plan.prompt_tokens,
            limit,
        });
    }

    /// Keep an exchange: the input always, the answer when there is one,
    /// with its calls read out where tools are listed (`answer_message`).
    pub fn record(
        &mut self,
        input: Vec<Message>,
        answer: Result<String, String>,
        format: Option<super::tool_format::ToolFormat>,
    ) -> Result<(), String> {
        self.messages.extend(input);
        let format = format.filter(|_| !self.tools.is_empty());
        self.messages.push(answer_message(answer?, format));
        Ok(())
    }

    /// Every message in template order, the system prompt first.
    pub fn with_new(&self, kept_from: usize, new: &[Message]) -> Vec<Message> {
        self.system
            .iter()
            .map(|s| Message::new(Role::System, s.clone()))
            .chain(self.messages[kept_from..].iter().cloned())
            .chain(new.iter().cloned())
            .collect()
    }
}

/// An answer as a conversation keeps it: with its calls read out in
/// `format`'s terms where it speaks one, so the template renders them as
/// it was trained to; a call that cannot be read stays in the text as
/// written. A resumed run rebuilds its conversation with the same function.
pub fn answer_message(answer: String, format: Option<super::tool_format::ToolFormat>) -> Message {
    let parsed = format
        .map(|f| f.parse(&answer))
        .filter(|p| p.problem.is_none() && !p.calls.is_empty());
    match parsed {
        Some(p) => Message {
            tool_calls: p.calls,
            ..Message::new(Role::Assistant, p.text)
        },
        None => Message::new(Role::Assistant, answer),
    }
}

#[derive(Debug, PartialEq)]
pub struct TurnPlan {
    /// How many of the oldest messages to drop.
    pub drop: usize,
    /// The full rendered prompt for the turn.
    pub prompt: String,
    pub prompt_tokens: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the message needs {tokens} tokens with the system prompt, but the context window holds {limit} (with {reserve} kept for the answer)")]
    TooLong {
        tokens: usize,
        limit: usize,
        reserve: usize,
    },
    #[error("chat template: {0}")]
    Template(String),
}

/// The room kept for the answer when planning: the requested maximum, but at
/// most a quarter of the window so a huge `max_tokens` cannot evict everything.
pub fn answer_reserve(max_tokens: u32, limit: usize) -> usize {
    (max_tokens as usize).min(limit / 4)
}

/// Decide which messages to keep for the next turn.
pub fn plan_turn(
    conv: &Conversation,
    new: &[Message],
    limit: usize,
    reserve: usize,
    render: impl Fn(&[Message]) -> Result<String, String>,
    count: impl Fn(&str) -> usize,
) -> Result<TurnPlan, PlanError> {
    let mut drop = 0;
    loop {
        let prompt = render(&conv.with_new(drop, new)).map_err(PlanError::Template)?;
        let tokens = count(&prompt);
        if tokens + reserve <= limit {
            return Ok(TurnPlan {
                drop,
                prompt,
                prompt_tokens: tokens,
            });
        }
        if drop >= conv.messages.len() {
            return Err(PlanError::TooLong {
                tokens,
                limit,
                reserve,
            });
        }
        drop = next_exchange(&conv.messages, drop);
    }
}

/// The prompt that continues the conversation's cut-off last answer: the
/// conversation before it rendered for a reply, then the answer so far.
/// Returns the prompt, the answer so far and the prompt's tokens.
pub fn continue_prompt(
    conv: &Conversation,
    limit: usize,
    reserve: usize,
    render: impl Fn(&[Message]) -> Result<String, String>,
    count: impl Fn(&str) -> usize,
) -> Result<(String, String, usize), String> {
    let Some(last) = conv.messages.last().filter(|m| m.role == Role::Assistant) else {
        return Err("there is no answer to continue".into());
    };
    let head = &conv.messages[..conv.messages.len() - 1];
    let messages: Vec<Message> = conv
        .system
        .iter()
        .map(|s| Message::new(Role::System, s.clone()))
        .chain(head.iter().cloned())
        .collect();
    let rendered = render(&messages)?;
    let prompt = format!(
        "{rendered}{}",
        super::thinking::after_open_prompt(&rendered, &last.content)
    );
    let tokens = count(&prompt);
    if tokens + reserve > limit {
        return Err(format!(
            "the conversation needs {tokens} tokens, too many to continue in a {limit}-token window; answer again instead"
        ));
    }
    Ok((prompt, last.content.clone(), tokens))
}

/// The index where the exchange after the one starting at `from` begins: past
/// the next user message and every reply up to the following user message.
fn next_exchange(messages: &[Message], from: usize) -> usize {
    let mut i = from + 1;
    while i < messages.len() && messages[i].role != Role::User {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(msgs: &[Message]) -> Result<String, String> {
        Ok(msgs
            .iter()
            .map(|m| format!("{:?}: {}\n", m.role, m.content))
            .collect())
    }

    fn user(text: &str) -> Vec<Message> {
        vec![Message::new(Role::User, text)]
    }

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn conv(n: usize) -> Conversation {
        let mut c = Conversation {
            system: Some("be brief".into()),
            ..Conversation::default()
        };
        for i in 0..n {
            c.messages
                .push(Message::new(Role::User, format!("question {i}")));
            c.messages
                .push(Message::new(Role::Assistant, format!("answer {i}")));
        }
        c
    }

    #[test]
    fn keeps_everything_when_it_fits() {
        let plan = plan_turn(&conv(2), &user("new one"), 100, 10, render, words).unwrap();
        assert_eq!(plan.drop, 0);
        assert!(plan
            .prompt
            .starts_with("System: be brief\nUser: question 0"));
        assert!(plan.prompt.ends_with("User: new one\n"));
    }

    #[test]
    fn drops_oldest_exchanges_first_and_keeps_system() {
        // Each exchange is 4 words; system 3, new message 3.
        let plan = plan_turn(&conv(4), &user("new one"), 20, 6, render, words).unwrap();
        assert_eq!(plan.drop % 2, 0, "drops whole exchanges");
        assert!(plan.prompt.starts_with("System: be brief"));
        assert!(plan.prompt.contains("question 3"));
        assert!(!plan.prompt.contains("question 0"));
        assert!(plan.prompt_tokens + 6 <= 20);
    }

    #[test]
    fn a_message_too_long_for_any_window_is_an_error() {
        let long = "word ".repeat(500);
        let err = plan_turn(&conv(3), &user(&long), 100, 10, render, words).unwrap_err();
        assert!(matches!(err, PlanError::TooLong { limit: 100, .. }));
        assert!(err.to_string().contains("context window holds 100"));
    }

    #[test]
    fn reserve_is_capped_at_a_quarter() {
        assert_eq!(answer_reserve(4096, 8192), 2048);
        assert_eq!(answer_reserve(128, 8192), 128);
    }
}
