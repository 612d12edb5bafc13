//! `KalosmEngine`: kalosm 0.4's `Llama` on a local GGUF file.
//!
//! kiln drives a text-completion `LlamaSession` and renders the chat template
//! itself instead of using kalosm's chat session. That way kiln knows exactly
//! which text is in the KV cache (`fed`): a new turn feeds only what the
//! rendered conversation adds to it, a cancelled answer stays consistent with
//! the cache, and a trimmed conversation is re-prefilled from scratch.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kalosm_language_model::kalosm_sample::RegexParser;
use kalosm_llama::prelude::*;
use kalosm_llama::{LlamaSession, LlamaSource};
use kalosm_model_types::FileSource;
use kalosm_model_types::ModelLoadingProgress;
use tokenizers::Tokenizer;

/// kalosm does not export its error type by name; its callbacks return it.
type LlamaError = <Llama as CreateTextCompletionSession>::Error;

use super::context::{Conversation, LocalTurns, Message, Role};
use super::sampler::{KilnSampler, SamplerSettings};
use super::template::ChatTemplate;
use super::{
    end_turn, rates, CancelFlag, Engine, EngineEvent, EventSink, FinishReason, Format, GenStats,
    ModelInfo, Trace,
};
use crate::chat::KvState;
use crate::chat::{PrefixCache, PREFIX_CACHE_MIN_TOKENS};
use crate::error::{KilnError, ModelFileError, Result};
use crate::models::ResolvedModel;

/// Settings fixed when the engine loads.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Context window to use; the model's trained context when `None`.
    pub context: Option<usize>,
    pub sampler: SamplerSettings,
    pub system_prompt: Option<String>,
    /// Keep generating past the end-of-turn token (benchmarks only).
    pub ignore_eos: bool,
    /// Where KV states after long system prompts are kept, with the
    /// fingerprint of this model and its settings.
    pub prompt_cache: Option<(std::sync::Arc<dyn PrefixCache>, String)>,
    /// How llama.cpp stores KV values (kalosm: f32 only).
    pub kv_type: crate::budget::KvType,
    /// Rope scaling, K/V types and flash attention as the flags gave them.
    pub window: crate::window::WindowArgs,
    /// The draft model `--draft` named, found (llama.cpp engine).
    pub draft: Option<ResolvedModel>,
}

pub struct KalosmEngine {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    eos_id: Option<u32>,
    info: ModelInfo,
    options: EngineOptions,
    conv: Conversation,
    session: LlamaSession,
    /// The text whose tokens are in `session`'s KV cache, in order.
    fed: String,
    kv_tokens: usize,
}

/// Architectures kalosm 0.4's `Llama` implements (llama-style blocks, with
/// qwen2's attention biases and phi3's fused qkv).
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "phi3"];

/// Refuse a file kalosm cannot run, in one line, before loading it.
pub fn check_model(info: &crate::gguf::GgufInfo) -> Result<()> {
    if !ARCHITECTURES.contains(&info.architecture.as_str()) {
        return Err(ModelFileError::UnsupportedArchitecture(
            info.path.clone(),
            info.architecture.clone(),
            ARCHITECTURES.join(", "),
        )
        .into());
    }
    if info.tokenizer != "gpt2" {
        return Err(ModelFileError::UnsupportedTokenizer(
            info.path.clone(),
            info.tokenizer.clone(),
        )
        .into());
    }
    Ok(())
}

/// kalosm prints "Running on CPU…" on stdout the first time it picks a
/// device. Pick it here, once, with stdout pointed at /dev/null, so the line
/// can never land in `kiln ask` output or on the TUI's screen.
pub fn init_device_quietly() -> Result<candle_core::Device> {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    let saved = unsafe {
        let saved = libc::dup(1);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if saved >= 0 && null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
        saved
    };
    let device = kalosm_common::accelerated_device_if_available();
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    unsafe {
        if saved >= 0 {
            libc::dup2(saved, 1);
            libc::close(saved);
        }
    }
    let device = device.map_err(|e| KilnError::Engine(format!("no compute device: {e}")))?;
    tracing::info!("compute device: {device:?}");
    Ok(device)
}

