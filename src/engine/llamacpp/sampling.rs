//! Token choice in llama.cpp's own sampler chain, in llama.cpp's order:
//! logit bias (bans), penalties over the recent tokens, top-k, then top-p,
//! min-p, temperature and a seeded draw (greedy at temperature 0).
//!
//! The chain is split after top-k so that a constrained run checks only the
//! few candidates left there against its format, and the rest of the chain
//! samples among the ones it allows.
//!
//! With top-k (or greedy), the chain is handed a shortlist instead of the
//! whole vocabulary: the k most likely tokens, plus as many as there are
//! recent and banned tokens, plus the recent ones themselves. Only those
//! can be in the top k after the penalties and bans (a penalty moves only
//! a recent token, a ban only a banned one), so the chain ends with the
//! same candidates (up to how exact ties are ordered); but it no longer builds and penalizes 152k entries a
//! token on Qwen's vocabulary, which cost a millisecond here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

use crate::engine::sampler::SamplerSettings;

/// With a constraint and no top-k of the user's, the most likely tokens
/// checked against it per step before the whole vocabulary is.
const CONSTRAINED_TOP_K: i32 = 64;

/// How a run samples: plain data, made on the caller's side.
#[derive(Clone, Debug, Default)]
pub struct Sampling {
    pub settings: SamplerSettings,
    /// Tokens never chosen (`kiln bench` bans the end of turn, as
    /// llama-bench decodes past it).
    pub banned: Vec<u32>,
}

/// A sequence's chain, made on the worker thread at its first token.
pub(super) struct Chain {
    /// Bans, penalties and top-k: what decides the candidates a constraint
    /// checks. The penalties keep the recent tokens, so every chosen token
    /// is accepted here.
    head: LlamaSampler,
    /// top-p, min-p, temperature and the draw.
    tail: LlamaSampler,
    /// The k of top-k (1 when greedy) when a shortlist is enough.
    keep: Option<usize>,
    /// The tokens the penalties see, as the chain keeps them.
    recent: VecDeque<LlamaToken>,
    last_n: usize,
    banned: usize,
    /// The candidates' storage, reused for every token.
    buf: Vec<LlamaTokenData>,
}

/// Whether a token may come next, and if so whether it completes the
/// format.
pub(super) type Check<'a> = &'a dyn Fn(LlamaToken) -> Option<bool>;

impl Chain {
    /// The chain for `sampling` over `n_vocab` tokens; `recent` are the
    /// tokens before the answer (the penalties count them), and
    /// `constrained` whether a format will check its candidates.
    pub(super) fn new(
        sampling: &Sampling,
        n_vocab: i32,
        recent: &[LlamaToken],
        constrained: bool,
    ) -> Chain {
        let s = &sampling.settings;
        let mut head = Vec::new();
        if !sampling.banned.is_empty() {
            let bans: Vec<LlamaLogitBias> = sampling
                .banned
                .iter()
                .map(|&t| LlamaLogitBias::new(LlamaToken(t as i32), f32::NEG_INFINITY))
                .collect();
            head.push(LlamaSampler::logit_bias(n_vocab, &bans));
        }
        let last_n = i32::try_from(s.repeat_last_n).unwrap_or(i32::MAX);
        let penalized =
            s.repeat_penalty != 1.0 || s.frequency_penalty != 0.0 || s.presence_penalty != 0.0;
        if penalized && last_n > 0 {
            head.push(LlamaSampler::penalties(
                n_vocab,
                last_n,
                s.repeat_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            ));
        }
        let greedy = s.temperature == 0.0;
        let top_k = match i32::try_from(s.top_k).unwrap_or(i32::MAX) {
            0 if constrained => CONSTRAINED_TOP_K,
            // Only the first token counts when greedy.
            _ if greedy && !constrained => 0,
            k => k,
        };
        if top_k > 0 {
            head.push(LlamaSampler::top_k(top_k));
        }
        let tail = if greedy {
            vec![LlamaSampler::greedy()]
        } else {
            let mut tail = Vec::new();
            if s.top_p < 1.0 {
                tail.push(LlamaSampler::top_p(s.top_p, 1));
            }
            if s.min_p > 0.0 {
                tail.push(LlamaSampler::min_p(s.min_p, 1));
            }
            tail.push(LlamaSampler::temp(s.temperature));
            tail.push(LlamaSampler::dist(seed32(s.seed)));
            tail
        };
        let keep = match (greedy, top_k) {
            (true, 0) => Some(1),
            (_, 0) => None,
            (_, k) => Some(k as usize),
        };
        let mut head = LlamaSampler::chain(head, true);
        head.accept_many(recent);
        let last_n = match penalized {
            true => last_n.max(0) as usize,
            false => 0,
        };
        Chain {
            head,
            tail: LlamaSampler::chain(tail, true),
            keep,
            recent: recent[recent.len().saturating_sub(last_n)..]
                .iter()
                .copied()
                .collect(),
            last_n,
            banned: sampling.banned.len(),
            buf: Vec::with_capacity(n_vocab.max(0) as usize),
        }
    }

