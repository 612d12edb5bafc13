//! `LlamaCppEngine`: kiln's engine over `LlamaCpp`, a kalosm model that
//! llama.cpp (through the `llama-cpp-2` crate) runs. The engine drives it
//! through kalosm's traits, as it would any kalosm model; what it adds is
//! kiln's conversation: the chat template, trimming, the prompt cache.
//!
//! Why llama.cpp rather than kiln's own transformer blocks on candle: on
//! this project's 2-core machine with SmolLM2-135M Q4_1, kalosm's candle
//! path (which such blocks would share the quantized matmuls with) prefills
//! ~68 tok/s and decodes ~28 tok/s at 664 MB RSS, and a first llama.cpp
//! prototype prefilled 413 tok/s and decoded 82 tok/s at 177 MB with an f16
//! KV cache per KV head (23,053 B/token). See the README's engine table.

mod draft;
mod log;
mod lookup;
mod model;
mod sampling;
mod sequence;
mod tokens;
mod worker;

pub use draft::DraftSettings;
pub use model::{
    LlamaCpp, LlamaCppChatSession, LlamaCppError, LlamaCppSession, LlamaCppSettings, NativeSampler,
    Plan, Turn,
};
pub use sampling::Sampling;
pub use sequence::{Ended, RunReport};

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kalosm_language_model::kalosm_sample::RegexParser;
use kalosm_language_model::{
    CreateTextCompletionSession, GenerationParameters, StructuredTextCompletionModel,
    TextCompletionModel, TextCompletionSession,
};

use super::context::{Conversation, LocalTurns, Message, Role};
use super::kalosm::EngineOptions;
use super::sampler::SamplerSettings;
use super::template::ChatTemplate;
use super::{
    end_turn, rates, CancelFlag, Engine, EngineEvent, EventSink, FinishReason, Format, GenStats,
    ModelInfo, Priority, Trace,
};
use crate::chat::KvState;
use crate::chat::PREFIX_CACHE_MIN_TOKENS;
use crate::error::{KilnError, ModelFileError, Result};
use crate::models::ResolvedModel;

pub struct LlamaCppEngine {
    llm: LlamaCpp,
    session: LlamaCppSession,
    template: ChatTemplate,
    /// Banned when the benchmark asks to ignore the end of the answer.
    end_tokens: Vec<u32>,
    info: ModelInfo,
    options: EngineOptions,
    conv: Conversation,
    priority: Priority,
}

impl LlamaCppEngine {
    pub async fn load(model: &ResolvedModel, options: EngineOptions) -> Result<Self> {
        let info = &model.info;
        let window = model.window(options.context, &options.window)?;
        let context_limit = window.tokens as usize;
        options.sampler.validate().map_err(KilnError::BadArgument)?;
        let name = model
            .preset
            .map(str::to_string)
            .unwrap_or_else(|| info.display_name());
        let load_error = |e: String| KilnError::Load(model.path.display().to_string(), e);
        let template =
            ChatTemplate::for_file(info, options.sampler.thinking).map_err(load_error)?;
        let (type_k, type_v) = options.window.kv(options.kv_type);
        let settings = LlamaCppSettings {
            type_k,
            type_v,
            rope: window.rope,
            flash_attn: options.window.flash_attn,
            sliding_window: info.layers.window,
            sequences: options.window.conversations as usize,
            kv_budget: options.window.kv_budget.map(|n| n as usize),
            draft: options.draft.as_ref().map(|d| d.path.clone()),
            drafting: options.window.drafting(),
            ..LlamaCppSettings::new(context_limit, Some(template.clone()))
        };
        let llm = LlamaCpp::load(&model.path, settings)
            .await
            .map_err(|e| match e {
                LlamaCppError::Refused(reason) => ModelFileError::Refused(
                    model.path.clone(),
                    crate::visible::visible_line(&reason).into_owned(),
                )
                .into(),
                LlamaCppError::Draft(line) => KilnError::BadArgument(line),
                e => load_error(e.to_string()),
            })?;
        let session = llm.new_session().map_err(|e| load_error(e.to_string()))?;
        let notes = window.note().into_iter().chain(template.notes()).collect();
        let tool_format = template.tool_format();
        Ok(LlamaCppEngine {
            end_tokens: llm.end_tokens(),
            llm,
            session,
            template,
            info: ModelInfo {
                name,
                engine: "llamacpp".into(),
                architecture: info.architecture.clone(),
                path: Some(model.path.clone()),
                context_limit,
                notes,
                tool_format,
            },
            conv: Conversation {
                system: options.system_prompt.clone(),
                messages: Vec::new(),
                tools: Vec::new(),
            },
            options,
            priority: Priority::default(),
        })
    }