impl KalosmEngine {
    /// Load `model`. `progress` gets the load fraction from 0 to 1.
    pub async fn load(
        model: &ResolvedModel,
        options: EngineOptions,
        mut progress: impl FnMut(f32) + Send + Sync + 'static,
    ) -> Result<Self> {
        let info = &model.info;
        check_model(info)?;
        let context_limit = model.window(options.context, &options.window)?.tokens as usize;
        options.sampler.validate().map_err(KilnError::BadArgument)?;
        let name = model
            .preset
            .map(str::to_string)
            .unwrap_or_else(|| info.display_name());
        let template = ChatTemplate::for_file(info, options.sampler.thinking)
            .map_err(|e| KilnError::Load(model.path.display().to_string(), e))?;

        let device = init_device_quietly()?;
        let source = LlamaSource::new(FileSource::Local(model.path.clone()));
        let llama = Llama::builder()
            .with_source(source)
            .with_device(device)
            .build_with_loading_handler(move |p| {
                if let ModelLoadingProgress::Loading { progress: f } = p {
                    progress(f)
                }
            })
            .await
            .map_err(|e| KilnError::Load(model.path.display().to_string(), e.to_string()))?;
        let tokenizer = llama.tokenizer().clone();
        let eos_id = tokenizer.token_to_id(&info.eos_token);
        let session = llama
            .new_session()
            .map_err(|e| KilnError::Engine(e.to_string()))?;
        tracing::info!(
            "loaded {} ({}), context {context_limit}",
            model.path.display(),
            info.architecture
        );
        let notes = template.notes();
        Ok(KalosmEngine {
            model: llama,
            tokenizer,
            template,
            eos_id,
            info: ModelInfo {
                name,
                engine: "kalosm".into(),
                architecture: info.architecture.clone(),
                path: Some(model.path.clone()),
                context_limit,
                notes,
                // Calls in free text need the lazy grammar only llama.cpp's
                // engine has; agents on kalosm use JSON-only calls.
                tool_format: None,
            },
            conv: Conversation {
                system: options.system_prompt.clone(),
                messages: Vec::new(),
                tools: Vec::new(),
            },
            options,
            session,
            fed: String::new(),
            kv_tokens: 0,
        })
    }

    /// Tokens `text` becomes when fed on its own, as kalosm feeds it.
    pub fn count_tokens(&self, text: &str) -> usize {
        count_tokens(&self.tokenizer, text)
    }

    pub fn conversation(&self) -> &Conversation {
        &self.conv
    }

    fn fresh_session(&mut self) -> std::result::Result<(), String> {
        self.session = self.model.new_session().map_err(|e| e.to_string())?;
        self.fed.clear();
        self.kv_tokens = 0;
        Ok(())
    }

    /// On a fresh KV cache, start from the prompt cache's state for the
    /// system prompt when it has one; otherwise prefill the system prompt on
    /// its own and store the state for the next session. Returns the tokens
    /// loaded from the cache.
    async fn start_from_prompt_cache(&mut self, prompt: &str) -> usize {
        let (Some((cache, fingerprint)), Some(system)) =
            (self.options.prompt_cache.clone(), self.conv.system.clone())
        else {
            return 0;
        };
        let Ok(prefix) = self
            .template
            .render(&[Message::new(Role::System, system)], false)
        else {
            return 0;
        };
        let tokens = self.count_tokens(&prefix);
        if !prompt.starts_with(&prefix) || tokens < PREFIX_CACHE_MIN_TOKENS {
            return 0;
        }
        if let Some(state) = cache.lookup(&fingerprint, &prefix) {
            if state.fed == prefix && self.load_state(&state).is_ok() {
                tracing::info!("prompt cache hit: {} tokens", state.kv_tokens);
                return state.kv_tokens;
            }
        }
        // Nothing is generated with a zero length: the prefix is only fed.
        let params = GenerationParameters::default().with_max_length(0);
        let fed = self
            .model
            .stream_text_with_callback(&mut self.session, &prefix, params, |_| Ok(()))
            .await;
        if let Err(e) = fed {
            tracing::warn!("prefilling the system prompt failed: {e}");
            let _ = self.fresh_session();
            return 0;
        }
        self.fed = prefix.clone();
        self.kv_tokens = tokens;
        match self.save_state() {
            Ok(state) => match cache.keep(&fingerprint, &prefix, &state) {
                Ok(bytes) => tracing::info!("prompt cache: stored {tokens} tokens ({bytes} bytes)"),
                Err(e) => tracing::warn!("prompt cache: cannot store: {e}"),
            },
            Err(e) => tracing::warn!("prompt cache: cannot serialize the KV cache: {e}"),
        }
        0
    }

