//! `LlamaCpp`: a GGUF model run by llama.cpp, as a kalosm model. It
//! implements kalosm's text-completion, structured-generation and chat
//! traits, so code written against kalosm drives it as it drives kalosm's
//! own `Llama` (`model.complete(..)`, `model.chat()`, parsers); kiln's
//! `LlamaCppEngine` is one such user.
//!
//! A session is the tokens it holds and the text they spell (after
//! `from_bytes`, also llama.cpp's saved state for them). The KV cache itself
//! belongs to the model's one worker thread, which reuses whatever prefix of
//! a session it already holds: going back to a session, or to another one
//! with the same start, recomputes only the part that differs.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use kalosm_language_model::kalosm_sample::{CreateParserState, ParseStatus, Parser};
use kalosm_language_model::{
    ChatMessage, ChatModel, ChatSession, CreateChatSession, CreateTextCompletionSession,
    GenerationParameters, MessageType, StructuredChatModel, StructuredTextCompletionModel,
    TextCompletionModel, TextCompletionSession,
};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::draft::{self, DraftSettings};
use super::sampling::Sampling;
use super::sequence::{Constraint, MakeConstraint, OnToken, Run, RunReport};
use super::tokens::{SavedState, Tokens};
use super::worker::{self, Job};
use crate::budget::KvType;
use crate::engine::context::{Message, Role};
use crate::engine::sampler::SamplerSettings;
use crate::engine::template::ChatTemplate;
use crate::engine::{CancelFlag, Priority};
use crate::window::{FlashAttn, Rope};

#[derive(Debug, thiserror::Error)]
pub enum LlamaCppError {
    #[error("{0}")]
    Load(String),
    /// llama.cpp refused the file, for this reason (from its log).
    #[error("llama.cpp cannot load it: {0}")]
    Refused(String),
    #[error("{0}")]
    Engine(String),
    /// The draft model cannot draft for this one (the line names both).
    #[error("{0}")]
    Draft(String),
    #[error("the engine thread stopped")]
    Stopped,
    /// What a token callback returns to end a run early.
    #[error("generation was stopped by its caller")]
    Interrupted,
    #[error("not a llama.cpp session: {0}")]
    BadSession(String),
    #[error("the model has no chat template: {0}")]
    Template(String),
    #[error("generation ended before the answer's format was complete")]
    Incomplete,
}

pub(super) fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs to stderr, which is the TUI's screen.
            super::log::install();
            Ok(backend)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The GGUF at `path`, on a blocking thread.
async fn load_model(path: &Path) -> Result<LlamaModel, LlamaCppError> {
    let backend = backend().map_err(LlamaCppError::Load)?;
    let file = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        super::log::mark();
        LlamaModel::load_from_file(backend, &file, &LlamaModelParams::default()).map_err(|e| {
            // llama.cpp's own reason, from its log, says more than the
            // binding's "null result".
            LlamaCppError::Refused(super::log::last_error().unwrap_or_else(|| e.to_string()))
        })
    })
    .await
    .map_err(|e| LlamaCppError::Load(e.to_string()))?
}

/// Tokens `text` becomes, special tokens (`<|im_start|>`) included.
pub(super) fn tokenize(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
    if text.is_empty() {
        return Vec::new();
    }
    // The chat template writes BOS itself where the model wants it.
    model.vocab().tokenize(text.as_bytes(), false, true)
}

/// llama.cpp's own limit on sequences in a context (`LLAMA_MAX_SEQ`).
pub const MAX_SEQUENCES: usize = 256;

pub struct LlamaCppSettings {
    /// The context window: the KV cache grows up to this many tokens.
    pub window: usize,
    /// Threads for llama.cpp; every core when `None`.
    pub threads: Option<usize>,
    /// How K and V values are stored.
    pub type_k: KvType,
    pub type_v: KvType,
    /// Rope scaling to apply; `None` leaves the file's own.
    pub rope: Option<Rope>,
    pub flash_attn: FlashAttn,
    /// The model's sliding window in tokens, 0 without one
    /// (`GgufInfo::layers`).
    pub sliding_window: u64,
    /// The chat template chat sessions render with.
    pub template: Option<ChatTemplate>,
    /// Sessions that can run at once, each on a sequence of its own.
    pub sequences: usize,
    /// The most KV cells all sequences hold together; the window when
    /// `None`.
    pub kv_budget: Option<usize>,
    /// A draft model for speculative decoding.
    pub draft: Option<PathBuf>,
    /// How drafts are made and when they are given up.
    pub drafting: DraftSettings,
}

