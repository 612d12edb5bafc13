//! Swap panel: swap used, swap-in/out rates with a sparkline, and memory
//! pressure; a warning style while kiln swaps as it generates.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Sparkline};
use ratatui::Frame;

use crate::app::State;
use crate::budget::gib;
use crate::telemetry::alarms::AlarmKind;
use crate::theme::{Slot, Theme};

pub const HEIGHT: u16 = 6;

/// Swapping while generating: the user is paying for it right now.
pub fn alarming(state: &State) -> bool {
    let swapping_in = state
        .telemetry
        .swap_rate
        .is_some_and(|r| r.in_bytes_per_s > 0.0);
    state
        .active_alarms
        .iter()
        .any(|(k, _)| *k == AlarmKind::SwapStorm)
        || (swapping_in && state.generating())
}

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let warn = alarming(state);
    let border = if warn {
        theme.alert(Slot::Warning)
    } else {
        theme.fg(Slot::Border)
    };
    let title = if warn { "swap · SWAPPING" } else { "swap" };
    let block = super::panel_block(title, border, theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text_style = if warn {
        theme.alert(Slot::Warning)
    } else {
        theme.fg(Slot::Text)
    };
    let s = &state.telemetry;
    let used = match s.memory {
        Some(m) if m.swap_total == 0 && !crate::telemetry::SWAP_ON_DEMAND => {
            "no swap configured".to_string()
        }
        Some(m) => format!("used {} of {}", gib(m.swap_used()), gib(m.swap_total)),
        None => "swap n/a".to_string(),
    };
    let rates = match s.swap_rate {
        Some(r) => format!(
            "in {:.1} MiB/s · out {:.1} MiB/s",
            r.in_bytes_per_s / 1048576.0,
            r.out_bytes_per_s / 1048576.0
        ),
        None => "in/out n/a".to_string(),
    };
    let pressure = match s.pressure {
        Some(p) => match p.psi {
            Some(psi) => {
                format!("pressure {:?} · stalled {:.1} %", p.level, psi.some_avg10).to_lowercase()
            }
            None => format!("pressure {:?}", p.level).to_lowercase(),
        },
        None => "pressure n/a".to_string(),
    };
    let [text, spark] = Layout::vertical([Constraint::Length(3), Constraint::Min(0)]).areas(inner);
    frame.render_widget(
        Paragraph::new(vec![
            Line::styled(used, text_style),
            Line::styled(rates, text_style),
            Line::styled(pressure, theme.fg(Slot::Dim)),
        ]),
        text,
    );
    let data: Vec<u64> = tail(&state.swap_in_history, spark.width as usize);
    frame.render_widget(
        Sparkline::default().data(&data).style(if warn {
            theme.alert(Slot::Warning)
        } else {
            theme.fg(Slot::Sparkline)
        }),
        spark,
    );
}

/// The last `n` points of a history.
pub fn tail<T: Copy>(history: &std::collections::VecDeque<T>, n: usize) -> Vec<T> {
    history
        .iter()
        .skip(history.len().saturating_sub(n))
        .copied()
        .collect()
}
