//! What a write changes, as a unified diff: shown before a write is
//! approved, and kept with what was written (the journal, the transcript,
//! headless logs), so an edit is never judged or remembered blind.
//!
//! The text is the model's and the repository's, so it is bounded here (a
//! file rewritten whole can be megabytes) and made visible where it is
//! drawn, never here.

use std::time::Duration;

use similar::TextDiff;

/// Lines of a diff that are kept; the rest is counted in one line.
pub const MAX_LINES: usize = 400;
/// Bytes of a diff that are kept, whatever its lines.
pub const MAX_BYTES: usize = 32 << 10;
/// Lines of unchanged text around each change.
const CONTEXT: usize = 3;
/// A file rewritten whole can take the diff a long time to make minimal;
/// past this it settles for a correct, longer one.
const TIMEOUT: Duration = Duration::from_millis(500);

/// The unified diff that turns `old` into `new` in `path` (`old` is `None`
/// for a file that does not exist yet), bounded to `MAX_LINES` lines and
/// `MAX_BYTES` bytes; empty when nothing changes.
pub fn unified(path: &str, old: Option<&str>, new: &str) -> String {
    let from = match old {
        Some(_) => format!("a/{path}"),
        None => "/dev/null".to_string(),
    };
    between(old.unwrap_or(""), new, &from, &format!("b/{path}"))
}

/// The unified diff of deleting `path`, which held `old`, bounded.
pub fn removed(path: &str, old: &str) -> String {
    between(old, "", &format!("a/{path}"), "/dev/null")
}

fn between(old: &str, new: &str, from: &str, to: &str) -> String {
    let text = TextDiff::configure()
        .timeout(TIMEOUT)
        .diff_lines(old, new)
        .unified_diff()
        .context_radius(CONTEXT)
        .missing_newline_hint(true)
        .header(from, to)
        .to_string();
    bounded(&text)
}

/// `text` cut to `MAX_LINES` lines and `MAX_BYTES` bytes (at a character
/// boundary), with a last line saying how many lines were left out.
pub fn bounded(text: &str) -> String {
    let total = text.lines().count();
    let mut out = String::new();
    let mut kept = 0;
    for line in text.lines() {
        if kept == MAX_LINES || out.len() + line.len() + 1 > MAX_BYTES {
            break;
        }
        out.push_str(line);
        out.push('\n');
        kept += 1;
    }
    if kept < total {
        out.push_str(&format!(
            "… {} more lines of the diff not shown\n",
            total - kept
        ));
    }
    out
}

/// How a diff line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Header,
    Hunk,
    Added,
    Removed,
    Context,
}

/// The kind of one line of a diff `unified` made.
pub fn kind(line: &str) -> LineKind {
    if line.starts_with("+++ ") || line.starts_with("--- ") {
        LineKind::Header
    } else if line.starts_with("@@") {
        LineKind::Hunk
    } else if line.starts_with('+') {
        LineKind::Added
    } else if line.starts_with('-') {
        LineKind::Removed
    } else {
        LineKind::Context
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_a_hunk_with_its_context() {
        let old = "one\ntwo\nthree\nfour\nfive\nsix\nseven\neight\n";
        let new = old.replace("five", "FIVE");
        let d = unified("src/x.txt", Some(old), &new);
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines[0], "--- a/src/x.txt");
        assert_eq!(lines[1], "+++ b/src/x.txt");
        assert!(lines[2].starts_with("@@ -2,7 +2,7 @@"), "{d}");
        assert!(lines.contains(&"-five") && lines.contains(&"+FIVE"), "{d}");
        // Three lines of context either side, no more.
        assert!(lines.contains(&" two") && lines.contains(&" eight"), "{d}");
        assert!(!lines.contains(&" one"), "{d}");
        let kinds: Vec<LineKind> = lines.iter().map(|l| kind(l)).collect();
        assert_eq!(
            &kinds[..3],
            [LineKind::Header, LineKind::Header, LineKind::Hunk]
        );
        assert!(kinds.contains(&LineKind::Added) && kinds.contains(&LineKind::Removed));
    }

    #[test]
    fn a_new_file_is_all_added_and_no_change_is_empty() {
        let d = unified("new.txt", None, "a\nb\n");
        assert!(d.starts_with("--- /dev/null\n+++ b/new.txt\n"), "{d}");
        assert!(d.contains("\n+a\n+b\n"), "{d}");
        assert_eq!(unified("same.txt", Some("x\n"), "x\n"), "");
        // A last line without a newline says so, so the two are not equal.
        let d = unified("n.txt", Some("x\n"), "x");
        assert!(d.contains("No newline at end of file"), "{d}");
    }

    #[test]
    fn a_huge_rewrite_is_cut_and_says_how_much_is_left_out() {
        let new: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        let d = unified("big.txt", Some(""), &new);
        assert_eq!(d.lines().count(), MAX_LINES + 1);
        assert!(d.ends_with("more lines of the diff not shown\n"), "{d}");
        // One enormous line is cut by bytes.
        let wide = "x".repeat(MAX_BYTES * 4);
        let d = unified("wide.txt", None, &wide);
        assert!(d.len() <= MAX_BYTES + 100, "{}", d.len());
        assert!(d.ends_with("not shown\n"), "{d}");
    }
}
