//! The conversation pane.

use ratatui::layout::{Alignment, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::text::{self, Sem, SemLine, Tone};
use crate::app::{EntryKind, Scroll, State};
use crate::engine::{thinking, FinishReason};
use crate::keys::Action;
use crate::theme::{Slot, Theme};

/// The rows transcript entry `index` takes at `width`: a header, the text,
/// a stats line for answers, and a blank separator.
pub fn entry_rows(state: &State, index: usize, width: u16) -> Vec<SemLine> {
    let entry = &state.transcript[index];
    let streaming = state.generation.as_ref().is_some_and(|g| g.entry == index);
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
                state.model.name.clone(),
                bold(Tone::Assistant),
            ));
            let split = thinking::split(&entry.text);
            if let Some(thought) = split.thinking {
                lines.extend(thinking_rows(
                    state,
                    thought,
                    split.open && streaming,
                    width,
                ));
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
                        state.keys.hint(crate::keys::Action::Continue),
                        state.keys.hint(crate::keys::Action::Regenerate)
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
fn thinking_rows(state: &State, thought: &str, live: bool, width: u16) -> Vec<SemLine> {
    let key = state.keys.hint(Action::ToggleThinking);
    let words = thought.split_whitespace().count();
    let faint = Sem {
        tone: Tone::Dim,
        italic: true,
        ..Sem::default()
    };
    let head = match (live, state.show_thinking) {
        (true, _) => format!("▾ thinking… {words} words · {key} folds or shows it"),
        (false, true) => format!("▾ thought · {words} words · {key} folds it"),
        (false, false) => format!("▸ thought · {words} words · {key} shows it"),
    };
    let mut rows = vec![SemLine::plain(head, faint)];
    let body: Vec<SemLine> = text::plain(thought.trim_matches('\n'), faint)
        .iter()
        .flat_map(|l| text::wrap(l, width as usize))
        .collect();
    match (live, state.show_thinking) {
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

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let area = super::chat_text_area(area);
    if area.area() == 0 {
        return;
    }
    if state.transcript.is_empty() {
        render_welcome(frame, area, state, theme);
        return;
    }
    let height = area.height as usize;
    let rows = visible_rows(state, area.width, height);
    let lines: Vec<Line> = rows
        .iter()
        .map(|row| to_line(row, area.width, theme))
        .collect();
    frame.render_widget(Paragraph::new(lines), area);
    if state.unseen_output && matches!(state.scroll, Scroll::At { .. }) {
        let marker = Rect {
            y: area.bottom() - 1,
            height: 1,
            ..area
        };
        frame.render_widget(
            Paragraph::new(Line::styled(
                format!(
                    "↓ new output below · {}",
                    state.keys.hint(crate::keys::Action::Bottom)
                ),
                theme.alert(Slot::Accent),
            ))
            .alignment(Alignment::Right),
            marker,
        );
    }
}

/// The rows in view, top first: from the anchor, or the last `height` rows
/// when following. Only entries in view are laid out.
fn visible_rows(state: &State, width: u16, height: usize) -> Vec<SemLine> {
    match state.scroll {
        Scroll::Follow => {
            let mut rows: Vec<SemLine> = Vec::new();
            for i in (0..state.transcript.len()).rev() {
                let mut entry = entry_rows(state, i, width);
                entry.append(&mut rows);
                rows = entry;
                if rows.len() >= height {
                    break;
                }
            }
            let skip = rows.len().saturating_sub(height);
            rows.drain(..skip);
            rows
        }
        Scroll::At { entry, row } => {
            let mut rows = Vec::new();
            for i in entry..state.transcript.len() {
                let lines = entry_rows(state, i, width);
                let skip = if i == entry { row } else { 0 };
                rows.extend(lines.into_iter().skip(skip));
                if rows.len() >= height {
                    break;
                }
            }
            rows.truncate(height);
            rows
        }
    }
}

fn style_of(sem: Sem, theme: &Theme) -> Style {
    let slot = match sem.tone {
        Tone::Normal => Slot::Text,
        Tone::User => Slot::User,
        Tone::Assistant => Slot::Assistant,
        Tone::Notice => Slot::Notice,
        Tone::Error => Slot::Error,
        Tone::Dim => Slot::Dim,
    };
    let mut style = if sem.code {
        theme.code()
    } else if sem.heading {
        theme.fg(Slot::Heading)
    } else {
        theme.fg(slot)
    };
    for (on, m) in [
        (sem.bold, Modifier::BOLD),
        (sem.italic, Modifier::ITALIC),
        (sem.strike, Modifier::CROSSED_OUT),
        (sem.underline, Modifier::UNDERLINED),
    ] {
        if on {
            style = style.add_modifier(m);
        }
    }
    style
}

fn to_line(row: &SemLine, width: u16, theme: &Theme) -> Line<'static> {
    let mut spans: Vec<Span> = row
        .spans
        .iter()
        .map(|s| Span::styled(s.text.clone(), style_of(s.sem, theme)))
        .collect();
    if row.code_block {
        // Code blocks are a solid band, so they read as one block.
        let pad = (width as usize).saturating_sub(row.width());
        spans.push(Span::styled(" ".repeat(pad), theme.code()));
    }
    Line::from(spans)
}

fn render_welcome(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let help = state.keys.hint(crate::keys::Action::Help);
    let lines = vec![
        Line::styled(
            format!("kiln · {}", state.model.name),
            theme.fg(Slot::Accent).add_modifier(Modifier::BOLD),
        ),
        Line::styled(
            format!(
                "{} · context {} tokens",
                state.model.engine,
                super::count(state.model.context_limit as u64)
            ),
            theme.fg(Slot::Dim),
        ),
        Line::default(),
        Line::styled(
            format!("Type a message and press Enter. {help} lists every key."),
            theme.fg(Slot::Text),
        ),
    ];
    let top = area.height.saturating_sub(lines.len() as u16) / 2;
    let area = Rect {
        y: area.y + top,
        height: area.height - top,
        ..area
    };
    frame.render_widget(
        Paragraph::new(lines)
            .alignment(Alignment::Center)
            .wrap(ratatui::widgets::Wrap { trim: true }),
        area,
    );
}
