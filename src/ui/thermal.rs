//! Thermal panel: every temperature sensor, the GPU's clock and load where
//! the machine reports them, and whether it is throttling. A machine
//! without sensors says so; no number is invented.

use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use crate::app::State;
use crate::telemetry::alarms::AlarmKind;
use crate::theme::{Slot, Theme};

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let s = &state.telemetry;
    let alarm = state
        .active_alarms
        .iter()
        .any(|(k, _)| *k == AlarmKind::ThermalThrottling);
    let throttled = s.throttle.throttled();
    let (title, border) = match (alarm, throttled) {
        (true, _) | (_, Some(true)) => ("thermal · THROTTLED", theme.alert(Slot::Warning)),
        _ => ("thermal", theme.fg(Slot::Border)),
    };
    let block = super::panel_block(title, border, theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.area() == 0 {
        return;
    }
    let mut lines = vec![match throttled {
        Some(true) => Line::styled(
            match s.throttle.cap_ratio {
                Some(r) if r < 0.95 => format!("throttling · clocks capped at {:.0} %", r * 100.0),
                _ => "throttling".to_string(),
            },
            theme.alert(Slot::Warning),
        ),
        Some(false) => Line::styled("not throttled", theme.fg(Slot::Ok)),
        None => Line::styled("throttling n/a", theme.fg(Slot::Dim)),
    }];
    if s.temperatures.is_empty() {
        lines.push(Line::styled("no sensors", theme.fg(Slot::Dim)));
    }
    if let Some(g) = s.gpu {
        lines.push(Line::styled(
            format!(
                "GPU {} MHz · {:.0}% · {:.1} W",
                g.mhz,
                g.busy * 100.0,
                g.watts
            ),
            theme.fg(Slot::Text),
        ));
    }
    let label_width = (inner.width as usize).saturating_sub(8);
    for t in &s.temperatures {
        let hot = t.celsius >= t.critical.map_or(90.0, |c| c - 10.0);
        let style = if hot {
            theme.alert(Slot::Warning)
        } else {
            theme.fg(Slot::Text)
        };
        let label: String = t.label.chars().take(label_width).collect();
        lines.push(Line::from(vec![
            Span::styled(format!("{label:<label_width$}"), theme.fg(Slot::Text)),
            Span::styled(format!("{:>5.0} °C", t.celsius), style),
        ]));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}
