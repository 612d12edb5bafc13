//! Prompt-lookup drafting (`--lookup`): the tokens that followed the last
//! earlier place the context's newest few tokens appeared are guessed to
//! follow again, and verified in one batch with the token being decoded.
//! It needs no second model, and pays when an answer quotes its context
//! (an agent rewriting a file, code edited in place).
//!
//! The model's own choice is sampled at every drafted position, and a
//! draft is kept only while it matches: each token is still drawn from the
//! model's distribution (greedy output is the same token for token), and
//! a draft changes only how many tokens one decode yields.
//!
//! Verifying a draft makes a decode bigger. On a compute-bound machine
//! (a few CPU cores) that costs nearly as much as decoding the drafted
//! tokens one by one, so a draft that is often wrong makes a turn slower.
//! The governor measures both as it goes and rests drafting while it does
//! not pay.

use llama_cpp_2::token::LlamaToken;

/// The longest and shortest run of tokens matched to find a draft.
const NGRAM_MAX: usize = 4;
const NGRAM_MIN: usize = 2;
/// How far back a match is looked for, in tokens.
const WINDOW: usize = 16_384;

/// Up to `max` tokens guessed to follow `cache` and then `last` (the
/// token chosen, not yet decoded), from the most recent earlier place the
/// last few of them appeared (the longest match first). Read in place: the
/// context is not copied, this runs every decode step.
pub(super) fn draft(cache: &[LlamaToken], last: LlamaToken, max: usize) -> Vec<LlamaToken> {
    let n = cache.len() + 1;
    let token = |i: usize| cache.get(i).copied().unwrap_or(last);
    if max == 0 {
        return Vec::new();
    }
    let start = n.saturating_sub(WINDOW);
    for len in (NGRAM_MIN..=NGRAM_MAX.min(n - 1)).rev() {
        let tail: Vec<LlamaToken> = (n - len..n).map(token).collect();
        // The newest earlier occurrence that has tokens after it; it ends
        // before `last`, so it lies in `cache`.
        let found = (start..n - len)
            .rev()
            .find(|&at| cache[at..at + len] == tail[..]);
        if let Some(at) = found {
            let from = at + len;
            return (from..(from + max).min(n)).map(token).collect();
        }
    }
    Vec::new()
}

/// Decode steps before drafting is tried again, the first time it does
/// not pay; the rest doubles each time it still does not, up to the most.
const FIRST_REST: usize = 256;
const LONGEST_REST: usize = 8192;
/// Drafted steps measured before drafting is judged.
const JUDGE_AFTER: usize = 4;
/// Plain steps measured before drafting starts.
const BASELINE_STEPS: usize = 4;
/// Weight of the newest step in the running means.
const WEIGHT: f64 = 0.2;

/// Whether drafting pays on this machine and model: the running time per
/// token of steps with a draft and of steps without one. One for the
/// worker, kept across runs: what a verify costs against a plain decode is
/// the machine's, and a new turn should not pay to learn it again.
///
/// A drafted step's cost per token is its mean time over its mean tokens,
/// not a mean of each step's time per token: a draft of eight kept is one
/// step worth eight tokens, and one rejected draft after it must not
/// outweigh it.
#[derive(Clone, Debug, Default)]
pub(super) struct Governor {
    plain_ms: Option<f64>,
    plain_steps: usize,
    drafted_ms: Option<f64>,
    drafted_tokens: Option<f64>,
    drafted_steps: usize,
    /// Steps left before drafting is tried again, and the next rest.
    rest: usize,
    next_rest: usize,
    /// Times drafting was rested for not paying.
    pub(super) rested: usize,
    /// Draft every step all the same (`--draft-always`).
    always: bool,
}

fn mean(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |m| m + WEIGHT * (new - m))
}

impl Governor {
    pub(super) fn new(always: bool) -> Governor {
        Governor {
            always,
            ..Governor::default()
        }
    }

    /// Whether a sequence may draft this step.
    pub(super) fn allows(&mut self) -> bool {
        if self.always {
            return true;
        }
        if self.rest > 0 {
            self.rest -= 1;
            return false;
        }
        self.plain_steps >= BASELINE_STEPS
    }

