//! One run on one of the worker's sequences: what the caller handed over
//! (`Run`), and its state while the scheduler steps it (`Sequence`): the
//! prompt left to prefill, the token waiting to be decoded, its sampler,
//! constraint, stop conditions and the text it has streamed.

use std::time::{Duration, Instant};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::draft::{Draft, Drafter};
use super::lookup::{self, Governor};
use super::model::LlamaCppError;
use super::sampling::{Chain, Sampling};
use super::tokens::{SavedState, Tokens};
use crate::engine::Priority;

/// Which tokens a constrained run may produce next.
pub(super) trait Constraint {
    /// Whether `piece` may come next, and if so whether it completes the
    /// format.
    fn check(&self, piece: &[u8]) -> Option<bool>;
    /// Take `piece` (which `check` allowed, or which was drawn freely).
    fn accept(&mut self, piece: &[u8]);
    /// Whether the next token is drawn freely, unchecked (the answer's
    /// text before a tool call opens); its piece then reaches `accept`
    /// with special tokens rendered, so a trigger that is one can be seen.
    fn free(&self) -> bool {
        false
    }
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
    pub(super) sampling: Sampling,
    /// Tokens to generate at most; 0 only prefills.
    pub(super) max_new: usize,
    pub(super) stop_on: Option<String>,
    /// Asked between prefill chunks and tokens.
    pub(super) interrupted: Option<Box<dyn Fn() -> bool + Send>>,
    pub(super) constraint: Option<MakeConstraint>,
    pub(super) on_token: OnToken,
    pub(super) priority: Priority,
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
    /// session's saved state, or copied from another sequence).
    pub reused: usize,
    pub prefilled: usize,
    pub generated: usize,
    pub ended: Ended,
    /// When the first token was chosen.
    pub first_token: Option<Instant>,
    /// KV cells allocated after the run, for all sequences.
    pub kv_cells: usize,
    /// Tokens in this sequence's cache after the run (the session may hold
    /// one more: the last token chosen, computed when the next run needs
    /// it).
    pub in_cache: usize,
    /// Time in llama.cpp's decode of the batches this run was in (shared
    /// with the other sequences in them).
    pub decoding: Duration,
    /// Time choosing tokens in the sampler chain.
    pub sampling: Duration,
    /// Tokens drafted (by prompt lookup or the draft model), those the
    /// model chose too, and times drafting was rested for not paying.
    pub drafted: usize,
    pub accepted: usize,
    pub rested: usize,
    /// Whether drafting was resting when the run ended (it may have rested
    /// since an earlier run, so `rested` can be 0).
    pub resting: bool,
}

pub(super) struct Ran {
    /// The session's new content: the cache after the run, and the last
    /// token chosen when it is not in the cache yet.
    pub(super) tokens: Tokens,
    pub(super) result: Result<RunReport, LlamaCppError>,
}

/// The prompt's tokens still to prefill.
pub(super) struct Prefill {
    pub(super) tokens: Vec<LlamaToken>,
    /// Each token's text, when the pieces spell the prompt exactly.
    pub(super) pieces: Option<Vec<Vec<u8>>>,
    /// The prompt's text after what the cache held.
    pub(super) delta: Vec<u8>,
    /// Tokens fed so far.
    pub(super) fed: usize,
}

impl Prefill {
    pub(super) fn left(&self) -> usize {
        self.tokens.len() - self.fed
    }

    /// Put `n` more fed tokens into `cache`; the whole delta's text once
    /// the last is in, where the pieces do not spell it.
    pub(super) fn commit(&mut self, n: usize, cache: &mut Tokens) {
        let start = cache.text.len();
        for i in self.fed..self.fed + n {
            match &self.pieces {
                Some(pieces) => cache.push(self.tokens[i], &pieces[i]),
                None => {
                    cache.ids.push(self.tokens[i]);
                    cache.ends.push(start + self.delta.len());
                }
            }
        }
        self.fed += n;
        if self.pieces.is_none() && self.left() == 0 {
            cache.text.extend_from_slice(&self.delta);
        }
    }
}

