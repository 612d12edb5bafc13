//! `LlamaCppEngine`: llama.cpp (through the `llama-cpp-2` crate) on a local
//! GGUF file.
//!
//! Why llama.cpp rather than kiln's own transformer blocks on candle: on
//! this project's 2-core machine with SmolLM2-135M Q4_1, kalosm's candle
//! path (which such blocks would share the quantized matmuls with) prefills
//! ~68 tok/s and decodes ~28 tok/s at 664 MB RSS, and a first llama.cpp
//! prototype prefilled 413 tok/s and decoded 82 tok/s at 177 MB with an f16
//! KV cache per KV head (23,053 B/token). See the README's engine table.
//!
//! The context lives on a worker thread of its own (llama.cpp's decode
//! blocks for as long as a forward pass takes, and its context is not
//! `Send`); the engine renders and plans turns, the worker owns the KV cache
//! and streams tokens straight to the event sink.
//!
//! The KV cache is kept with the tokens in it and the text each token ended
//! at. A new prompt reuses the longest prefix of that text it starts with,
//! at a token boundary, and the cache is cut there (`llama_memory_seq_rm`):
//! regenerating, continuing a cut answer, a trimmed conversation or another
//! session with the same system prompt recompute only what differs. Prompts
//! are prefilled in chunks of `BATCH` tokens, so a long prompt never needs
//! more than one chunk's activations.

use std::num::NonZeroU32;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kalosm_language_model::kalosm_sample::{CreateParserState, ParseStatus, Parser, RegexParser};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llm_samplers::prelude::{Logit, Logits, Sampler, SimpleSamplerResources};

use super::context::{answer_reserve, continue_prompt, plan_turn, Conversation, Message, Role};
use super::kalosm::EngineOptions;
use super::sampler::{KilnSampler, SamplerSettings};
use super::template::ChatTemplate;
use super::{rates, CancelFlag, Engine, EngineEvent, EventSink, FinishReason, GenStats, ModelInfo};
use crate::error::{KilnError, Result};
use crate::models::ResolvedModel;
use crate::store::prompt_cache::PromptCache;
use crate::store::snapshot::KvState;

/// Tokens per prefill chunk (and llama.cpp's physical batch).
const BATCH: usize = 512;
/// With a constraint, the most likely tokens checked against it per step
/// before the whole vocabulary is.
const CONSTRAINED_TOP_K: usize = 64;
/// System prompts shorter than this are cheaper to prefill than to load.
const MIN_CACHED_PREFIX: usize = 64;

fn backend() -> std::result::Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs to stderr, which is the TUI's screen.
            backend.void_logs();
            Ok(backend)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One turn's work for the worker.
struct GenerateJob {
    turn: u64,
    prompt: String,
    /// Text already in the answer (continuing a cut one), for `TurnFinished`.
    earlier: String,
    constraint: Option<RegexParser>,
    sampler: SamplerSettings,
    ignore_eos: bool,
    max_new: usize,
    limit_reason: FinishReason,
    out: EventSink,
    cancel: CancelFlag,
}

enum Job {
    Generate(
        Box<GenerateJob>,
        /// The new answer text.
        tokio::sync::oneshot::Sender<std::result::Result<String, String>>,
    ),
    /// Put `prompt` in the cache without generating (a system prompt for
    /// the prompt cache); answers the tokens now cached.
    Prefill(String, std_mpsc::Sender<std::result::Result<usize, String>>),
    /// How many tokens the cache holds.
    Cached(std_mpsc::Sender<usize>),
    Snapshot(std_mpsc::Sender<std::result::Result<Option<KvState>, String>>),
    Restore(KvState, std_mpsc::Sender<std::result::Result<(), String>>),
    Reset,
}

pub struct LlamaCppEngine {
    model: Arc<LlamaModel>,
    jobs: std_mpsc::Sender<Job>,
    template: ChatTemplate,
    info: ModelInfo,
    options: EngineOptions,
    conv: Conversation,
}