    /// Tokens `text` becomes, special tokens (`<|im_start|>`) included.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.llm.count_tokens(text)
    }

    /// The session as a KV state to save.
    fn state(&self) -> std::result::Result<KvState, String> {
        Ok(KvState {
            fed: self.session.text(),
            kv_tokens: self.session.token_count(),
            bytes: self.session.to_bytes().map_err(|e| e.to_string())?,
        })
    }

    /// On an empty session, start from the prompt cache's state for the
    /// system prompt when it has one; otherwise prefill the system prompt
    /// alone and store its state. Returns the tokens taken from the cache.
    async fn start_from_prompt_cache(&mut self, prompt: &str) -> usize {
        let (Some((cache, fingerprint)), Some(system)) =
            (self.options.prompt_cache.clone(), &self.conv.system)
        else {
            return 0;
        };
        let Ok(prefix) = self
            .template
            .render(&[Message::new(Role::System, system.clone())], false)
        else {
            return 0;
        };
        if !prompt.starts_with(&prefix) || self.count_tokens(&prefix) < PREFIX_CACHE_MIN_TOKENS {
            return 0;
        }
        if let Some(state) = cache.lookup(&fingerprint, &prefix) {
            match LlamaCppSession::from_bytes(&state.bytes) {
                // The model loads its llama.cpp state when the turn runs.
                Ok(session) if state.fed == prefix && session.token_count() == state.kv_tokens => {
                    tracing::info!("prompt cache hit: {} tokens", state.kv_tokens);
                    self.session = session;
                    return state.kv_tokens;
                }
                Ok(_) => tracing::warn!("prompt cache: the entry is for other text"),
                Err(e) => tracing::warn!("prompt cache: {e}"),
            }
        }
        // A zero length only prefills.
        let params = GenerationParameters::default().with_max_length(0);
        let fed = self
            .llm
            .stream_text_with_callback(&mut self.session, &prefix, params, |_| Ok(()))
            .await;
        if let Err(e) = fed {
            tracing::warn!("prefilling the system prompt failed: {e}");
            return 0;
        }
        match self.state() {
            Ok(state) => match cache.keep(&fingerprint, &prefix, &state) {
                Ok(bytes) => tracing::info!(
                    "prompt cache: stored {} tokens ({bytes} bytes)",
                    state.kv_tokens
                ),
                Err(e) => tracing::warn!("prompt cache: cannot store: {e}"),
            },
            Err(e) => tracing::warn!("prompt cache: no state to store: {e}"),
        }
        0
    }
}

impl LocalTurns for LlamaCppEngine {
    fn conversation(&self) -> &Conversation {
        &self.conv
    }

    fn conversation_mut(&mut self) -> &mut Conversation {
        &mut self.conv
    }

    fn template(&self) -> &ChatTemplate {
        &self.template
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.llm.count_tokens(text)
    }

    fn window(&self) -> (usize, u32) {
        (self.info.context_limit, self.options.sampler.max_tokens)
    }

