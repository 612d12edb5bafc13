//! A sequence's tokens with the text they spell, and llama.cpp's saved
//! state for a prefix of them: what a session holds and what each of the
//! worker's sequences holds, compared to reuse the longest shared prefix.

use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;

/// Tokens with the text they spell: the content of a session, and of the
/// KV cache.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Tokens {
    pub(super) ids: Vec<LlamaToken>,
    /// For each token, the byte of `text` its text ends at (the end of a
    /// whole tokenized block where its pieces do not spell the text).
    pub(super) ends: Vec<usize>,
    pub(super) text: Vec<u8>,
}

impl Tokens {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn push(&mut self, token: LlamaToken, piece: &[u8]) {
        self.text.extend_from_slice(piece);
        self.ids.push(token);
        self.ends.push(self.text.len());
    }

    pub(super) fn truncate(&mut self, keep: usize) {
        self.ids.truncate(keep);
        self.ends.truncate(keep);
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }

    /// How many leading tokens spell a prefix of `text` (ending where
    /// `boundary` allows).
    pub(super) fn shared_with(&self, text: &[u8], boundary: impl Fn(usize) -> bool) -> usize {
        let common = self
            .text
            .iter()
            .zip(text)
            .take_while(|(a, b)| a == b)
            .count();
        let mut keep = self.ends.partition_point(|&end| end <= common);
        while keep > 0 && !boundary(self.ends[keep - 1]) {
            keep -= 1;
        }
        keep
    }
}

/// llama.cpp's state of a session's first `tokens` tokens (the last token
/// a run chose is only computed when the next run needs it).
#[derive(Clone, Debug)]
pub(super) struct SavedState {
    pub(super) bytes: Arc<Vec<u8>>,
    pub(super) tokens: usize,
}

/// Whether a character of UTF-8 `text` starts at byte `at` (or the text
/// ends there).
pub(super) fn starts_char(text: &[u8], at: usize) -> bool {
    // Continuation bytes are 0b10xxxxxx.
    text.get(at).is_none_or(|b| (*b as i8) >= -0x40)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "abécd" in tokens that split the é between two byte tokens.
    fn tokens() -> Tokens {
        let mut t = Tokens::default();
        for (id, piece) in [(1, &b"ab"[..]), (2, &[0xC3]), (3, &[0xA9]), (4, b"cd")] {
            t.push(LlamaToken(id), piece);
        }
        t
    }

    #[test]
    fn the_shared_prefix_ends_between_tokens_and_characters() {
        let t = tokens();
        // "abéx": the three tokens that spell "abé".
        let text = "abéx".as_bytes();
        assert_eq!(t.shared_with(text, |at| starts_char(text, at)), 3);
        // "abêx" shares "ab" and the first byte of the character; a cut
        // there would leave half a character to tokenize.
        let text = "abêx".as_bytes();
        assert_eq!(t.shared_with(text, |_| true), 2);
        assert_eq!(t.shared_with(text, |at| starts_char(text, at)), 1);
        let mut cut = t.clone();
        cut.truncate(1);
        assert_eq!((cut.ids.len(), cut.text.as_slice()), (1, &b"ab"[..]));
    }
}
