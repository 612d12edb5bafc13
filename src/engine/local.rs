//! The engine for a model on this machine, whichever backend `--engine`
//! picked: llama.cpp (the default, see the README's engine table) or
//! kalosm's own `Llama`.

use super::kalosm::{EngineOptions, KalosmEngine};
use super::llamacpp::LlamaCppEngine;
use super::sampler::SamplerSettings;
use super::{CancelFlag, Engine, EventSink, Format, Message, ModelInfo, Priority};
use crate::budget::{KvLayout, KvType};
use crate::chat::KvState;
use crate::error::KilnError;
use crate::models::ResolvedModel;
use crate::window::{FlashAttn, Rope, WindowArgs};

pub enum LocalEngine {
    LlamaCpp(LlamaCppEngine),
    Kalosm(KalosmEngine),
}

/// The backend names `--engine` takes for a local model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    LlamaCpp,
    Kalosm,
}

impl Backend {
    /// `--engine local` (or nothing), `llamacpp` or `kalosm`; `None` for
    /// anything else (`remote:NAME`).
    pub fn parse(engine: &str) -> Option<Backend> {
        match engine {
            "" | "local" | "llamacpp" => Some(Backend::LlamaCpp),
            "kalosm" => Some(Backend::Kalosm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::LlamaCpp => "llamacpp",
            Backend::Kalosm => "kalosm",
        }
    }

    /// The backend, the form of its saved states, how it stores KV values
    /// and the rope scaling it applies, for fingerprints: a saved KV state
    /// is only good for the same.
    pub fn label(self, kv: KvType, window: &WindowArgs, rope: Option<Rope>) -> String {
        match self {
            // States are llama.cpp's in-memory sequence data (v2), not its
            // session files (v1).
            Backend::LlamaCpp => {
                let (k, v) = window.kv(kv);
                let mut label = format!("{}-v2-{}", self.name(), k.name());
                if v != k {
                    label.push_str(&format!("-v{}", v.name()));
                }
                if let Some(r) = rope {
                    label.push_str(&format!("-{}{}x{}", r.scaling.name(), r.factor, r.original));
                }
                label
            }
            Backend::Kalosm => self.name().to_string(),
        }
    }

    /// Refuse settings this backend cannot honour.
    pub fn check(self, kv: KvType, window: &WindowArgs) -> Result<(), KilnError> {
        let (k, v) = window.kv(kv);
        match self {
            Backend::Kalosm if k.is_quantized() || v.is_quantized() => {
                Err(KilnError::BadArgument(format!(
                    "--kv-type {}: kalosm keeps its KV cache in f32; use --engine llamacpp",
                    if k.is_quantized() { k.name() } else { v.name() }
                )))
            }
            Backend::Kalosm if window.rope_given() => Err(KilnError::BadArgument(
                "--rope-scaling: kalosm has no rope scaling; use --engine llamacpp".into(),
            )),
            Backend::Kalosm if window.flash_attn == FlashAttn::On => Err(KilnError::BadArgument(
                "--flash-attn on: kalosm has no flash attention; use --engine llamacpp".into(),
            )),
            Backend::Kalosm if window.draft.is_some() => Err(KilnError::BadArgument(
                "--draft: kalosm has no speculative decoding; use --engine llamacpp".into(),
            )),
            // llama.cpp transposes a V cache that flash attention does not
            // read, and cannot transpose quantized blocks.
            Backend::LlamaCpp if v.is_quantized() && window.flash_attn == FlashAttn::Off => {
                Err(KilnError::BadArgument(format!(
                    "--kv-type-v {} needs flash attention: use --flash-attn on or auto",
                    v.name()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Conversations this backend runs at once on one loaded model.
    pub fn sequences(self, window: &WindowArgs) -> u64 {
        match self {
            Backend::LlamaCpp => window.conversations as u64,
            Backend::Kalosm => 1,
        }
    }

    /// How this backend stores the KV cache of a `context`-token window.
    pub fn kv_layout(self, context: usize, kv: KvType, window: &WindowArgs) -> KvLayout {
        let (k, v) = window.kv(kv);
        match self {
            Backend::LlamaCpp => KvLayout::Gqa {
                window: context as u64,
                k,
                v,
                // llama.cpp resolves `auto` to on wherever its backend runs flash
                // attention: its CPU and Metal backends do.
                flash: window.flash_attn != crate::window::FlashAttn::Off,
            },
            Backend::Kalosm => KvLayout::KalosmF32,
        }
    }
}

macro_rules! each {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            LocalEngine::LlamaCpp($e) => $body,
            LocalEngine::Kalosm($e) => $body,
        }
    };
}

impl LocalEngine {
    /// Load `model` on `backend`; `progress` gets the load fraction where
    /// the backend reports one (kalosm).
    pub async fn load(
        backend: Backend,
        model: &ResolvedModel,
        options: EngineOptions,
        progress: impl FnMut(f32) + Send + Sync + 'static,
    ) -> Result<LocalEngine, KilnError> {
        Ok(match backend {
            Backend::LlamaCpp => LocalEngine::LlamaCpp(LlamaCppEngine::load(model, options).await?),
            Backend::Kalosm => {
                LocalEngine::Kalosm(KalosmEngine::load(model, options, progress).await?)
            }
        })
    }

    /// Tokens `text` becomes in this model's tokenizer.
    pub fn count_tokens(&self, text: &str) -> usize {
        each!(self, e => e.count_tokens(text))
    }
}

impl Engine for LocalEngine {
    fn info(&self) -> ModelInfo {
        each!(self, e => e.info())
    }

    fn tokens_in(&self, text: &str) -> Option<usize> {
        Some(self.count_tokens(text))
    }

    async fn chat(&mut self, turn: u64, message: String, out: &EventSink, cancel: &CancelFlag) {
        each!(self, e => e.chat(turn, message, out, cancel).await)
    }

    async fn chat_constrained(
        &mut self,
        turn: u64,
        input: Vec<Message>,
        format: Option<Format>,
        out: &EventSink,
        cancel: &CancelFlag,
    ) {
        each!(self, e => e.chat_constrained(turn, input, format, out, cancel).await)
    }

    async fn complete(&mut self, turn: u64, prompt: String, out: &EventSink, cancel: &CancelFlag) {
        each!(self, e => e.complete(turn, prompt, out, cancel).await)
    }

    fn set_tools(&mut self, tools: Vec<serde_json::Value>) {
        each!(self, e => e.set_tools(tools))
    }

    async fn continue_last(&mut self, turn: u64, out: &EventSink, cancel: &CancelFlag) {
        each!(self, e => e.continue_last(turn, out, cancel).await)
    }

    fn set_system_prompt(&mut self, prompt: Option<String>) {
        each!(self, e => e.set_system_prompt(prompt))
    }

    fn set_history(&mut self, messages: Vec<Message>) {
        each!(self, e => e.set_history(messages))
    }

    fn snapshot(&self) -> Result<Option<KvState>, String> {
        each!(self, e => e.snapshot())
    }

    fn restore(&mut self, state: KvState) -> Result<(), String> {
        each!(self, e => e.restore(state))
    }

    fn set_sampler(&mut self, settings: SamplerSettings) {
        each!(self, e => e.set_sampler(settings))
    }

    fn reset(&mut self) {
        each!(self, e => e.reset())
    }

    fn open(&self) -> Option<Self> {
        match self {
            LocalEngine::LlamaCpp(e) => e.open().map(LocalEngine::LlamaCpp),
            LocalEngine::Kalosm(_) => None,
        }
    }

    fn conversations(&self) -> usize {
        each!(self, e => e.conversations())
    }

    fn set_priority(&mut self, priority: Priority) {
        each!(self, e => e.set_priority(priority))
    }
}
