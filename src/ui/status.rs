//! The status bar, and the one-line panel summary shown on narrow screens.

use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use crate::app::{Mode, State};
use crate::budget::gib;
use crate::keys::Action;
use crate::theme::{Slot, Theme};

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let agent_mode = state.agent.as_ref().map(|a| {
        let mut mode = format!("agent step {}", a.step);
        if let Some(s) = &a.sandbox {
            mode.push_str(&format!(" · {}", s.short()));
        }
        if let Some(native) = a.calls {
            mode.push_str(&format!(" · calls {}", crate::agent::calls_mode(native)));
        }
        mode
    });
    let mode = match state.mode {
        Mode::Chat if agent_mode.is_some() => agent_mode.as_deref().unwrap_or(""),
        Mode::Chat if state.generating() => "answering",
        Mode::Chat => "chat",
        Mode::Help => "help",
        Mode::EditSystem => "system prompt",
        Mode::ConfirmQuit => "quit?",
        Mode::Picker => "sessions",
        Mode::Approve => "approve?",
    };
    let ctx = format!(
        "ctx {}/{}",
        crate::layout::count(state.context_tokens as u64),
        crate::layout::count(state.model.context_limit as u64)
    );
    let title = crate::visible::visible_line(state.title.as_deref().unwrap_or("new session"));
    let hints = format!(
        "{} help · {} quit",
        state.keys.hint(Action::Help),
        state.keys.hint(Action::Quit)
    );
    let notes: String = state
        .model
        .notes
        .iter()
        .map(|n| format!(" · {}", crate::visible::visible_line(n)))
        .collect();
    let mut spans = vec![
        Span::styled(format!(" {} ", state.model.name), theme.status()),
        Span::styled(
            format!("· {ctx}{notes} · {mode} · {title} "),
            theme.status(),
        ),
    ];
    // An alarm, then a notice, take the space before the hints.
    if let Some((_, alarm)) = state.active_alarms.last() {
        spans.push(Span::styled(
            format!(" {alarm} "),
            theme.alert(Slot::Warning),
        ));
    } else if let Some(notice) = &state.notice {
        spans.push(Span::styled(
            format!(" {} ", crate::visible::visible_line(notice)),
            theme.alert(Slot::Accent),
        ));
    }
    let used: usize = spans.iter().map(|s| s.width()).sum();
    let room = (area.width as usize).saturating_sub(used);
    if room > hints.len() + 1 {
        spans.push(Span::styled(
            format!("{hints:>room$}", room = room - 1) + " ",
            theme.status(),
        ));
    } else {
        spans.push(Span::styled(" ".repeat(room), theme.status()));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// Everything the panels say, in one line.
pub fn render_summary(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let s = &state.telemetry;
    let mem = s.memory.map_or("mem n/a".to_string(), |m| {
        format!("mem {} free", gib(m.available))
    });
    let swap = match (s.memory, s.swap_rate) {
        (Some(m), _) if m.swap_total == 0 => {
            crate::telemetry::no_swap_words(crate::telemetry::SWAP_ON_DEMAND).to_string()
        }
        (_, Some(r)) => format!("swap in {:.1} MiB/s", r.in_bytes_per_s / 1048576.0),
        _ => "swap n/a".to_string(),
    };
    let speed = match (&state.generation, &state.last_stats) {
        (Some(g), _) => format!("live {} tok/s", crate::layout::rate(g.live_tok_s)),
        (None, Some(st)) => format!("{} tok/s", crate::layout::rate(st.decode_tok_s)),
        (None, None) => "no turn yet".to_string(),
    };
    let temp = match s.hottest() {
        Some(t) => format!("{:.0} °C", t.celsius),
        None => "no sensors".to_string(),
    };
    let throttle = if s.throttle.throttled() == Some(true) {
        " · THROTTLED"
    } else {
        ""
    };
    let warn = super::swap::alarming(state) || !throttle.is_empty();
    let text = format!(
        "{mem} · {swap} · {speed} · {temp}{throttle} · {} panels",
        state.keys.hint(Action::TogglePanels)
    );
    let style = if warn {
        theme.alert(Slot::Warning)
    } else {
        theme.fg(Slot::Dim)
    };
    frame.render_widget(Paragraph::new(Line::styled(text, style)), area);
}
