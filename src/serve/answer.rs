//! An answer's text as it streams, shaped into what OpenAI's API sends:
//! thinking apart as `reasoning_content`, the answer cut at the first stop
//! string, and tool calls held back from the content and read out at the
//! end. Only the unreleased tail is searched per token, so the cost per
//! token does not grow with the answer.

use crate::chat::ToolCallMessage;
use crate::engine::thinking;
use crate::engine::tool_format::ToolFormat;

#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Reasoning(String),
    Content(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Thinking,
    Answer,
    /// A call opened: the rest is read at the end.
    Calls,
    /// A stop string was written: nothing more is let out.
    Stopped,
}

pub struct Shaper {
    stops: Vec<String>,
    calls: Option<ToolFormat>,
    raw: String,
    /// Bytes of `raw` let out (or dropped, for the tags).
    sent: usize,
    phase: Phase,
    started: bool,
    /// Just past the thinking: the blank before the answer is dropped.
    after_thinking: bool,
}

/// How the answer ended, once its last text is in.
#[derive(Debug, Default, PartialEq)]
pub struct Ending {
    pub pieces: Vec<Piece>,
    pub calls: Vec<ToolCallMessage>,
    /// A stop string ended it.
    pub stopped: bool,
}

impl Shaper {
    /// `thinking`: an answer that opens with the thinking tag keeps its
    /// thinking apart (a chat; a raw completion is text as it comes).
    pub fn new(stops: Vec<String>, calls: Option<ToolFormat>, thinking: bool) -> Shaper {
        Shaper {
            stops,
            calls,
            raw: String::new(),
            sent: 0,
            phase: Phase::Answer,
            started: !thinking,
            after_thinking: false,
        }
    }

    /// A shaper for an answer that is calls from its first token: all of
    /// it is read as calls at the end (or, when it reads as none, is the
    /// content).
    pub fn calls_only(stops: Vec<String>, format: ToolFormat) -> Shaper {
        Shaper {
            phase: Phase::Calls,
            started: true,
            ..Shaper::new(stops, Some(format), false)
        }
    }

    /// Whether a stop string has ended the answer (the engine's turn is
    /// then cancelled).
    pub fn stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// What `text` lets out now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.raw.push_str(text);
        let mut out = Vec::new();
        if !self.started {
            // The engine opens a thinking answer with its tag.
            if self.raw.len() < thinking::OPEN.len() && thinking::OPEN.starts_with(&self.raw) {
                return out;
            }
            self.started = true;
            if self.raw.starts_with(thinking::OPEN) {
                self.sent = thinking::OPEN.len();
                self.phase = Phase::Thinking;
            }
        }
        loop {
            let rest = &self.raw[self.sent..];
            match self.phase {
                Phase::Thinking => match rest.find(thinking::CLOSE) {
                    Some(i) => {
                        push(&mut out, Piece::Reasoning(rest[..i].to_string()));
                        self.sent += i + thinking::CLOSE.len();
                        self.phase = Phase::Answer;
                        self.after_thinking = true;
                    }
                    None => {
                        let end = rest.len() - held(rest, [thinking::CLOSE]);
                        push(&mut out, Piece::Reasoning(rest[..end].to_string()));
                        self.sent += end;
                        return out;
                    }
                },
                Phase::Answer if self.after_thinking => {
                    let blank = rest.len() - rest.trim_start().len();
                    self.sent += blank;
                    if blank == rest.len() {
                        return out;
                    }
                    self.after_thinking = false;
                }
                Phase::Answer => {
                    let stop = self
                        .stops
                        .iter()
                        .filter_map(|s| rest.find(s.as_str()))
                        .min();
                    let call = self.calls.and_then(|f| rest.find(f.trigger()));
                    let markers = self
                        .stops
                        .iter()
                        .map(String::as_str)
                        .chain(self.calls.map(ToolFormat::trigger));
                    let (end, phase) = match (stop, call) {
                        (Some(s), Some(c)) if c < s => (c, Phase::Calls),
                        (_, Some(c)) if stop.is_none() => (c, Phase::Calls),
                        (Some(s), _) => (s, Phase::Stopped),
                        _ => (rest.len() - held(rest, markers), Phase::Answer),
                    };
                    push(&mut out, Piece::Content(rest[..end].to_string()));
                    self.sent += end;
                    if phase == Phase::Stopped {
                        self.raw.truncate(self.sent);
                    }
                    self.phase = phase;
                    return out;
                }
                Phase::Calls | Phase::Stopped => return out,
            }
        }
    }

    /// The rest, once the answer is done: text held back, and the calls.
    pub fn finish(&mut self) -> Ending {
        let rest = self.raw[self.sent.min(self.raw.len())..].to_string();
        let mut ending = Ending {
            stopped: self.phase == Phase::Stopped,
            ..Ending::default()
        };
        match (self.phase, self.calls) {
            (Phase::Thinking, _) => push(&mut ending.pieces, Piece::Reasoning(rest)),
            (Phase::Calls, Some(format)) => {
                let parsed = format.parse(&rest);
                match parsed.calls.is_empty() {
                    // A call that could not be read is the model's text.
                    true => push(&mut ending.pieces, Piece::Content(rest)),
                    false => ending.calls = parsed.calls,
                }
            }
            (Phase::Stopped, _) => {}
            _ => push(&mut ending.pieces, Piece::Content(rest)),
        }
        self.sent = self.raw.len();
        ending
    }
}