impl LlamaCppSettings {
    /// A window of `window` tokens with llama.cpp's defaults otherwise.
    pub fn new(window: usize, template: Option<ChatTemplate>) -> LlamaCppSettings {
        LlamaCppSettings {
            window,
            threads: None,
            type_k: KvType::F16,
            type_v: KvType::F16,
            rope: None,
            flash_attn: FlashAttn::Auto,
            sliding_window: 0,
            template,
            sequences: 1,
            kv_budget: None,
            draft: None,
            drafting: DraftSettings::LLAMA_CPP,
        }
    }
}

/// A llama.cpp model; clones share the model and its KV cache.
#[derive(Clone)]
pub struct LlamaCpp {
    inner: Arc<Inner>,
}

struct Inner {
    model: Arc<LlamaModel>,
    jobs: std_mpsc::Sender<Job>,
    template: Option<ChatTemplate>,
    window: usize,
    sequences: usize,
    /// What llama.cpp said as it made the context.
    report: Vec<String>,
}

impl LlamaCpp {
    pub async fn load(path: &Path, settings: LlamaCppSettings) -> Result<LlamaCpp, LlamaCppError> {
        let model = load_model(path).await?;
        let draft = match &settings.draft {
            Some(file) => {
                let draft = load_model(file).await.map_err(|e| match e {
                    LlamaCppError::Refused(reason) => LlamaCppError::Draft(format!(
                        "the draft model {}: llama.cpp cannot load it: {}",
                        file.display(),
                        crate::visible::visible_line(&reason)
                    )),
                    e => e,
                })?;
                if let Some(why) = draft::incompatible(&model, &draft) {
                    return Err(LlamaCppError::Draft(draft::refusal(file, path, &why)));
                }
                Some(Arc::new(draft))
            }
            None => None,
        };
        let model = Arc::new(model);
        let threads = settings
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let sequences = settings.sequences.clamp(1, MAX_SEQUENCES);
        let (jobs, rx) = std_mpsc::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let worker_model = model.clone();
        let worker_settings = worker::Settings {
            window: settings.window,
            type_k: settings.type_k,
            type_v: settings.type_v,
            rope: settings.rope,
            flash_attn: settings.flash_attn,
            n_swa: settings.sliding_window.min(u32::MAX as u64) as u32,
            threads: threads as i32,
            sequences,
            drafting: settings.drafting,
            kv_budget: settings
                .kv_budget
                .unwrap_or(settings.window)
                .max(settings.window),
        };
        std::thread::Builder::new()
            .name("kiln-llamacpp".into())
            .spawn(move || worker::serve(worker_model, draft, worker_settings, rx, ready_tx))
            .map_err(|e| LlamaCppError::Load(e.to_string()))?;
        let report = ready
            .await
            .map_err(|_| LlamaCppError::Stopped)?
            .map_err(LlamaCppError::Load)?;
        tracing::info!(
            "llama.cpp: {} loaded, window {}, K {} V {}, {threads} threads",
            path.display(),
            settings.window,
            settings.type_k.name(),
            settings.type_v.name()
        );
        Ok(LlamaCpp {
            inner: Arc::new(Inner {
                model,
                jobs,
                template: settings.template,
                window: settings.window,
                sequences,
                report,
            }),
        })
    }

    pub fn count_tokens(&self, text: &str) -> usize {
        tokenize(&self.inner.model, text).len()
    }

    pub fn window(&self) -> usize {
        self.inner.window
    }

    /// Runs the worker steps at once, each on a sequence of its own.
    pub fn sequences(&self) -> usize {
        self.inner.sequences
    }

    /// A value llama.cpp reported as it made the context (`n_ctx`,
    /// `freq_scale`, `flash_attn`, …): what it applied, read back rather
    /// than trusted from the settings.
    pub fn reported(&self, name: &str) -> Option<String> {
        super::log::reported(&self.inner.report, name).map(str::to_string)
    }