/// Where a sequence is between steps.
pub(super) enum Phase {
    Prefill(Prefill),
    /// The last token chosen waits to be decoded for the next logits.
    Decode,
}

/// What sampling one step's logits led to.
pub(super) enum Next {
    /// Go on: decode the chosen token next step.
    More,
    Done(Ended),
}

/// A run being stepped on the worker's sequence `slot`.
pub(super) struct Sequence {
    /// Arrival order: the youngest gives way when memory runs out.
    pub(super) order: u64,
    pub(super) slot: usize,
    /// The most cells it may come to hold, counted against the budget
    /// when others start.
    pub(super) reserve: usize,
    pub(super) priority: Priority,
    pub(super) phase: Phase,
    pub(super) want_logits: bool,
    sampling: Sampling,
    /// Made at the first token, when the prompt is in the cache.
    chain: Option<Chain>,
    /// Drafted tokens this run verified, and those the model chose too.
    pub(super) proposed: usize,
    pub(super) accepted: usize,
    /// The worker's count of rests when the run started.
    rests_before: Option<usize>,
    max_new: usize,
    stop_on: Option<String>,
    interrupted: Option<Box<dyn Fn() -> bool + Send>>,
    constraint: Option<Box<dyn Constraint>>,
    on_token: OnToken,
    /// The chosen token and its text, until it is decoded into the cache.
    pub(super) pending: Option<(LlamaToken, Vec<u8>)>,
    reply: Vec<u8>,
    emitted: usize,
    pub(super) report: RunReport,
    pub(super) reply_to: tokio::sync::oneshot::Sender<Ran>,
}

impl Sequence {
    /// `run` on `slot`, its prompt tokenized to `prefill`; the constraint is
    /// made here, on the worker thread.
    pub(super) fn new(
        run: Run,
        order: u64,
        slot: usize,
        reused: usize,
        prefill: Prefill,
        reply_to: tokio::sync::oneshot::Sender<Ran>,
    ) -> Sequence {
        Sequence {
            order,
            slot,
            reserve: 0,
            priority: run.priority,
            want_logits: run.max_new > 0,
            report: RunReport {
                reused,
                prefilled: prefill.tokens.len(),
                ..RunReport::default()
            },
            phase: Phase::Prefill(prefill),
            sampling: run.sampling,
            chain: None,
            proposed: 0,
            accepted: 0,
            rests_before: None,
            max_new: run.max_new,
            stop_on: run.stop_on,
            interrupted: run.interrupted,
            constraint: run.constraint.map(|make| make()),
            on_token: run.on_token,
            pending: None,
            reply: Vec::new(),
            emitted: 0,
            reply_to,
        }
    }

    /// Tokens to verify after the pending one, at most `room`, when the
    /// run drafts and drafting pays: a prompt lookup in the sequence's
    /// context (`--lookup`), else the draft model's guess (`--draft`).
    pub(super) fn draft(
        &mut self,
        cache: &[LlamaToken],
        room: usize,
        governor: &mut Governor,
        drafter: Option<&mut Drafter>,
    ) -> Draft {
        let none = Draft {
            tokens: Vec::new(),
            spent: Duration::ZERO,
        };
        let lookup = self.sampling.settings.lookup as usize;
        let most = lookup.max(drafter.as_ref().map_or(0, |d| d.max()));
        let max = most
            .min(room)
            .min(self.max_new.saturating_sub(self.report.generated + 1));
        if max == 0 || !self.may_draft() {
            return none;
        }
        self.rests_before.get_or_insert(governor.rested);
        if !governor.allows() {
            return none;
        }
        let Some((pending, _)) = &self.pending else {
            return none;
        };
        let pending = *pending;
        let found = lookup::draft(cache, pending, lookup.min(max));
        match drafter {
            Some(d) if found.is_empty() => {
                let interrupted = &self.interrupted;
                let stop = || interrupted.as_ref().is_some_and(|f| f());
                d.propose(self.slot, cache, pending, max, &stop)
            }
            _ => Draft {
                tokens: found,
                ..none
            },
        }
    }

