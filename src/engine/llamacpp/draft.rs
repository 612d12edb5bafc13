//! Speculative decoding with a draft model (`--draft`): a small model with
//! the same vocabulary guesses the next tokens, greedily, and the model
//! verifies them in one batch with the token being decoded.
//!
//! The draft is deterministic (the draft model's likeliest token), so the
//! standard accept/reject rule (accept a drafted token with probability
//! p/q, else sample from what is left of p) comes down to sampling the
//! model's own token at each drafted position and keeping the draft while
//! they match: q is 1 for the drafted token, a match happens with
//! probability p, and a mismatch is a draw from p without that token. The
//! output is the model's distribution, and greedy output is token for
//! token what it is without a draft; the worker's verify does exactly
//! that, for this and for prompt lookup alike.
//!
//! The draft model keeps its own context on the worker thread, with a
//! sequence for each of the model's: it holds the tokens its sequence
//! holds (it reads a prompt once the model has, and catches up with what a
//! verify kept before each draft), so a draft costs one small decode per
//! drafted token.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::worker::{context_params, Settings, BATCH};
use crate::budget::grown_kv_cells;
pub use crate::window::DraftSettings;

/// Vocabulary sizes may differ by this many tokens (padding, a few added
/// special tokens), as llama.cpp's own check allows.
const MAX_VOCAB_DIFFERENCE: i32 = 128;
/// Tokens below this id are not compared (control tokens that families
/// number alike but name differently), as llama.cpp does.
const FIRST_COMPARED: i32 = 5;

/// Why `draft` cannot draft for `model`, in words: another kind of
/// vocabulary, other sizes, other start or end tokens, or a token spelled
/// differently. The draft's tokens are the model's tokens, so they must
/// be the same ones.
pub(super) fn incompatible(model: &LlamaModel, draft: &LlamaModel) -> Option<String> {
    let (m, d) = (model.vocab(), draft.vocab());
    if m.vocab_type() != d.vocab_type() {
        return Some(format!(
            "its vocabulary is {:?}, the model's {:?}",
            d.vocab_type(),
            m.vocab_type()
        ));
    }
    let (nm, nd) = (model.n_vocab(), draft.n_vocab());
    if (nm - nd).abs() > MAX_VOCAB_DIFFERENCE {
        return Some(format!("it has {nd} tokens, the model {nm}"));
    }
    if m.bos() != d.bos() || m.eos() != d.eos() {
        return Some(format!(
            "its start and end tokens are {} and {}, the model's {} and {}",
            d.bos().0,
            d.eos().0,
            m.bos().0,
            m.eos().0
        ));
    }
    (FIRST_COMPARED..nm.min(nd)).find_map(|id| {
        let token = LlamaToken(id);
        let (a, b) = (m.text(token), d.text(token));
        (a != b).then(|| {
            let show = |t: Option<&std::ffi::CStr>| {
                t.map_or("nothing".into(), |t| {
                    format!("{:?}", crate::visible::visible_line(&t.to_string_lossy()))
                })
            };
            format!("token {id} is {} in it, {} in the model", show(b), show(a))
        })
    })
}

/// The refusal, in one line naming both files.
pub(super) fn refusal(draft: &Path, model: &Path, why: &str) -> String {
    format!(
        "the draft model {} cannot draft for {}: {why}; a draft model must share the model's vocabulary (the same family, a smaller size)",
        draft.display(),
        model.display()
    )
}

/// The draft model's context and what each of its sequences holds.
pub(super) struct Drafter<'m> {
    model: &'m LlamaModel,
    context: Settings,
    /// Always `Some` but while it is made again, bigger.
    ctx: Option<LlamaContext<'m>>,
    batch: LlamaBatch<'static>,
    /// Tokens each sequence holds, as the model's sequences are numbered.
    held: Vec<Vec<LlamaToken>>,
}

/// A draft and what making it cost.
pub(super) struct Draft {
    pub(super) tokens: Vec<LlamaToken>,
    /// The draft model's decodes for the drafted tokens, and for catching
    /// up with the tokens the last verify kept (not for a prompt: that is
    /// its prefill).
    pub(super) spent: Duration,
}

