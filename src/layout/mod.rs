//! Layout: the screen's parts, text as rows, counts and rates in words.
//! Pure, below both `app` (scrolling, paging) and `ui` (drawing), so the
//! two agree on every row without importing each other.

pub mod approval;
pub mod entries;
pub mod text;

use ratatui::layout::{Constraint, Layout, Margin, Rect};

/// Below this the screen shows one line asking for a larger terminal.
pub const MIN_WIDTH: u16 = 20;
pub const MIN_HEIGHT: u16 = 6;
/// The side panels need this much width to be worth drawing in full.
pub const FULL_PANELS_MIN_WIDTH: u16 = 100;

pub struct Areas {
    pub chat: Rect,
    pub input: Rect,
    /// Zero-sized when the panels are collapsed.
    pub panels: Rect,
    /// The one-line panel summary; zero-sized when the panels are full.
    pub summary: Rect,
    pub status: Rect,
}

/// The screen's parts at `area`: with the side panels in full or as a
/// summary line, and an input box for `input_lines` lines.
pub fn areas(area: Rect, full_panels: bool, input_lines: usize) -> Option<Areas> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let status = Rect {
        y: area.bottom() - 1,
        height: 1,
        ..area
    };
    let body = Rect {
        height: area.height - 1,
        ..area
    };
    let (main, panels, summary) = if full_panels {
        let width = (area.width * 3 / 10).clamp(30, 44).min(area.width / 2);
        let [main, panels] =
            Layout::horizontal([Constraint::Min(0), Constraint::Length(width)]).areas(body);
        (main, panels, Rect::default())
    } else {
        let [main, summary] =
            Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(body);
        (main, Rect::default(), summary)
    };
    let wanted = input_lines.min(u16::MAX as usize - 2) as u16 + 2;
    let input_height = wanted.clamp(3, (main.height / 3).max(3)).min(main.height);
    let [chat, input] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(input_height)]).areas(main);
    Some(Areas {
        chat,
        input,
        panels,
        summary,
        status,
    })
}

/// The text area of the conversation pane: one column of margin each side.
pub fn chat_text_area(chat: Rect) -> Rect {
    chat.inner(Margin {
        horizontal: 1,
        vertical: 0,
    })
}

/// Width and height of the conversation text on a terminal of `size`.
pub fn chat_viewport(size: (u16, u16), full_panels: bool, input_lines: usize) -> (u16, usize) {
    let area = Rect::new(0, 0, size.0, size.1);
    match areas(area, full_panels, input_lines) {
        Some(a) => {
            let text = chat_text_area(a.chat);
            (text.width, text.height as usize)
        }
        None => (0, 0),
    }
}

/// 12,345
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate with one decimal, or "n/a".
pub fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"))
}