impl LlamaCppEngine {
    pub async fn load(model: &ResolvedModel, options: EngineOptions) -> Result<Self> {
        let info = &model.info;
        let context_limit = super::kalosm::context_limit(options.context, info)?;
        options.sampler.validate().map_err(KilnError::BadArgument)?;
        let name = model
            .preset
            .map(str::to_string)
            .unwrap_or_else(|| info.display_name());
        let template = ChatTemplate::new(
            info.chat_template.as_deref(),
            info.bos_token.as_deref(),
            &info.eos_token,
        )
        .map_err(|e| KilnError::Load(model.path.display().to_string(), e))?;
        let path = model.path.clone();
        let load_error = |e: String| KilnError::Load(path.display().to_string(), e);
        let backend = backend().map_err(load_error)?;
        let file = model.path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            LlamaModel::load_from_file(backend, &file, &LlamaModelParams::default())
        })
        .await
        .map_err(|e| load_error(e.to_string()))?
        .map_err(|e| load_error(e.to_string()))?;
        let llama = Arc::new(loaded);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(context_limit as u32))
            .with_n_batch(BATCH as u32)
            .with_n_ubatch(BATCH as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let (jobs, rx) = std_mpsc::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let worker_model = llama.clone();
        std::thread::Builder::new()
            .name("kiln-llamacpp".into())
            .spawn(move || worker(worker_model, params, rx, ready_tx))
            .map_err(|e| load_error(e.to_string()))?;
        ready
            .await
            .map_err(|_| load_error("the engine thread stopped".into()))?
            .map_err(load_error)?;
        tracing::info!(
            "loaded {} ({}) with llama.cpp, context {context_limit}, {threads} threads",
            model.path.display(),
            info.architecture
        );
        Ok(LlamaCppEngine {
            model: llama,
            jobs,
            template,
            info: ModelInfo {
                name,
                engine: "llamacpp".into(),
                architecture: info.architecture.clone(),
                path: Some(model.path.clone()),
                context_limit,
            },
            conv: Conversation {
                system: options.system_prompt.clone(),
                messages: Vec::new(),
            },
            options,
        })
    }

    /// Tokens `text` becomes, special tokens (`<|im_start|>`) included.
    pub fn count_tokens(&self, text: &str) -> usize {
        tokenize(&self.model, text).len()
    }

    fn ask<T>(
        &self,
        job: impl FnOnce(std_mpsc::Sender<T>) -> Job,
    ) -> std::result::Result<T, String> {
        let (tx, rx) = std_mpsc::channel();
        self.jobs
            .send(job(tx))
            .map_err(|_| "the engine thread stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the engine thread stopped".to_string())
    }

    /// On an empty cache, start from the prompt cache's state for the
    /// system prompt when it has one; otherwise prefill the system prompt
    /// alone and store its state. Returns the tokens loaded from the cache.
    fn start_from_prompt_cache(&self, prompt: &str) -> usize {
        let (Some((cache, fingerprint)), Some(system)) =
            (&self.options.prompt_cache, &self.conv.system)
        else {
            return 0;
        };
        let Ok(prefix) = self
            .template
            .render(&[Message::new(Role::System, system.clone())], false)
        else {
            return 0;
        };
        if !prompt.starts_with(&prefix) || self.count_tokens(&prefix) < MIN_CACHED_PREFIX {
            return 0;
        }
        let key = PromptCache::key(fingerprint, &prefix);
        if let Some(state) = cache.get(&key, fingerprint) {
            let tokens = state.kv_tokens;
            if state.fed == prefix && matches!(self.ask(|tx| Job::Restore(state, tx)), Ok(Ok(()))) {
                tracing::info!("prompt cache hit: {tokens} tokens");
                return tokens;
            }
        }
        match self.ask(|tx| Job::Prefill(prefix.clone(), tx)) {
            Ok(Ok(tokens)) => match self.ask(Job::Snapshot) {
                Ok(Ok(Some(state))) => match cache.put(&key, fingerprint, &state) {
                    Ok(bytes) => {
                        tracing::info!("prompt cache: stored {tokens} tokens ({bytes} bytes)")
                    }
                    Err(e) => tracing::warn!("prompt cache: cannot store: {e}"),
                },
                other => tracing::warn!("prompt cache: no state to store: {:?}", other.err()),
            },
            Ok(Err(e)) | Err(e) => tracing::warn!("prefilling the system prompt failed: {e}"),
        }
        0
    }

    async fn generate(
        &mut self,
        turn: u64,
        // The prompt and its tokens, counted while planning the turn.
        (prompt, prompt_tokens): (String, usize),
        earlier: &str,
        constraint: Option<&str>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> std::result::Result<String, String> {
        let started = Instant::now();
        let cached_tokens = match self.ask(Job::Cached) {
            // An empty cache: the prompt cache may hold the system prompt.
            Ok(0) => self.start_from_prompt_cache(&prompt),
            _ => 0,
        };
        let constraint = constraint
            .map(RegexParser::new)
            .transpose()
            .map_err(|e| format!("the answer's pattern does not compile: {e}"))?;
        let limit = self.info.context_limit;
        let room = limit.saturating_sub(prompt_tokens + 1);
        let wanted = self.options.sampler.max_tokens as usize;
        let max_new = wanted.min(room).max(1);
        let job = GenerateJob {
            turn,
            prompt,
            earlier: earlier.to_string(),
            constraint,
            sampler: self.options.sampler.clone(),
            ignore_eos: self.options.ignore_eos,
            max_new,
            limit_reason: if max_new < wanted {
                FinishReason::ContextFull
            } else {
                FinishReason::MaxTokens
            },
            out: out.clone(),
            cancel: cancel.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Generate(Box::new(job), tx))
            .map_err(|_| "the engine thread stopped".to_string())?;
        let reply = rx
            .await
            .map_err(|_| "the engine thread stopped".to_string())??;
        if cached_tokens > 0 {
            tracing::info!(
                "turn {turn}: {cached_tokens} tokens from the prompt cache, {:.0} ms in all",
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        Ok(reply)
    }

    async fn run_turn(
        &mut self,
        turn: u64,
        message: String,
        constraint: Option<&str>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> std::result::Result<(), String> {
        let limit = self.info.context_limit;
        let reserve = answer_reserve(self.options.sampler.max_tokens, limit);
        let template = &self.template;
        let model = &self.model;
        let plan = plan_turn(
            &self.conv,
            &message,
            limit,
            reserve,
            |msgs| template.render(msgs, true),
            |text| tokenize(model, text).len(),
        )
        .map_err(|e| e.to_string())?;
        self.conv.trim(&plan, turn, limit, out);
        let answer = self
            .generate(
                turn,
                (plan.prompt, plan.prompt_tokens),
                "",
                constraint,
                out,
                cancel,
            )
            .await;
        self.conv.record(message, answer)
    }

    /// Continue the last answer where it was cut: the prompt ends with the
    /// partial answer, which the cache mostly holds already.
    async fn run_continue(
        &mut self,
        turn: u64,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> std::result::Result<(), String> {
        let limit = self.info.context_limit;
        let reserve = answer_reserve(self.options.sampler.max_tokens, limit);
        let template = &self.template;
        let model = &self.model;
        let (prompt, so_far, prompt_tokens) = continue_prompt(
            &self.conv,
            limit,
            reserve,
            |msgs| template.render(msgs, true),
            |text| tokenize(model, text).len(),
        )?;
        let more = self
            .generate(turn, (prompt, prompt_tokens), &so_far, None, out, cancel)
            .await?;
        if let Some(m) = self.conv.messages.last_mut() {
            m.content = so_far + &more;
        }
        Ok(())
    }
}

fn tokenize(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
    if text.is_empty() {
        return Vec::new();
    }
    // The chat template writes BOS itself where the model wants it.
    model.vocab().tokenize(text.as_bytes(), false, true)
}

impl Engine for LlamaCppEngine {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    async fn chat(&mut self, turn: u64, message: String, out: &EventSink, cancel: &CancelFlag) {
        if let Err(error) = self.run_turn(turn, message, None, out, cancel).await {
            let _ = out.send(EngineEvent::TurnFailed { turn, error });
        }
    }

    async fn chat_constrained(
        &mut self,
        turn: u64,
        message: String,
        pattern: String,
        out: &EventSink,
        cancel: &CancelFlag,
    ) {
        if let Err(error) = self
            .run_turn(turn, message, Some(&pattern), out, cancel)
            .await
        {
            let _ = out.send(EngineEvent::TurnFailed { turn, error });
        }
    }

    async fn continue_last(&mut self, turn: u64, out: &EventSink, cancel: &CancelFlag) {
        if let Err(error) = self.run_continue(turn, out, cancel).await {
            let _ = out.send(EngineEvent::TurnFailed { turn, error });
        }
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        self.conv.system = prompt;
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        // The cache keeps whatever prefix the next prompt shares with it.
        self.conv.messages = messages;
    }

    fn snapshot(&self) -> std::result::Result<Option<KvState>, String> {
        self.ask(Job::Snapshot)?
    }

    fn restore(&mut self, state: KvState) -> std::result::Result<(), String> {
        self.ask(|tx| Job::Restore(state, tx))?
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        self.options.sampler = settings;
    }

    fn reset(&mut self) {
        self.conv.messages.clear();
        let _ = self.jobs.send(Job::Reset);
    }
}

/// The KV cache of sequence 0 as the worker tracks it.
#[derive(Default)]
struct Cache {
    tokens: Vec<LlamaToken>,
    /// For each token, the byte of `text` its text ends at (the end of a
    /// whole tokenized block where its pieces do not spell the text).
    ends: Vec<usize>,
    text: Vec<u8>,
}

impl Cache {
    fn push(&mut self, token: LlamaToken, piece: &[u8]) {
        self.text.extend_from_slice(piece);
        self.tokens.push(token);
        self.ends.push(self.text.len());
    }

    fn truncate(&mut self, keep: usize) {
        self.tokens.truncate(keep);
        self.ends.truncate(keep);
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }
}

struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    cache: Cache,
}

fn worker(
    model: Arc<LlamaModel>,
    params: LlamaContextParams,
    jobs: std_mpsc::Receiver<Job>,
    ready: tokio::sync::oneshot::Sender<std::result::Result<(), String>>,
) {
    let ctx = match backend().and_then(|b| model.new_context(b, params).map_err(|e| e.to_string()))
    {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot create the llama.cpp context: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut w = Worker {
        model: &model,
        ctx,
        batch: LlamaBatch::new(BATCH, 1),
        cache: Cache::default(),
    };
    for job in jobs {
        match job {
            Job::Generate(job, reply) => {
                let result = w.generate(*job);
                if result.is_err() {
                    // The cache state after a failed decode is unknown.
                    w.reset();
                }
                let _ = reply.send(result);
            }
            Job::Prefill(text, reply) => {
                w.reset();
                let fed = w.feed(text.as_bytes(), false, &CancelFlag::default(), 0);
                let _ = reply.send(fed.map(|_| w.cache.tokens.len()));
            }
            Job::Cached(reply) => {
                let _ = reply.send(w.cache.tokens.len());
            }
            Job::Snapshot(reply) => {
                let _ = reply.send(w.snapshot());
            }
            Job::Restore(state, reply) => {
                let restored = w.restore(&state);
                if restored.is_err() {
                    w.reset();
                }
                let _ = reply.send(restored);
            }
            Job::Reset => w.reset(),
        }
    }
}

impl Worker<'_> {
    fn reset(&mut self) {
        self.ctx.clear_kv_cache();
        self.cache = Cache::default();
    }

    /// Bring the cache to `prompt`: keep the longest prefix whose text
    /// starts it (ending on a token boundary, and short of the whole prompt
    /// so that the last token is decoded again for its logits), cut the
    /// rest, prefill what remains in chunks. Returns (tokens reused, tokens
    /// prefilled).
    fn feed(
        &mut self,
        prompt: &[u8],
        want_logits: bool,
        cancel: &CancelFlag,
        turn: u64,
    ) -> std::result::Result<(usize, usize), String> {
        let common = self
            .cache
            .text
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let mut keep = self.cache.ends.partition_point(|&end| end <= common);
        if want_logits && keep > 0 && self.cache.ends[keep - 1] == prompt.len() {
            keep -= 1;
        }
        if keep < self.cache.tokens.len() {
            let cut = self
                .ctx
                .clear_kv_cache_seq(Some(0), Some(keep as u32), None)
                .map_err(|e| e.to_string())?;
            if !cut {
                // llama.cpp could not cut this cache: start over.
                self.reset();
                keep = 0;
            } else {
                self.cache.truncate(keep);
            }
        }
        let delta = &prompt[self.cache.text.len()..];
        let text = String::from_utf8_lossy(delta);
        let tokens = tokenize(self.model, &text);
        // Token pieces spell the text for BPE vocabularies; where they do
        // not (a leading space an SPM vocabulary adds), the block is reused
        // only whole.
        let pieces: Vec<Vec<u8>> = tokens.iter().map(|t| piece(self.model, *t, true)).collect();
        let exact = pieces.concat() == delta;
        let start = self.cache.text.len();
        let total = tokens.len();
        for (chunk_at, chunk) in tokens.chunks(BATCH).enumerate() {
            if cancel.is_cancelled(turn) && turn > 0 {
                return Err("cancelled while reading the prompt".into());
            }
            self.batch.clear();
            for (i, t) in chunk.iter().enumerate() {
                let index = chunk_at * BATCH + i;
                let pos = (self.cache.tokens.len() + i) as i32;
                let last = index + 1 == total;
                self.batch
                    .add(*t, pos, &[0], last && want_logits)
                    .map_err(|e| e.to_string())?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| format!("llama.cpp decode: {e}"))?;
            for (i, t) in chunk.iter().enumerate() {
                let index = chunk_at * BATCH + i;
                if exact {
                    self.cache.push(*t, &pieces[index]);
                } else {
                    self.cache.tokens.push(*t);
                    self.cache.ends.push(start + delta.len());
                }
            }
        }
        if !exact {
            self.cache.text.extend_from_slice(delta);
        }
        Ok((keep, total))
    }

    fn generate(&mut self, job: GenerateJob) -> std::result::Result<String, String> {
        let started = Instant::now();
        let GenerateJob {
            turn,
            prompt,
            earlier,
            constraint,
            sampler: settings,
            ignore_eos,
            max_new,
            limit_reason,
            out,
            cancel,
        } = job;
        let (reused, prompt_tokens) = self.feed(prompt.as_bytes(), true, &cancel, turn)?;
        let _ = out.send(EngineEvent::TurnStarted {
            turn,
            prompt_tokens,
            reused_tokens: reused,
        });
        let vocab = self.model.vocab();
        let eos = vocab.eos().0 as u32;
        let banned = if ignore_eos { vec![eos] } else { vec![] };
        let mut sampler = KilnSampler::new(&settings, banned);
        let mut parser_state = constraint.as_ref().map(|p| p.create_parser_state());
        let mut logits_at = self.batch.n_tokens() - 1;
        let mut reply: Vec<u8> = Vec::new();
        let mut emitted = 0usize;
        let mut first_at = None;
        let mut completion = 0usize;
        let mut finish = FinishReason::Stop;
        loop {
            let logits = self.ctx.get_logits_ith(logits_at);
            let recent = self
                .cache
                .tokens
                .iter()
                .rev()
                .take(settings.repeat_last_n)
                .rev()
                .map(|t| t.0 as u32)
                .collect::<Vec<_>>();
            let mut resources = SimpleSamplerResources::new(None, Some(recent));
            let (token, done) = match (&constraint, &mut parser_state) {
                (Some(parser), Some(state)) => {
                    let (token, next, done) = constrained_pick(
                        self.model,
                        parser,
                        state,
                        logits,
                        &mut sampler,
                        &mut resources,
                    )?;
                    *state = next;
                    (token, done)
                }
                _ => {
                    let mut candidates =
                        Logits::try_from_iter(logits.iter().copied()).map_err(|e| e.to_string())?;
                    let id = sampler
                        .sample_token(&mut resources, &mut candidates)
                        .map_err(|e| e.to_string())?
                        .ok_or("the sampler chose no token")?;
                    (LlamaToken(id as i32), false)
                }
            };
            if vocab.is_eog(token) && !(ignore_eos && constraint.is_none()) {
                finish = FinishReason::Stop;
                break;
            }
            let bytes = piece(self.model, token, false);
            reply.extend_from_slice(&bytes);
            completion += 1;
            first_at.get_or_insert_with(Instant::now);
            let valid = match std::str::from_utf8(&reply[emitted..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                let text = String::from_utf8_lossy(&reply[emitted..emitted + valid]).into_owned();
                emitted += valid;
                let _ = out.send(EngineEvent::Token { turn, text });
            }
            if done {
                break;
            }
            if cancel.is_cancelled(turn) {
                finish = FinishReason::Cancelled;
                break;
            }
            if completion >= max_new {
                finish = limit_reason;
                break;
            }
            // The chosen token goes into the cache for the next logits.
            self.batch.clear();
            let pos = self.cache.tokens.len() as i32;
            self.batch
                .add(token, pos, &[0], true)
                .map_err(|e| e.to_string())?;
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| format!("llama.cpp decode: {e}"))?;
            self.cache.push(token, &bytes);
            logits_at = 0;
        }
        if emitted < reply.len() {
            let text = String::from_utf8_lossy(&reply[emitted..]).into_owned();
            let _ = out.send(EngineEvent::Token { turn, text });
        }
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let ended = Instant::now();
        let total_s = (ended - started).as_secs_f64();
        let ttft_s = first_at.map_or(total_s, |t| (t - started).as_secs_f64());
        let (prefill_tok_s, decode_tok_s) = rates(prompt_tokens, completion, ttft_s, total_s);
        let stats = GenStats {
            ttft_ms: ttft_s * 1000.0,
            prompt_tokens,
            reused_tokens: reused,
            completion_tokens: completion,
            prefill_tok_s,
            decode_tok_s,
            total_ms: total_s * 1000.0,
            context_tokens: self.cache.tokens.len(),
            cached_tokens: 0,
        };
        tracing::info!("turn {turn}: {}", stats.summary(finish));
        let _ = out.send(EngineEvent::TurnFinished {
            turn,
            reply: format!("{earlier}{reply}"),
            finish,
            stats,
        });
        Ok(reply)
    }

    /// The cache as bytes: kiln's token list and text, then llama.cpp's own
    /// sequence state (through a file: the crate offers no other way out).
    fn snapshot(&mut self) -> std::result::Result<Option<KvState>, String> {
        if self.cache.tokens.is_empty() {
            return Ok(None);
        }
        let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        self.ctx
            .state_seq_save_file(file.path(), 0, &self.cache.tokens)
            .map_err(|e| e.to_string())?;
        let state = std::fs::read(file.path()).map_err(|e| e.to_string())?;
        let header = serde_json::to_vec(&SnapshotHeader {
            tokens: self.cache.tokens.iter().map(|t| t.0).collect(),
            ends: self.cache.ends.clone(),
            text_len: self.cache.text.len(),
        })
        .map_err(|e| e.to_string())?;
        let mut bytes = Vec::with_capacity(8 + header.len() + self.cache.text.len() + state.len());
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&self.cache.text);
        bytes.extend_from_slice(&state);
        Ok(Some(KvState {
            fed: String::from_utf8_lossy(&self.cache.text).into_owned(),
            kv_tokens: self.cache.tokens.len(),
            bytes,
        }))
    }

    fn restore(&mut self, state: &KvState) -> std::result::Result<(), String> {
        let bytes = &state.bytes;
        let bad = || "not a llama.cpp KV snapshot".to_string();
        let len = u64::from_le_bytes(
            bytes
                .get(..8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize;
        let header_end = 8usize.checked_add(len).ok_or_else(bad)?;
        let header: SnapshotHeader =
            serde_json::from_slice(bytes.get(8..header_end).ok_or_else(bad)?)
                .map_err(|e| e.to_string())?;
        let text_end = header_end.checked_add(header.text_len).ok_or_else(bad)?;
        let text = bytes.get(header_end..text_end).ok_or_else(bad)?.to_vec();
        if header.tokens.len() != header.ends.len() {
            return Err(bad());
        }
        let mut file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut file, &bytes[text_end..]).map_err(|e| e.to_string())?;
        self.reset();
        let (tokens, _) = self
            .ctx
            .state_seq_load_file(file.path(), 0, header.tokens.len())
            .map_err(|e| e.to_string())?;
        let expected: Vec<LlamaToken> = header.tokens.iter().map(|t| LlamaToken(*t)).collect();
        if tokens != expected {
            self.reset();
            return Err("the KV snapshot's tokens do not match its header".into());
        }
        self.cache = Cache {
            tokens: expected,
            ends: header.ends,
            text,
        };
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotHeader {
    tokens: Vec<i32>,
    ends: Vec<usize>,
    text_len: usize,
}

fn piece(model: &LlamaModel, token: LlamaToken, special: bool) -> Vec<u8> {
    model.vocab().token_to_piece(token, special, None)
}

/// Pick the next token among those the constraint accepts: the most likely
/// few are checked first, the whole vocabulary only if none of them fits.
/// Returns the token, the parser's next state, and whether it finished.
fn constrained_pick(
    model: &LlamaModel,
    parser: &RegexParser,
    state: &<RegexParser as Parser>::PartialState,
    logits: &[f32],
    sampler: &mut KilnSampler,
    resources: &mut SimpleSamplerResources,
) -> std::result::Result<(LlamaToken, <RegexParser as Parser>::PartialState, bool), String> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|a, b| logits[*b].total_cmp(&logits[*a]));
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
        match parser.parse(state, &bytes) {
            Ok(ParseStatus::Incomplete { new_state, .. }) => Some((id, new_state, false)),
            Ok(ParseStatus::Finished { remaining: [], .. }) => Some((id, state.clone(), true)),
            _ => None,
        }
    };
    let mut allowed: Vec<(usize, <RegexParser as Parser>::PartialState, bool)> = order
        .iter()
        .take(CONSTRAINED_TOP_K)
        .filter_map(|&id| check(id))
        .collect();
    if allowed.is_empty() {
        allowed = order
            .iter()
            .skip(CONSTRAINED_TOP_K)
            .filter_map(|&id| check(id))
            .take(1)
            .collect();
    }
    if allowed.is_empty() {
        return Err("no token can continue the required answer format".into());
    }
    // Only the allowed tokens, under their own ids (the repetition penalty
    // looks them up).
    let mut candidates = Logits::default();
    candidates.extend(allowed.iter().map(|(id, _, _)| Logit {
        token_id: *id as u32,
        logit: logits[*id],
        prob: 0.0,
    }));
    let chosen = sampler
        .sample_token(resources, &mut candidates)
        .map_err(|e| e.to_string())?
        .ok_or("the sampler chose no token")? as usize;
    let at = allowed
        .iter()
        .position(|(id, _, _)| *id == chosen)
        .ok_or("the sampler chose a token outside the answer format")?;
    let (id, next, done) = allowed.swap_remove(at);
    Ok((LlamaToken(id as i32), next, done))
}
