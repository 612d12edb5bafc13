//! A conversation as people read it, and how it is rebuilt from a session's
//! journal. The TUI shows it, `kiln sessions show/export` print it, resume
//! hands it back to the engine.

use serde::Serialize;

use crate::chat::{FinishReason, GenStats, Message, Role};
use crate::store::session::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    User,
    Assistant,
    /// Something kiln says: trimmed context, alarms, copied text.
    Notice,
    /// What an agent's write changed, as a unified diff.
    Diff,
    /// What an agent's model wrote before its calls: folded like thinking.
    Thought,
    Error,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    pub kind: EntryKind,
    pub text: String,
    pub stats: Option<GenStats>,
    pub finish: Option<FinishReason>,
    /// An answer cut off when kiln stopped (crash, kill, lost connection).
    pub interrupted: bool,
}

impl Entry {
    pub fn new(kind: EntryKind, text: impl Into<String>) -> Entry {
        Entry {
            kind,
            text: text.into(),
            stats: None,
            finish: None,
            interrupted: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transcript {
    pub entries: Vec<Entry>,
    pub system_prompt: Option<String>,
    pub last_stats: Option<GenStats>,
}

impl Transcript {
    /// Rebuild from journal events. Chunks not followed by their answer are
    /// an interrupted answer; a question with no answer at all gets an empty
    /// interrupted one, so the cut is visible.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Transcript {
        let mut t = Transcript::default();
        let mut pending: Option<String> = None;
        let mut awaiting_answer = false;
        // A tool call journaled with no result: it was running when kiln
        // stopped. It is shown as interrupted and never re-run on its own.
        let mut call_in_flight: Option<(u32, String)> = None;
        for event in events {
            match event {
                Event::User { text } => {
                    t.close_pending(&mut pending, &mut awaiting_answer);
                    t.entries.push(Entry::new(EntryKind::User, text.clone()));
                    awaiting_answer = true;
                }
                Event::Chunk { text } => pending.get_or_insert_with(String::new).push_str(text),
                Event::Answer {
                    text,
                    finish,
                    stats,
                } => {
                    pending = None;
                    awaiting_answer = false;
                    let mut e = Entry::new(EntryKind::Assistant, text.clone());
                    e.finish = Some(*finish);
                    e.stats = Some(stats.clone());
                    t.last_stats = Some(stats.clone());
                    t.entries.push(e);
                }
                Event::Error { text } => {
                    pending = None;
                    awaiting_answer = false;
                    t.entries.push(Entry::new(EntryKind::Error, text.clone()));
                }
                Event::Notice { text } => {
                    t.entries.push(Entry::new(EntryKind::Notice, text.clone()))
                }
                Event::Alarm { message, .. } => t
                    .entries
                    .push(Entry::new(EntryKind::Notice, message.clone())),
                Event::SystemPrompt { text } => t.system_prompt = text.clone(),
                Event::ToolCall { step, call } => {
                    let shown = format!("step {step}: {}", call);
                    t.entries.push(Entry::new(EntryKind::Notice, shown.clone()));
                    call_in_flight = Some((*step, shown));
                }
                Event::ToolResult {
                    step,
                    ok,
                    refused,
                    output,
                    diff,
                    interrupted,
                } => {
                    call_in_flight = None;
                    let status = match (refused, ok, interrupted) {
                        (true, _, _) => "refused",
                        (false, _, true) => "interrupted",
                        (false, true, false) => "ok",
                        (false, false, false) => "failed",
                    };
                    let first = output.lines().next().unwrap_or("");
                    t.entries.push(Entry::new(
                        EntryKind::Notice,
                        format!("step {step}: {status}: {first}"),
                    ));
                    if let Some(diff) = diff {
                        t.entries.push(Entry::new(EntryKind::Diff, diff.clone()));
                    }
                }
                Event::RunStarted { spec, resumed, .. } => {
                    let text = match resumed {
                        true => "agent run resumed from its journal".to_string(),
                        false => format!(
                            "agent run: {}",
                            spec["task"].as_str().unwrap_or("(no task)")
                        ),
                    };
                    t.entries.push(Entry::new(EntryKind::Notice, text));
                }
                Event::RunEnded { outcome } => {
                    let word = outcome["outcome"].as_str().unwrap_or("ended");
                    let text = match outcome["detail"].as_str() {
                        Some(detail) => format!("agent run {word}: {detail}"),
                        None => format!("agent run {word}"),
                    };
                    t.entries.push(Entry::new(EntryKind::Notice, text));
                }
                Event::Approved { .. } => {}
                Event::Compacted { context_tokens, .. } => t.entries.push(Entry::new(
                    EntryKind::Notice,
                    format!("older steps compacted into a summary at {context_tokens} tokens"),
                )),
                Event::Continue => {
                    if let Some(i) = t
                        .entries
                        .iter()
                        .rposition(|e| e.kind == EntryKind::Assistant)
                    {
                        pending = Some(t.entries.remove(i).text);
                        awaiting_answer = true;
                    }
                }
                Event::Regenerate => {
                    pending = None;
                    if let Some(i) = t
                        .entries
                        .iter()
                        .rposition(|e| e.kind == EntryKind::Assistant)
                    {
                        t.entries.truncate(i);
                    }
                    awaiting_answer = true;
                }
            }
        }
        t.close_pending(&mut pending, &mut awaiting_answer);
        if let Some((step, _)) = call_in_flight {
            t.entries.push(Entry::new(
                EntryKind::Notice,
                format!("step {step}: interrupted while running; not re-run"),
            ));
        }
        t
    }

    fn close_pending(&mut self, pending: &mut Option<String>, awaiting: &mut bool) {
        if let Some(text) = pending.take() {
            let mut e = Entry::new(EntryKind::Assistant, text);
            e.interrupted = true;
            self.entries.push(e);
        } else if *awaiting {
            let mut e = Entry::new(EntryKind::Assistant, "");
            e.interrupted = true;
            self.entries.push(e);
        }
        *awaiting = false;
    }

    /// The conversation as the engine sees it: user and assistant turns.
    pub fn messages(entries: &[Entry]) -> Vec<Message> {
        entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::User => Some(Message::new(Role::User, e.text.clone())),
                EntryKind::Assistant => Some(Message::new(Role::Assistant, e.text.clone())),
                _ => None,
            })
            .collect()
    }

