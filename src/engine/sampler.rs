//! Token sampling with the user's settings.
//!
//! The settings are llama.cpp's (and its defaults for top-k and min-p); the
//! llama.cpp engine samples them in llama.cpp's own chain
//! (`engine::llamacpp::sampling`).
//!
//! kalosm's own `GenerationParameters` ignore top-p locally and reseed the RNG
//! at every token, so kiln hands the kalosm engine its own sampler, in
//! llama.cpp's order: penalties, top-k, top-p, min-p, temperature, then a
//! draw from one RNG seeded once per turn (greedy when the temperature is
//! 0). Token bans let `kiln bench` decode a fixed number of tokens past the
//! end-of-turn token, as llama-bench does.

use llm_samplers::prelude::*;
use llm_samplers::types::{HasSamplerResources, Logits, SamplerError, TID};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerSettings {
    pub temperature: f32,
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Drop tokens less likely than this share of the most likely one.
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Subtracted from a recent token's logit once per time it occurs.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of any recent token.
    pub presence_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: u32,
    /// Tokens drafted by prompt lookup per step (llama.cpp engine); 0 is
    /// off. Output is the same as without it.
    pub lookup: u32,
    /// Whether a reasoning model thinks before it answers, for templates
    /// that take `enable_thinking` (Qwen3); `None` is the template's default.
    pub thinking: Option<bool>,
}

impl Default for SamplerSettings {
    fn default() -> Self {
        SamplerSettings {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 512,
            lookup: 0,
            thinking: None,
        }
    }
}

impl SamplerSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// The sampler kiln passes to kalosm for one turn.
#[derive(Debug)]
pub struct KilnSampler {
    chain: SamplerChain,
    rng: StdRng,
    banned: Vec<TID>,
    repeat_penalty: f32,
    repeat_last_n: usize,
}

impl KilnSampler {
    pub fn new(settings: &SamplerSettings, banned: Vec<TID>) -> Self {
        let mut chain = SamplerChain::new();
        if settings.frequency_penalty != 0.0 || settings.presence_penalty != 0.0 {
            chain += SampleFreqPresence::new(
                settings.frequency_penalty,
                settings.presence_penalty,
                settings.repeat_last_n,
            );
        }
        if settings.temperature == 0.0 {
            chain += SampleGreedy::default();
        } else {
            if settings.top_k > 0 {
                chain += SampleTopK::new(settings.top_k as usize, 1);
            }
            if settings.top_p < 1.0 {
                chain += SampleTopP::default().p(settings.top_p).min_keep(1);
            }
            if settings.min_p > 0.0 {
                chain += SampleMinP::new(settings.min_p, 1);
            }
            chain += SampleTemperature::default().temperature(settings.temperature);
            chain += SampleRandDistrib::default();
        }
        let rng = match settings.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        KilnSampler {
            chain,
            rng,
            banned,
            repeat_penalty: settings.repeat_penalty,
            repeat_last_n: settings.repeat_last_n,
        }
    }

    /// The repetition penalty, as llm-samplers' `SampleRepetition` applies
    /// it (each recent token's logit once: divided when positive, multiplied
    /// when not), but looked up by token instead of scanning the whole
    /// vocabulary against every recent token: that scan was 3 million
    /// comparisons a token for a 49k vocabulary, a tenth of decode time.
    fn penalize_repeats(&self, recent: &[TID], logits: &mut Logits) {
        let recent = &recent[recent.len().saturating_sub(self.repeat_last_n)..];
        let mut tokens = recent.to_vec();
        tokens.sort_unstable();
        tokens.dedup();
        let mut changed = false;
        for t in tokens {
            // A full vocabulary is in token order; a few allowed tokens are not.
            let at = match logits.get(t as usize) {
                Some(l) if l.token_id == t => Some(t as usize),
                _ => logits.iter().position(|l| l.token_id == t),
            };
            if let Some(l) = at.map(|i| &mut logits[i]) {
                l.logit = if l.logit <= 0.0 {
                    l.logit * self.repeat_penalty
                } else {
                    l.logit / self.repeat_penalty
                };
                changed = true;
            }
        }
        if changed {
            logits.set_sorted(false);
            logits.set_softmax(false);
        }
    }
}