    fn save_state(&self) -> std::result::Result<KvState, String> {
        let mut bytes = Vec::new();
        self.session
            .write_to(&mut bytes)
            .map_err(|e| e.to_string())?;
        Ok(KvState {
            fed: self.fed.clone(),
            kv_tokens: self.kv_tokens,
            bytes,
        })
    }

    fn load_state(&mut self, state: &KvState) -> std::result::Result<(), String> {
        self.session = LlamaSession::from_bytes(&state.bytes).map_err(|e| e.to_string())?;
        self.fed = state.fed.clone();
        self.kv_tokens = state.kv_tokens;
        Ok(())
    }
}

fn count_tokens(tokenizer: &Tokenizer, text: &str) -> usize {
    if text.is_empty() {
        return 0;
    }
    tokenizer
        .encode_fast(text, false)
        .map(|e| e.get_ids().len())
        // A tokenizer failure on odd text must not stop a turn; a byte count
        // over-estimates, which errs on the safe side for the context check.
        .unwrap_or(text.len())
}

impl LocalTurns for KalosmEngine {
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
        count_tokens(&self.tokenizer, text)
    }

    fn window(&self) -> (usize, u32) {
        (self.info.context_limit, self.options.sampler.max_tokens)
    }

    /// Feed whatever `prompt` adds to the KV cache and generate, streaming
    /// tokens to `out`; sends `TurnFinished` with the full answer (for a
    /// continued answer, its earlier part too). Returns the new text.
    async fn generate(
        &mut self,
        turn: u64,
        // kalosm counts what the cache does not hold yet itself.
        (prompt, _): (String, usize),
        earlier: &str,
        constraint: Option<&Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) -> std::result::Result<String, String> {
        // kalosm's engine reports no tool format, so calls in free text
        // never reach it; only a whole answer is held to a pattern.
        let constraint = match constraint {
            Some(Format::Whole(p)) => Some(p.as_str()),
            _ => None,
        };
        // Loading a cached prefix or prefilling it is part of the wait.
        let started = Instant::now();
        // Reuse the KV cache when it holds a prefix of the new prompt; a
        // trimmed conversation (or a template that rewrites history) cannot.
        // Nor can a prompt the cache already holds whole (continuing a cut
        // answer): kalosm needs new tokens to compute the next logits, and
        // its cache cannot be shortened.
        let mut cached_tokens = 0;
        if self.fed.is_empty() || !prompt.starts_with(&self.fed) || prompt.len() == self.fed.len() {
            self.fresh_session()?;
            cached_tokens = self.start_from_prompt_cache(&prompt).await;
        }
        let delta = prompt[self.fed.len()..].to_string();
        let reused_tokens = self.kv_tokens;
        let prompt_tokens = self.count_tokens(&delta);
        let _ = out.send(EngineEvent::TurnStarted {
            turn,
            prompt_tokens,
            reused_tokens,
        });

        let room = self
            .info
            .context_limit
            .saturating_sub(reused_tokens + prompt_tokens + 1);
        let max_new = (self.options.sampler.max_tokens as usize).min(room).max(1);
        let limit_reason = if max_new < self.options.sampler.max_tokens as usize {
            FinishReason::ContextFull
        } else {
            FinishReason::MaxTokens
        };

        let trace = Arc::new(Mutex::new(Trace::for_prompt(
            &prompt,
            earlier,
            constraint.is_some(),
        )));
        let on_token = {
            let trace = trace.clone();
            let out = out.clone();
            let cancel = cancel.clone();
            move |text: String| -> std::result::Result<(), LlamaError> {
                let mut t = trace.lock().expect("trace lock");
                t.token(turn, text, &out);
                // Returning an error is kalosm's only way to stop mid-stream.
                // The token just emitted is already in the KV cache, so it is
                // kept in the reply to keep the two in step.
                if cancel.is_cancelled(turn) {
                    t.stopped = Some(FinishReason::Cancelled);
                } else if t.chunks >= max_new {
                    t.stopped = Some(limit_reason);
                }
                match t.stopped {
                    Some(_) => Err(LlamaError::ModelStopped),
                    None => Ok(()),
                }
            }
        };
        let banned = match (self.options.ignore_eos, self.eos_id) {
            (true, Some(id)) => vec![id],
            _ => vec![],
        };
        let sampler = KilnSampler::new(&self.options.sampler, banned);
        let result = match constraint {
            None => {
                self.model
                    .stream_text_with_callback(&mut self.session, &delta, sampler, on_token)
                    .await
            }
            Some(pattern) => {
                let parser = RegexParser::new(pattern)
                    .map_err(|e| format!("the answer's pattern does not compile: {e}"))?;
                self.model
                    .stream_text_with_callback_and_parser(
                        &mut self.session,
                        &delta,
                        sampler,
                        parser,
                        on_token,
                    )
                    .await
                    .map(|_| ())
            }
        };
        let ended = Instant::now();

        let trace = std::mem::take(&mut *trace.lock().expect("trace lock"));
        let finish = match (result, trace.stopped) {
            (_, Some(reason)) => reason,
            (Ok(()), None) => FinishReason::Stop,
            (Err(e), None) => {
                // The cache state after a failed forward pass is unknown.
                let _ = self.fresh_session();
                return Err(format!("generation failed: {e}"));
            }
        };
        let completion_tokens = self.count_tokens(&trace.reply);
        self.fed.push_str(&delta);
        self.fed.push_str(&trace.reply);
        self.kv_tokens += prompt_tokens + completion_tokens;
        if finish == FinishReason::Stop {
            // kalosm runs the end-of-turn token through the model before it
            // stops, so the cache holds it.
            self.fed.push_str(self.template.eos());
            self.kv_tokens += 1;
        }

        let total_s = (ended - started).as_secs_f64();
        let ttft_s = trace
            .first_at
            .map_or(total_s, |t| (t - started).as_secs_f64());
        let (prefill_tok_s, decode_tok_s) =
            rates(prompt_tokens, completion_tokens, ttft_s, total_s);
        let stats = GenStats {
            ttft_ms: ttft_s * 1000.0,
            prompt_tokens,
            reused_tokens,
            completion_tokens,
            prefill_tok_s,
            decode_tok_s,
            total_ms: total_s * 1000.0,
            context_tokens: self.kv_tokens,
            cached_tokens,
            ..GenStats::default()
        };
        tracing::info!("turn {turn}: {}", stats.summary(finish));
        let _ = out.send(EngineEvent::TurnFinished {
            turn,
            reply: format!("{earlier}{}", trace.answer()),
            finish,
            stats,
        });
        Ok(trace.answer())
    }
}

impl Engine for KalosmEngine {
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

    async fn continue_last(&mut self, turn: u64, out: &EventSink, cancel: &CancelFlag) {
        let result = self.run_continue(turn, out, cancel).await;
        end_turn(turn, result, out);
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        // The next turn renders a different prefix and so re-prefills.
        self.conv.system = prompt;
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        // `fed` still describes the KV cache; the next turn keeps it only if
        // the new rendering starts with it.
        self.conv.messages = messages;
    }

    fn snapshot(&self) -> std::result::Result<Option<KvState>, String> {
        if self.kv_tokens == 0 {
            return Ok(None);
        }
        self.save_state().map(Some)
    }

    fn restore(&mut self, state: KvState) -> std::result::Result<(), String> {
        self.load_state(&state).inspect_err(|_| {
            let _ = self.fresh_session();
        })
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        self.options.sampler = settings;
    }

    fn reset(&mut self) {
        self.conv.messages.clear();
        let _ = self.fresh_session();
    }
}