    /// Free the cells that hold `session` (where no run is on them); the
    /// other sessions' stay.
    pub fn forget(&self, session: &LlamaCppSession) {
        let _ = self
            .inner
            .jobs
            .send(Job::Forget(session.tokens.ids.clone()));
    }

    /// The tokens that end a generation (end of turn, end of text).
    pub fn end_tokens(&self) -> Vec<u32> {
        let vocab = self.inner.model.vocab();
        (0..self.inner.model.n_vocab())
            .filter(|&id| vocab.is_eog(LlamaToken(id)))
            .map(|id| id as u32)
            .collect()
    }

    /// A run of `text` after `session`, sampled as `sampler` says.
    fn run<S: NativeSampler>(
        &self,
        session: &LlamaCppSession,
        text: &str,
        sampler: S,
        constraint: Option<MakeConstraint>,
        on_token: OnToken,
    ) -> Run {
        let plan = sampler.into_plan();
        Run {
            session: session.tokens.clone(),
            state: session.state.clone(),
            text: text.to_string(),
            sampling: plan.sampling,
            max_new: plan.max_new,
            stop_on: plan.stop_on,
            interrupted: plan.interrupted,
            constraint,
            on_token,
            priority: plan.priority,
        }
    }

    /// Hand `run` to the worker; `session` then holds what the cache holds.
    async fn send(
        &self,
        session: &mut LlamaCppSession,
        run: Run,
    ) -> Result<RunReport, LlamaCppError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .jobs
            .send(Job::Run(Box::new(run), tx))
            .map_err(|_| LlamaCppError::Stopped)?;
        let ran = rx.await.map_err(|_| LlamaCppError::Stopped)?;
        session.tokens = ran.tokens;
        session.state = None;
        session.worker = Some(self.inner.jobs.clone());
        session.last = ran.result.as_ref().ok().copied();
        ran.result
    }

    /// The text `messages` add to a chat session: the whole conversation
    /// rendered, less the prefix the session already holds (cut back where
    /// the template rendered earlier messages differently).
    fn chat_delta(
        &self,
        session: &mut LlamaCppChatSession,
        messages: &[ChatMessage],
    ) -> Result<String, LlamaCppError> {
        let template = self
            .inner
            .template
            .as_ref()
            .ok_or_else(|| LlamaCppError::Template("none was given at load".into()))?;
        session.history.extend_from_slice(messages);
        let rendered: Vec<Message> = session
            .history
            .iter()
            .map(|m| {
                let role = match m.role() {
                    MessageType::SystemPrompt => Role::System,
                    MessageType::UserMessage => Role::User,
                    MessageType::ModelAnswer => Role::Assistant,
                };
                Message::new(role, m.content())
            })
            .collect();
        let prompt = template
            .render(&rendered, true)
            .map_err(LlamaCppError::Template)?;
        session.session.keep_prefix_of(&prompt);
        Ok(prompt[session.session.tokens.text.len()..].to_string())
    }
}

/// A sampler type a caller of the kalosm traits may pass: llama.cpp's own
/// chain samples its settings, and it brings the rest of a run's limits.
pub trait NativeSampler: Send + 'static {
    fn into_plan(self) -> Plan;
}

/// What a sampler type asks of a run.
pub struct Plan {
    pub(super) sampling: Sampling,
    /// Tokens to generate at most; 0 only prefills.
    pub(super) max_new: usize,
    pub(super) stop_on: Option<String>,
    pub(super) interrupted: Option<Box<dyn Fn() -> bool + Send>>,
    pub(super) priority: Priority,
}

/// kalosm's parameters, as far as llama.cpp's chain has them: temperature,
/// repetition penalty and its range, seed, length and stop text (its
/// mirostat settings have no place in the chain, and kalosm keeps top-p and
/// top-k private).
impl NativeSampler for GenerationParameters {
    fn into_plan(self) -> Plan {
        let settings = SamplerSettings {
            temperature: self.temperature(),
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repeat_penalty: self.repetition_penalty(),
            repeat_last_n: self.repetition_penalty_range() as usize,
            seed: self.seed(),
            ..SamplerSettings::default()
        };
        Plan {
            sampling: Sampling {
                settings,
                banned: Vec::new(),
            },
            max_new: self.max_length() as usize,
            stop_on: self.stop_on().map(str::to_string),
            interrupted: None,
            priority: Priority::default(),
        }
    }
}