impl<'m> Drafter<'m> {
    /// The draft model's context, for as many sequences and tokens as the
    /// model's (`context`: the model's settings).
    pub(super) fn new(model: &'m LlamaModel, mut context: Settings) -> Result<Drafter<'m>, String> {
        // The draft model's own rope and window, not the model's.
        context.rope = None;
        let cells = grown_kv_cells(0, context.kv_budget as u64) as usize;
        let ctx = make(model, cells, &context)?;
        Ok(Drafter {
            model,
            held: vec![Vec::new(); context.sequences],
            context,
            ctx: Some(ctx),
            batch: LlamaBatch::new(BATCH, 1),
        })
    }

    pub(super) fn max(&self) -> usize {
        self.context.drafting.max
    }

    fn cells(&self) -> usize {
        self.ctx.as_ref().map_or(0, |c| c.n_ctx() as usize)
    }

    pub(super) fn forget(&mut self, slot: usize) {
        if let Some(ctx) = &mut self.ctx {
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        }
        self.held[slot].clear();
    }

    pub(super) fn reset(&mut self) {
        if let Some(ctx) = &mut self.ctx {
            ctx.clear_kv_cache();
        }
        self.held.iter_mut().for_each(Vec::clear);
    }

    /// Up to `max` tokens the draft model expects after `cache` and then
    /// `last` (the token chosen, not decoded yet) on sequence `slot`;
    /// `stop` is asked between drafted tokens. Empty when the draft model
    /// is unsure of the first, or fails.
    pub(super) fn propose(
        &mut self,
        slot: usize,
        cache: &[LlamaToken],
        last: LlamaToken,
        max: usize,
        stop: &dyn Fn() -> bool,
    ) -> Draft {
        let started = Instant::now();
        let (tokens, prefill) = match self.draft(slot, cache, last, max, stop) {
            Ok((tokens, prefill)) if tokens.len() >= self.context.drafting.min => (tokens, prefill),
            Ok((_, prefill)) => (Vec::new(), prefill),
            Err(e) => {
                self.failed(&e);
                (Vec::new(), Duration::ZERO)
            }
        };
        Draft {
            tokens,
            spent: started.elapsed().saturating_sub(prefill),
        }
    }

    /// Read a prompt the model has just prefilled on sequence `slot`
    /// (`cache`), so the first draft costs a draft and not a prefill: the
    /// draft model reads the prompt with the model, as llama.cpp's does.
    pub(super) fn read(&mut self, slot: usize, cache: &[LlamaToken]) {
        let read = self
            .make_room(slot, cache.len() + self.max() + 1)
            .and_then(|()| self.catch_up(slot, cache.len(), &|i| cache[i], false));
        if let Err(e) = read {
            self.failed(&e);
        }
    }

    /// The draft context's state is unknown after a failed decode.
    fn failed(&mut self, e: &str) {
        tracing::warn!("the draft model failed ({e}); drafting again from the start");
        self.reset();
    }

    fn draft(
        &mut self,
        slot: usize,
        cache: &[LlamaToken],
        last: LlamaToken,
        max: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<(Vec<LlamaToken>, Duration), String> {
        if max == 0 {
            return Ok((Vec::new(), Duration::ZERO));
        }
        let context_len = cache.len() + 1;
        let token = |i: usize| cache.get(i).copied().unwrap_or(last);
        self.make_room(slot, context_len + max)?;
        let caught_up = Instant::now();
        let read = self.catch_up(slot, context_len, &token, true)?;
        // More than a verify can keep is a prompt (one dropped for room, or
        // one read while drafting rested): the draft model's prefill, not
        // what a drafted step costs.
        let prefill = match read > self.max() + 1 {
            true => caught_up.elapsed(),
            false => Duration::ZERO,
        };
        let mut drafted = Vec::with_capacity(max);
        loop {
            let ctx = self.ctx.as_ref().expect("the draft context");
            let logits = ctx.get_logits_ith(self.batch.n_tokens() - 1);
            let (best, p) = likeliest(logits);
            if p < self.context.drafting.p_min {
                break;
            }
            drafted.push(LlamaToken(best as i32));
            if drafted.len() >= max || stop() {
                break;
            }
            let pos = context_len + drafted.len() - 1;
            self.decode(slot, pos, &[LlamaToken(best as i32)])?;
        }
        Ok((drafted, prefill))
    }

    /// Make sequence `slot` hold `token(0..len)`, decoding what it lacks, a
    /// batch at a time; with `logits`, the last token is decoded again if
    /// it was held, for its logits. Returns the tokens decoded.
    fn catch_up(
        &mut self,
        slot: usize,
        len: usize,
        token: &dyn Fn(usize) -> LlamaToken,
        logits: bool,
    ) -> Result<usize, String> {
        let held = &self.held[slot];
        let mut common = held
            .iter()
            .enumerate()
            .take_while(|&(i, t)| i < len && *t == token(i))
            .count();
        if logits {
            common = common.min(len.saturating_sub(1));
        }
        if common < held.len() {
            let ctx = self.ctx.as_mut().expect("the draft context");
            let cut = ctx
                .clear_kv_cache_seq(Some(slot as u32), Some(common as u32), None)
                .unwrap_or(false);
            if !cut || ctx.kv_cache_seq_pos_max(slot as i32) + 1 != common as i32 {
                // Memory that cannot be cut here (a sliding window, a
                // recurrent state): start the sequence over.
                self.forget(slot);
                common = 0;
            }
            self.held[slot].truncate(common);
        }
        let mut at = common;
        while at < len {
            let end = (at + BATCH).min(len);
            let batch = (at..end).map(token).collect::<Vec<_>>();
            self.decode(slot, at, &batch)?;
            at = end;
        }
        Ok(len - common)
    }

    /// Decode `tokens` at `pos` on sequence `slot`, logits for the last.
    fn decode(&mut self, slot: usize, pos: usize, tokens: &[LlamaToken]) -> Result<(), String> {
        self.batch.clear();
        for (k, t) in tokens.iter().enumerate() {
            let logits = k + 1 == tokens.len();
            self.batch
                .add(*t, (pos + k) as i32, &[slot as i32], logits)
                .map_err(|e| e.to_string())?;
        }
        let ctx = self.ctx.as_mut().expect("the draft context");
        ctx.decode(&mut self.batch)
            .map_err(|e| format!("draft decode: {e}"))?;
        self.held[slot].extend_from_slice(tokens);
        Ok(())
    }

    /// Room for sequence `slot` to hold `wanted` tokens: the others'
    /// tokens are dropped first (they are caught up again when they draft
    /// next), then the context is made again, bigger, up to the model's
    /// budget and a draft more.
    fn make_room(&mut self, slot: usize, wanted: usize) -> Result<(), String> {
        let held = |d: &Drafter| -> usize {
            d.held
                .iter()
                .enumerate()
                .filter(|&(s, _)| s != slot)
                .map(|(_, h)| h.len())
                .sum()
        };
        if held(self) + wanted <= self.cells() {
            return Ok(());
        }
        for other in (0..self.held.len()).filter(|&s| s != slot) {
            self.forget(other);
        }
        if wanted <= self.cells() {
            return Ok(());
        }
        let most = self.context.kv_budget + self.context.drafting.max + 1;
        if wanted > most {
            return Err(format!(
                "{wanted} tokens do not fit its {most}-token context"
            ));
        }
        let cells = grown_kv_cells(wanted as u64, most as u64) as usize;
        self.ctx = None;
        self.held.iter_mut().for_each(Vec::clear);
        self.ctx = Some(make(self.model, cells, &self.context)?);
        Ok(())
    }
}

fn make<'m>(
    model: &'m LlamaModel,
    cells: usize,
    settings: &Settings,
) -> Result<LlamaContext<'m>, String> {
    let backend = super::model::backend()?;
    super::log::mark();
    let params = context_params(cells, settings).with_n_ctx(NonZeroU32::new(cells as u32));
    model.new_context(backend, params).map_err(|e| {
        let reason = super::log::last_error().unwrap_or_else(|| e.to_string());
        format!("cannot create the draft model's context: {reason}")
    })
}

