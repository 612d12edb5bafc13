//! The conversation pane.

use ratatui::layout::{Alignment, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use crate::app::{Scroll, State};
use crate::layout::entries::entry_rows;
use crate::layout::text::{Sem, SemLine, Tone};
use crate::theme::{Slot, Theme};

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let area = crate::layout::chat_text_area(area);
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
    let view = state.entry_view();
    match state.scroll {
        Scroll::Follow => {
            let mut rows: Vec<SemLine> = Vec::new();
            for i in (0..state.transcript.len()).rev() {
                let mut entry = entry_rows(&view, &state.transcript, i, width);
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
                let lines = entry_rows(&view, &state.transcript, i, width);
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
        Tone::Added => Slot::Ok,
        Tone::Removed => Slot::Error,
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
                crate::layout::count(state.model.context_limit as u64)
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