/// kiln's settings for one turn, passed as the model's sampler: how to
/// sample, how many tokens at most, and the cancel flag, which the model
/// checks between prefill chunks too (a token callback runs only once
/// tokens come out, and a long prompt takes minutes on a big model).
#[derive(Debug)]
pub struct Turn {
    pub sampling: Sampling,
    pub max_new: usize,
    pub cancel: CancelFlag,
    pub turn: u64,
    pub priority: Priority,
}

impl NativeSampler for Turn {
    fn into_plan(self) -> Plan {
        let (cancel, n) = (self.cancel, self.turn);
        Plan {
            sampling: self.sampling,
            max_new: self.max_new,
            stop_on: None,
            interrupted: Some(Box::new(move || cancel.is_cancelled(n))),
            priority: self.priority,
        }
    }
}

/// A completion session: tokens and their text. Clones are cheap (kalosm's
/// builders make them): they share the saved state and the worker.
#[derive(Clone, Default)]
pub struct LlamaCppSession {
    tokens: Tokens,
    /// llama.cpp's state for the start of `tokens`, from `from_bytes`,
    /// until a run has put the session in the worker's cache.
    state: Option<SavedState>,
    /// The worker whose cache last held this session (for `write_to`).
    worker: Option<std_mpsc::Sender<Job>>,
    last: Option<RunReport>,
}

/// The saved form: this header (JSON), the text, llama.cpp's state.
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionHeader {
    tokens: Vec<i32>,
    ends: Vec<usize>,
    text_len: usize,
    /// How many of the tokens llama.cpp's state holds (all when absent).
    #[serde(default)]
    state_tokens: Option<usize>,
}

impl LlamaCppSession {
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The text the session's tokens spell.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.tokens.text).into_owned()
    }

    /// Bytes of the text the session's tokens spell.
    pub fn text_len(&self) -> usize {
        self.tokens.text.len()
    }

    /// What the last run on this session did.
    pub fn last_run(&self) -> Option<RunReport> {
        self.last
    }

    /// Cut the session back to the longest prefix of `text` it holds that
    /// ends between two tokens and two characters; returns the tokens kept.
    pub fn keep_prefix_of(&mut self, text: &str) -> usize {
        let keep = self
            .tokens
            .shared_with(text.as_bytes(), |end| text.is_char_boundary(end));
        if keep < self.tokens.len() {
            self.tokens.truncate(keep);
            if self.state.as_ref().is_some_and(|s| s.tokens > keep) {
                // The saved state holds tokens that are cut off.
                self.state = None;
            }
        }
        keep
    }

    /// llama.cpp's state for this session: from the worker when its cache
    /// still holds these tokens, else the state it was loaded with.
    fn llama_state(&self) -> Result<Option<SavedState>, LlamaCppError> {
        if let Some(worker) = &self.worker {
            let (tx, rx) = std_mpsc::channel();
            worker
                .send(Job::State(self.tokens.ids.clone(), tx))
                .map_err(|_| LlamaCppError::Stopped)?;
            let state = rx.recv().map_err(|_| LlamaCppError::Stopped)?;
            if let Some(state) = state.map_err(LlamaCppError::Engine)? {
                return Ok(Some(state));
            }
        }
        Ok(self.state.clone())
    }
}

impl TextCompletionSession for LlamaCppSession {
    type Error = LlamaCppError;

