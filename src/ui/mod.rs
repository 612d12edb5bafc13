//! Drawing: `render` is a pure function of the state and the theme. One file
//! per panel; `text` turns conversation text into rows.

pub mod approval;
pub mod chat;
mod help;
pub mod memory;
mod speed;
mod status;
mod swap;
pub mod text;
mod thermal;

use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use crate::app::{Mode, State};
use crate::theme::{Slot, Theme};

/// Below this the screen shows one line asking for a larger terminal.
pub const MIN_WIDTH: u16 = 20;
pub const MIN_HEIGHT: u16 = 6;
/// The side panels need this much width to be worth drawing in full.
pub const FULL_PANELS_MIN_WIDTH: u16 = 100;

pub struct Areas {
    pub chat: Rect,
    pub input: Rect,
    /// Zero-sized when the panels are collapsed.
    pub panels: Rect,
    /// The one-line panel summary; zero-sized when the panels are full.
    pub summary: Rect,
    pub status: Rect,
}

pub fn layout(area: Rect, state: &State) -> Option<Areas> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let status = Rect {
        y: area.bottom() - 1,
        height: 1,
        ..area
    };
    let body = Rect {
        height: area.height - 1,
        ..area
    };
    let (main, panels, summary) = if state.full_panels() {
        let width = (area.width * 3 / 10).clamp(30, 44).min(area.width / 2);
        let [main, panels] =
            Layout::horizontal([Constraint::Min(0), Constraint::Length(width)]).areas(body);
        (main, panels, Rect::default())
    } else {
        let [main, summary] =
            Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(body);
        (main, Rect::default(), summary)
    };
    let wanted = state.input.lines().len().min(u16::MAX as usize - 2) as u16 + 2;
    let input_height = wanted.clamp(3, (main.height / 3).max(3)).min(main.height);
    let [chat, input] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(input_height)]).areas(main);
    Some(Areas {
        chat,
        input,
        panels,
        summary,
        status,
    })
}

/// The text area of the conversation pane: one column of margin each side.
pub fn chat_text_area(chat: Rect) -> Rect {
    chat.inner(Margin {
        horizontal: 1,
        vertical: 0,
    })
}

/// Width and height of the conversation text at the current terminal size.
pub fn chat_viewport(state: &State) -> (u16, usize) {
    let area = Rect::new(0, 0, state.size.0, state.size.1);
    match layout(area, state) {
        Some(a) => {
            let text = chat_text_area(a.chat);
            (text.width, text.height as usize)
        }
        None => (0, 0),
    }
}

pub fn render(frame: &mut Frame, state: &State, theme: &Theme) {
    draw(frame, state, theme);
    scrub(frame.buffer_mut());
}

/// The last wall: a control or escape character that some widget let into
/// a cell (ratatui appends zero-width characters to the cell before them)
/// is taken out, so nothing drawn can act on the terminal. Text is made
/// visible before it is laid out (`crate::visible`); this only catches
/// what slipped past.
fn scrub(buffer: &mut ratatui::buffer::Buffer) {
    for cell in buffer.content.iter_mut() {
        if cell.symbol().chars().any(crate::visible::acts) {
            let kept: String = cell
                .symbol()
                .chars()
                .filter(|c| !crate::visible::acts(*c))
                .collect();
            cell.set_symbol(if kept.is_empty() { " " } else { &kept });
        }
    }
}

fn draw(frame: &mut Frame, state: &State, theme: &Theme) {
    let area = frame.area();
    let Some(areas) = layout(area, state) else {
        let line = Line::styled("kiln: terminal too small", theme.alert(Slot::Warning));
        frame.render_widget(Paragraph::new(line), area);
        return;
    };
    chat::render(frame, areas.chat, state, theme);
    render_input(frame, areas.input, state, theme);
    if areas.panels.area() > 0 {
        render_panels(frame, areas.panels, state, theme);
    }
    if areas.summary.area() > 0 {
        status::render_summary(frame, areas.summary, state, theme);
    }
    status::render(frame, areas.status, state, theme);
    match state.mode {
        Mode::Help => help::render_help(frame, area, state, theme),
        Mode::ConfirmQuit => help::render_confirm_quit(frame, area, state, theme),
        Mode::EditSystem => help::render_system_editor(frame, area, state, theme),
        Mode::Picker => help::render_picker(frame, area, state, theme),
        Mode::Approve => approval::render(frame, area, state, theme),
        Mode::Chat => {}
    }
}

fn render_input(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let active = state.mode == Mode::Chat;
    let mut input = state.input.clone();
    input.set_block(panel_block(
        if state.generating() {
            "message · answering…"
        } else {
            "message"
        },
        if active {
            theme.fg(Slot::BorderActive)
        } else {
            theme.fg(Slot::Border)
        },
        theme,
    ));
    input.set_style(theme.fg(Slot::Text));
    input.set_cursor_line_style(Style::default());
    input.set_placeholder_style(theme.fg(Slot::Dim));
    if !active {
        input.set_cursor_style(Style::default());
    }
    frame.render_widget(&input, area);
}

fn render_panels(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let [mem, swap, speed, thermal] = Layout::vertical([
        Constraint::Length(memory::HEIGHT),
        Constraint::Length(swap::HEIGHT),
        Constraint::Length(speed::HEIGHT),
        Constraint::Min(0),
    ])
    .areas(area);
    memory::render(frame, mem, state, theme);
    swap::render(frame, swap, state, theme);
    speed::render(frame, speed, state, theme);
    thermal::render(frame, thermal, state, theme);
}

/// A bordered block with a title, as every panel has.
pub fn panel_block<'a>(title: &'a str, border: Style, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(border)
        .title(Line::styled(format!(" {title} "), theme.fg(Slot::Accent)))
}

/// 12,345
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with one decimal, or "n/a".
pub fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"))
}

#[cfg(test)]
mod tests;
