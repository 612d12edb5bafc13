//! The llama.cpp context on a thread of its own: a forward pass blocks for
//! as long as it takes, and the context is not `Send`. The thread owns the
//! KV cache of sequence 0 and knows which tokens are in it; a caller hands
//! it a whole run (the session it continues, the text to add, how to sample,
//! a token callback) and gets the cache's tokens back.
//!
//! The cache is kept with the tokens in it and the text byte each token
//! ended at. A run reuses the longest prefix of that text its prompt starts
//! with, at a token boundary, and cuts the rest (`llama_memory_seq_rm`):
//! regenerating, continuing a cut answer, a trimmed conversation or another
//! session with the same system prompt recompute only what differs. Prompts
//! are prefilled in chunks of `BATCH` tokens.
//!
//! The cache starts at `KV_CHUNK` cells and grows (doubling, up to the
//! window) when a run needs more: the sequence's state is copied out, the
//! old context freed, a bigger one made and the state copied in. A short
//! chat on a 128k-token window so holds 4k cells, not 128k.

use std::num::NonZeroU32;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams, RopeScalingType};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llm_samplers::prelude::{HasSamplerResources, Logit, Logits, Sampler};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::model::LlamaCppError;
use crate::budget::{grown_kv_cells, KvType};
use crate::engine::sampler::Resources;
use crate::window::{FlashAttn, Rope, RopeScaling};

/// Tokens per prefill chunk (and llama.cpp's physical batch).
pub(super) const BATCH: usize = crate::budget::PREFILL_CHUNK as usize;
/// With a constraint, the most likely tokens checked against it per step
/// before the whole vocabulary is.
const CONSTRAINED_TOP_K: usize = 64;
/// Recent tokens the sampler sees (for its repetition penalty).
const RECENT_TOKENS: usize = 256;

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

/// Which tokens a constrained run may produce next.
pub(super) trait Constraint {
    /// Whether `piece` may come next, and if so whether it completes the
    /// format.
    fn check(&self, piece: &[u8]) -> Option<bool>;
    /// Take `piece` (which `check` allowed).
    fn accept(&mut self, piece: &[u8]);
}

/// Made on the worker thread, where the parser's state lives.
pub(super) type MakeConstraint = Box<dyn FnOnce() -> Box<dyn Constraint> + Send>;
pub(super) type OnToken = Box<dyn FnMut(String) -> Result<(), LlamaCppError> + Send>;