    /// Without a state for its tokens (the worker moved on to another
    /// session), the session is written as text and tokens only and is
    /// prefilled again when used.
    fn write_to(&self, into: &mut Vec<u8>) -> Result<(), Self::Error> {
        let state = self.llama_state()?;
        let header = serde_json::to_vec(&SessionHeader {
            tokens: self.tokens.ids.iter().map(|t| t.0).collect(),
            ends: self.tokens.ends.clone(),
            text_len: self.tokens.text.len(),
            state_tokens: state.as_ref().map(|s| s.tokens),
        })
        .map_err(|e| LlamaCppError::BadSession(e.to_string()))?;
        into.extend_from_slice(&(header.len() as u64).to_le_bytes());
        into.extend_from_slice(&header);
        into.extend_from_slice(&self.tokens.text);
        if let Some(state) = state {
            into.extend_from_slice(&state.bytes);
        }
        Ok(())
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, Self::Error> {
        let bad = |why: &str| LlamaCppError::BadSession(why.to_string());
        let len = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| bad("too short"))?;
        let header_end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(8))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| bad("its header is cut off"))?;
        let header: SessionHeader = serde_json::from_slice(&bytes[8..header_end])
            .map_err(|e| LlamaCppError::BadSession(format!("its header: {e}")))?;
        let text_end = header_end
            .checked_add(header.text_len)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| bad("its text is cut off"))?;
        let ordered = header.ends.windows(2).all(|w| w[0] <= w[1])
            && header.ends.last().is_none_or(|&end| end <= header.text_len);
        let state_tokens = header.state_tokens.unwrap_or(header.tokens.len());
        if header.tokens.len() != header.ends.len()
            || !ordered
            || state_tokens > header.tokens.len()
        {
            return Err(bad("its tokens and text do not agree"));
        }
        let state = &bytes[text_end..];
        Ok(LlamaCppSession {
            tokens: Tokens {
                ids: header.tokens.into_iter().map(LlamaToken).collect(),
                ends: header.ends,
                text: bytes[header_end..text_end].to_vec(),
            },
            state: (!state.is_empty()).then(|| SavedState {
                bytes: Arc::new(state.to_vec()),
                tokens: state_tokens,
            }),
            worker: None,
            last: None,
        })
    }

    /// A clone shares the worker's cache like the original: copying the KV
    /// state out (gigabytes on a long context) for every clone kalosm's
    /// builders make would cost more than the prefill it might save.
    fn try_clone(&self) -> Result<Self, Self::Error> {
        Ok(self.clone())
    }
}

impl CreateTextCompletionSession for LlamaCpp {
    type Error = LlamaCppError;
    type Session = LlamaCppSession;

    fn new_session(&self) -> Result<Self::Session, Self::Error> {
        Ok(LlamaCppSession::default())
    }
}

impl<S: NativeSampler> TextCompletionModel<S> for LlamaCpp {
    fn stream_text_with_callback<'a>(
        &'a self,
        session: &'a mut Self::Session,
        text: &str,
        sampler: S,
        on_token: impl FnMut(String) -> Result<(), Self::Error> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'a {
        let run = self.run(session, text, sampler, None, Box::new(on_token));
        async move { self.send(session, run).await.map(|_| ()) }
    }
}

/// A kalosm parser as the worker's constraint; the parsed value lands in
/// `output` when the format completes.
struct ParserConstraint<P: Parser> {
    parser: P,
    state: P::PartialState,
    output: Arc<Mutex<Option<P::Output>>>,
}

impl<P: Parser> Constraint for ParserConstraint<P> {
    fn check(&self, piece: &[u8]) -> Option<bool> {
        match self.parser.parse(&self.state, piece) {
            Ok(ParseStatus::Incomplete { .. }) => Some(false),
            Ok(ParseStatus::Finished { remaining: [], .. }) => Some(true),
            _ => None,
        }
    }

    fn accept(&mut self, piece: &[u8]) {
        match self.parser.parse(&self.state, piece) {
            Ok(ParseStatus::Incomplete { new_state, .. }) => self.state = new_state,
            Ok(ParseStatus::Finished { result, .. }) => {
                *self.output.lock().expect("parser output") = Some(result);
            }
            Err(_) => {}
        }
    }
}

/// Tool calls in free text: the answer is free until it writes `trigger`,
/// then held to `parser` (one call and what closes it), then free again,
/// for as many calls as the model makes. The end of the answer may come
/// only while it is free, so a call always completes.
struct Calls<P: Parser> {
    trigger: Vec<u8>,
    parser: P,
    /// The free text's last bytes, enough to see a trigger cut across
    /// pieces.
    seen: Vec<u8>,
    call: Option<P::PartialState>,
}

