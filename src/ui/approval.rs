//! The agent's approval question drawn as a popup over the conversation;
//! its rows and paging are laid out by `layout::approval`.

use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::{Clear, Paragraph};
use ratatui::Frame;

use crate::agent::diff::LineKind;
use crate::app::State;
use crate::layout::approval::{page, RowKind};
use crate::theme::{Slot, Theme};

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let Some(agent) = state.agent.as_ref() else {
        return;
    };
    let Some(question) = agent.pending.as_ref() else {
        return;
    };
    let page = page(question, area, agent.approval_scroll);
    frame.render_widget(Clear, page.rect);
    let block = super::panel_block("approve?", theme.alert(Slot::Warning), theme);
    let inner = block.inner(page.rect);
    frame.render_widget(block, page.rect);
    let mut lines: Vec<Line> = page
        .rows
        .iter()
        .skip(page.first)
        .take(page.shown)
        .map(|r| {
            let style = match r.kind {
                RowKind::Title => theme.fg(Slot::Text),
                RowKind::Argument | RowKind::Diff(LineKind::Context) => theme.code(),
                RowKind::Diff(LineKind::Added) => theme.code().patch(theme.fg(Slot::Ok)),
                RowKind::Diff(LineKind::Removed) => theme.code().patch(theme.fg(Slot::Error)),
                RowKind::Diff(LineKind::Header | LineKind::Hunk) => theme.fg(Slot::Accent),
            };
            Line::styled(r.text.clone(), style)
        })
        .collect();
    lines.resize(page.shown, Line::default());
    let position = if page.shows_the_end() {
        format!("all {} rows shown", page.rows.len())
    } else {
        format!(
            "rows {}–{} of {}: scroll to the end before y",
            page.first + 1,
            page.first + page.shown,
            page.rows.len()
        )
    };
    lines.push(Line::styled(position, theme.fg(Slot::Dim)));
    lines.extend(
        page.hint
            .iter()
            .map(|h| Line::styled(h.text.clone(), theme.fg(Slot::Accent))),
    );
    // The hint is the last thing drawn: if anything is cut, it is the call's
    // rows, never the keys.
    let skip = lines.len().saturating_sub(inner.height as usize);
    let lines: Vec<Line> = lines.into_iter().skip(skip).collect();
    frame.render_widget(Paragraph::new(lines), inner);
}
