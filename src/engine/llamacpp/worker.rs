//! The llama.cpp context on a thread of its own: a forward pass blocks for
//! as long as it takes, and the context is not `Send`. The thread owns one
//! context with several sequences, knows which tokens each holds, and steps
//! every run in flight together: each step is one batch holding every
//! decoding sequence's next token and bounded prefill chunks of the others,
//! so the weights are read once for all of them.
//!
//! A run goes to an idle sequence, the one holding the longest prefix of its
//! prompt. It reuses that prefix at a token and character boundary and cuts
//! the rest (`llama_memory_seq_rm`); when another sequence holds a longer
//! one (a shared system prompt, the same conversation gone on elsewhere)
//! those cells are copied across (`llama_memory_seq_cp`) rather than
//! computed again.
//!
//! Scheduling: a sequence a terminal waits on (`Priority::Interactive`) is
//! placed in the batch, and given memory, before background ones, and while
//! one decodes the background prefill per step is held to `MIXED_PREFILL`
//! tokens so its tokens keep coming.
//!
//! Memory: every sequence's cells come from one unified cache, allocated
//! in `KV_CHUNK` cells and grown (doubling) up to `kv_budget` cells. A run
//! starts only when the most it can come to hold (its prompt and its
//! longest answer, within the window) fits beside what the runs in flight
//! may hold; else it waits in the queue. Past the budget, idle sequences'
//! cached tokens are dropped oldest first; when every run in flight still
//! waits for cells (one admitted alone, past its share), the youngest
//! fails with the numbers.

use std::collections::VecDeque;
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
use tokio::sync::oneshot;

use super::draft::{DraftSettings, Drafter};
use super::lookup::Governor;
use super::model::LlamaCppError;
use super::sequence::{piece, Ended, Next, Phase, Prefill, Ran, Run, RunReport, Sequence};
use super::tokens::{starts_char, SavedState, Tokens};
use crate::budget::{grown_kv_cells, KvType};
use crate::engine::Priority;
use crate::window::{FlashAttn, Rope, RopeScaling};

/// Tokens per step (llama.cpp's logical and physical batch).
pub(super) const BATCH: usize = crate::budget::PREFILL_CHUNK as usize;
/// Background prefill tokens per step while an interactive sequence
/// decodes: a 512-token chunk would hold its next token back for the time
/// of a whole prefill chunk.
const MIXED_PREFILL: usize = 64;
/// Tokens another sequence must share beyond a sequence's own before its
/// cells are copied over instead of computed.
const MIN_COPY: usize = 32;

pub(super) enum Job {
    Run(Box<Run>, oneshot::Sender<Ran>),
    /// Forget what the idle sequences holding a start of these tokens
    /// hold: a conversation's own cells, not the others'.
    Forget(Vec<LlamaToken>),
    /// llama.cpp's state of the sequence that holds the longest start of
    /// these tokens, if one does.
    State(
        Vec<LlamaToken>,
        std_mpsc::Sender<Result<Option<SavedState>, String>>,
    ),
}

#[derive(Clone)]
pub(super) struct Settings {
    /// The most tokens one sequence holds.
    pub(super) window: usize,
    pub(super) threads: i32,
    pub(super) type_k: KvType,
    pub(super) type_v: KvType,
    pub(super) rope: Option<Rope>,
    pub(super) flash_attn: FlashAttn,
    /// The model's sliding window (0 without one): a cut cache must still
    /// hold this many tokens before the cut.
    pub(super) n_swa: u32,
    /// Sequences in the context: runs in flight at once.
    pub(super) sequences: usize,
    /// The most KV cells all sequences hold together.
    pub(super) kv_budget: usize,
    pub(super) drafting: DraftSettings,
}

fn cache_type(kv: KvType) -> KvCacheType {
    match kv {
        KvType::F16 => KvCacheType::F16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q4_0 => KvCacheType::Q4_0,
    }
}

