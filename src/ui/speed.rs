//! Speed panel: the last turn's TTFT, prefill and decode rates, the live
//! rate while generating, and decode speed across turns.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Sparkline};
use ratatui::Frame;

use crate::app::State;
use crate::layout::rate;
use crate::theme::{Slot, Theme};

pub const HEIGHT: u16 = 9;

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let block = super::panel_block("speed", theme.fg(Slot::Border), theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text = theme.fg(Slot::Text);
    let dim = theme.fg(Slot::Dim);
    let mut lines = Vec::new();
    match &state.last_stats {
        Some(s) => {
            let mut ttft = format!("TTFT {:.2} s", s.ttft_ms / 1000.0);
            if s.cached_tokens > 0 {
                ttft.push_str(&format!(
                    " · cache hit {} tok",
                    crate::layout::count(s.cached_tokens as u64)
                ));
            }
            lines.push(Line::styled(ttft, text));
            lines.push(Line::styled(
                format!("prefill {} tok/s", rate(s.prefill_tok_s)),
                text,
            ));
            lines.push(Line::styled(
                format!("decode {} tok/s{}", rate(s.decode_tok_s), drafting(state)),
                text,
            ));
        }
        None => lines.push(Line::styled("no turn yet", dim)),
    }
    lines.resize(3, Line::default());
    // Energy where the machine reports its power (RAPL, Apple's SoC).
    lines.push(match (&state.last_energy, &state.last_stats) {
        (Some(e), _) => Line::styled(
            format!("energy {:.2} J/tok · {:.0} W", e.joules_per_token, e.watts),
            text,
        ),
        (None, Some(_)) => Line::styled("energy n/a", dim),
        (None, None) => Line::default(),
    });
    lines.push(bound_line(state).map_or_else(Line::default, |t| Line::styled(t, text)));
    lines.push(match &state.generation {
        Some(g) => Line::styled(
            format!("live {} tok/s · {} tok", rate(g.live_tok_s), g.tokens),
            theme.fg(Slot::Ok),
        ),
        None => Line::styled("idle", dim),
    });
    let [top, spark] = Layout::vertical([Constraint::Length(6), Constraint::Min(0)]).areas(inner);
    frame.render_widget(Paragraph::new(lines), top);
    // Tenths of a token per second, so the sparkline keeps some resolution.
    let data: Vec<u64> = super::swap::tail(&state.decode_history, spark.width as usize)
        .into_iter()
        .map(|d| (d * 10.0).round().max(0.0) as u64)
        .collect();
    frame.render_widget(
        Sparkline::default()
            .data(&data)
            .style(theme.fg(Slot::Sparkline)),
        spark,
    );
}

/// Turns the drafting figures are taken over.
const DRAFT_TURNS: usize = 8;

/// Drafting (prompt lookup, a draft model) over the last turns that
/// drafted: the share of drafts the model kept and the tokens each decode
/// gave, or that drafting rests when the last turn ended with it resting;
/// empty without drafting. One turn's figures swing with what it said; a few
/// turns' tell whether drafting pays here.
fn drafting(state: &State) -> String {
    let recent: Vec<&crate::engine::GenStats> = state
        .transcript
        .iter()
        .rev()
        .filter_map(|e| e.stats.as_ref())
        .filter(|s| s.drafted > 0)
        .take(DRAFT_TURNS)
        .collect();
    let sum = |f: fn(&crate::engine::GenStats) -> usize| recent.iter().map(|s| f(s)).sum::<usize>();
    let (drafted, kept, tokens) = (
        sum(|s| s.drafted),
        sum(|s| s.accepted_drafts),
        sum(|s| s.completion_tokens),
    );
    let rests = state
        .last_stats
        .as_ref()
        .is_some_and(|s| s.drafting_rested > 0 || s.drafting_resting);
    if drafted == 0 {
        return match rests {
            true => " · draft rests".into(),
            false => String::new(),
        };
    }
    let share = kept as f64 * 100.0 / drafted as f64;
    if rests {
        return format!(" · draft {share:.0}% rests");
    }
    let steps = tokens.saturating_sub(kept).max(1);
    format!(" · draft {share:.0}% ×{:.1}", tokens as f64 / steps as f64)
}

/// The last decode as a share of the memory-bandwidth bound: the bytes a
/// token reads (active weights, the KV cache in use) at that rate, over
/// what the machine's memory delivers.
fn bound_line(state: &State) -> Option<String> {
    let shape = state.shape.as_ref()?;
    let tok_s = state.last_stats.as_ref()?.decode_tok_s?;
    let bandwidth = state.telemetry.memory_bandwidth?;
    let bytes =
        shape.active_weight_bytes() + shape.own_kv_per_token() * state.context_tokens as u64;
    let share = crate::bandwidth::share_of_bound(bytes, tok_s, bandwidth)?;
    Some(format!(
        "bandwidth {:.0}% of {:.0} GB/s",
        share * 100.0,
        bandwidth / 1e9
    ))
}
