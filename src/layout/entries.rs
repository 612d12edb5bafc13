//! A transcript entry as rows: a header, the text (markdown for answers,
//! thinking folded or shown), a stats line for answers, and a blank
//! separator, wrapped at a width. Scrolling counts these rows and the
//! conversation pane draws them.

use super::text::{self, Sem, SemLine, Tone};
use crate::agent::diff::{self, LineKind};
use crate::engine::{thinking, FinishReason};
use crate::keys::{Action, KeyMap};
use crate::store::transcript::{Entry, EntryKind};

/// What, besides the entries, decides how they are laid out.
pub struct EntryView<'a> {
    /// The model's name, over its answers.
    pub model: &'a str,
    /// The entry being generated.
    pub streaming: Option<usize>,
    /// Whether answers show their thinking whole rather than folded.
    pub show_thinking: bool,
    /// For the key hints in the text.
    pub keys: &'a KeyMap,
}

/// The rows transcript entry `index` of `entries` takes at `width`: a header, the text,
/// a stats line for answers, and a blank separator.
pub fn entry_rows(view: &EntryView, entries: &[Entry], index: usize, width: u16) -> Vec<SemLine> {
    let entry = &entries[index];
    let streaming = view.streaming == Some(index);
    let bold = |tone| Sem {
        tone,
        bold: true,
        ..Sem::default()
    };
    let dim = Sem {
        tone: Tone::Dim,
        ..Sem::default()
    };
    let mut lines = Vec::new();
    match entry.kind {
        EntryKind::User => {
            lines.push(SemLine::plain("you", bold(Tone::User)));
            lines.extend(text::plain(&entry.text, Sem::default()));
        }
        EntryKind::Assistant => {
            lines.push(SemLine::plain(
                view.model.to_string(),
                bold(Tone::Assistant),
            ));
            let split = thinking::split(&entry.text);
            if let Some(thought) = split.thinking {
                lines.extend(thinking_rows(view, thought, split.open && streaming, width));
            }
            if split.answer.trim().is_empty() && (streaming || entry.interrupted) {
                if split.thinking.is_none() {
                    lines.push(SemLine::plain("…", dim));
                }
            } else {
                lines.extend(text::markdown(split.shown_answer(), Sem::default()));
            }
            if entry.interrupted {
                lines.push(SemLine::plain(
                    format!(
                        "interrupted: kiln stopped before this answer ended · {} continues · {} answers again",
                        view.keys.hint(Action::Continue),
                        view.keys.hint(Action::Regenerate)
                    ),
                    Sem {
                        tone: Tone::Notice,
                        italic: true,
                        ..Sem::default()
                    },
                ));
            }
            if let Some(stats) = &entry.stats {
                let mut footer = format!(
                    "{} tok · {} tok/s · TTFT {:.2} s",
                    stats.completion_tokens,
                    super::rate(stats.decode_tok_s),
                    stats.ttft_ms / 1000.0
                );
                match entry.finish {
                    Some(FinishReason::Cancelled) => footer.push_str(" · stopped"),
                    Some(FinishReason::MaxTokens) => footer.push_str(" · hit max tokens"),
                    Some(FinishReason::ContextFull) => footer.push_str(" · context full"),
                    _ => {}
                }
                lines.push(SemLine::plain(footer, dim));
            }
        }
        EntryKind::Notice => {
            for l in text::plain(&entry.text, Sem::default()) {
                let mut line = SemLine::plain("· ", bold(Tone::Notice));
                line.spans.extend(l.spans.into_iter().map(|mut s| {
                    s.sem.tone = Tone::Notice;
                    s
                }));
                lines.push(line);
            }
        }
        EntryKind::Thought => {
            lines.extend(thinking_rows(view, &entry.text, false, width));
        }
        EntryKind::Diff => {
            for l in text::plain(entry.text.trim_end_matches('\n'), Sem::default()) {
                let tone = match l.spans.first().map(|s| diff::kind(&s.text)) {
                    Some(LineKind::Added) => Tone::Added,
                    Some(LineKind::Removed) => Tone::Removed,
                    Some(LineKind::Header | LineKind::Hunk) => Tone::Dim,
                    _ => Tone::Normal,
                };
                lines.push(SemLine::plain(
                    l.spans.into_iter().map(|s| s.text).collect::<String>(),
                    Sem {
                        tone,
                        code: true,
                        ..Sem::default()
                    },
                ));
            }
        }
        EntryKind::Error => {
            lines.push(SemLine::plain("error", bold(Tone::Error)));
            lines.extend(text::plain(
                &entry.text,
                Sem {
                    tone: Tone::Error,
                    ..Sem::default()
                },
            ));
        }
    }
    lines.push(SemLine::default());
    lines
        .iter()
        .flat_map(|l| text::wrap(l, width as usize))
        .collect()
}

/// An answer's thinking: folded to one line (the last lines while it
/// streams), or whole when the user asked to see it.
fn thinking_rows(view: &EntryView, thought: &str, live: bool, width: u16) -> Vec<SemLine> {
    let key = view.keys.hint(Action::ToggleThinking);
    let words = thought.split_whitespace().count();
    let faint = Sem {
        tone: Tone::Dim,
        italic: true,
        ..Sem::default()
    };
    let head = match (live, view.show_thinking) {
        (true, _) => format!("▾ thinking… {words} words · {key} folds or shows it"),
        (false, true) => format!("▾ thought · {words} words · {key} folds it"),
        (false, false) => format!("▸ thought · {words} words · {key} shows it"),
    };
    let mut rows = vec![SemLine::plain(head, faint)];
    let body: Vec<SemLine> = text::plain(thought.trim_matches('\n'), faint)
        .iter()
        .flat_map(|l| text::wrap(l, width as usize))
        .collect();
    match (live, view.show_thinking) {
        (_, true) => rows.extend(body),
        (true, false) => {
            let skip = body.len().saturating_sub(LIVE_THINKING_LINES);
            rows.extend(body.into_iter().skip(skip));
        }
        (false, false) => {}
    }
    rows
}

/// How much of a folded thinking block shows while it streams.
const LIVE_THINKING_LINES: usize = 3;