pub(super) fn context_params(cells: usize, settings: &Settings) -> LlamaContextParams {
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
        .with_n_threads_batch(threads)
        .with_n_seq_max(settings.sequences as u32)
        // One pool of cells for every sequence, so a conversation can use
        // what the others leave rather than a fixed 1/N of the window.
        .with_kv_unified(true);
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
/// serves jobs until every sender is gone and every run has ended.
pub(super) fn serve(
    model: Arc<LlamaModel>,
    draft: Option<Arc<LlamaModel>>,
    settings: Settings,
    jobs: std_mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<Vec<String>, String>>,
) {
    let cells = grown_kv_cells(0, settings.kv_budget as u64) as usize;
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
    let drafter = match &draft {
        Some(draft) => match Drafter::new(draft, settings.clone()) {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        },
        None => None,
    };
    let _ = ready.send(Ok(super::log::lines()));
    let always = settings.drafting.always;
    let mut w = Worker {
        drafter,
        model: &model,
        slots: (0..settings.sequences).map(|_| Slot::default()).collect(),
        settings,
        ctx: Some(ctx),
        batch: LlamaBatch::new(BATCH, 1),
        running: Vec::new(),
        queue: VecDeque::new(),
        tick: 0,
        waiting_said: false,
        governor: Governor::new(always),
    };
    loop {
        if w.running.is_empty() && w.queue.is_empty() {
            match jobs.recv() {
                Ok(job) => w.take(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            w.take(job);
        }
        w.admit();
        w.step();
    }
}

/// One of the context's sequences.
#[derive(Default)]
struct Slot {
    cache: Tokens,
    /// A run is on it.
    busy: bool,
    /// When its last run ended, for dropping the oldest first.
    used: u64,
}

struct Worker<'m> {
    model: &'m LlamaModel,
    settings: Settings,
    /// Always `Some` but while the context is being replaced by a bigger
    /// one (the old one is freed first).
    ctx: Option<LlamaContext<'m>>,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    running: Vec<Sequence>,
    /// Runs waiting for a sequence or for memory.
    queue: VecDeque<Queued>,
    tick: u64,
    /// Whether the wait for memory has been logged since runs last fit.
    waiting_said: bool,
    /// Whether drafts pay here.
    governor: Governor,
    /// The draft model, with `--draft`.
    drafter: Option<Drafter<'m>>,
}

/// A run waiting to start.
struct Queued {
    run: Box<Run>,
    reply: oneshot::Sender<Ran>,
    /// Arrival order.
    order: u64,
    /// The most cells it can come to hold: its session, its text and its
    /// longest answer, within the window (reckoned once, on arrival).
    reserve: usize,
}

/// A sequence's share of a step's batch.
struct Entry {
    seq: usize,
    tokens: usize,
    /// Where its logits are in the batch, when it wants them (a drafted
    /// token's follow on).
    logits: Option<i32>,
    /// Tokens drafted after the one decoded, to verify, and the time the
    /// draft model took to draft them.
    drafts: Vec<LlamaToken>,
    drafting: std::time::Duration,
}

impl<'m> Worker<'m> {
    fn ctx(&mut self) -> &mut LlamaContext<'m> {
        self.ctx.as_mut().expect("the llama.cpp context")
    }

    fn cells(&self) -> usize {
        self.ctx.as_ref().map_or(0, |c| c.n_ctx() as usize)
    }

    /// Cells the sequences hold (cells copied between sequences count
    /// once for each, so this never undercounts).
    fn held(&self) -> usize {
        self.slots.iter().map(|s| s.cache.len()).sum()
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Run(run, reply) => {
                self.tick += 1;
                let reserve = (run.session.len()
                    + super::model::tokenize(self.model, &run.text).len())
                .saturating_add(run.max_new)
                .min(self.settings.window);
                self.queue.push_back(Queued {
                    run,
                    reply,
                    order: self.tick,
                    reserve,
                });
            }
            Job::Forget(tokens) => {
                for slot in 0..self.slots.len() {
                    let s = &self.slots[slot];
                    if !s.busy && !s.cache.ids.is_empty() && tokens.starts_with(&s.cache.ids) {
                        self.forget(slot);
                    }
                }
            }
            Job::State(tokens, reply) => {
                let holder = (0..self.slots.len())
                    .filter(|&s| {
                        let ids = &self.slots[s].cache.ids;
                        !ids.is_empty() && tokens.starts_with(ids)
                    })
                    .max_by_key(|&s| self.slots[s].cache.len());
                let state = match holder {
                    None => Ok(None),
                    Some(slot) => self.save_state(slot).map(|bytes| {
                        Some(SavedState {
                            bytes: Arc::new(bytes),
                            tokens: self.slots[slot].cache.len(),
                        })
                    }),
                };
                let _ = reply.send(state);
            }
        }
    }

    fn forget(&mut self, slot: usize) {
        if let Some(ctx) = &mut self.ctx {
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        }
        if let Some(d) = &mut self.drafter {
            d.forget(slot);
        }
        self.slots[slot].cache = Tokens::default();
    }

    /// Empty every sequence (after a failed decode their state is unknown).
    fn reset(&mut self) {
        if let Some(ctx) = &mut self.ctx {
            ctx.clear_kv_cache();
        }
        if let Some(d) = &mut self.drafter {
            d.reset();
        }
        for slot in &mut self.slots {
            slot.cache = Tokens::default();
        }
    }

    /// Start queued runs on idle sequences, interactive ones first.
    fn admit(&mut self) {
        loop {
            let next = self
                .queue
                .iter()
                .position(|q| q.run.priority == Priority::Interactive)
                .or((!self.queue.is_empty()).then_some(0));
            let Some(at) = next else { return };
            let Queued { run, reserve, .. } = &self.queue[at];
            let reserve = *reserve;
            let mut prompt = run.session.text.clone();
            prompt.extend_from_slice(run.text.as_bytes());
            let Some(slot) = self.idle_slot(&prompt) else {
                return;
            };
            // The most the run can come to hold, against what the runs in
            // flight may: a run that could push the cache past its budget
            // waits for one to end rather than starve them all later.
            let reserved: usize = self.running.iter().map(|s| s.reserve).sum();
            let budget = self.settings.kv_budget;
            if !self.running.is_empty() && reserved + reserve > budget {
                if !self.waiting_said {
                    tracing::info!(
                        "a run waits for KV memory: it may need {reserve} tokens, and the {} running may need {reserved} of {budget}",
                        self.running.len()
                    );
                    self.waiting_said = true;
                }
                return;
            }
            let Queued {
                run, reply, order, ..
            } = self.queue.remove(at).expect("queued");
            match self.start(*run, prompt, slot) {
                Ok((run, reused, prefill)) => {
                    self.slots[slot].busy = true;
                    let mut seq = Sequence::new(run, order, slot, reused, prefill, reply);
                    seq.reserve = reserve;
                    self.running.push(seq);
                }
                Err((session, e)) => {
                    let _ = reply.send(Ran {
                        tokens: session,
                        result: Err(LlamaCppError::Engine(e)),
                    });
                }
            }
        }
    }

    /// The idle sequence for `prompt`: the one holding most of it, else an
    /// empty one, else the one idle longest.
    fn idle_slot(&self, prompt: &[u8]) -> Option<usize> {
        (0..self.slots.len())
            .filter(|&s| !self.slots[s].busy)
            .max_by_key(|&s| {
                let slot = &self.slots[s];
                let shared = slot.cache.shared_with(prompt, |at| starts_char(prompt, at));
                (shared, slot.cache.len() == 0, std::cmp::Reverse(slot.used))
            })
    }

    /// Bring sequence `slot` to the start of `prompt`: load the session's
    /// saved state, or copy a longer shared prefix from another sequence,
    /// cut what differs, and tokenize the rest. Returns the run, the tokens
    /// reused and the prefill to do.
    fn start(
        &mut self,
        mut run: Run,
        prompt: Vec<u8>,
        slot: usize,
    ) -> Result<(Run, usize, Prefill), (Tokens, String)> {
        if let Some(state) = run.state.take() {
            self.adopt(slot, &run.session, &state);
        }
        self.borrow_prefix(slot, &prompt);
        let want_logits = run.max_new > 0;
        let keep = match self.cut(slot, &prompt, want_logits) {
            Ok(keep) => keep,
            Err(e) => return Err((run.session, e)),
        };
        let cache = &self.slots[slot].cache;
        let delta = prompt[cache.text.len()..].to_vec();
        let text = String::from_utf8_lossy(&delta);
        let tokens = super::model::tokenize(self.model, &text);
        // Token pieces spell the text for BPE vocabularies; where they do
        // not (a leading space an SPM vocabulary adds), the block is reused
        // only whole.
        let pieces: Vec<Vec<u8>> = tokens.iter().map(|t| piece(self.model, *t, true)).collect();
        let exact = pieces.concat() == delta;
        let needed = cache.len() + tokens.len();
        let window = self.settings.window;
        if needed > window {
            return Err((
                run.session,
                format!("{needed} tokens do not fit the {window}-token context"),
            ));
        }
        Ok((
            run,
            keep,
            Prefill {
                tokens,
                pieces: exact.then_some(pieces),
                delta,
                fed: 0,
            },
        ))
    }

    /// Keep the longest prefix of `prompt` that sequence `slot` holds,
    /// ending on a token and character boundary (and short of the whole
    /// prompt when its last token must be decoded again for its logits),
    /// and cut the rest. Returns the tokens kept.
    fn cut(&mut self, slot: usize, prompt: &[u8], want_logits: bool) -> Result<usize, String> {
        let starts_char = |end: usize| starts_char(prompt, end);
        let cache = &self.slots[slot].cache;
        let mut keep = cache.shared_with(prompt, starts_char);
        if want_logits && keep > 0 && cache.ends[keep - 1] == prompt.len() {
            keep -= 1;
            while keep > 0 && !starts_char(cache.ends[keep - 1]) {
                keep -= 1;
            }
        }
        if keep < cache.len() {
            let seq = slot as i32;
            let ctx = self.ctx();
            let cut = ctx
                .clear_kv_cache_seq(Some(slot as u32), Some(keep as u32), None)
                .map_err(|e| e.to_string())?;
            // A sliding-window cache drops tokens that left its window: it
            // can go back only as far as it still holds the window before
            // the cut (llama.cpp's server checks the same).
            let n_swa = self.settings.n_swa as i64;
            let held_from = self.ctx().kv_cache_seq_pos_min(seq) as i64;
            let whole = n_swa == 0 || keep == 0 || held_from <= (keep as i64 - n_swa).max(0);
            if cut && whole {
                self.slots[slot].cache.truncate(keep);
            } else {
                // llama.cpp could not cut this sequence: start it over.
                self.forget(slot);
                keep = 0;
            }
        }
        Ok(keep)
    }

    /// When another sequence holds a longer start of `prompt` than `slot`
    /// does, copy those cells into `slot`: they are shared, not computed
    /// or stored again.
    fn borrow_prefix(&mut self, slot: usize, prompt: &[u8]) {
        // A sliding-window cache may no longer hold the start it would copy.
        if self.settings.n_swa > 0 {
            return;
        }
        let shared = |cache: &Tokens| cache.shared_with(prompt, |at| starts_char(prompt, at));
        let own = shared(&self.slots[slot].cache);
        let Some((source, count)) = (0..self.slots.len())
            .filter(|&s| s != slot)
            .map(|s| (s, shared(&self.slots[s].cache)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n >= own + MIN_COPY)
        else {
            return;
        };
        self.forget(slot);
        let ctx = self.ctx();
        let copied = ctx
            .copy_kv_cache_seq(source as i32, slot as i32, None, Some(count as u32))
            .is_ok()
            && ctx.kv_cache_seq_pos_max(slot as i32) + 1 == count as i32;
        if copied {
            let mut cache = self.slots[source].cache.clone();
            cache.truncate(count);
            self.slots[slot].cache = cache;
        } else {
            // Memory that cannot copy part of a sequence (recurrent state).
            self.forget(slot);
        }
    }

    /// Load the session's saved state into `slot` when the sequence holds
    /// less of the session than the state does.
    fn adopt(&mut self, slot: usize, session: &Tokens, state: &SavedState) {
        let mut saved = session.clone();
        saved.truncate(state.tokens.min(session.len()));
        if self.slots[slot].cache.shared_with(&saved.text, |_| true) >= saved.len() {
            return;
        }
        if let Err(e) = self.load_state(slot, &saved, &state.bytes) {
            tracing::warn!("the session's KV state does not load ({e}); prefilling it instead");
            self.forget(slot);
        }
    }

    /// One batch for every running sequence, decoded, and what it gave.
    fn step(&mut self) {
        let mut done: Vec<(usize, Result<Ended, LlamaCppError>)> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if seq.interrupted() {
                done.push((i, Ok(Ended::Interrupted)));
            }
        }
        self.finish(done);
        if self.running.is_empty() {
            return;
        }
        let mut done = Vec::new();
        let entries = self.plan(&mut done);
        if entries.is_empty() {
            self.finish(done);
            return;
        }
        let started = Instant::now();
        let decoded = self
            .ensure_room(self.held() + self.batch.n_tokens() as usize)
            .and_then(|()| self.decode());
        let decoding = started.elapsed();
        if let Err(e) = decoded {
            // The cache's state is unknown after a failed decode.
            self.reset();
            let all = (0..self.running.len())
                .map(|i| (i, Err(LlamaCppError::Engine(e.clone()))))
                .collect();
            self.finish(all);
            return;
        }
        for entry in entries {
            let seq = &mut self.running[entry.seq];
            seq.report.decoding += decoding;
            let decoded = matches!(seq.phase, Phase::Decode);
            let cache = &mut self.slots[seq.slot].cache;
            let prefilled = match &mut seq.phase {
                Phase::Prefill(p) => {
                    p.commit(entry.tokens, cache);
                    p.left() == 0
                }
                Phase::Decode => {
                    let (token, bytes) = seq.pending.take().expect("a token to decode");
                    cache.push(token, &bytes);
                    false
                }
            };
            if prefilled {
                seq.phase = Phase::Decode;
                if !seq.want_logits {
                    done.push((entry.seq, Ok(Ended::Stop)));
                    continue;
                }
                if let Some(d) = &mut self.drafter {
                    if seq.may_draft() && !self.governor.resting() {
                        d.read(seq.slot, &cache.ids);
                    }
                }
            }
            let Some(at) = entry.logits else { continue };
            let ctx = self.ctx.as_mut().expect("the llama.cpp context");
            // The token decoded, then each drafted one while the model
            // chose it too: the cell of a draft is kept once its token is.
            let mut given = 0;
            let mut accepted = 0;
            for k in 0..=entry.drafts.len() {
                let next = seq.sample(self.model, ctx.get_logits_ith(at + k as i32), cache);
                given += 1;
                match next {
                    Ok(Next::More) => {}
                    Ok(Next::Done(ended)) => {
                        done.push((entry.seq, Ok(ended)));
                        break;
                    }
                    Err(e) => {
                        done.push((entry.seq, Err(e)));
                        break;
                    }
                }
                let chosen = seq.pending.as_ref().map(|(t, _)| *t);
                if k == entry.drafts.len() || chosen != Some(entry.drafts[k]) {
                    break;
                }
                let (token, bytes) = seq.pending.take().expect("the token chosen");
                cache.push(token, &bytes);
                accepted += 1;
                // A cancel lands between drafted tokens too, not a whole
                // draft later.
                if seq.interrupted() {
                    done.push((entry.seq, Ok(Ended::Interrupted)));
                    break;
                }
            }
            if !entry.drafts.is_empty() {
                // The drafts after the last one kept.
                let _ =
                    ctx.clear_kv_cache_seq(Some(seq.slot as u32), Some(cache.len() as u32), None);
            }
            if decoded {
                // A draft costs its drafting too.
                let ms = (decoding + entry.drafting).as_secs_f64() * 1000.0;
                let drafted = !entry.drafts.is_empty() || !entry.drafting.is_zero();
                self.governor.record(ms, given, drafted);
                seq.proposed += entry.drafts.len();
                seq.accepted += accepted;
            }
        }
        self.finish(done);
    }

    /// Fill the batch: interactive sequences before background ones,
    /// decoding before prefilling, each within the memory budget. A
    /// sequence past the window goes to `done`; when nothing fits, the
    /// youngest waiting run fails, so the others can go on.
    fn plan(&mut self, done: &mut Vec<(usize, Result<Ended, LlamaCppError>)>) -> Vec<Entry> {
        self.batch.clear();
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        let prefilling = |s: &Sequence| matches!(s.phase, Phase::Prefill(_));
        order.sort_by_key(|&i| {
            let s = &self.running[i];
            (s.priority, prefilling(s), s.order)
        });
        let interactive_decodes = self
            .running
            .iter()
            .any(|s| s.priority == Priority::Interactive && !prefilling(s));
        let decodes = self.running.iter().filter(|s| !prefilling(s)).count();
        let mut prefill_room = BATCH.saturating_sub(decodes);
        let mut held = self.held();
        let budget = self.settings.kv_budget;
        let window = self.settings.window;
        let mut entries = Vec::new();
        let mut waiting = Vec::new();
        for i in order {
            let seq = &self.running[i];
            let in_cache = self.slots[seq.slot].cache.len();
            if let Phase::Prefill(p) = &seq.phase {
                if p.left() == 0 {
                    // Nothing to prefill: the prompt was in the cache whole.
                    let result = match seq.want_logits {
                        false => Ok(Ended::Stop),
                        true => Err(LlamaCppError::Engine("the prompt is empty".into())),
                    };
                    done.push((i, result));
                    continue;
                }
            }
            let (drafts, drafting) = match &seq.phase {
                Phase::Decode => {
                    // Room for a draft within the window, the budget and the
                    // batch.
                    let room = window
                        .saturating_sub(in_cache + 1)
                        .min(budget.saturating_sub(held + 1))
                        .min(BATCH.saturating_sub(self.batch.n_tokens() as usize + 1));
                    let cache = &self.slots[seq.slot].cache;
                    let draft = self.running[i].draft(
                        &cache.ids,
                        room,
                        &mut self.governor,
                        self.drafter.as_mut(),
                    );
                    (draft.tokens, draft.spent)
                }
                Phase::Prefill(_) => Default::default(),
            };
            let seq = &self.running[i];
            let wanted = match &seq.phase {
                Phase::Decode => 1 + drafts.len(),
                Phase::Prefill(p) => {
                    let cap = match (seq.priority, interactive_decodes) {
                        (Priority::Background, true) => MIXED_PREFILL.min(prefill_room),
                        _ => prefill_room,
                    };
                    p.left().min(cap)
                }
            };
            if wanted == 0 {
                continue;
            }
            if in_cache + wanted > window {
                let e = format!(
                    "{} tokens do not fit the {window}-token context",
                    in_cache + wanted
                );
                done.push((i, Err(LlamaCppError::Engine(e))));
                continue;
            }
            if held + wanted > budget {
                // What this batch adds stays counted.
                let added = held - self.held();
                held = self.drop_idle(held + wanted - budget) + added;
            }
            let tokens = wanted.min(budget.saturating_sub(held));
            if tokens == 0 {
                waiting.push(i);
                continue;
            }
            let seq = &self.running[i];
            let slot = seq.slot as i32;
            let logits = match &seq.phase {
                Phase::Decode => {
                    let (token, _) = seq.pending.as_ref().expect("a token to decode");
                    let at = self.batch.n_tokens();
                    let added = std::iter::once(token)
                        .chain(&drafts)
                        .enumerate()
                        .try_for_each(|(k, t)| {
                            self.batch.add(*t, (in_cache + k) as i32, &[slot], true)
                        });
                    if let Err(e) = added {
                        done.push((i, Err(LlamaCppError::Engine(e.to_string()))));
                        continue;
                    }
                    Some(at)
                }
                Phase::Prefill(p) => {
                    let last = p.fed + tokens == p.tokens.len() && seq.want_logits;
                    let mut added = Ok(());
                    for (k, t) in p.tokens[p.fed..p.fed + tokens].iter().enumerate() {
                        let pos = (in_cache + k) as i32;
                        let logits = last && k + 1 == tokens;
                        added = added.and_then(|()| self.batch.add(*t, pos, &[slot], logits));
                    }
                    if let Err(e) = added {
                        done.push((i, Err(LlamaCppError::Engine(e.to_string()))));
                        continue;
                    }
                    prefill_room -= tokens;
                    last.then(|| self.batch.n_tokens() - 1)
                }
            };
            held += tokens;
            entries.push(Entry {
                seq: i,
                tokens,
                logits,
                drafts,
                drafting,
            });
        }
        if !waiting.is_empty() && !self.waiting_said {
            tracing::info!(
                "{} run(s) wait for KV memory: the sequences hold {held} of {budget} cells",
                waiting.len()
            );
        }
        self.waiting_said = !waiting.is_empty();
        if entries.is_empty() && done.is_empty() {
            if let Some(&youngest) = waiting.iter().max_by_key(|&&i| self.running[i].order) {
                let busy = self.running.len();
                let e = format!(
                    "the KV cache is full: {busy} conversation(s) hold {held} of the {budget} tokens it may use; end one, or give it more with --kv-budget"
                );
                done.push((youngest, Err(LlamaCppError::Engine(e))));
            }
        }
        entries
    }

    /// Drop idle sequences' cached tokens, oldest first, until `wanted`
    /// cells are free or none are left to drop; returns the cells held.
    fn drop_idle(&mut self, wanted: usize) -> usize {
        let mut idle: Vec<usize> = (0..self.slots.len())
            .filter(|&s| !self.slots[s].busy && self.slots[s].cache.len() > 0)
            .collect();
        idle.sort_by_key(|&s| self.slots[s].used);
        let mut freed = 0;
        for slot in idle {
            if freed >= wanted {
                break;
            }
            freed += self.slots[slot].cache.len();
            self.forget(slot);
        }
        self.held()
    }

    /// End the runs at these indices of `running`, each with its result.
    fn finish(&mut self, mut done: Vec<(usize, Result<Ended, LlamaCppError>)>) {
        done.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        done.dedup_by_key(|(i, _)| *i);
        let cells = self.cells();
        for (i, result) in done {
            let mut seq = self.running.swap_remove(i);
            let result = result.and_then(|ended| {
                seq.flush()?;
                Ok(ended)
            });
            self.tick += 1;
            let slot = &mut self.slots[seq.slot];
            slot.busy = false;
            slot.used = self.tick;
            let mut tokens = slot.cache.clone();
            if let Some((token, piece)) = &seq.pending {
                tokens.push(*token, piece);
            }
            let result = result.map(|ended| RunReport {
                ended,
                kv_cells: cells,
                in_cache: slot.cache.len(),
                drafted: seq.proposed,
                accepted: seq.accepted,
                rested: seq.rests(&self.governor),
                resting: seq.resting(&self.governor),
                ..seq.report
            });
            let _ = seq.reply_to.send(Ran { tokens, result });
        }
    }

    fn decode(&mut self) -> Result<(), String> {
        let (held, cells) = (self.held(), self.cells());
        let ctx = self.ctx.as_mut().expect("the llama.cpp context");
        ctx.decode(&mut self.batch).map_err(|e| {
            format!(
                "llama.cpp decode: {e} ({} tokens into {held} held of {cells} cells)",
                self.batch.n_tokens()
            )
        })
    }

    /// Make room for `needed` cells in all, growing the context when it has
    /// fewer: every sequence's state is copied out, the old context freed,
    /// a bigger one made and the states copied back.
    fn ensure_room(&mut self, needed: usize) -> Result<(), String> {
        let had = self.cells();
        if needed <= had {
            return Ok(());
        }
        let cells = grown_kv_cells(needed as u64, self.settings.kv_budget as u64) as usize;
        let started = Instant::now();
        let mut saved = Vec::new();
        for slot in 0..self.slots.len() {
            if self.slots[slot].cache.len() > 0 {
                let state = self
                    .ctx()
                    .state_seq_get(slot as i32, LlamaStateSeqFlags::empty())
                    .map_err(|e| format!("cannot copy the KV cache to grow it: {e}"))?;
                saved.push((slot, state));
            }
        }
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
                self.reset();
                return Err(format!("cannot grow the KV cache to {cells} tokens: {e}"));
            }
        };
        self.ctx = Some(ctx);
        for (slot, state) in saved {
            if let Err(e) = self.ctx().state_seq_set(&state, slot as i32) {
                self.reset();
                return Err(format!("cannot copy the KV cache back after growing: {e}"));
            }
        }
        tracing::info!(
            "KV cache grown from {had} to {} cells ({} tokens kept) in {:.0} ms",
            self.cells(),
            self.held(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }

    /// llama.cpp's state of sequence `slot` (its KV rows and their
    /// positions), copied straight into memory: the crate's file route
    /// wrote it to a temporary file first, which on a tmpfs `/tmp` is as
    /// much RAM again (gigabytes for a long context on a big model).
    fn save_state(&mut self, slot: usize) -> Result<Vec<u8>, String> {
        let ctx = self.ctx();
        let flags = LlamaStateSeqFlags::empty();
        let seq = slot as i32;
        let size = ctx.state_seq_get_size_ext(seq, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` is the size llama.cpp just reported for this
        // sequence, and nothing runs on the context in between (this thread
        // owns it).
        let written = unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags) };
        if written != size {
            return Err(format!("llama.cpp wrote {written} of {size} state bytes"));
        }
        Ok(bytes)
    }

    fn load_state(&mut self, slot: usize, session: &Tokens, state: &[u8]) -> Result<(), String> {
        self.forget(slot);
        let needed = self.held() + session.len();
        if needed > self.settings.kv_budget {
            self.drop_idle(needed - self.settings.kv_budget);
        }
        self.ensure_room(self.held() + session.len())?;
        let seq = slot as i32;
        let ctx = self.ctx();
        // SAFETY: llama.cpp reads the buffer through its own bounds-checked
        // reader (the one its file loader uses on a file's bytes) and
        // refuses a state whose sizes or shapes do not match this context;
        // the bytes came from `save_state` through a checksummed file.
        let loaded = unsafe { ctx.state_seq_set_data_ext(state, seq, LlamaStateSeqFlags::empty()) };
        let held = ctx.kv_cache_seq_pos_max(seq) + 1;
        if !loaded || held != session.len() as i32 {
            self.forget(slot);
            return Err(format!(
                "llama.cpp took {held} of the session's {} tokens",
                session.len()
            ));
        }
        self.slots[slot].cache = session.clone();
        Ok(())
    }
}