    /// Whether drafting rests now for not paying.
    pub(super) fn resting(&self) -> bool {
        !self.always && self.rest > 0
    }

    /// A decode step of `ms` that gave a sequence `tokens`; `drafted` when
    /// a draft was verified or the draft model was asked for one (a step
    /// where it was unsure still paid for asking).
    pub(super) fn record(&mut self, ms: f64, tokens: usize, drafted: bool) {
        if !drafted {
            self.plain_ms = Some(mean(self.plain_ms, ms / tokens.max(1) as f64));
            self.plain_steps += 1;
            return;
        }
        self.drafted_ms = Some(mean(self.drafted_ms, ms));
        self.drafted_tokens = Some(mean(self.drafted_tokens, tokens.max(1) as f64));
        self.drafted_steps += 1;
        if self.always || self.drafted_steps < JUDGE_AFTER {
            return;
        }
        if self.pays() {
            self.next_rest = FIRST_REST;
        } else {
            self.rest = self.next_rest.max(FIRST_REST);
            self.next_rest = (self.rest * 2).min(LONGEST_REST);
            self.rested += 1;
            self.drafted_ms = None;
            self.drafted_tokens = None;
            self.drafted_steps = 0;
        }
    }

    /// Whether a drafted step's token costs less than a plain one's.
    fn pays(&self) -> bool {
        match (self.drafted_ms, self.drafted_tokens, self.plain_ms) {
            (Some(ms), Some(tokens), Some(plain)) => ms / tokens < plain,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken).collect()
    }

    /// `draft` on a whole context, its last token the one chosen.
    fn draft(context: &[LlamaToken], max: usize) -> Vec<LlamaToken> {
        match context.split_last() {
            Some((last, cache)) => super::draft(cache, *last, max),
            None => Vec::new(),
        }
    }

    #[test]
    fn a_draft_is_what_followed_the_newest_earlier_match() {
        // "1 2 3" appeared twice before; the newest is followed by 9 8.
        let context = tokens(&[1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 7, 1, 2, 3]);
        assert_eq!(draft(&context, 2), tokens(&[9, 8]));
        assert_eq!(draft(&context, 10), tokens(&[9, 8, 7, 1, 2, 3]));
        assert!(draft(&context, 0).is_empty());
        // No repeated pair: nothing to draft.
        assert!(draft(&tokens(&[1, 2, 3, 4, 5]), 4).is_empty());
        assert!(draft(&tokens(&[7]), 4).is_empty());
        assert!(draft(&[], 4).is_empty());
    }

    #[test]
    fn the_longest_match_wins() {
        // The pair "5 6" last came before 1, but "4 5 6" before 2.
        let context = tokens(&[4, 5, 6, 2, 0, 5, 6, 1, 4, 5, 6]);
        assert_eq!(draft(&context, 1), tokens(&[2]));
    }

    #[test]
    fn drafting_that_does_not_pay_rests_longer_each_time() {
        let mut g = Governor::default();
        // No baseline yet: plain steps first.
        assert!(!g.allows());
        for _ in 0..BASELINE_STEPS {
            g.record(10.0, 1, false);
        }
        assert!(g.allows());
        // Drafts that are never kept cost more per token.
        let mut rests = Vec::new();
        for _ in 0..3 {
            for _ in 0..JUDGE_AFTER {
                g.record(14.0, 1, true);
            }
            rests.push(g.rest);
            while !g.allows() {}
        }
        assert_eq!(rests, vec![FIRST_REST, FIRST_REST * 2, FIRST_REST * 4]);
        assert_eq!(g.rested, 3);
        // Drafts that are mostly kept pay, and go on.
        for _ in 0..JUDGE_AFTER * 4 {
            g.record(14.0, 4, true);
            assert!(g.allows());
        }
        assert_eq!(g.rested, 3);
        // One rejected draft after drafts mostly kept does not rest it: a
        // step worth eight tokens outweighs a step worth one.
        let mut g = Governor::default();
        for _ in 0..BASELINE_STEPS {
            g.record(8.0, 1, false);
        }
        for tokens in [2, 9, 9] {
            g.record(20.0, tokens, true);
        }
        g.record(20.0, 1, true);
        assert_eq!(g.rested, 0);
        assert!(g.allows());
    }
}
