//! Overlays: the key help, the quit question, the system-prompt editor and
//! the session picker (the approval question has `approval`).

use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph, Wrap};
use ratatui::Frame;

use crate::app::State;
use crate::keys::Action;
use crate::theme::{Slot, Theme};

/// A centred rectangle of at most `width` x `height` inside `area`.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

/// A bordered box of `lines` in the middle of the screen, over what is
/// under it.
fn popup(
    frame: &mut Frame,
    area: Rect,
    width: u16,
    title: &str,
    border: Style,
    lines: Vec<Line>,
    theme: &Theme,
) {
    let rect = centered(area, width, lines.len() as u16 + 2);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .block(super::panel_block(title, border, theme))
            .wrap(Wrap { trim: false }),
        rect,
    );
}

pub fn render_help(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let keys: Vec<String> = Action::ALL
        .iter()
        .map(|a| {
            let keys = state.keys.keys_for(*a).join(", ");
            if keys.is_empty() {
                "(unbound)".into()
            } else {
                keys
            }
        })
        .collect();
    let width = keys.iter().map(|k| k.chars().count()).max().unwrap_or(0) + 2;
    let name_width = Action::ALL
        .iter()
        .map(|a| a.name().len())
        .max()
        .unwrap_or(0)
        + 1;
    let mut lines = Vec::new();
    for (action, keys) in Action::ALL.into_iter().zip(keys) {
        lines.push(Line::from(vec![
            Span::styled(
                format!("{keys:<width$}"),
                theme.fg(Slot::Accent).add_modifier(Modifier::BOLD),
            ),
            Span::styled(
                format!("{:<name_width$}", action.name()),
                theme.fg(Slot::Dim),
            ),
            Span::styled(action.describe(), theme.fg(Slot::Text)),
        ]));
    }
    lines.push(Line::default());
    lines.push(Line::styled(
        "Ctrl-\\ detaches, leaving the session running in the daemon · mouse wheel scrolls",
        theme.fg(Slot::Dim),
    ));
    lines.push(Line::styled(
        "rebind keys by these names in [keys] of config.toml · any key closes",
        theme.fg(Slot::Dim),
    ));
    popup(
        frame,
        area,
        112,
        "keys",
        theme.fg(Slot::BorderActive),
        lines,
        theme,
    );
}

pub fn render_confirm_quit(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let text = format!(
        "Quit kiln? y / Enter / {} again quits · any other key stays",
        state.keys.hint(Action::Interrupt)
    );
    let width = text.chars().count() as u16 + 4;
    let line = Line::styled(text, theme.fg(Slot::Text));
    popup(
        frame,
        area,
        width,
        "quit",
        theme.alert(Slot::Warning),
        vec![line],
        theme,
    );
}

pub fn render_system_editor(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let popup = centered(area, 90, 12);
    frame.render_widget(Clear, popup);
    let title = format!(
        "system prompt · {} saves · {} new line · {} cancels",
        state.keys.hint(Action::Send),
        state.keys.hint(Action::Newline),
        state.keys.hint(Action::Cancel)
    );
    let mut editor = state.system_editor.clone();
    editor.set_block(super::panel_block(
        &title,
        theme.fg(Slot::BorderActive),
        theme,
    ));
    editor.set_style(theme.fg(Slot::Text));
    editor.set_cursor_line_style(ratatui::style::Style::default());
    frame.render_widget(&editor, popup);
}

pub fn render_picker(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let popup = centered(area, 100, area.height.saturating_sub(4).max(5));
    frame.render_widget(Clear, popup);
    let block = super::panel_block(
        "sessions · type to filter · Enter opens · Esc closes",
        theme.fg(Slot::BorderActive),
        theme,
    );
    let inner = block.inner(popup);
    frame.render_widget(block, popup);
    let visible = state.picker.visible();
    let mut lines = vec![
        Line::from(vec![
            Span::styled("filter: ", theme.fg(Slot::Dim)),
            Span::styled(state.picker.filter.clone(), theme.fg(Slot::Text)),
            Span::styled("▏", theme.fg(Slot::Accent)),
        ]),
        Line::default(),
    ];
    if visible.is_empty() {
        lines.push(Line::styled(
            if state.picker.items.is_empty() {
                "no saved sessions yet"
            } else {
                "no session matches"
            },
            theme.fg(Slot::Dim),
        ));
    }
    let rows = (inner.height as usize).saturating_sub(2).max(1);
    // Keep the selection in view.
    let first = state.picker.selected.saturating_sub(rows - 1);
    for (i, item) in visible.iter().enumerate().skip(first).take(rows) {
        let text = format!(
            "{:<22} {:>4} msgs  {}",
            item.updated, item.messages, item.title
        );
        let style = if i == state.picker.selected {
            theme.fg(Slot::Accent).add_modifier(Modifier::REVERSED)
        } else {
            theme.fg(Slot::Text)
        };
        lines.push(Line::styled(text, style));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}