    /// The chain's candidates: the shortlist when one is enough, else the
    /// whole vocabulary.
    fn candidates(&self, logits: &[f32], buf: &mut Vec<LlamaTokenData>) {
        buf.clear();
        let token = |id: usize| LlamaTokenData::new(LlamaToken(id as i32), logits[id], 0.0);
        let Some(k) = self.keep else {
            buf.extend((0..logits.len()).map(token));
            return;
        };
        let mut recent: Vec<usize> = self.recent.iter().map(|t| t.0 as usize).collect();
        recent.sort_unstable();
        recent.dedup();
        recent.retain(|&id| id < logits.len());
        let top = top_ids(logits, k + recent.len() + self.banned);
        buf.extend(top.iter().copied().map(token));
        buf.extend(recent.into_iter().filter(|id| !top.contains(id)).map(token));
    }

    /// Choose a token from `logits` (one per vocabulary entry), among those
    /// `check` allows when there is one; returns it and whether it completes
    /// the format.
    pub(super) fn pick(
        &mut self,
        logits: &[f32],
        check: Option<Check>,
    ) -> Result<(LlamaToken, bool), String> {
        let mut buf = std::mem::take(&mut self.buf);
        self.candidates(logits, &mut buf);
        let mut candidates = LlamaTokenDataArray::new(buf, false);
        self.head.apply(&mut candidates);
        let mut complete = Vec::new();
        if let Some(check) = check {
            complete = allowed(&mut candidates, logits, check)?;
        }
        self.tail.apply(&mut candidates);
        let chosen = candidates
            .selected
            .filter(|&i| i < candidates.data.len())
            .ok_or("the sampler chose no token")?;
        let token = candidates.data[chosen].id();
        // The tail may have reordered the candidates.
        let completes = complete.iter().any(|&(t, done)| t == token && done);
        self.head.accept(token);
        if self.last_n > 0 {
            if self.recent.len() == self.last_n {
                self.recent.pop_front();
            }
            self.recent.push_back(token);
        }
        self.buf = candidates.data;
        Ok((token, completes))
    }
}

/// The ids of the `n` highest logits, in one pass.
fn top_ids(logits: &[f32], n: usize) -> Vec<usize> {
    #[derive(PartialEq)]
    struct Logit(f32);
    impl Eq for Logit {}
    impl PartialOrd for Logit {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Logit {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&other.0)
        }
    }
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    // The lowest of the best so far on top, and its logit apart: the loop
    // is one float comparison a token (kiln builds at opt-level 1).
    let mut best: BinaryHeap<Reverse<(Logit, usize)>> = BinaryHeap::with_capacity(n + 1);
    for (id, &l) in logits[..n].iter().enumerate() {
        best.push(Reverse((Logit(l), id)));
    }
    let mut low = best.peek().map_or(f32::NEG_INFINITY, |Reverse((l, _))| l.0);
    #[allow(clippy::needless_range_loop)]
    for id in n..logits.len() {
        let l = logits[id];
        if l > low {
            best.pop();
            best.push(Reverse((Logit(l), id)));
            low = best.peek().map_or(f32::NEG_INFINITY, |Reverse((l, _))| l.0);
        }
    }
    best.into_iter().map(|Reverse((_, id))| id).collect()
}

