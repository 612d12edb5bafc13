//! The remote node's panel, while the conversation runs on an endpoint:
//! a kiln node's memory, swap, heat and what it serves, labelled with the
//! node's name; any other endpoint is said to have no figures, and none
//! are shown.

use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

use crate::app::State;
use crate::budget::gib;
use crate::telemetry::remote::RemoteNode;
use crate::theme::{Slot, Theme};
use crate::visible::visible_line;

pub const HEIGHT: u16 = 6;

/// A node's name as a title: visible, and short.
fn label(name: &str) -> String {
    visible_line(name).chars().take(24).collect()
}

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let endpoint = state.remote.as_deref().unwrap_or("remote");
    let (title, lines, warn) = match &state.node {
        RemoteNode::Connecting => (
            format!("node · {}", label(endpoint)),
            vec![Line::styled("asking the node…", theme.fg(Slot::Dim))],
            false,
        ),
        RemoteNode::Unavailable(why) => (
            format!("node · {}", label(endpoint)),
            vec![Line::styled(
                visible_line(why).into_owned(),
                theme.fg(Slot::Dim),
            )],
            false,
        ),
        RemoteNode::Node(report) => {
            let s = &report.sample;
            let memory = match s.memory {
                Some(m) => format!("mem {} of {} used", gib(m.used()), gib(m.total)),
                None => "mem n/a".into(),
            };
            let swap = match (s.memory, s.swap_rate) {
                (Some(m), Some(r)) => format!(
                    "swap {} · in {:.1} MiB/s",
                    gib(m.swap_used()),
                    r.in_bytes_per_s / 1048576.0
                ),
                (Some(m), None) => format!("swap {}", gib(m.swap_used())),
                _ => "swap n/a".into(),
            };
            let heat = match (s.hottest(), s.throttle.throttled()) {
                (Some(t), Some(true)) => format!("{:.0} °C · THROTTLED", t.celsius),
                (Some(t), _) => format!("{:.0} °C", t.celsius),
                (None, Some(true)) => "THROTTLED".into(),
                (None, _) => "heat n/a".into(),
            };
            let (used, seats) = report.seats;
            let serving = format!(
                "serving {} · seats {used}/{seats}",
                report.served.active.len()
            );
            let hot = s.running_hot() || s.throttle.throttled() == Some(true);
            let swapping = s.swap_rate.is_some_and(|r| r.in_bytes_per_s > 0.0);
            let style = |alarm: bool| match alarm {
                true => theme.alert(Slot::Warning),
                false => theme.fg(Slot::Text),
            };
            (
                format!("node {}", label(&report.node)),
                vec![
                    Line::styled(memory, theme.fg(Slot::Text)),
                    Line::styled(swap, style(swapping)),
                    Line::styled(heat, style(hot)),
                    Line::styled(serving, theme.fg(Slot::Dim)),
                ],
                hot || swapping,
            )
        }
    };
    let border = match warn {
        true => theme.alert(Slot::Warning),
        false => theme.fg(Slot::Border),
    };
    let block = super::panel_block(&title, border, theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), inner);
}
