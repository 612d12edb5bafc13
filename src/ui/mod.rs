//! Drawing: `render` is a pure function of the state and the theme. One file
//! per panel; `text` turns conversation text into rows.

pub mod approval;
pub mod chat;
mod help;
pub mod memory;
mod node;
mod speed;
mod status;
mod swap;
mod thermal;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use crate::app::{Mode, State};
use crate::layout;
use crate::theme::{Slot, Theme};

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
    let Some(areas) = layout::areas(
        area,
        state.full_panels_at(area.width),
        state.input.lines().len(),
    ) else {
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
    // On an endpoint, the node's own figures sit beside this machine's.
    let node_height = match state.remote {
        Some(_) => node::HEIGHT,
        None => 0,
    };
    let [mem, swap, speed, remote, thermal] = Layout::vertical([
        Constraint::Length(memory::HEIGHT),
        Constraint::Length(swap::HEIGHT),
        Constraint::Length(speed::HEIGHT),
        Constraint::Length(node_height),
        Constraint::Min(0),
    ])
    .areas(area);
    memory::render(frame, mem, state, theme);
    swap::render(frame, swap, state, theme);
    speed::render(frame, speed, state, theme);
    if remote.area() > 0 {
        node::render(frame, remote, state, theme);
    }
    thermal::render(frame, thermal, state, theme);
}

/// A bordered block with a title, as every panel has.
pub fn panel_block<'a>(title: &'a str, border: Style, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(border)
        .title(Line::styled(format!(" {title} "), theme.fg(Slot::Accent)))
}

#[cfg(test)]
mod tests;