    /// Whether drafts may be verified for this run: more than one token to
    /// come, and no constraint (it checks each token as it is chosen, one
    /// at a time).
    pub(super) fn may_draft(&self) -> bool {
        self.constraint.is_none() && self.max_new > 1
    }

    /// Whether this run would have drafted but drafting rests now.
    pub(super) fn resting(&self, governor: &Governor) -> bool {
        self.rests_before.is_some() && governor.resting()
    }

    /// Times drafting rested during this run.
    pub(super) fn rests(&self, governor: &Governor) -> usize {
        self.rests_before
            .map_or(0, |before| governor.rested.saturating_sub(before))
    }

    pub(super) fn interrupted(&self) -> bool {
        self.interrupted.as_ref().is_some_and(|f| f())
    }

    /// Choose the next token from `logits`, given the tokens in the
    /// sequence's cache, and stream its text.
    pub(super) fn sample(
        &mut self,
        model: &LlamaModel,
        logits: &[f32],
        cache: &Tokens,
    ) -> Result<Next, LlamaCppError> {
        let started = Instant::now();
        let chain = self.chain.get_or_insert_with(|| {
            let recent = cache
                .len()
                .saturating_sub(self.sampling.settings.repeat_last_n);
            let constrained = self.constraint.is_some();
            Chain::new(
                &self.sampling,
                model.n_vocab(),
                &cache.ids[recent..],
                constrained,
            )
        });
        let picked = match &self.constraint {
            Some(c) if !c.free() => {
                let vocab = model.vocab();
                let check = |token: LlamaToken| {
                    if vocab.is_eog(token) {
                        return None;
                    }
                    let bytes = piece(model, token, false);
                    if bytes.is_empty() {
                        return None;
                    }
                    c.check(&bytes)
                };
                chain.pick(logits, Some(&check))
            }
            _ => chain.pick(logits, None),
        };
        let (token, complete) = picked.map_err(LlamaCppError::Engine)?;
        self.report.sampling += started.elapsed();
        self.report.first_token.get_or_insert_with(Instant::now);
        if model.vocab().is_eog(token) {
            return Ok(Next::Done(Ended::Stop));
        }
        let bytes = piece(model, token, false);
        if let Some(c) = &mut self.constraint {
            match c.free() {
                true => c.accept(&piece(model, token, true)),
                false => c.accept(&bytes),
            }
        }
        self.reply.extend_from_slice(&bytes);
        self.pending = Some((token, bytes));
        self.report.generated += 1;
        let valid = match std::str::from_utf8(&self.reply[self.emitted..]) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            let text = String::from_utf8_lossy(&self.reply[self.emitted..self.emitted + valid])
                .into_owned();
            self.emitted += valid;
            // The callback's error ends the run, as kalosm's models do.
            (self.on_token)(text)?;
        }
        if complete {
            return Ok(Next::Done(Ended::Complete));
        }
        if self
            .stop_on
            .as_deref()
            .is_some_and(|s| String::from_utf8_lossy(&self.reply).contains(s))
        {
            return Ok(Next::Done(Ended::Stop));
        }
        if self.report.generated >= self.max_new {
            return Ok(Next::Done(Ended::Limit));
        }
        Ok(Next::More)
    }

    /// Stream whatever is left of the reply (a character cut at the end).
    pub(super) fn flush(&mut self) -> Result<(), LlamaCppError> {
        if self.emitted < self.reply.len() {
            let rest = String::from_utf8_lossy(&self.reply[self.emitted..]).into_owned();
            self.emitted = self.reply.len();
            (self.on_token)(rest)?;
        }
        Ok(())
    }
}

pub(super) fn piece(model: &LlamaModel, token: LlamaToken, special: bool) -> Vec<u8> {
    model.vocab().token_to_piece(token, special, None)
}