/// Resources for a sampler chain: the previous tokens, and an RNG.
#[derive(Debug)]
pub(crate) struct Resources<'a> {
    pub(crate) rng: &'a mut StdRng,
    pub(crate) last_tokens: Vec<TID>,
}

impl HasSamplerResources for Resources<'_> {
    fn with_rng_mut(
        &mut self,
        fun: &mut dyn FnMut(&mut dyn rand::RngCore),
    ) -> Result<(), SamplerError> {
        fun(self.rng);
        Ok(())
    }

    fn with_last_tokens(&self, fun: &mut dyn FnMut(&[TID])) -> Result<(), SamplerError> {
        fun(&self.last_tokens);
        Ok(())
    }
}

impl Sampler for KilnSampler {
    fn sample<'a>(
        &mut self,
        res: &mut dyn HasSamplerResources,
        logits: &'a mut Logits,
    ) -> anyhow::Result<&'a mut Logits> {
        if !self.banned.is_empty() {
            logits.retain(|l| !self.banned.contains(&l.token_id));
            logits.set_softmax(false);
        }
        let mut last_tokens = Vec::new();
        let _ = res.with_last_tokens(&mut |t| last_tokens.extend_from_slice(t));
        if self.repeat_penalty != 1.0 && self.repeat_last_n > 0 {
            self.penalize_repeats(&last_tokens, logits);
        }
        let mut own = Resources {
            rng: &mut self.rng,
            last_tokens,
        };
        self.chain.sample(&mut own, logits)
    }

    fn sampled_token_id(&self) -> Option<TID> {
        self.chain.sampled_token_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct NoResources;
    impl HasSamplerResources for NoResources {}

    fn logits() -> Logits {
        Logits::try_from_iter([0.1f32, 3.0, 2.5, -1.0]).unwrap()
    }

    fn pick(settings: &SamplerSettings, banned: Vec<TID>) -> TID {
        let mut s = KilnSampler::new(settings, banned);
        let mut l = logits();
        s.sample_token(&mut NoResources, &mut l).unwrap().unwrap()
    }

    #[test]
    fn greedy_picks_the_top_token_and_respects_bans() {
        let greedy = SamplerSettings {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        };
        assert_eq!(pick(&greedy, vec![]), 1);
        assert_eq!(pick(&greedy, vec![1]), 2);
    }

    /// The same logits out as llm-samplers' own repetition sampler, on the
    /// whole vocabulary and on a few tokens out of order.
    #[test]
    fn repetition_penalty_matches_llm_samplers() {
        #[derive(Debug)]
        struct Recent(Vec<TID>);
        impl HasSamplerResources for Recent {
            fn with_last_tokens(&self, fun: &mut dyn FnMut(&[TID])) -> Result<(), SamplerError> {
                fun(&self.0);
                Ok(())
            }
        }
        let settings = SamplerSettings {
            repeat_penalty: 1.3,
            repeat_last_n: 3,
            ..Default::default()
        };
        let ours = KilnSampler::new(&settings, vec![]);
        let recent = Recent(vec![0, 2, 2, 3, 1]);
        let full = || Logits::try_from_iter([0.1f32, 3.0, 2.5, -1.0]).unwrap();
        let mut few = Logits::default();
        few.extend([3u32, 1].map(|token_id| llm_samplers::types::Logit {
            token_id,
            logit: 2.0,
            prob: 0.0,
        }));
        for logits in [full(), few] {
            let (mut a, mut b) = (logits.clone(), logits);
            ours.penalize_repeats(&recent.0, &mut a);
            let mut theirs = SampleRepetition::default().penalty(1.3).last_n(3);
            theirs
                .sample(&mut Recent(recent.0.clone()), &mut b)
                .unwrap();
            let values = |l: &Logits| l.iter().map(|l| (l.token_id, l.logit)).collect::<Vec<_>>();
            assert_eq!(values(&a), values(&b));
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let seeded = SamplerSettings {
            temperature: 1.5,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let draws = |s: &SamplerSettings| {
            let mut sampler = KilnSampler::new(s, vec![]);
            (0..32)
                .map(|_| {
                    sampler
                        .sample_token(&mut NoResources, &mut logits())
                        .unwrap()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let a = draws(&seeded);
        assert_eq!(a, draws(&seeded));
        assert!(a.iter().any(|&t| t != a[0]), "a hot sampler varies: {a:?}");
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = SamplerSettings {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
    }
}