/// Candidates the draft model's probability is taken over, as llama.cpp's
/// drafting sampler (top-k 10) does: `--draft-p-min` means what it means
/// there.
const DRAFT_TOP_K: usize = 10;

/// The likeliest token and its probability among the `DRAFT_TOP_K`
/// likeliest.
fn likeliest(logits: &[f32]) -> (usize, f32) {
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(DRAFT_TOP_K + 1);
    for (i, &v) in logits.iter().enumerate() {
        if top.len() == DRAFT_TOP_K && v <= top[DRAFT_TOP_K - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, t)| t >= v);
        top.insert(at, (i, v));
        top.truncate(DRAFT_TOP_K);
    }
    let Some(&(best, max)) = top.first() else {
        return (0, 0.0);
    };
    let sum: f32 = top.iter().map(|&(_, l)| (l - max).exp()).sum();
    (best, 1.0 / sum)
}

#[cfg(test)]
mod tests {
    use super::likeliest;

    #[test]
    fn the_likeliest_token_and_its_probability_among_the_ten_likeliest() {
        let (best, p) = likeliest(&[0.0, 2.0_f32.ln(), 0.0]);
        assert_eq!(best, 1);
        // 2 / (1 + 2 + 1)
        assert!((p - 0.5).abs() < 1e-6, "{p}");
        let (best, p) = likeliest(&[5.0]);
        assert_eq!((best, p), (0, 1.0));
        // Over the ten likeliest only: the long tail does not count.
        let mut logits = vec![-100.0; 1000];
        logits[7] = 3.0_f32.ln();
        (20..29).for_each(|i| logits[i] = 0.0);
        let (best, p) = likeliest(&logits);
        assert_eq!(best, 7);
        // 3 / (3 + 9)
        assert!((p - 0.25).abs() < 1e-6, "{p}");
    }
}
