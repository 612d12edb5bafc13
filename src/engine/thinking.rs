//! A reasoning model's thinking: the `<think>…</think>` block it writes
//! before its answer (Qwen3, QwQ, DeepSeek-R1 and its distills, GLM).
//!
//! An answer is kept as the model wrote it, block included: the journal
//! keeps the thinking, and every view splits it the same way here. The chat
//! template decides whether earlier thinking goes back to the model (it
//! gets it as `reasoning_content`, the way Hugging Face passes it).

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// An answer split into its thinking and the rest.
#[derive(Debug, PartialEq, Eq)]
pub struct Split<'a> {
    /// The thinking, without its tags; `None` when the answer has none.
    pub thinking: Option<&'a str>,
    /// Whether the thinking is still going (no closing tag yet).
    pub open: bool,
    pub answer: &'a str,
}

impl<'a> Split<'a> {
    /// The answer as shown and sent on: without the blank lines a model
    /// writes after its thinking.
    pub fn shown_answer(&self) -> &'a str {
        match self.thinking {
            Some(_) => self.answer.trim_start(),
            None => self.answer,
        }
    }
}

/// Split `raw`, an answer as generated. Thinking only counts at the start,
/// so an answer that talks about the tags later keeps them as text. While
/// streaming, a partial tag at the end is held back, not shown as text.
pub fn split(raw: &str) -> Split<'_> {
    let start = raw.len() - raw.trim_start().len();
    let body = &raw[start..];
    let Some(inner) = body.strip_prefix(OPEN) else {
        if !body.is_empty() && OPEN.starts_with(body) {
            return Split {
                thinking: Some(""),
                open: true,
                answer: "",
            };
        }
        return Split {
            thinking: None,
            open: false,
            answer: raw,
        };
    };
    match inner.find(CLOSE) {
        Some(end) => Split {
            thinking: Some(&inner[..end]),
            open: false,
            answer: &inner[end + CLOSE.len()..],
        },
        None => Split {
            thinking: Some(&inner[..inner.len() - partial_suffix(inner, CLOSE)]),
            open: true,
            answer: "",
        },
    }
}

/// How many bytes at the end of `text` could start `tag` (an ASCII tag, so
/// the cut is always on a character boundary).
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// Whether a rendered prompt leaves a thinking block open, so that the model
/// starts inside it (DeepSeek-R1's template ends its prompt with `<think>`).
pub fn opens(prompt: &str) -> bool {
    match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The answer to append after a rendered prompt that `opens` a thinking
/// block: without its own opening tag, which the prompt already has.
pub fn after_open_prompt<'a>(prompt: &str, answer: &'a str) -> &'a str {
    match opens(prompt) {
        true => answer.trim_start().strip_prefix(OPEN).unwrap_or(answer),
        false => answer,
    }
}

/// Splits a streamed answer as it comes: each piece of text gives the new
/// thinking and the new answer text since the last piece.
#[derive(Default)]
pub struct Stream {
    raw: String,
    thinking: usize,
    answer: usize,
}

impl Stream {
    pub fn push(&mut self, text: &str) -> (String, String) {
        self.raw.push_str(text);
        let split = split(&self.raw);
        let thought = split.thinking.unwrap_or_default();
        let answer = split.shown_answer();
        let new = |shown: &mut usize, text: &str| {
            let part = text.get(*shown..).unwrap_or_default().to_string();
            *shown = (*shown).max(text.len());
            part
        };
        (
            new(&mut self.thinking, thought),
            new(&mut self.answer, answer),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_then_answer() {
        let s = split("<think>\nsum it\n</think>\n\nFour.");
        assert_eq!(s.thinking, Some("\nsum it\n"));
        assert!(!s.open);
        assert_eq!(s.answer, "\n\nFour.");
    }

    #[test]
    fn no_thinking_and_tags_later_are_text() {
        let s = split("Use <think> tags </think> like so.");
        assert_eq!(s.thinking, None);
        assert_eq!(s.answer, "Use <think> tags </think> like so.");
    }

    #[test]
    fn every_streamed_prefix_splits_without_showing_a_partial_tag() {
        let raw = "<think>a</think>b";
        for end in 0..=raw.len() {
            let s = split(&raw[..end]);
            assert!(!s.answer.contains('<'), "{end}: {s:?}");
            if let Some(t) = s.thinking {
                assert!(!t.contains('<'), "{end}: {s:?}");
                assert!("a".starts_with(t), "{end}: {s:?}");
            }
        }
        let s = split("<think>\nwhy</th");
        assert_eq!(s.thinking, Some("\nwhy"));
        assert!(s.open);
    }

    #[test]
    fn multibyte_text_next_to_a_partial_tag_is_safe() {
        for raw in ["<think>é<", "<think>日本</", "<think>🙂</thi", "<think>x😀"] {
            let s = split(raw);
            assert!(s.open, "{raw}");
        }
    }

    #[test]
    fn a_stream_hands_out_each_part_once() {
        let raw = "<think>\nfirst, add</think>\n\nFour, <b>.";
        for size in 1..raw.len() {
            let mut stream = Stream::default();
            let (mut thought, mut answer) = (String::new(), String::new());
            let mut rest = raw;
            while !rest.is_empty() {
                let mut cut = size.min(rest.len());
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                let (t, a) = stream.push(&rest[..cut]);
                thought += &t;
                answer += &a;
                rest = &rest[cut..];
            }
            assert_eq!(thought, "\nfirst, add", "pieces of {size}");
            assert_eq!(answer, "Four, <b>.", "pieces of {size}");
        }
    }

    #[test]
    fn an_open_prompt_is_seen_and_its_tag_not_repeated() {
        assert!(opens("<｜Assistant｜><think>\n"));
        assert!(!opens("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!opens("<|im_start|>assistant\n"));
        let prompt = "<｜Assistant｜><think>\n";
        assert_eq!(after_open_prompt(prompt, "<think>\nhm"), "\nhm");
        assert_eq!(after_open_prompt("x", "<think>\nhm"), "<think>\nhm");
    }
}