    /// Markdown for `kiln sessions export --format md`.
    pub fn to_markdown(&self, title: &str, model: &str) -> String {
        let mut out = format!("# {title}\n\nModel: {model}\n\n");
        if let Some(p) = &self.system_prompt {
            out.push_str(&format!("**System prompt:** {p}\n\n"));
        }
        for e in &self.entries {
            match e.kind {
                EntryKind::User => out.push_str(&format!("## You\n\n{}\n\n", e.text)),
                EntryKind::Assistant => {
                    out.push_str(&format!("## {model}\n\n{}\n\n", e.text));
                    if e.interrupted {
                        out.push_str("*(interrupted)*\n\n");
                    }
                }
                EntryKind::Notice => out.push_str(&format!("> {}\n\n", e.text)),
                EntryKind::Thought => out.push_str(&format!("> *thinks:* {}\n\n", e.text)),
                EntryKind::Error => out.push_str(&format!("> **error:** {}\n\n", e.text)),
                EntryKind::Diff => {
                    // A fence longer than any run of backticks in the diff.
                    let longest = e.text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
                    let fence = "`".repeat(longest.max(2) + 1);
                    out.push_str(&format!("{fence}diff\n{}\n{fence}\n\n", e.text.trim_end()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(t: &str) -> Event {
        Event::User { text: t.into() }
    }
    fn chunk(t: &str) -> Event {
        Event::Chunk { text: t.into() }
    }
    fn answer(t: &str) -> Event {
        Event::Answer {
            text: t.into(),
            finish: FinishReason::Stop,
            stats: GenStats::default(),
        }
    }

    #[test]
    fn chunks_without_an_answer_are_an_interrupted_answer() {
        let t = Transcript::replay(&[
            user("a"),
            chunk("one "),
            chunk("two"),
            answer("one two three"),
            user("b"),
            chunk("par"),
            chunk("tial"),
        ]);
        let texts: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.text.as_str(), e.interrupted))
            .collect();
        assert_eq!(
            texts,
            [
                ("a", false),
                ("one two three", false),
                ("b", false),
                ("partial", true)
            ]
        );
    }

    #[test]
    fn a_question_cut_before_any_text_shows_an_empty_interrupted_answer() {
        let t = Transcript::replay(&[user("a"), user("b"), answer("B")]);
        let kinds: Vec<_> = t.entries.iter().map(|e| (e.kind, e.interrupted)).collect();
        assert_eq!(
            kinds,
            [
                (EntryKind::User, false),
                (EntryKind::Assistant, true),
                (EntryKind::User, false),
                (EntryKind::Assistant, false)
            ]
        );
    }

    #[test]
    fn a_continued_answer_grows_and_can_be_cut_again() {
        let t = Transcript::replay(&[user("a"), chunk("one "), Event::Continue, chunk("two ")]);
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[1].text, "one two ");
        assert!(t.entries[1].interrupted);
        let t = Transcript::replay(&[
            user("a"),
            chunk("one "),
            Event::Continue,
            chunk("two"),
            answer("one two"),
        ]);
        assert_eq!(t.entries[1].text, "one two");
        assert!(!t.entries[1].interrupted);
    }

    #[test]
    fn regenerate_replaces_the_last_answer() {
        let t = Transcript::replay(&[
            Event::SystemPrompt {
                text: Some("be brief".into()),
            },
            user("a"),
            answer("first try"),
            Event::Regenerate,
            chunk("sec"),
            answer("second try"),
        ]);
        assert_eq!(t.system_prompt.as_deref(), Some("be brief"));
        assert_eq!(
            Transcript::messages(&t.entries),
            [
                Message::new(Role::User, "a"),
                Message::new(Role::Assistant, "second try")
            ]
        );
    }
}
