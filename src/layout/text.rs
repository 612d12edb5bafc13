//! Conversation text as rows on screen: markdown (through pulldown-cmark)
//! into lines of tagged spans, then wrapped to a width. Theme-free, so
//! `update` can count rows for scrolling with the same code `render` draws.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use unicode_width::UnicodeWidthChar;

/// What a piece of text is, for the theme to colour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tone {
    #[default]
    Normal,
    User,
    Assistant,
    Notice,
    Error,
    Dim,
    /// A diff's added and removed lines.
    Added,
    Removed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sem {
    pub tone: Tone,
    pub bold: bool,
    pub italic: bool,
    pub strike: bool,
    pub underline: bool,
    pub code: bool,
    pub heading: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SemSpan {
    pub text: String,
    pub sem: Sem,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SemLine {
    pub spans: Vec<SemSpan>,
    /// A line of a fenced code block: wrapped by character, drawn on the
    /// code background.
    pub code_block: bool,
}

impl SemLine {
    pub fn plain(text: impl Into<String>, sem: Sem) -> SemLine {
        SemLine {
            spans: vec![SemSpan {
                text: text.into(),
                sem,
            }],
            code_block: false,
        }
    }

    fn push(&mut self, text: &str, sem: Sem) {
        if text.is_empty() {
            return;
        }
        match self.spans.last_mut() {
            Some(last) if last.sem == sem => last.text.push_str(text),
            _ => self.spans.push(SemSpan {
                text: text.to_string(),
                sem,
            }),
        }
    }

    pub fn width(&self) -> usize {
        self.spans.iter().map(|s| str_width(&s.text)).sum()
    }
}

fn str_width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

fn char_width(c: char) -> usize {
    // Tabs and control characters would move the cursor; they are drawn as
    // one cell (tabs are expanded before this).
    c.width().unwrap_or(1)
}

/// Lines of plain text, exactly as written (user messages, notices), with
/// control and escape characters drawn as symbols (`visible`).
pub fn plain(text: &str, sem: Sem) -> Vec<SemLine> {
    crate::visible::visible(text)
        .split('\n')
        .map(|l| SemLine::plain(l.replace('\t', "    "), sem))
        .collect()
}

/// Markdown into lines. Soft breaks stay line breaks: models use single
/// newlines for structure far more often than for reflowed prose.
pub fn markdown(text: &str, base: Sem) -> Vec<SemLine> {
    // The model's text: what would act on the terminal is drawn instead.
    let text = crate::visible::visible(text);
    let text: &str = &text;
    let mut out: Vec<SemLine> = Vec::new();
    let mut line = SemLine::default();
    let mut sem = base;
    let mut lists: Vec<Option<u64>> = Vec::new();
    let mut quote = 0usize;
    let mut in_code_block = false;
    let mut pending_prefix: Option<String> = None;

    fn flush(out: &mut Vec<SemLine>, line: &mut SemLine) {
        out.push(std::mem::take(line));
    }
    fn blank(out: &mut Vec<SemLine>) {
        if out
            .last()
            .is_some_and(|l| !l.spans.is_empty() || l.code_block)
        {
            out.push(SemLine::default());
        }
    }
    let start_line = |line: &mut SemLine, quote: usize, prefix: &mut Option<String>| {
        if line.spans.is_empty() {
            if quote > 0 {
                line.push(
                    &"│ ".repeat(quote),
                    Sem {
                        tone: Tone::Dim,
                        ..base
                    },
                );
            }
            if let Some(p) = prefix.take() {
                line.push(
                    &p,
                    Sem {
                        tone: Tone::Dim,
                        ..base
                    },
                );
            }
        }
    };

    let options =
        Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS;
    for event in Parser::new_ext(text, options) {
        match event {
            Event::Start(tag) => match tag {
                Tag::Heading { level, .. } => {
                    blank(&mut out);
                    sem.heading = true;
                    sem.bold = true;
                    let hashes = match level {
                        HeadingLevel::H1 => "# ",
                        HeadingLevel::H2 => "## ",
                        _ => "### ",
                    };
                    line.push(hashes, sem);
                }
                Tag::Paragraph => {}
                Tag::BlockQuote(_) => quote += 1,
                Tag::CodeBlock(kind) => {
                    if !line.spans.is_empty() {
                        flush(&mut out, &mut line);
                    }
                    in_code_block = true;
                    let lang = match kind {
                        CodeBlockKind::Fenced(l) if !l.is_empty() => l.to_string(),
                        _ => String::new(),
                    };
                    if !lang.is_empty() {
                        out.push(SemLine::plain(
                            lang,
                            Sem {
                                tone: Tone::Dim,
                                ..base
                            },
                        ));
                    }
                }
                Tag::List(first) => {
                    if !line.spans.is_empty() {
                        flush(&mut out, &mut line);
                    }
                    lists.push(first);
                }
                Tag::Item => {
                    if !line.spans.is_empty() {
                        flush(&mut out, &mut line);
                    }
                    let depth = lists.len().saturating_sub(1);
                    let marker = match lists.last_mut() {
                        Some(Some(n)) => {
                            let m = format!("{n}. ");
                            *n += 1;
                            m
                        }
                        _ => "• ".to_string(),
                    };
                    pending_prefix = Some(format!("{}{marker}", "  ".repeat(depth)));
                }
                Tag::Emphasis => sem.italic = true,
                Tag::Strong => sem.bold = true,
                Tag::Strikethrough => sem.strike = true,
                Tag::Link { .. } => sem.underline = true,
                Tag::TableCell if !line.spans.is_empty() => line.push(
                    " │ ",
                    Sem {
                        tone: Tone::Dim,
                        ..base
                    },
                ),
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Heading(_) => {
                    flush(&mut out, &mut line);
                    blank(&mut out);
                    sem.heading = false;
                    sem.bold = false;
                }
                TagEnd::Paragraph => {
                    flush(&mut out, &mut line);
                    if lists.is_empty() {
                        blank(&mut out);
                    }
                }
                TagEnd::BlockQuote(_) => {
                    quote = quote.saturating_sub(1);
                    blank(&mut out);
                }
                TagEnd::CodeBlock => {
                    in_code_block = false;
                    if !line.spans.is_empty() {
                        line.code_block = true;
                        flush(&mut out, &mut line);
                    }
                    blank(&mut out);
                }
                TagEnd::List(_) => {
                    lists.pop();
                    if lists.is_empty() {
                        blank(&mut out);
                    }
                }
                TagEnd::Item if !line.spans.is_empty() => flush(&mut out, &mut line),
                TagEnd::Emphasis => sem.italic = false,
                TagEnd::Strong => sem.bold = false,
                TagEnd::Strikethrough => sem.strike = false,
                TagEnd::Link => sem.underline = false,
                TagEnd::TableHead | TagEnd::TableRow => flush(&mut out, &mut line),
                TagEnd::Table => blank(&mut out),
                _ => {}
            },
            Event::Text(t) if in_code_block => {
                let code = Sem { code: true, ..base };
                let mut parts = t.split('\n').peekable();
                while let Some(part) = parts.next() {
                    line.push(&part.replace('\t', "    "), code);
                    if parts.peek().is_some() {
                        line.code_block = true;
                        flush(&mut out, &mut line);
                    }
                }
            }
            Event::Text(t) | Event::Html(t) | Event::InlineHtml(t) => {
                start_line(&mut line, quote, &mut pending_prefix);
                let mut parts = t.split('\n').peekable();
                while let Some(part) = parts.next() {
                    line.push(&part.replace('\t', "    "), sem);
                    if parts.peek().is_some() {
                        flush(&mut out, &mut line);
                        start_line(&mut line, quote, &mut pending_prefix);
                    }
                }
            }
            Event::Code(t) => {
                start_line(&mut line, quote, &mut pending_prefix);
                line.push(&t, Sem { code: true, ..sem });
            }
            Event::SoftBreak | Event::HardBreak => {
                flush(&mut out, &mut line);
                start_line(&mut line, quote, &mut pending_prefix);
            }
            Event::Rule => {
                blank(&mut out);
                out.push(SemLine::plain(
                    "────────",
                    Sem {
                        tone: Tone::Dim,
                        ..base
                    },
                ));
                blank(&mut out);
            }
            Event::TaskListMarker(done) => {
                start_line(&mut line, quote, &mut pending_prefix);
                line.push(if done { "[x] " } else { "[ ] " }, sem);
            }
            _ => {}
        }
    }
    if !line.spans.is_empty() {
        if in_code_block {
            line.code_block = true;
        }
        out.push(line);
    }
    while out
        .last()
        .is_some_and(|l| l.spans.is_empty() && !l.code_block)
    {
        out.pop();
    }
    out
}

/// Rows being filled by `wrap`.
struct Rows {
    done: Vec<SemLine>,
    row: SemLine,
    used: usize,
}

impl Rows {
    fn push(&mut self, text: &str, sem: Sem, width: usize) {
        self.row.push(text, sem);
        self.used += width;
    }

    fn break_row(&mut self) {
        let next = SemLine {
            spans: Vec::new(),
            code_block: self.row.code_block,
        };
        self.done.push(std::mem::replace(&mut self.row, next));
        self.used = 0;
    }
}

/// Wrap one line to `width` cells: by word for prose, by character for code
/// and for words longer than the width.
pub fn wrap(line: &SemLine, width: usize) -> Vec<SemLine> {
    let width = width.max(1);
    if line.width() <= width {
        return vec![line.clone()];
    }
    let mut r = Rows {
        done: Vec::new(),
        row: SemLine {
            spans: Vec::new(),
            code_block: line.code_block,
        },
        used: 0,
    };
    // Pieces are words with their trailing spaces (or single characters in
    // code), so a row break falls between words.
    for span in &line.spans {
        for piece in pieces(&span.text, line.code_block) {
            let w = str_width(piece);
            if r.used + w > width && (r.used > 0 || w <= width) {
                let trimmed = piece.trim_end();
                let tw = str_width(trimmed);
                if r.used + tw <= width && !trimmed.is_empty() {
                    // The word fits once its trailing spaces are dropped.
                    r.push(trimmed, span.sem, tw);
                    r.break_row();
                    continue;
                }
                if r.used > 0 {
                    r.break_row();
                }
            }
            if w <= width {
                r.push(piece, span.sem, w);
                continue;
            }
            // A word wider than a row: break it by character.
            for c in piece.chars() {
                let cw = char_width(c);
                if r.used + cw > width && r.used > 0 {
                    r.break_row();
                }
                if c == ' ' && r.used == 0 && !line.code_block {
                    continue;
                }
                let mut buf = [0u8; 4];
                r.push(c.encode_utf8(&mut buf), span.sem, cw);
            }
        }
    }
    let mut rows = r.done;
    if !r.row.spans.is_empty() || rows.is_empty() {
        rows.push(r.row);
    }
    if !line.code_block {
        // A space at a row break is a line end on screen, not text.
        let last = rows.len() - 1;
        for row in &mut rows[..last] {
            if let Some(span) = row.spans.last_mut() {
                span.text.truncate(span.text.trim_end().len());
            }
        }
    }
    rows
}

fn pieces(text: &str, by_char: bool) -> Vec<&str> {
    if by_char {
        return text
            .char_indices()
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect();
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c == ' ' {
            in_space = true;
        } else if in_space {
            out.push(&text[start..i]);
            start = i;
            in_space = false;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[SemLine]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.text.as_str()).collect())
            .collect()
    }

    #[test]
    fn markdown_blocks() {
        let md = "# Title\n\nSome *soft* and **strong** `code`.\nNext line.\n\n- one\n- two\n  1. inner\n\n```rust\nfn main() {}\n```\n\n> quoted";
        let lines = markdown(md, Sem::default());
        assert_eq!(
            texts(&lines),
            [
                "# Title",
                "",
                "Some soft and strong code.",
                "Next line.",
                "",
                "• one",
                "• two",
                "  1. inner",
                "",
                "rust",
                "fn main() {}",
                "",
                "│ quoted"
            ]
        );
        assert!(lines[0].spans[0].sem.heading);
        let emph = &lines[2].spans;
        assert!(emph.iter().any(|s| s.text == "soft" && s.sem.italic));
        assert!(emph.iter().any(|s| s.text == "strong" && s.sem.bold));
        assert!(emph.iter().any(|s| s.text == "code" && s.sem.code));
        assert!(lines[10].code_block && lines[10].spans[0].sem.code);
    }

    #[test]
    fn an_unclosed_fence_while_streaming_is_code_to_the_end() {
        let lines = markdown("Here:\n```\nlet x = 1;\nlet y", Sem::default());
        assert_eq!(texts(&lines), ["Here:", "", "let x = 1;", "let y"]);
        assert!(lines[2].code_block && lines[3].code_block);
    }

    #[test]
    fn wrapping_by_word_and_by_character() {
        let line = SemLine::plain("the quick brown fox jumps", Sem::default());
        assert_eq!(texts(&wrap(&line, 10)), ["the quick", "brown fox", "jumps"]);
        let long = SemLine::plain("abcdefghijkl xy", Sem::default());
        assert_eq!(texts(&wrap(&long, 5)), ["abcde", "fghij", "kl xy"]);
        let mut code = SemLine::plain("let a = 1;", Sem::default());
        code.code_block = true;
        assert_eq!(texts(&wrap(&code, 4)), ["let ", "a = ", "1;"]);
        // Wide characters take two cells.
        let wide = SemLine::plain("日本語のテキスト", Sem::default());
        let rows = wrap(&wide, 5);
        assert!(rows.iter().all(|r| r.width() <= 5), "{:?}", texts(&rows));
        assert_eq!(texts(&rows).concat(), "日本語のテキスト");
        // Width 1 must still terminate.
        assert_eq!(wrap(&line, 1).len(), 21);
    }
}
