//! Memory budget panel: where the machine's memory is, with kiln's share
//! split into weights, KV cache and the rest, and the tokens left.

use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use crate::app::State;
use crate::budget::{gib, tokens_before_memory_runs_out};
use crate::theme::{Slot, Theme};

/// Border, bar, five legend rows and the tokens-left row.
pub const HEIGHT: u16 = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryView {
    pub total: u64,
    pub weights: u64,
    pub kv: u64,
    /// The rest of kiln's resident memory.
    pub process: u64,
    /// Memory other processes (and the kernel) use.
    pub other: u64,
    pub free: u64,
    /// Tokens left in the context window.
    pub context_left: u64,
    /// Tokens the KV cache can still grow by in free memory (`None` when the
    /// model's shape is unknown).
    pub memory_left: Option<u64>,
    /// KV bytes the local engine would hold for this conversation, saved
    /// while it runs on a remote endpoint.
    pub offloaded: Option<u64>,
}

pub fn view(state: &State) -> Option<MemoryView> {
    let mem = state.telemetry.memory?;
    let rss = state.telemetry.process.map(|p| p.rss);
    let used = mem.used();
    let context = state.context_tokens as u64;
    let (weights, local_kv) = match &state.shape {
        Some(shape) => (shape.weight_bytes(), shape.kv_bytes(context)),
        None => (0, 0),
    };
    let (kv, offloaded) = match state.remote {
        Some(_) => (0, Some(local_kv)),
        None => (local_kv, None),
    };
    // Parts of the weights may not be resident (mmap); never show more than
    // the process holds.
    let kiln = rss.unwrap_or(weights + kv).min(used.max(1));
    let weights = weights.min(kiln);
    let kv = kv.min(kiln - weights);
    Some(MemoryView {
        total: mem.total,
        weights,
        kv,
        process: kiln - weights - kv,
        other: used.saturating_sub(kiln),
        free: mem.available,
        context_left: (state.model.context_limit as u64).saturating_sub(context),
        memory_left: state
            .shape
            .as_ref()
            .map(|s| tokens_before_memory_runs_out(s, context, mem.available)),
        offloaded,
    })
}

/// (character, slot) per segment: distinct characters keep the bar readable
/// without colour.
const SEGMENTS: [(char, Slot, &str); 5] = [
    ('█', Slot::BarWeights, "weights"),
    ('▓', Slot::BarKv, "KV cache"),
    ('▒', Slot::BarProcess, "kiln, rest"),
    ('░', Slot::BarOther, "other"),
    ('·', Slot::BarFree, "free"),
];

pub fn render(frame: &mut Frame, area: Rect, state: &State, theme: &Theme) {
    let title = match state.telemetry.memory {
        Some(m) => format!("memory · {}", gib(m.total)),
        None => "memory".to_string(),
    };
    let block = super::panel_block(&title, theme.fg(Slot::Border), theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(v) = view(state) else {
        frame.render_widget(
            Paragraph::new(Line::styled("not available", theme.fg(Slot::Dim))),
            inner,
        );
        return;
    };
    let parts = [v.weights, v.kv, v.process, v.other, v.free];
    let mut lines = vec![bar(&parts, v.total, inner.width as usize, theme)];
    for ((c, slot, name), bytes) in SEGMENTS.iter().zip(parts) {
        lines.push(Line::from(vec![
            Span::styled(format!("{c} "), theme.fg(*slot)),
            Span::styled(format!("{name:<11}"), theme.fg(Slot::Text)),
            Span::styled(format!("{:>10}", gib(bytes)), theme.fg(Slot::Text)),
        ]));
    }
    lines[2].spans.push(Span::styled(
        format!(" {} tok", crate::layout::count(state.context_tokens as u64)),
        theme.fg(Slot::Dim),
    ));
    let (left, style) = match (v.offloaded, v.memory_left) {
        (Some(saved), _) => (
            format!("offloaded: {} of KV not held here", gib(saved)),
            theme.fg(Slot::Ok),
        ),
        (None, memory_left) => match memory_left {
            Some(m) if m < v.context_left => (
                format!("{} tok left, then memory runs out", crate::layout::count(m)),
                theme.alert(Slot::Warning),
            ),
            _ => (
                format!(
                    "{} tok left in context",
                    crate::layout::count(v.context_left)
                ),
                theme.fg(Slot::Text),
            ),
        },
    };
    lines.push(Line::styled(left, style));
    frame.render_widget(Paragraph::new(lines), inner);
}

/// A bar `width` cells wide, each part at least one cell when non-zero so
/// a small KV cache is still visible.
fn bar(parts: &[u64], total: u64, width: usize, theme: &Theme) -> Line<'static> {
    let total = total.max(parts.iter().sum::<u64>()).max(1);
    let mut cells: Vec<usize> = parts
        .iter()
        .map(|&p| {
            if p == 0 {
                0
            } else {
                ((p as f64 / total as f64 * width as f64).round() as usize).max(1)
            }
        })
        .collect();
    // Rounding may overshoot; take the excess from the largest part.
    while cells.iter().sum::<usize>() > width {
        let Some(max) = (0..cells.len()).max_by_key(|&i| cells[i]) else {
            break;
        };
        cells[max] -= 1;
    }
    let spans: Vec<Span> = SEGMENTS
        .iter()
        .zip(cells)
        .filter(|(_, n)| *n > 0)
        .map(|((c, slot, _), n)| Span::styled(c.to_string().repeat(n), theme.fg(*slot)))
        .collect();
    Line::from(spans)
}