fn push(out: &mut Vec<Piece>, piece: Piece) {
    let empty = match &piece {
        Piece::Reasoning(t) | Piece::Content(t) => t.is_empty(),
    };
    if !empty {
        out.push(piece);
    }
}

/// How many bytes at the end of `text` could be the start of a marker,
/// and so are held until the next text says.
fn held<'a>(text: &str, markers: impl IntoIterator<Item = &'a str>) -> usize {
    let mut keep = 0;
    for marker in markers {
        let longest = (marker.len() - 1).min(text.len());
        for n in (keep + 1..=longest).rev() {
            let start = text.len() - n;
            if text.is_char_boundary(start) && marker.starts_with(&text[start..]) {
                keep = n;
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `text` lets out, fed in pieces cut at every byte.
    fn shaped_every_split(
        text: &str,
        stops: &[&str],
        calls: Option<ToolFormat>,
    ) -> (String, String, Ending) {
        let mut first: Option<(String, String, usize, bool)> = None;
        for cut in 0..=text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            let mut s = Shaper::new(stops.iter().map(|s| s.to_string()).collect(), calls, true);
            let mut pieces = s.push(&text[..cut]);
            pieces.extend(s.push(&text[cut..]));
            let ending = s.finish();
            pieces.extend(ending.pieces.iter().cloned());
            let (mut reasoning, mut content) = (String::new(), String::new());
            for p in pieces {
                match p {
                    Piece::Reasoning(t) => reasoning.push_str(&t),
                    Piece::Content(t) => content.push_str(&t),
                }
            }
            let seen = (reasoning, content, ending.calls.len(), ending.stopped);
            match &first {
                None => first = Some(seen),
                Some(f) => assert_eq!(f, &seen, "cut at {cut}"),
            }
        }
        let (r, c, _, _) = first.clone().unwrap();
        let mut s = Shaper::new(stops.iter().map(|s| s.to_string()).collect(), calls, true);
        s.push(text);
        (r, c, s.finish())
    }

    #[test]
    fn a_stop_string_ends_the_answer_wherever_the_stream_splits() {
        let (_, content, ending) = shaped_every_split("One, two. END three", &["END", "xyz"], None);
        assert_eq!(content, "One, two. ");
        assert!(ending.stopped);
        // A marker's prefix that turns out to be text is let out whole.
        let (_, content, ending) = shaped_every_split("EN and xy", &["END", "xyz"], None);
        assert_eq!(content, "EN and xy");
        assert!(!ending.stopped);
    }

    #[test]
    fn thinking_goes_apart_and_calls_come_out_at_the_end() {
        let text = "<think>Weather first.</think>\n\nLet me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (reasoning, content, ending) =
            shaped_every_split(text, &["</tool_call>"], Some(ToolFormat::Hermes));
        assert_eq!(reasoning, "Weather first.");
        assert_eq!(content, "Let me look.\n");
        assert_eq!(ending.calls.len(), 1);
        assert_eq!(ending.calls[0].name, "get_weather");
        assert_eq!(ending.calls[0].arguments["city"], "Paris");
    }

    #[test]
    fn a_broken_call_is_text() {
        let (_, content, ending) = shaped_every_split(
            "Sure <tool_call>\n{\"name\": ",
            &[],
            Some(ToolFormat::Hermes),
        );
        assert_eq!(content, "Sure <tool_call>\n{\"name\": ");
        assert!(ending.calls.is_empty());
    }

    /// A forced answer is calls from its first byte, in every format: a
    /// Mistral answer's array comes without its control token.
    #[test]
    fn a_forced_answer_is_read_whole_as_calls() {
        let cases = [
            (
                ToolFormat::Mistral,
                " [{\"name\": \"f\", \"arguments\": {\"a\": 1}}]",
            ),
            (
                ToolFormat::Hermes,
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>",
            ),
            (
                ToolFormat::Llama3,
                "{\"name\": \"f\", \"parameters\": {\"a\": 1}}",
            ),
        ];
        for (format, text) in cases {
            let mut s = Shaper::calls_only(vec!["a".into()], format);
            let shown: Vec<Piece> = text.chars().flat_map(|c| s.push(&c.to_string())).collect();
            let ending = s.finish();
            assert!(shown.is_empty() && ending.pieces.is_empty(), "{format:?}");
            assert_eq!(ending.calls.len(), 1, "{format:?}");
            assert_eq!(ending.calls[0].name, "f");
            assert_eq!(ending.calls[0].arguments["a"], 1);
        }
        // Cut short of a call, it is the model's text.
        let mut s = Shaper::calls_only(Vec::new(), ToolFormat::Mistral);
        s.push(" [{\"name\": \"f");
        assert_eq!(
            s.finish().pieces,
            vec![Piece::Content(" [{\"name\": \"f".into())]
        );
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let (_, content, _) = shaped_every_split("glaze ✓ 釉薬 done", &["✓✓"], None);
        assert_eq!(content, "glaze ✓ 釉薬 done");
    }
}