impl<P: Parser + CreateParserState> Calls<P> {
    fn take_free(&mut self, piece: &[u8]) {
        self.seen.extend_from_slice(piece);
        let found = self
            .seen
            .windows(self.trigger.len())
            .position(|w| w == self.trigger.as_slice());
        match found {
            Some(at) => {
                let rest = self.seen.split_off(at + self.trigger.len());
                self.seen.clear();
                self.call = Some(self.parser.create_parser_state());
                if !rest.is_empty() {
                    self.take_call(&rest);
                }
            }
            None => {
                let keep = self.trigger.len().saturating_sub(1);
                let cut = self.seen.len().saturating_sub(keep);
                self.seen.drain(..cut);
            }
        }
    }

    fn take_call(&mut self, piece: &[u8]) {
        let Some(state) = &self.call else {
            return;
        };
        match self.parser.parse(state, piece) {
            Ok(ParseStatus::Incomplete { new_state, .. }) => self.call = Some(new_state),
            Ok(ParseStatus::Finished { remaining, .. }) => {
                let remaining = remaining.to_vec();
                self.call = None;
                self.take_free(&remaining);
            }
            // Bytes drawn before the trigger was seen that break the call:
            // it is read back as broken, and the text goes on free.
            Err(_) => self.call = None,
        }
    }
}

impl<P: Parser + CreateParserState> Constraint for Calls<P> {
    fn check(&self, piece: &[u8]) -> Option<bool> {
        let state = self.call.as_ref()?;
        match self.parser.parse(state, piece) {
            Ok(_) => Some(false),
            Err(_) => None,
        }
    }

    fn accept(&mut self, piece: &[u8]) {
        match self.call.is_some() {
            true => self.take_call(piece),
            false => self.take_free(piece),
        }
    }

    fn free(&self) -> bool {
        self.call.is_none()
    }
}

/// A constraint made on the worker thread from `parser`, and where its
/// result will be.
fn constraint_for<P>(parser: P) -> (MakeConstraint, Arc<Mutex<Option<P::Output>>>)
where
    P: CreateParserState + Send + 'static,
    P::Output: Send + 'static,
{
    let output = Arc::new(Mutex::new(None));
    let out = output.clone();
    let make: MakeConstraint = Box::new(move || {
        let state = parser.create_parser_state();
        Box::new(ParserConstraint {
            parser,
            state,
            output: out,
        }) as Box<dyn Constraint>
    });
    (make, output)
}

fn parsed<T>(output: &Mutex<Option<T>>) -> Result<T, LlamaCppError> {
    output
        .lock()
        .expect("parser output")
        .take()
        .ok_or(LlamaCppError::Incomplete)
}

impl<S, P> StructuredTextCompletionModel<P, S> for LlamaCpp
where
    P: CreateParserState + Send + 'static,
    P::Output: Send + 'static,
    S: NativeSampler,
{
    fn stream_text_with_callback_and_parser<'a>(
        &'a self,
        session: &'a mut Self::Session,
        text: &str,
        sampler: S,
        parser: P,
        on_token: impl FnMut(String) -> Result<(), Self::Error> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<P::Output, Self::Error>> + Send + 'a {
        let (make, output) = constraint_for(parser);
        let run = self.run(session, text, sampler, Some(make), Box::new(on_token));
        async move {
            self.send(session, run).await?;
            parsed(&output)
        }
    }
}

impl LlamaCpp {
    /// Stream a completion whose tool calls, once the text writes
    /// `trigger`, are held to `parser`; the text around them is free.
    pub fn stream_text_with_calls<'a, S: NativeSampler, P>(
        &'a self,
        session: &'a mut LlamaCppSession,
        text: &str,
        sampler: S,
        trigger: &str,
        parser: P,
        on_token: impl FnMut(String) -> Result<(), LlamaCppError> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<(), LlamaCppError>> + Send + 'a
    where
        P: CreateParserState + Send + 'static,
    {
        let trigger = trigger.as_bytes().to_vec();
        let make: MakeConstraint = Box::new(move || {
            Box::new(Calls {
                trigger,
                parser,
                seen: Vec::new(),
                call: None,
            }) as Box<dyn Constraint>
        });
        let run = self.run(session, text, sampler, Some(make), Box::new(on_token));
        async move { self.send(session, run).await.map(|_| ()) }
    }
}