    async fn generate(
        &mut self,
        turn: u64,
        // The prompt and its tokens, counted while planning the turn.
        (prompt, prompt_tokens): (String, usize),
        earlier: &str,
        constraint: Option<&Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> std::result::Result<String, String> {
        let started = Instant::now();
        let cached_tokens = match self.session.token_count() {
            0 => self.start_from_prompt_cache(&prompt).await,
            _ => 0,
        };
        let compile = |pattern: &str| {
            RegexParser::new(pattern)
                .map_err(|e| format!("the answer's pattern does not compile: {e}"))
        };
        let constraint = match constraint {
            None => None,
            Some(Format::Whole(p)) => Some((None, compile(p)?)),
            // A call that opens on nothing would never let the answer end.
            Some(Format::Calls { trigger, .. }) if trigger.is_empty() => {
                return Err("a tool call's opening text is empty".into())
            }
            Some(Format::Calls { trigger, pattern }) => {
                Some((Some(trigger.as_str()), compile(pattern)?))
            }
        };
        let kept = self.session.keep_prefix_of(&prompt);
        let delta = &prompt[self.session.text_len()..];
        let _ = out.send(EngineEvent::TurnStarted {
            turn,
            prompt_tokens: prompt_tokens.saturating_sub(kept),
            reused_tokens: kept,
        });
        let limit = self.info.context_limit;
        let room = limit.saturating_sub(prompt_tokens + 1);
        let wanted = self.options.sampler.max_tokens as usize;
        let max_new = wanted.min(room).max(1);
        let banned = match self.options.ignore_eos {
            true => self.end_tokens.clone(),
            false => Vec::new(),
        };
        let sampler = Turn {
            sampling: Sampling {
                settings: self.options.sampler.clone(),
                banned,
            },
            max_new,
            cancel: cancel.clone(),
            turn,
            priority: self.priority,
        };
        let trace = Arc::new(Mutex::new(Trace::for_prompt(
            &prompt,
            earlier,
            constraint.is_some(),
        )));
        let on_token = {
            let (trace, out) = (trace.clone(), out.clone());
            move |text: String| {
                trace.lock().expect("trace lock").token(turn, text, &out);
                Ok(())
            }
        };
        let result = match constraint {
            None => {
                self.llm
                    .stream_text_with_callback(&mut self.session, delta, sampler, on_token)
                    .await
            }
            Some((Some(trigger), parser)) => {
                self.llm
                    .stream_text_with_calls(
                        &mut self.session,
                        delta,
                        sampler,
                        trigger,
                        parser,
                        on_token,
                    )
                    .await
            }
            Some((None, parser)) => self
                .llm
                .stream_text_with_callback_and_parser(
                    &mut self.session,
                    delta,
                    sampler,
                    parser,
                    on_token,
                )
                .await
                .map(|_| ()),
        };
        let ended = Instant::now();
        let report = match (result, self.session.last_run()) {
            // An answer cut short of its format is still the answer so far.
            (Ok(()) | Err(LlamaCppError::Incomplete), Some(report)) => report,
            (Err(e), _) => return Err(format!("generation failed: {e}")),
            (Ok(()), None) => RunReport::default(),
        };
        let finish = match report.ended {
            Ended::Stop | Ended::Complete => FinishReason::Stop,
            Ended::Limit if max_new < wanted => FinishReason::ContextFull,
            Ended::Limit => FinishReason::MaxTokens,
            Ended::Interrupted => FinishReason::Cancelled,
        };
        let trace = std::mem::take(&mut *trace.lock().expect("trace lock"));
        let total_s = (ended - started).as_secs_f64();
        let ttft_s = trace
            .first_at
            .map_or(total_s, |t| (t - started).as_secs_f64());
        let (prefill_tok_s, decode_tok_s) =
            rates(report.prefilled, report.generated, ttft_s, total_s);
        let stats = GenStats {
            ttft_ms: ttft_s * 1000.0,
            prompt_tokens: report.prefilled,
            reused_tokens: report.reused,
            completion_tokens: report.generated,
            prefill_tok_s,
            decode_tok_s,
            total_ms: total_s * 1000.0,
            context_tokens: report.in_cache,
            // A cached state llama.cpp refused was prefilled instead: only
            // what the run really reused counts as a hit.
            cached_tokens: cached_tokens.min(report.reused),
            decode_ms: Some(report.decoding.as_secs_f64() * 1000.0),
            sample_ms: Some(report.sampling.as_secs_f64() * 1000.0),
            drafted: report.drafted,
            accepted_drafts: report.accepted,
            drafting_rested: report.rested,
            drafting_resting: report.resting,
        };
        tracing::info!(
            "turn {turn}: {} · KV cells {}",
            stats.summary(finish),
            report.kv_cells
        );
        let _ = out.send(EngineEvent::TurnFinished {
            turn,
            reply: format!("{earlier}{}", trace.answer()),
            finish,
            stats,
        });
        Ok(trace.answer())
    }
}

impl Engine for LlamaCppEngine {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    async fn chat(&mut self, turn: u64, message: String, out: &EventSink, cancel: &CancelFlag) {
        let input = vec![Message::new(Role::User, message)];
        let result = self.run_turn(turn, input, None, out, cancel).await;
        end_turn(turn, result, out);
    }