/// One call of the model, with everything type-erased for the thread.
pub(super) struct Run {
    /// The session this run continues.
    pub(super) session: Tokens,
    /// llama.cpp's saved state for the start of `session`, when it was
    /// loaded from bytes and the worker may not hold it.
    pub(super) state: Option<SavedState>,
    pub(super) text: String,
    pub(super) sampler: Box<dyn Sampler>,
    pub(super) seed: Option<u64>,
    /// Tokens to generate at most; 0 only prefills.
    pub(super) max_new: usize,
    pub(super) stop_on: Option<String>,
    /// Asked between prefill chunks and tokens.
    pub(super) interrupted: Option<Box<dyn Fn() -> bool + Send>>,
    pub(super) constraint: Option<MakeConstraint>,
    pub(super) on_token: OnToken,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ended {
    /// An end-of-generation token, or the stop text.
    #[default]
    Stop,
    /// The constraint's format is complete.
    Complete,
    /// `max_new` tokens.
    Limit,
    Interrupted,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunReport {
    /// Tokens of the prompt found in the KV cache (or loaded from the
    /// session's saved state).
    pub reused: usize,
    pub prefilled: usize,
    pub generated: usize,
    pub ended: Ended,
    /// When the first token was chosen.
    pub first_token: Option<Instant>,
    /// KV cells allocated after the run.
    pub kv_cells: usize,
    /// Tokens in the KV cache after the run (the session may hold one
    /// more: the last token chosen, computed when the next run needs it).
    pub in_cache: usize,
}

pub(super) struct Ran {
    /// The session's new content: the cache after the run, and the last
    /// token chosen when it is not in the cache yet.
    pub(super) tokens: Tokens,
    pub(super) result: Result<RunReport, LlamaCppError>,
}

pub(super) enum Job {
    Run(Box<Run>, tokio::sync::oneshot::Sender<Ran>),
    /// Empty the cache.
    Clear,
    /// llama.cpp's state of the cache, when these tokens start with it.
    State(
        Vec<LlamaToken>,
        std_mpsc::Sender<Result<Option<SavedState>, String>>,
    ),
}

pub(super) struct Settings {
    pub(super) window: usize,
    pub(super) threads: i32,
    pub(super) type_k: KvType,
    pub(super) type_v: KvType,
    pub(super) rope: Option<Rope>,
    pub(super) flash_attn: FlashAttn,
    /// The model's sliding window (0 without one): a cut cache must still
    /// hold this many tokens before the cut.
    pub(super) n_swa: u32,
}

fn cache_type(kv: KvType) -> KvCacheType {
    match kv {
        KvType::F16 => KvCacheType::F16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q4_0 => KvCacheType::Q4_0,
    }
}

fn context_params(cells: usize, settings: &Settings) -> LlamaContextParams {
    let threads = settings.threads;
    let flash = match settings.flash_attn {
        FlashAttn::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttn::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        FlashAttn::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
    };
    let mut params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cells as u32))
        .with_type_k(cache_type(settings.type_k))
        .with_type_v(cache_type(settings.type_v))
        .with_flash_attention_policy(flash)
        // Sliding-window layers keep their window, not the whole context
        // (llama.h's default keeps it all).
        .with_swa_full(false)
        .with_n_batch(BATCH as u32)
        .with_n_ubatch(BATCH as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    if let Some(rope) = settings.rope {
        params = match rope.scaling {
            RopeScaling::None => params.with_rope_scaling_type(RopeScalingType::None),
            scaling => params
                .with_rope_scaling_type(if scaling == RopeScaling::Yarn {
                    RopeScalingType::Yarn
                } else {
                    RopeScalingType::Linear
                })
                .with_rope_freq_scale(1.0 / rope.factor)
                .with_yarn_orig_ctx(rope.original as u32),
        };
    }
    params
}

/// The thread: makes the first context, says whether that worked, then
/// serves jobs until every sender is gone.
pub(super) fn serve(
    model: Arc<LlamaModel>,
    settings: Settings,
    jobs: std_mpsc::Receiver<Job>,
    ready: tokio::sync::oneshot::Sender<Result<Vec<String>, String>>,
) {
    let cells = grown_kv_cells(0, settings.window as u64) as usize;
    super::log::mark();
    let ctx = match super::model::backend().and_then(|b| {
        model
            .new_context(b, context_params(cells, &settings))
            .map_err(|e| e.to_string())
    }) {
        Ok(ctx) => ctx,
        Err(e) => {
            let reason = super::log::last_error().unwrap_or(e);
            let _ = ready.send(Err(format!(
                "cannot create the llama.cpp context: {reason}"
            )));
            return;
        }
    };
    let _ = ready.send(Ok(super::log::lines()));
    let mut w = Worker {
        model: &model,
        settings,
        ctx: Some(ctx),
        batch: LlamaBatch::new(BATCH, 1),
        cache: Tokens::default(),
    };
    for job in jobs {
        match job {
            Job::Run(run, reply) => {
                let mut pending = None;
                let result = w.run(*run, &mut pending);
                if result.is_err() {
                    // After a failed decode the cache's state is unknown.
                    w.reset();
                    pending = None;
                }
                let mut tokens = w.cache.clone();
                if let Some((token, piece)) = pending {
                    tokens.push(token, &piece);
                }
                let _ = reply.send(Ran { tokens, result });
            }
            Job::Clear => w.reset(),
            Job::State(tokens, reply) => {
                let held = w.cache.len();
                let state = if held == 0 || !tokens.starts_with(&w.cache.ids) {
                    Ok(None)
                } else {
                    w.save_state().map(|bytes| {
                        Some(SavedState {
                            bytes: Arc::new(bytes),
                            tokens: held,
                        })
                    })
                };
                let _ = reply.send(state);
            }
        }
    }
}

struct Worker<'m> {
    model: &'m LlamaModel,
    settings: Settings,
    /// Always `Some` but while the context is being replaced by a bigger
    /// one (the old one is freed first).
    ctx: Option<LlamaContext<'m>>,
    batch: LlamaBatch<'static>,
    cache: Tokens,
}

