//! Overlays: the key help, the quit question and the system-prompt editor.

use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::Modifier;
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
    let mut lines = Vec::new();
    for (action, keys) in Action::ALL.into_iter().zip(keys) {
        lines.push(Line::from(vec![
            Span::styled(
                format!("{keys:<width$}"),
                theme.fg(Slot::Accent).add_modifier(Modifier::BOLD),
            ),
            Span::styled(format!("{:<15}", action.name()), theme.fg(Slot::Dim)),
            Span::styled(action.describe(), theme.fg(Slot::Text)),
        ]));
    }
    lines.push(Line::default());
    lines.push(Line::styled(
        "mouse wheel scrolls · rebind keys by these names in [keys] of config.toml · any key closes",
        theme.fg(Slot::Dim),
    ));
    let popup = centered(area, 112, lines.len() as u16 + 2);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .block(super::panel_block(
                "keys",
                theme.fg(Slot::BorderActive),
                theme,
            ))
            .wrap(Wrap { trim: false }),
        popup,
    );
}

pub fn render_confirm_quit(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let text = format!(
        "Quit kiln? y / Enter / {} again quits · any other key stays",
        state.keys.hint(Action::Interrupt)
    );
    let popup = centered(area, text.chars().count() as u16 + 4, 3);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(Line::styled(text, theme.fg(Slot::Text)))
            .block(super::panel_block(
                "quit",
                theme.alert(Slot::Warning),
                theme,
            ))
            .wrap(Wrap { trim: true }),
        popup,
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