    async fn chat_constrained(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        format: Option<Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) {
        let result = self
            .run_turn(turn, input, format.as_ref(), out, cancel)
            .await;
        end_turn(turn, result, out);
    }

    fn set_tools(&mut self, tools: Vec<serde_json::Value>) {
        self.conv.tools = tools;
    }

    async fn complete(&mut self, turn: u64, prompt: String, out: &EventSink, cancel: &CancelFlag) {
        let tokens = self.count_tokens(&prompt);
        let limit = self.info.context_limit;
        let result = match tokens < limit {
            true => self
                .generate(turn, (prompt, tokens), "", None, out, cancel)
                .await
                .map(drop),
            false => Err(format!(
                "the prompt is {tokens} tokens; the context window is {limit}"
            )),
        };
        end_turn(turn, result, out);
    }

    async fn continue_last(&mut self, turn: u64, out: &EventSink, cancel: &CancelFlag) {
        let result = self.run_continue(turn, out, cancel).await;
        end_turn(turn, result, out);
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        self.conv.system = prompt;
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        // The cache keeps whatever prefix the next prompt shares with it.
        self.conv.messages = messages;
    }

    fn snapshot(&self) -> std::result::Result<Option<KvState>, String> {
        match self.session.token_count() {
            0 => Ok(None),
            _ => self.state().map(Some),
        }
    }

    fn restore(&mut self, state: KvState) -> std::result::Result<(), String> {
        let session = LlamaCppSession::from_bytes(&state.bytes).map_err(|e| e.to_string())?;
        if session.token_count() != state.kv_tokens {
            return Err("the KV snapshot's token count does not match its header".into());
        }
        // The model loads the llama.cpp state when the next turn runs.
        self.session = session;
        Ok(())
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        self.options.sampler = settings;
    }

    fn reset(&mut self) {
        self.conv.messages.clear();
        self.llm.forget(&self.session);
        self.session = LlamaCppSession::default();
    }

    /// A conversation of its own on the same model and worker: its turns
    /// run on another of the context's sequences, batched with this one's.
    fn open(&self) -> Option<Self> {
        Some(LlamaCppEngine {
            llm: self.llm.clone(),
            session: LlamaCppSession::default(),
            template: self.template.clone(),
            end_tokens: self.end_tokens.clone(),
            info: self.info.clone(),
            options: self.options.clone(),
            conv: Conversation {
                system: self.options.system_prompt.clone(),
                messages: Vec::new(),
                tools: Vec::new(),
            },
            priority: Priority::default(),
        })
    }

    fn conversations(&self) -> usize {
        self.llm.sequences()
    }

    fn set_priority(&mut self, priority: Priority) {
        self.priority = priority;
    }
}