/// Keep only the candidates `check` allows (or, when none of them is, the
/// most likely token of the whole vocabulary that is); returns each kept
/// one with whether it completes the format.
fn allowed(
    candidates: &mut LlamaTokenDataArray,
    logits: &[f32],
    check: Check,
) -> Result<Vec<(LlamaToken, bool)>, String> {
    let mut complete = Vec::new();
    candidates.data.retain(|c| match check(c.id()) {
        Some(done) => {
            complete.push((c.id(), done));
            true
        }
        None => false,
    });
    if candidates.data.is_empty() {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        let (id, done) = order
            .into_iter()
            .find_map(|id| check(LlamaToken(id as i32)).map(|done| (id, done)))
            .ok_or("no token can continue the required answer format")?;
        candidates
            .data
            .push(LlamaTokenData::new(LlamaToken(id as i32), logits[id], 0.0));
        complete.push((LlamaToken(id as i32), done));
    }
    candidates.selected = None;
    Ok(complete)
}

/// llama.cpp's samplers take a 32-bit seed, and read its all-ones value as
/// "pick one at random".
fn seed32(seed: Option<u64>) -> u32 {
    const RANDOM: u32 = u32::MAX;
    match seed {
        None => RANDOM,
        Some(s) => match (s ^ (s >> 32)) as u32 {
            RANDOM => RANDOM - 1,
            folded => folded,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(f: impl FnOnce(&mut SamplerSettings)) -> Sampling {
        let mut settings = SamplerSettings {
            repeat_penalty: 1.0,
            ..SamplerSettings::default()
        };
        f(&mut settings);
        Sampling {
            settings,
            banned: Vec::new(),
        }
    }

    /// A draw at temperature 1 with every cut off but what `f` sets.
    fn plain_draw(seed: u64, f: impl FnOnce(&mut SamplerSettings)) -> Sampling {
        settings(|s| {
            (s.top_k, s.top_p, s.min_p, s.temperature) = (0, 1.0, 0.0, 1.0);
            s.seed = Some(seed);
            f(s);
        })
    }

    /// Logits whose probabilities are (about) the given ones.
    fn logits_for(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Which tokens a chain may draw from `logits`, over many seeds.
    fn drawn(sampling: impl Fn(u64) -> Sampling, logits: &[f32]) -> Vec<i32> {
        let mut seen: Vec<i32> = (0..400)
            .map(|seed| {
                let mut chain = Chain::new(&sampling(seed), logits.len() as i32, &[], false);
                chain.pick(logits, None).unwrap().0 .0
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    #[test]
    fn top_p_keeps_the_smallest_set_past_its_mass() {
        // 0.5 + 0.3 = 0.8 < 0.85, so the third token is needed too.
        let logits = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        let top_p = |p| move |seed| plain_draw(seed, |s| s.top_p = p);
        assert_eq!(drawn(top_p(0.85), &logits), vec![0, 1, 2]);
        assert_eq!(drawn(top_p(0.75), &logits), vec![0, 1]);
        assert_eq!(drawn(top_p(1.0), &logits), vec![0, 1, 2, 3]);
    }

    #[test]
    fn min_p_cuts_below_its_share_of_the_top_token() {
        // 0.05 of the top token's 0.6 is 0.03: the 0.02 token goes.
        let logits = logits_for(&[0.6, 0.3, 0.08, 0.02]);
        let min_p = |p| move |seed| plain_draw(seed, |s| s.min_p = p);
        assert_eq!(drawn(min_p(0.05), &logits), vec![0, 1, 2]);
        assert_eq!(drawn(min_p(0.4), &logits), vec![0, 1]);
    }

    #[test]
    fn top_k_one_is_greedy_and_bans_hold() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let k1 = |seed| {
            settings(|s| {
                s.top_k = 1;
                s.temperature = 1.5;
                s.seed = Some(seed);
            })
        };
        assert_eq!(drawn(k1, &logits), vec![1]);
        let greedy = settings(|s| s.temperature = 0.0);
        let mut chain = Chain::new(&greedy, 4, &[], false);
        assert_eq!(chain.pick(&logits, None).unwrap().0, LlamaToken(1));
        let banned = Sampling {
            banned: vec![1],
            ..greedy
        };
        let mut chain = Chain::new(&banned, 4, &[], false);
        assert_eq!(chain.pick(&logits, None).unwrap().0, LlamaToken(2));
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits = logits_for(&[0.3, 0.3, 0.2, 0.2]);
        let draws = |seed| {
            let hot = settings(|s| {
                s.temperature = 1.5;
                s.top_p = 1.0;
                s.seed = Some(seed);
            });
            let mut chain = Chain::new(&hot, 4, &[], false);
            (0..48)
                .map(|_| chain.pick(&logits, None).unwrap().0 .0)
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        assert!(a.iter().any(|&t| t != a[0]), "a hot sampler varies: {a:?}");
    }

    /// The repeat penalty counts the tokens before the answer and each one
    /// chosen since.
    #[test]
    fn penalties_remember_recent_tokens() {
        let logits = vec![2.0, 1.9, 0.0];
        let penalized = settings(|s| {
            s.temperature = 0.0;
            s.repeat_penalty = 1.5;
        });
        let mut chain = Chain::new(&penalized, 3, &[LlamaToken(0)], false);
        assert_eq!(chain.pick(&logits, None).unwrap().0, LlamaToken(1));
        // Token 1 now has been seen too: 2.0 / 1.5 > 1.9 / 1.5.
        assert_eq!(chain.pick(&logits, None).unwrap().0, LlamaToken(0));
        let freq = settings(|s| {
            s.temperature = 0.0;
            s.frequency_penalty = 0.5;
        });
        let mut chain = Chain::new(&freq, 3, &[LlamaToken(0)], false);
        assert_eq!(chain.pick(&logits, None).unwrap().0, LlamaToken(1));
    }

    #[test]
    fn a_constraint_chooses_among_the_tokens_it_allows() {
        let logits = vec![5.0, 4.0, 3.0, 2.0, 1.0];
        let greedy = settings(|s| s.temperature = 0.0);
        let odd = |t: LlamaToken| (t.0 % 2 == 1).then_some(t.0 == 3);
        let mut chain = Chain::new(&greedy, 5, &[], true);
        assert_eq!(
            chain.pick(&logits, Some(&odd)).unwrap(),
            (LlamaToken(1), false)
        );
        // Beyond top-k: the whole vocabulary is searched.
        let k1 = settings(|s| {
            s.temperature = 0.0;
            s.top_k = 1;
        });
        let mut chain = Chain::new(&k1, 5, &[], true);
        let only_3 = |t: LlamaToken| (t.0 == 3).then_some(true);
        assert_eq!(
            chain.pick(&logits, Some(&only_3)).unwrap(),
            (LlamaToken(3), true)
        );
        let none = |_: LlamaToken| None;
        assert!(chain.pick(&logits, Some(&none)).is_err());
    }

    /// The shortlist leaves the chain the candidates the whole vocabulary
    /// would: the same tokens drawn, seed for seed, with penalties that
    /// lower and raise recent tokens and with bans.
    #[test]
    fn a_shortlist_draws_what_the_whole_vocabulary_draws() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut logits: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 10.0
            })
            .collect();
        // A recent token far down the list, which the presence "penalty"
        // below raises into the top.
        logits[4321] = -3.0;
        let recent: Vec<LlamaToken> = [17, 4321, 99, 17, 2500].map(LlamaToken).to_vec();
        for (temperature, top_k) in [(0.0, 0), (0.8, 40), (1.0, 5), (0.0, 3)] {
            for seed in 0..40 {
                let sampling = Sampling {
                    settings: SamplerSettings {
                        temperature,
                        top_k,
                        repeat_penalty: 1.3,
                        repeat_last_n: 4,
                        frequency_penalty: 0.2,
                        presence_penalty: -2.0,
                        seed: Some(seed),
                        ..SamplerSettings::default()
                    },
                    banned: vec![1, 2, 3],
                };
                let mut short = Chain::new(&sampling, 5000, &recent, false);
                let mut whole = Chain::new(&sampling, 5000, &recent, false);
                assert!(short.keep.is_some());
                whole.keep = None;
                for step in 0..12 {
                    let a = short.pick(&logits, None).unwrap();
                    let b = whole.pick(&logits, None).unwrap();
                    assert_eq!(a, b, "t={temperature} k={top_k} seed {seed} step {step}");
                }
            }
        }
        let mut big = logits.clone();
        big.sort_by(|a, b| b.total_cmp(a));
        let mut top = top_ids(&logits, 7);
        top.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        assert_eq!(top.iter().map(|&i| logits[i]).collect::<Vec<_>>(), big[..7]);
    }

    #[test]
    fn seeds_fold_to_32_bits_without_meaning_random() {
        assert_eq!(seed32(None), u32::MAX);
        assert_ne!(seed32(Some(u32::MAX as u64)), u32::MAX);
        assert_ne!(seed32(Some(1)), seed32(Some(2)));
    }
}