impl<'m> Worker<'m> {
    fn ctx(&mut self) -> &mut LlamaContext<'m> {
        self.ctx.as_mut().expect("the llama.cpp context")
    }

    fn cells(&self) -> usize {
        self.ctx.as_ref().map_or(0, |c| c.n_ctx() as usize)
    }

    fn decode(&mut self) -> Result<(), String> {
        let ctx = self.ctx.as_mut().expect("the llama.cpp context");
        ctx.decode(&mut self.batch)
            .map_err(|e| format!("llama.cpp decode: {e}"))
    }

    fn reset(&mut self) {
        if let Some(ctx) = &mut self.ctx {
            ctx.clear_kv_cache();
        }
        self.cache = Tokens::default();
    }

    /// Make room for `needed` tokens, growing the cache when it has fewer
    /// cells.
    fn ensure_room(&mut self, needed: usize) -> Result<(), String> {
        let window = self.settings.window;
        if needed > window {
            return Err(format!(
                "{needed} tokens do not fit the {window}-token context"
            ));
        }
        let had = self.cells();
        if needed <= had {
            return Ok(());
        }
        let cells = grown_kv_cells(needed as u64, window as u64) as usize;
        let started = Instant::now();
        let saved = match self.cache.len() {
            0 => None,
            _ => Some(
                self.ctx()
                    .state_seq_get(0, LlamaStateSeqFlags::empty())
                    .map_err(|e| format!("cannot copy the KV cache to grow it: {e}"))?,
            ),
        };
        // The old context goes first: both at once would need the memory
        // of the old cache twice over at the worst moment.
        self.ctx = None;
        let backend = super::model::backend()?;
        let params = context_params(cells, &self.settings);
        let ctx = match self.model.new_context(backend, params) {
            Ok(ctx) => ctx,
            Err(e) => {
                // Back to the size that worked, empty.
                self.ctx = self
                    .model
                    .new_context(backend, context_params(had, &self.settings))
                    .ok();
                self.cache = Tokens::default();
                return Err(format!("cannot grow the KV cache to {cells} tokens: {e}"));
            }
        };
        self.ctx = Some(ctx);
        if let Some(state) = saved {
            if let Err(e) = self.ctx().state_seq_set(&state, 0) {
                self.reset();
                return Err(format!("cannot copy the KV cache back after growing: {e}"));
            }
        }
        tracing::info!(
            "KV cache grown from {had} to {} cells ({} tokens kept) in {:.0} ms",
            self.cells(),
            self.cache.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }

    /// Bring the cache to `prompt`: keep the longest prefix whose text
    /// starts it (ending on a token boundary, and short of the whole prompt
    /// when the last token must be decoded again for its logits), cut the
    /// rest, prefill what remains in chunks. Returns (tokens reused, tokens
    /// prefilled), or `None` when interrupted.
    fn feed(
        &mut self,
        prompt: &[u8],
        want_logits: bool,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Option<(usize, usize)>, String> {
        // The rest is tokenized as text, so it must start on a character.
        let starts_char = |end: usize| starts_char(prompt, end);
        let mut keep = self.cache.shared_with(prompt, starts_char);
        if want_logits && keep > 0 && self.cache.ends[keep - 1] == prompt.len() {
            keep -= 1;
            while keep > 0 && !starts_char(self.cache.ends[keep - 1]) {
                keep -= 1;
            }
        }
        if keep < self.cache.len() {
            let cut = self
                .ctx()
                .clear_kv_cache_seq(Some(0), Some(keep as u32), None)
                .map_err(|e| e.to_string())?;
            // A sliding-window cache drops tokens that left its window: it
            // can go back only as far as it still holds the window before
            // the cut (llama.cpp's server checks the same).
            let n_swa = self.settings.n_swa as i64;
            let held_from = self.ctx().kv_cache_seq_pos_min(0) as i64;
            let whole = n_swa == 0 || keep == 0 || held_from <= (keep as i64 - n_swa).max(0);
            if cut && whole {
                self.cache.truncate(keep);
            } else {
                // llama.cpp could not cut this cache: start over.
                self.reset();
                keep = 0;
            }
        }
        let delta = &prompt[self.cache.text.len()..];
        let text = String::from_utf8_lossy(delta);
        let tokens = super::model::tokenize(self.model, &text);
        // Token pieces spell the text for BPE vocabularies; where they do
        // not (a leading space an SPM vocabulary adds), the block is reused
        // only whole.
        let pieces: Vec<Vec<u8>> = tokens.iter().map(|t| piece(self.model, *t, true)).collect();
        let exact = pieces.concat() == delta;
        let start = self.cache.text.len();
        let total = tokens.len();
        for (chunk_at, chunk) in tokens.chunks(BATCH).enumerate() {
            if interrupted() {
                return Ok(None);
            }
            self.ensure_room(self.cache.len() + chunk.len())?;
            self.batch.clear();
            for (i, t) in chunk.iter().enumerate() {
                let last = chunk_at * BATCH + i + 1 == total;
                let pos = (self.cache.len() + i) as i32;
                self.batch
                    .add(*t, pos, &[0], last && want_logits)
                    .map_err(|e| e.to_string())?;
            }
            self.decode()?;
            for (i, t) in chunk.iter().enumerate() {
                if exact {
                    self.cache.push(*t, &pieces[chunk_at * BATCH + i]);
                } else {
                    self.cache.ids.push(*t);
                    self.cache.ends.push(start + delta.len());
                }
            }
        }
        if !exact {
            self.cache.text.extend_from_slice(delta);
        }
        Ok(Some((keep, total)))
    }

    /// Load the session's saved state when the cache holds less of the
    /// session than the state does.
    fn adopt(&mut self, session: &Tokens, state: &SavedState) {
        let mut saved = session.clone();
        saved.truncate(state.tokens.min(session.len()));
        if self.cache.shared_with(&saved.text, |_| true) >= saved.len() {
            return;
        }
        if let Err(e) = self.load_state(&saved, &state.bytes) {
            tracing::warn!("the session's KV state does not load ({e}); prefilling it instead");
            self.reset();
        }
    }

    /// Carry out `run`; `pending` gets the last token chosen when it is not
    /// decoded into the cache.
    fn run(
        &mut self,
        run: Run,
        pending: &mut Option<(LlamaToken, Vec<u8>)>,
    ) -> Result<RunReport, LlamaCppError> {
        let Run {
            session,
            state,
            text,
            mut sampler,
            seed,
            max_new,
            stop_on,
            interrupted,
            constraint,
            mut on_token,
        } = run;
        let engine = LlamaCppError::Engine;
        if let Some(state) = &state {
            self.adopt(&session, state);
        }
        let never = || false;
        let interrupted: &dyn Fn() -> bool = match &interrupted {
            Some(f) => f.as_ref(),
            None => &never,
        };
        let mut prompt = session.text;
        prompt.extend_from_slice(text.as_bytes());
        let want_logits = max_new > 0;
        let Some((reused, prefilled)) = self
            .feed(&prompt, want_logits, interrupted)
            .map_err(engine)?
        else {
            return Ok(self.report(0, 0, 0, Ended::Interrupted, None));
        };
        if !want_logits {
            return Ok(self.report(reused, prefilled, 0, Ended::Stop, None));
        }
        let mut constraint = constraint.map(|make| make());
        let mut rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let vocab = self.model.vocab();
        let mut logits_at = self.batch.n_tokens() - 1;
        let mut reply: Vec<u8> = Vec::new();
        let mut emitted = 0usize;
        let mut first_token = None;
        let mut generated = 0usize;
        let ended = loop {
            let recent = self.cache.ids[self.cache.len().saturating_sub(RECENT_TOKENS)..]
                .iter()
                .map(|t| t.0 as u32)
                .collect();
            let mut resources = Resources {
                rng: &mut rng,
                last_tokens: recent,
            };
            let ctx = self.ctx.as_ref().expect("the llama.cpp context");
            let logits = ctx.get_logits_ith(logits_at);
            let (token, complete) = match &mut constraint {
                Some(c) => {
                    let (token, complete) = constrained_pick(
                        self.model,
                        c.as_ref(),
                        logits,
                        &mut *sampler,
                        &mut resources,
                    )
                    .map_err(engine)?;
                    (token, complete)
                }
                None => {
                    let mut candidates = Logits::try_from_iter(logits.iter().copied())
                        .map_err(|e| engine(e.to_string()))?;
                    let id = sampler
                        .sample_token(&mut resources, &mut candidates)
                        .map_err(|e| engine(e.to_string()))?
                        .ok_or_else(|| engine("the sampler chose no token".into()))?;
                    (LlamaToken(id as i32), false)
                }
            };
            first_token.get_or_insert_with(Instant::now);
            if vocab.is_eog(token) {
                break Ended::Stop;
            }
            let bytes = piece(self.model, token, false);
            if let Some(c) = &mut constraint {
                c.accept(&bytes);
            }
            *pending = Some((token, bytes.clone()));
            reply.extend_from_slice(&bytes);
            generated += 1;
            let valid = match std::str::from_utf8(&reply[emitted..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                let text = String::from_utf8_lossy(&reply[emitted..emitted + valid]).into_owned();
                emitted += valid;
                // The callback's error ends the run, as kalosm's models do.
                on_token(text)?;
            }
            if complete {
                break Ended::Complete;
            }
            if stop_on
                .as_deref()
                .is_some_and(|s| String::from_utf8_lossy(&reply).contains(s))
            {
                break Ended::Stop;
            }
            if generated >= max_new {
                break Ended::Limit;
            }
            if interrupted() {
                break Ended::Interrupted;
            }
            // The chosen token goes into the cache for the next logits.
            self.ensure_room(self.cache.len() + 1).map_err(engine)?;
            self.batch.clear();
            let pos = self.cache.len() as i32;
            self.batch
                .add(token, pos, &[0], true)
                .map_err(|e| engine(e.to_string()))?;
            self.decode().map_err(engine)?;
            self.cache.push(token, &bytes);
            *pending = None;
            logits_at = 0;
        };
        if emitted < reply.len() {
            on_token(String::from_utf8_lossy(&reply[emitted..]).into_owned())?;
        }
        Ok(self.report(reused, prefilled, generated, ended, first_token))
    }

    fn report(
        &self,
        reused: usize,
        prefilled: usize,
        generated: usize,
        ended: Ended,
        first_token: Option<Instant>,
    ) -> RunReport {
        RunReport {
            reused,
            prefilled,
            generated,
            ended,
            first_token,
            kv_cells: self.cells(),
            in_cache: self.cache.len(),
        }
    }

    /// llama.cpp's state of sequence 0 (its KV rows and their positions),
    /// copied straight into memory: the crate's file route wrote it to a
    /// temporary file first, which on a tmpfs `/tmp` is as much RAM again
    /// (gigabytes for a long context on a big model).
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        let ctx = self.ctx();
        let flags = LlamaStateSeqFlags::empty();
        let size = ctx.state_seq_get_size_ext(0, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` is the size llama.cpp just reported for this
        // sequence, and nothing runs on the context in between (this thread
        // owns it).
        let written = unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), 0, flags) };
        if written != size {
            return Err(format!("llama.cpp wrote {written} of {size} state bytes"));
        }
        Ok(bytes)
    }

    fn load_state(&mut self, session: &Tokens, state: &[u8]) -> Result<(), String> {
        self.reset();
        self.ensure_room(session.len())?;
        let ctx = self.ctx();
        // SAFETY: llama.cpp reads the buffer through its own bounds-checked
        // reader (the one its file loader uses on a file's bytes) and
        // refuses a state whose sizes or shapes do not match this context;
        // the bytes came from `save_state` through a checksummed file.
        let loaded = unsafe { ctx.state_seq_set_data_ext(state, 0, LlamaStateSeqFlags::empty()) };
        let held = ctx.kv_cache_seq_pos_max(0) + 1;
        if !loaded || held != session.len() as i32 {
            self.reset();
            return Err(format!(
                "llama.cpp took {held} of the session's {} tokens",
                session.len()
            ));
        }
        self.cache = session.clone();
        Ok(())
    }
}

/// Whether a character of UTF-8 `text` starts at byte `at` (or the text
/// ends there).
fn starts_char(text: &[u8], at: usize) -> bool {
    // Continuation bytes are 0b10xxxxxx.
    text.get(at).is_none_or(|b| (*b as i8) >= -0x40)
}

fn piece(model: &LlamaModel, token: LlamaToken, special: bool) -> Vec<u8> {
    model.vocab().token_to_piece(token, special, None)
}

/// Pick the next token among those the constraint accepts: the most likely
/// few are checked first, the whole vocabulary only if none of them fits.
/// Returns the token and whether it completes the format.
fn constrained_pick(
    model: &LlamaModel,
    constraint: &dyn Constraint,
    logits: &[f32],
    sampler: &mut dyn Sampler,
    resources: &mut dyn HasSamplerResources,
) -> Result<(LlamaToken, bool), String> {
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let top = CONSTRAINED_TOP_K.min(order.len());
    if top == 0 {
        return Err("the model has no tokens".into());
    }
    order.select_nth_unstable_by(top - 1, by_logit);
    order[..top].sort_unstable_by(by_logit);
    let vocab = model.vocab();
    let check = |id: usize| {
        let token = LlamaToken(id as i32);
        if vocab.is_eog(token) {
            return None;
        }
        let bytes = piece(model, token, false);
        if bytes.is_empty() {
            return None;
        }
        constraint.check(&bytes).map(|complete| (id, complete))
    };
    let mut allowed: Vec<(usize, bool)> = order[..top].iter().filter_map(|&id| check(id)).collect();
    if allowed.is_empty() {
        let rest = &mut order[top..];
        rest.sort_unstable_by(by_logit);
        allowed = rest.iter().filter_map(|&id| check(id)).take(1).collect();
    }
    if allowed.is_empty() {
        return Err("no token can continue the required answer format".into());
    }
    // Only the allowed tokens, under their own ids (the repetition penalty
    // looks them up).
    let mut candidates = Logits::default();
    candidates.extend(allowed.iter().map(|(id, _)| Logit {
        token_id: *id as u32,
        logit: logits[*id],
        prob: 0.0,
    }));
    let chosen = sampler
        .sample_token(resources, &mut candidates)
        .map_err(|e| e.to_string())?
        .ok_or("the sampler chose no token")? as usize;
    let (id, complete) = allowed
        .into_iter()
        .find(|(id, _)| *id == chosen)
        .ok_or("the sampler chose a token outside the answer format")?;
    Ok((LlamaToken(id as i32), complete))
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
