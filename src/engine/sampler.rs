//! Token sampling with the user's settings.
//!
//! kalosm's own `GenerationParameters` ignore top-p locally and reseed the RNG
//! at every token, so kiln hands kalosm its own sampler: repetition penalty,
//! temperature, top-p, then a draw from one RNG seeded once per turn (greedy
//! when the temperature is 0). Token bans let `kiln bench` decode a fixed
//! number of tokens past the end-of-turn token, as llama-bench does.

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
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: Option<u64>,
    pub max_tokens: u32,
}

impl Default for SamplerSettings {
    fn default() -> Self {
        SamplerSettings {
            temperature: 0.7,
            top_p: 0.9,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
            max_tokens: 512,
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
}

impl KilnSampler {
    pub fn new(settings: &SamplerSettings, banned: Vec<TID>) -> Self {
        let mut chain = SamplerChain::new();
        if settings.repeat_penalty != 1.0 {
            chain += SampleRepetition::default()
                .penalty(settings.repeat_penalty)
                .last_n(settings.repeat_last_n);
        }
        if settings.temperature == 0.0 {
            chain += SampleGreedy::default();
        } else {
            chain += SampleTemperature::default().temperature(settings.temperature);
            if settings.top_p < 1.0 {
                chain += SampleTopP::default().p(settings.top_p).min_keep(1);
            }
            chain += SampleRandDistrib::default();
        }
        let rng = match settings.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        KilnSampler { chain, rng, banned }
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
