//! Text kiln did not write (the model's, a tool's, an endpoint's, a file
//! name, a session title) is shown, never obeyed: control characters,
//! escape sequences and bidirectional overrides are drawn as visible
//! symbols, so they cannot retitle the terminal, write the clipboard, move
//! the cursor to fake a prompt, or reorder what an approval shows.

use std::borrow::Cow;

/// Whether `c` would act on a terminal, or on how text around it is shown,
/// rather than print.
pub fn acts(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200e}' | '\u{200f}' | '\u{061c}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}')
}

fn push_visible(out: &mut String, c: char) {
    match c {
        // C0 controls have pictures of their own: ␛ for ESC, ␇ for BEL.
        '\0'..='\u{1f}' => out.push(char::from_u32(0x2400 + c as u32).expect("control picture")),
        '\u{7f}' => out.push('␡'),
        _ => out.push_str(&format!("<U+{:04X}>", c as u32)),
    }
}

fn replace(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| acts(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if acts(c) && !keep(c) {
            push_visible(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` with every control character made visible except line breaks
/// and tabs: for text shown as paragraphs.
pub fn visible(text: &str) -> Cow<'_, str> {
    replace(text, |c| c == '\n' || c == '\t')
}

/// `text` with every control character made visible, line breaks and tabs
/// too: for what must stay on one line (a title, a file name, a path).
pub fn visible_line(text: &str) -> Cow<'_, str> {
    replace(text, |_| false)
}

/// `visible`, where `raw` is false (output going to a file or a pipe keeps
/// the bytes as they are; a terminal gets them made visible).
pub fn for_output(text: &str, raw: bool) -> Cow<'_, str> {
    if raw {
        Cow::Borrowed(text)
    } else {
        visible(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character that acts on a terminal, in every class: C0, DEL,
    /// C1 (8-bit CSI and OSC among them), and bidi overrides.
    #[test]
    fn no_acting_character_survives() {
        let mut all = String::new();
        for c in (0u32..0x2100).filter_map(char::from_u32) {
            all.push(c);
        }
        for s in [visible(&all), visible_line(&all)] {
            assert!(
                !s.chars().any(|c| acts(c) && c != '\n' && c != '\t'),
                "{s:?}"
            );
        }
        assert!(!visible_line("a\nb\tc").contains(['\n', '\t']));
        assert_eq!(visible("title\x1b]2;pwned\x07"), "title␛]2;pwned␇");
        assert_eq!(visible("\u{9b}31m"), "<U+009B>31m");
        assert_eq!(visible("rm \u{202e}txt.exe"), "rm <U+202E>txt.exe");
        assert_eq!(visible("a\r\nb"), "a␍\nb");
        assert!(matches!(visible("plain ✓ text\n"), Cow::Borrowed(_)));
    }
}