/// A chat session: the messages, and the completion session of their
/// rendering.
#[derive(Clone, Default)]
pub struct LlamaCppChatSession {
    history: Vec<ChatMessage>,
    session: LlamaCppSession,
}

impl ChatSession for LlamaCppChatSession {
    type Error = LlamaCppError;

    fn write_to(&self, into: &mut Vec<u8>) -> Result<(), Self::Error> {
        let history = serde_json::to_vec(&self.history)
            .map_err(|e| LlamaCppError::BadSession(e.to_string()))?;
        into.extend_from_slice(&(history.len() as u64).to_le_bytes());
        into.extend_from_slice(&history);
        self.session.write_to(into)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, Self::Error> {
        let len = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|l| usize::try_from(l).ok())
            .and_then(|l| l.checked_add(8))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| LlamaCppError::BadSession("its history is cut off".into()))?;
        let history = serde_json::from_slice(&bytes[8..len])
            .map_err(|e| LlamaCppError::BadSession(format!("its history: {e}")))?;
        Ok(LlamaCppChatSession {
            history,
            session: LlamaCppSession::from_bytes(&bytes[len..])?,
        })
    }

    fn history(&self) -> Vec<ChatMessage> {
        self.history.clone()
    }

    fn try_clone(&self) -> Result<Self, Self::Error> {
        Ok(self.clone())
    }
}

impl CreateChatSession for LlamaCpp {
    type Error = LlamaCppError;
    type ChatSession = LlamaCppChatSession;

    fn new_chat_session(&self) -> Result<Self::ChatSession, Self::Error> {
        Ok(LlamaCppChatSession::default())
    }
}

impl LlamaCpp {
    /// A chat turn: `messages` join the history, the model answers (held to
    /// `constraint` if any), and the answer joins the history too, however
    /// the run ends.
    fn chat_turn<'a, S: NativeSampler>(
        &'a self,
        session: &'a mut LlamaCppChatSession,
        messages: &[ChatMessage],
        sampler: S,
        constraint: Option<MakeConstraint>,
        mut on_token: impl FnMut(String) -> Result<(), LlamaCppError> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<RunReport, LlamaCppError>> + Send + 'a {
        let delta = self.chat_delta(session, messages);
        let answer = Arc::new(Mutex::new(String::new()));
        let kept = answer.clone();
        let callback: OnToken = Box::new(move |token: String| {
            kept.lock().expect("chat answer").push_str(&token);
            on_token(token)
        });
        async move {
            let run = self.run(&session.session, &delta?, sampler, constraint, callback);
            let sent = self.send(&mut session.session, run).await;
            let answer = std::mem::take(&mut *answer.lock().expect("chat answer"));
            session
                .history
                .push(ChatMessage::new(MessageType::ModelAnswer, answer));
            sent
        }
    }
}

impl<S: NativeSampler> ChatModel<S> for LlamaCpp {
    fn add_messages_with_callback<'a>(
        &'a self,
        session: &'a mut Self::ChatSession,
        messages: &[ChatMessage],
        sampler: S,
        on_token: impl FnMut(String) -> Result<(), Self::Error> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'a {
        let turn = self.chat_turn(session, messages, sampler, None, on_token);
        async move { turn.await.map(|_| ()) }
    }
}

impl<S, P> StructuredChatModel<P, S> for LlamaCpp
where
    P: CreateParserState + Send + 'static,
    P::Output: Send + 'static,
    S: NativeSampler,
{
    fn add_message_with_callback_and_constraints<'a>(
        &'a self,
        session: &'a mut Self::ChatSession,
        messages: &[ChatMessage],
        sampler: S,
        constraints: P,
        on_token: impl FnMut(String) -> Result<(), Self::Error> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<P::Output, Self::Error>> + Send + 'a {
        let (make, output) = constraint_for(constraints);
        let turn = self.chat_turn(session, messages, sampler, Some(make), on_token);
        async move {
            turn.await?;
            parsed(&output)
        }
    }
}
