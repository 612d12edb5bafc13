//! Memory budget: what a model needs at a given context, for the engine as it
//! really stores things, and whether that fits this machine.
//!
//! Pure functions, for either local backend (`KvLayout`).
//!
//! llama.cpp keeps the weights as the file has them (mapped). kiln's
//! llama.cpp engine makes its context for `KV_CHUNK` tokens and makes it
//! again, bigger, when the conversation outgrows it (`grown_kv_cells`): f16
//! K and V per KV head, n_layer × n_kv_head × head_dim × 2 × 2 bytes per
//! allocated token.
//!
//! The figures for kalosm 0.4 come from its source and were checked against
//! measured RSS on SmolLM2-135M (see `tests/budget_accuracy.rs`):
//! - weights are kept as loaded, except the token embedding table, which is
//!   dequantized to f32 (vocab × hidden × 4 bytes) on top of the file's copy;
//! - K and V are cached after the grouped-query repeat, in f32 (on CPU and
//!   Metal alike): n_layer × n_head × head_dim × 2 × 4 bytes per token;
//! - the cache grows to the next power of two of the tokens held, capped at the
//!   model's trained context;
//! - a prompt is prefilled in one pass: the attention scores and their softmax
//!   are two f32 tensors of n_head × prompt × context, freed afterwards;
//! - the allocator keeps some of the prefill's activations (measured about
//!   60 KB per prefilled token on SmolLM2's 576-wide layers; scaled by width).

use serde::Serialize;

use crate::gguf::GgufInfo;
use crate::layers::Layers;

/// The machine's memory as a budget sees it; telemetry reads it from the
/// OS (`MemorySnapshot::read`).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MemorySnapshot {
    pub total: u64,
    /// Memory a new allocation can get without swapping (MemAvailable on
    /// Linux), capped by a cgroup limit when the process runs in one, and
    /// by the GPU wired limit when kiln runs on Metal.
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

/// RSS of kiln with a model loaded, less the weights: binary, tokenizer, rope
/// tables, thread stacks. Measured: 38 MB with SmolLM2-135M.
pub const RUNTIME_BASE_BYTES: u64 = 40 << 20;
/// Retained activation bytes per prefilled token per unit of hidden width
/// (60 KB / 576, measured on SmolLM2-135M).
const RETAINED_PER_TOKEN_PER_WIDTH: u64 = 104;
/// Resident bytes of llama.cpp's compute buffer that do not grow with the
/// context: a 512-token batch's activations and the vocabulary's tables.
/// Measured 17 MiB on 256-wide synthetic models of four architectures
/// (`tests/architectures.rs`); the part that grows is the attention mask
/// (`KvLayout::Gqa`'s `compute_bytes`).
const LLAMACPP_GRAPH_BYTES: u64 = 17 << 20;
/// Fits, but with less than this share of available memory left over.
const HEADROOM: f64 = 0.10;

/// The numbers of a model that decide its memory use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: String,
    pub architecture: String,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_kv_head: u64,
    /// Head size as kalosm computes it (hidden / heads).
    pub head_dim: u64,
    /// Key/value head size for the reference layout (the file's key_length).
    pub kv_head_dim: u64,
    pub hidden: u64,
    pub vocab: u64,
    pub context_length: u64,
    /// The longest window it may run with: the trained context, or more
    /// with rope scaling.
    pub window_limit: u64,
    /// What llama.cpp keeps per layer.
    pub layers: Layers,
    /// Bytes of all tensors in the file.
    pub tensor_bytes: u64,
    /// Bytes of MoE expert tensors among them.
    pub expert_bytes: u64,
    /// Bytes per tensor type, largest first (empty for built-in presets).
    pub tensor_types: Vec<(String, u64)>,
    pub kv_layout: KvLayout,
    /// Conversations the llama.cpp context runs at once: its sliding-window
    /// layers keep a window for each.
    pub sequences: u64,
    /// The draft model (`--draft`), whose weights and KV cache (a cell for
    /// each of this model's) come with this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<Box<ModelShape>>,
}

/// Tokens the llama.cpp engine prefills per forward pass.
pub const PREFILL_CHUNK: u64 = 512;

/// Tokens the llama.cpp engine's first KV cache holds; it doubles from there.
pub const KV_CHUNK: u64 = 4096;

/// KV cells the llama.cpp engine allocates to hold `tokens` in a
/// `window`-token context: `KV_CHUNK` doubled until they fit, at most the
/// window. Doubling keeps the copies a growing conversation costs to a few.
pub fn grown_kv_cells(tokens: u64, window: u64) -> u64 {
    (tokens.max(1).div_ceil(KV_CHUNK).next_power_of_two() * KV_CHUNK).min(window)
}

/// How llama.cpp stores each K and V value (`--kv-type`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    #[default]
    F16,
    /// Blocks of 32 values in 34 bytes: about half of f16, slightly less
    /// exact.
    #[value(name = "q8_0")]
    Q8_0,
    /// Blocks of 32 values in 18 bytes: about a quarter of f16; for K it
    /// costs more accuracy than for V.
    #[value(name = "q4_0")]
    Q4_0,
}

impl KvType {
    /// Bytes of a row of `values` values.
    pub fn bytes(self, values: u64) -> u64 {
        match self {
            KvType::F16 => values * 2,
            KvType::Q8_0 => values.div_ceil(32) * 34,
            KvType::Q4_0 => values.div_ceil(32) * 18,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    pub fn is_quantized(self) -> bool {
        self != KvType::F16
    }
}

/// How the engine stores the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvLayout {
    /// kalosm 0.4: f32, repeated to every query head, grown by powers of two.
    KalosmF32,
    /// llama.cpp: K and V values per KV head, stored as `k` and `v`, grown
    /// in chunks up to `window` tokens; `flash` when attention runs as flash
    /// attention, which never holds a batch's full score matrix.
    Gqa {
        window: u64,
        k: KvType,
        v: KvType,
        flash: bool,
    },
}

impl KvLayout {
    /// For `kiln fit`: how the values are kept.
    pub fn describe(self) -> String {
        match self {
            KvLayout::KalosmF32 => "kalosm f32, repeated heads".into(),
            KvLayout::Gqa { k, v, flash, .. } => {
                let values = match k == v {
                    true => format!("{} per KV head", k.name()),
                    false => format!("K {}, V {} per KV head", k.name(), v.name()),
                };
                let attention = match flash {
                    true => "flash attention",
                    false => "flash attention off",
                };
                format!("{values} · {attention}")
            }
        }
    }
}

impl ModelShape {
    pub fn from_gguf(info: &GgufInfo) -> ModelShape {
        let head_dim = info.head_dim() as u64;
        ModelShape {
            name: info.display_name(),
            architecture: info.architecture.clone(),
            n_layer: info.block_count as u64,
            n_head: info.head_count as u64,
            n_kv_head: info.head_count_kv as u64,
            head_dim,
            kv_head_dim: info.key_length.map_or(head_dim, |k| k as u64),
            hidden: info.embedding_length as u64,
            vocab: info.vocab_size as u64,
            context_length: info.context_length as u64,
            window_limit: info.context_length as u64,
            layers: info.layers.clone(),
            tensor_bytes: info.tensor_bytes,
            expert_bytes: info.expert_bytes,
            tensor_types: info.tensor_types.clone(),
            kv_layout: KvLayout::KalosmF32,
            sequences: 1,
            draft: None,
        }
    }

    /// This model with `draft` drafting for it.
    pub fn with_draft(mut self, draft: ModelShape) -> ModelShape {
        let draft = draft
            .with_kv_layout(self.kv_layout)
            .with_sequences(self.sequences);
        self.draft = Some(Box::new(draft));
        self
    }

    /// The same model able to run up to `tokens` (rope scaling).
    pub fn with_window_limit(mut self, tokens: u64) -> ModelShape {
        self.window_limit = tokens.max(self.context_length);
        self
    }

    /// The same model with its window set to `n` tokens.
    fn sized_for(&self, n: u64) -> ModelShape {
        let mut sized = self.own_sized_for(n);
        sized.draft = self.draft.as_ref().map(|d| Box::new(d.own_sized_for(n)));
        sized
    }

    fn own_sized_for(&self, n: u64) -> ModelShape {
        match self.kv_layout {
            KvLayout::Gqa { k, v, flash, .. } => self.clone().with_kv_layout(KvLayout::Gqa {
                window: n,
                k,
                v,
                flash,
            }),
            KvLayout::KalosmF32 => self.clone(),
        }
    }

    /// The same model as an engine storing its KV cache this way.
    pub fn with_kv_layout(mut self, layout: KvLayout) -> ModelShape {
        self.kv_layout = layout;
        if let Some(d) = &mut self.draft {
            d.kv_layout = layout;
        }
        self
    }

    /// KV bytes per token as the engine stores them, in the layers whose
    /// cache grows with the context (sliding-window layers stop growing at
    /// their window; see `kv_bytes`).
    pub fn kv_per_token_engine(&self) -> u64 {
        self.and_draft(Self::own_kv_per_token)
    }

    /// `own` of this model plus, with a draft model, of that one.
    fn and_draft(&self, own: impl Fn(&ModelShape) -> u64) -> u64 {
        own(self) + self.draft.as_deref().map_or(0, own)
    }

    /// `kv_per_token_engine` without the draft model's.
    pub fn own_kv_per_token(&self) -> u64 {
        match self.kv_layout {
            KvLayout::KalosmF32 => self.n_layer * self.n_head * self.head_dim * 2 * 4,
            KvLayout::Gqa { k, v, .. } => k.bytes(self.layers.full.k) + v.bytes(self.layers.full.v),
        }
    }

    /// Bytes per cell of the sliding-window layers' cache.
    fn swa_per_cell(&self) -> u64 {
        match self.kv_layout {
            KvLayout::KalosmF32 => 0,
            KvLayout::Gqa { k, v, .. } => k.bytes(self.layers.swa.k) + v.bytes(self.layers.swa.v),
        }
    }

    /// Cells the sliding-window layers hold when the rest holds `cells`:
    /// a window for each sequence and one batch, padded to 256
    /// (`llama_kv_cache_iswa` with one unified cache).
    pub fn swa_cells(&self, cells: u64) -> u64 {
        if self.layers.swa.layers == 0 {
            return 0;
        }
        cells
            .min(self.layers.window * self.sequences.max(1) + PREFILL_CHUNK)
            .next_multiple_of(256)
    }

    /// The same model run with `n` conversations at once.
    pub fn with_sequences(mut self, n: u64) -> ModelShape {
        self.sequences = n.max(1);
        if let Some(d) = &mut self.draft {
            d.sequences = self.sequences;
        }
        self
    }

    /// KV cache (and recurrent state) bytes the engine has allocated when
    /// it holds `tokens`, the draft model's included.
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        self.and_draft(|m| m.own_kv_bytes(tokens))
    }

    /// `kv_bytes` without the draft model's.
    pub fn own_kv_bytes(&self, tokens: u64) -> u64 {
        let cells = self.kv_allocated_tokens(tokens);
        match self.kv_layout {
            KvLayout::KalosmF32 => cells * self.own_kv_per_token(),
            KvLayout::Gqa { .. } => {
                cells * self.own_kv_per_token()
                    + self.swa_cells(cells) * self.swa_per_cell()
                    + self.layers.recurrent_bytes
            }
        }
    }

    /// KV bytes per token for an f16 cache kept per KV head for every
    /// layer (llama.cpp's default without windows), for comparison.
    pub fn kv_per_token_f16_gqa(&self) -> u64 {
        let l = &self.layers;
        2 * (l.full.k + l.full.v + l.swa.k + l.swa.v)
    }

    /// Weights in memory: the file's tensors, plus (kalosm) the f32
    /// embedding table.
    pub fn weight_bytes(&self) -> u64 {
        self.and_draft(Self::own_weight_bytes)
    }

    /// `weight_bytes` without the draft model's.
    pub fn own_weight_bytes(&self) -> u64 {
        match self.kv_layout {
            KvLayout::KalosmF32 => self.tensor_bytes + self.vocab * self.hidden * 4,
            KvLayout::Gqa { .. } => self.tensor_bytes,
        }
    }

    /// Weight bytes one decoded token reads: every tensor, but of the
    /// experts only the share a token is routed to.
    pub fn active_weight_bytes(&self) -> u64 {
        let dense = self.tensor_bytes - self.expert_bytes.min(self.tensor_bytes);
        let experts = match self.layers.experts {
            Some((n, used)) if n > 0 => self.expert_bytes * used.min(n) / n,
            _ => self.expert_bytes,
        };
        dense + experts
    }

    /// Tokens of KV cache the engine has allocated when it holds `tokens`.
    pub fn kv_allocated_tokens(&self, tokens: u64) -> u64 {
        if let KvLayout::Gqa { window, .. } = self.kv_layout {
            return grown_kv_cells(tokens, window);
        }
        if tokens == 0 {
            return 0;
        }
        tokens
            .next_power_of_two()
            .min(self.window_limit)
            .max(tokens.min(self.window_limit))
    }

    /// Transient bytes of attention scores while prefilling `prompt` tokens
    /// with `context` tokens in the cache afterwards: kalosm computes them
    /// in one pass (scores and their softmax) and frees them. llama.cpp
    /// keeps its score matrix in the compute buffer it holds (see
    /// `retained_activation_bytes`), so nothing is transient there.
    pub fn prefill_peak_bytes(&self, prompt: u64, context: u64) -> u64 {
        match self.kv_layout {
            KvLayout::KalosmF32 => 2 * self.n_head * prompt * context * 4,
            KvLayout::Gqa { .. } => 0,
        }
    }

    /// The attention scores llama.cpp holds when flash attention is off,
    /// for the largest batch of a `prefilled`-token prompt ending with
    /// `tokens` cached: f32 scores in its compute buffer (the softmax runs in
    /// place) plus the f16 copy the CPU backend makes of them for the
    /// product with V, 6 bytes a score. Measured on SmolLM2 (9 heads) against
    /// `--flash-attn on`: +6, +50 and +123 MB of RSS at 296, 2,078 and
    /// 5,042 tokens, where this gives 0.5, 57 and 127 MB.
    pub fn score_matrix_bytes(&self, tokens: u64, prefilled: u64) -> u64 {
        let KvLayout::Gqa { flash: false, .. } = self.kv_layout else {
            return 0;
        };
        let prefilled = prefilled.min(tokens);
        let start = tokens - prefilled;
        let full = prefilled / PREFILL_CHUNK;
        let last_full = match full {
            0 => 0,
            n => PREFILL_CHUNK * (start + n * PREFILL_CHUNK),
        };
        let rest = (prefilled % PREFILL_CHUNK) * tokens;
        self.n_head * last_full.max(rest) * 6
    }

    /// Activations the allocator keeps after prefilling `prefilled`
    /// tokens into a cache holding `tokens`: kalosm keeps some of each
    /// prefill's; llama.cpp keeps its compute buffer, whose resident part
    /// is a batch's activations plus the f16 attention mask, one row per
    /// batch token and one column per cell (and one more mask over the
    /// window's cells), and with flash attention off a batch's scores.
    fn retained_activation_bytes(&self, tokens: u64, prefilled: u64) -> u64 {
        self.and_draft(|m| m.own_activation_bytes(tokens, prefilled))
    }

    fn own_activation_bytes(&self, tokens: u64, prefilled: u64) -> u64 {
        match self.kv_layout {
            KvLayout::KalosmF32 => prefilled * self.hidden * RETAINED_PER_TOKEN_PER_WIDTH,
            KvLayout::Gqa { .. } => {
                let cells = self.kv_allocated_tokens(tokens);
                LLAMACPP_GRAPH_BYTES
                    + (cells + self.swa_cells(cells)) * PREFILL_CHUNK * 2
                    + self.score_matrix_bytes(tokens, prefilled)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Fits,
    /// Fits, with less than 10 % of available memory to spare.
    Tight,
    /// Needs more than is available, but no more than available plus free swap.
    WillSwap,
    DoesNotFit,
}

impl Verdict {
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::Fits => "fits",
            Verdict::Tight => "fits, but leaves less than 10% headroom",
            Verdict::WillSwap => "will swap",
            Verdict::DoesNotFit => "does not fit",
        }
    }

    /// The verdict in a Mac's terms, where the model lives in GPU-wired
    /// memory under Metal's limit: wired memory cannot swap, so a budget
    /// over the limit is a failed or crawling load, not swapping. (macOS
    /// grows swap on demand, so a swap total of 0 is no sign either way.)
    pub fn describe_on_metal(self) -> &'static str {
        match self {
            Verdict::Fits => "fits under the GPU wired limit",
            Verdict::Tight => "fits under the GPU wired limit, with less than 10% headroom",
            Verdict::WillSwap | Verdict::DoesNotFit => {
                "does not fit under the GPU wired limit: wired memory cannot swap, so Metal fails the allocation or runs far slower"
            }
        }
    }

    /// This platform's words: a Mac's where the engine runs on Metal.
    pub fn describe_here(self, metal: bool) -> &'static str {
        match metal {
            true => self.describe_on_metal(),
            false => self.describe(),
        }
    }
}

/// The `sysctl` that lets a Mac's GPU wire `need` bytes, when that is the
/// only thing in the way: the model needs more than the GPU wired `limit`
/// but fits in 95% of `total` memory. The figure leaves 1 GiB over `need`.
pub fn wired_limit_advice(need: u64, limit: u64, total: u64) -> Option<String> {
    let room = total / 100 * 95;
    if need <= limit || need > room {
        return None;
    }
    let mb = ((need + (1 << 30)).min(room)).div_ceil(1 << 20);
    Some(format!(
        "the GPU may wire {} and this needs {}: `sudo sysctl iogpu.wired_limit_mb={mb}` lets it wire {} (until the next reboot; the setting does not persist)",
        gib(limit),
        gib(need),
        gib(mb << 20),
    ))
}

/// A model at a context size against this machine's memory.
#[derive(Clone, Debug, Serialize)]
pub struct Budget {
    pub context: u64,
    pub weights: u64,
    pub kv_per_token: u64,
    pub kv_per_token_f16_gqa: u64,
    /// KV cache as allocated when `context` tokens are held.
    pub kv_at_context: u64,
    /// The same context in an f16 per-KV-head cache.
    pub kv_at_context_f16_gqa: u64,
    /// Runtime base plus activations the allocator keeps.
    pub overhead: u64,
    /// Steady memory with the context full: weights + KV + overhead.
    pub total: u64,
    /// Extra, briefly, to prefill a whole context in one pass.
    pub full_prefill_peak: u64,
    pub available: u64,
    pub verdict: Verdict,
    /// The largest context whose steady budget fits in available memory.
    pub max_context: u64,
    /// Why the figures cannot be trusted for this model's layout, when
    /// they cannot.
    pub unmodelled: Option<String>,
}

/// Steady bytes kalosm needs holding `tokens`, of which `prefilled` were
/// prefilled in the largest single prompt.
pub fn steady_bytes(shape: &ModelShape, tokens: u64, prefilled: u64) -> u64 {
    shape.weight_bytes()
        + shape.kv_bytes(tokens)
        + RUNTIME_BASE_BYTES
        + shape.retained_activation_bytes(tokens, prefilled)
}

pub fn verdict(need: u64, mem: &MemorySnapshot) -> Verdict {
    let available = mem.available as f64;
    let need_f = need as f64;
    if need_f <= available * (1.0 - HEADROOM) {
        Verdict::Fits
    } else if need <= mem.available {
        Verdict::Tight
    } else if need <= mem.available + mem.swap_free {
        Verdict::WillSwap
    } else {
        Verdict::DoesNotFit
    }
}

/// The budget at `context` tokens, which the caller has checked against
/// the model's window (`window::plan`): nothing here clamps it.
pub fn budget(shape: &ModelShape, context: u64, mem: &MemorySnapshot) -> Budget {
    let shape = &shape.sized_for(context);
    let total = steady_bytes(shape, context, context);
    Budget {
        context,
        weights: shape.weight_bytes(),
        kv_per_token: shape.kv_per_token_engine(),
        kv_per_token_f16_gqa: shape.kv_per_token_f16_gqa(),
        kv_at_context: shape.kv_bytes(context),
        kv_at_context_f16_gqa: context * shape.kv_per_token_f16_gqa(),
        overhead: RUNTIME_BASE_BYTES + shape.retained_activation_bytes(context, context),
        total,
        full_prefill_peak: shape.prefill_peak_bytes(context, context),
        available: mem.available,
        verdict: verdict(total, mem),
        max_context: max_context(shape, mem.available),
        unmodelled: shape.layers.unmodelled.clone(),
    }
}

/// The largest `n` in `lo..=hi` for which `fits` holds, given that it holds
/// for every number below one that fits; `None` when not even `lo` fits.
fn largest(lo: u64, hi: u64, fits: impl Fn(u64) -> bool) -> Option<u64> {
    if !fits(lo) {
        return None;
    }
    if fits(hi) {
        return Some(hi);
    }
    let (mut lo, mut hi) = (lo, hi);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The largest context (in tokens, up to the window limit) whose steady
/// budget fits in `available` bytes; 0 when not even the weights fit.
pub fn max_context(shape: &ModelShape, available: u64) -> u64 {
    largest(1, shape.window_limit, |n| {
        steady_bytes(&shape.sized_for(n), n, n) <= available
    })
    .unwrap_or(0)
}

/// The KV cells all conversations on one llama.cpp context may hold
/// together: as many as fit in `available` bytes beside the weights, at
/// least one window (which the load guard checked) and at most one window
/// per conversation. One window without memory figures.
pub fn shared_kv_cells(
    shape: &ModelShape,
    window: u64,
    conversations: u64,
    available: Option<u64>,
) -> u64 {
    let most = window * conversations.max(1);
    let Some(available) = available else {
        return window;
    };
    max_context(&shape.clone().with_window_limit(most), available).clamp(window, most)
}

/// How many more tokens the conversation can take before the KV cache's
/// growth no longer fits in `available` bytes, up to the trained context.
/// When the cache grows it allocates the larger buffer while the old one is
/// still held, so each step needs the whole new buffer free.
pub fn tokens_before_memory_runs_out(
    shape: &ModelShape,
    context_tokens: u64,
    available: u64,
) -> u64 {
    let held = shape.kv_allocated_tokens(context_tokens);
    let room = shape.window_limit.saturating_sub(context_tokens);
    largest(0, room, |extra| {
        let tokens = context_tokens + extra;
        shape.kv_allocated_tokens(tokens) == held || shape.kv_bytes(tokens) <= available
    })
    .unwrap_or(0)
}

pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 10.0 {
        format!("{g:.1} GiB")
    } else if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn wired_limit_advice_appears_exactly_when_raising_the_limit_is_enough() {
        let g = 1u64 << 30;
        // 48 GB Mac, default limit 36 GiB: a 38 GiB budget fits in 95%.
        let advice = wired_limit_advice(38 * g, 36 * g, 48 * g).unwrap();
        assert!(
            advice.contains("sudo sysctl iogpu.wired_limit_mb=39936"),
            "{advice}"
        );
        assert!(advice.contains("until the next reboot"), "{advice}");
        // Under the limit: nothing to do.
        assert_eq!(wired_limit_advice(30 * g, 36 * g, 48 * g), None);
        // Past 95% of memory: raising the limit would not help.
        assert_eq!(wired_limit_advice(46 * g, 36 * g, 48 * g), None);
        // Just under 95%: the figure is capped there, not above.
        let close = wired_limit_advice(45 * g, 36 * g, 48 * g).unwrap();
        let cap_mb = (48 * g / 100 * 95).div_ceil(1 << 20);
        assert!(
            close.contains(&format!("wired_limit_mb={cap_mb}")),
            "{close}"
        );
    }

    #[test]
    fn a_mac_verdict_speaks_of_the_wired_limit_not_swap() {
        for v in [Verdict::WillSwap, Verdict::DoesNotFit] {
            let text = v.describe_here(true);
            assert!(text.contains("wired memory cannot swap"), "{text}");
            assert!(!text.contains("will swap"), "{text}");
        }
        assert_eq!(Verdict::WillSwap.describe_here(false), "will swap");
        // A Mac at swap 0 (macOS grows swap on demand) that needs more than
        // it has: does not fit, in the Mac's words.
        let mem = MemorySnapshot {
            total: 48 << 30,
            available: 36 << 30,
            swap_total: 0,
            swap_free: 0,
        };
        let v = verdict(40 << 30, &mem);
        assert_eq!(v, Verdict::DoesNotFit);
        assert!(v
            .describe_here(true)
            .starts_with("does not fit under the GPU wired limit"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-32B-Instruct: 64 layers, 40 heads, 8 KV heads, head 128.
    fn qwen32() -> ModelShape {
        ModelShape {
            name: "qwen".into(),
            architecture: "qwen2".into(),
            n_layer: 64,
            n_head: 40,
            n_kv_head: 8,
            head_dim: 128,
            kv_head_dim: 128,
            hidden: 5120,
            vocab: 152_064,
            context_length: 32_768,
            window_limit: 32_768,
            layers: Layers::uniform(64, 8, 128),
            tensor_bytes: 19_851_336_256,
            expert_bytes: 0,
            tensor_types: Vec::new(),
            kv_layout: KvLayout::KalosmF32,
            sequences: 1,
            draft: None,
        }
    }

    /// llama.cpp's layout: 256 KiB a token for Qwen2.5-32B, allocated 4k
    /// tokens at a time and doubled up to the window.
    #[test]
    fn the_llamacpp_layout_is_f16_per_kv_head_and_grows_in_chunks() {
        let q = qwen32().with_kv_layout(KvLayout::Gqa {
            window: 32_768,
            k: KvType::F16,
            v: KvType::F16,
            flash: true,
        });
        assert_eq!(q.kv_per_token_engine(), 262_144);
        assert_eq!(q.kv_allocated_tokens(0), 4096);
        assert_eq!(q.kv_allocated_tokens(10), 4096);
        assert_eq!(q.kv_allocated_tokens(4097), 8192);
        assert_eq!(q.kv_allocated_tokens(12_289), 16_384);
        assert_eq!(q.kv_allocated_tokens(20_000), 32_768);
        assert_eq!(q.weight_bytes(), q.tensor_bytes);
        let b = budget(&q, 16_384, &mem(64, 0));
        assert_eq!(b.kv_at_context, 16_384 * 262_144);
        // 1 GiB holds the first 4,096 cells but not the 8,192 after them.
        assert_eq!(tokens_before_memory_runs_out(&q, 1_000, 1 << 30), 3_096);
        // A small window is allocated whole.
        let small = q.clone().with_kv_layout(KvLayout::Gqa {
            window: 2048,
            k: KvType::F16,
            v: KvType::F16,
            flash: true,
        });
        assert_eq!(small.kv_allocated_tokens(1), 2048);
        // q8_0: 128 values a head row, four blocks of 34 bytes.
        let q8 = q.with_kv_layout(KvLayout::Gqa {
            window: 32_768,
            k: KvType::Q8_0,
            v: KvType::Q8_0,
            flash: true,
        });
        assert_eq!(q8.kv_per_token_engine(), 64 * 2 * 8 * 4 * 34);
    }

    fn mem(avail_gib: u64, swap_gib: u64) -> MemorySnapshot {
        MemorySnapshot {
            total: avail_gib << 30,
            available: avail_gib << 30,
            swap_total: swap_gib << 30,
            swap_free: swap_gib << 30,
        }
    }

    #[test]
    fn kv_per_token_matches_the_known_layouts() {
        let q = qwen32();
        assert_eq!(q.kv_per_token_engine(), 2_621_440); // ≈ 2.6 MB
        assert_eq!(q.kv_per_token_f16_gqa(), 262_144); // 256 KiB
    }

    #[test]
    fn cache_grows_in_powers_of_two_up_to_the_trained_context() {
        let q = qwen32();
        assert_eq!(q.kv_allocated_tokens(0), 0);
        assert_eq!(q.kv_allocated_tokens(3000), 4096);
        assert_eq!(q.kv_allocated_tokens(4096), 4096);
        assert_eq!(q.kv_allocated_tokens(20_000), 32_768);
    }

    #[test]
    fn verdicts() {
        let q = qwen32();
        let need_8k = steady_bytes(&q, 8192, 8192);
        assert!(need_8k > 40 << 30 && need_8k < 48 << 30, "{}", gib(need_8k));
        assert_eq!(budget(&q, 8192, &mem(64, 0)).verdict, Verdict::Fits);
        assert_eq!(budget(&q, 8192, &mem(47, 0)).verdict, Verdict::Tight);
        assert_eq!(budget(&q, 8192, &mem(40, 16)).verdict, Verdict::WillSwap);
        assert_eq!(budget(&q, 32_768, &mem(96, 8)).verdict, Verdict::DoesNotFit);
    }

    #[test]
    fn max_context_is_the_boundary() {
        let q = qwen32();
        let m = mem(48, 0);
        let n = max_context(&q, m.available);
        assert!(n > 4096 && n < 32_768, "{n}");
        assert!(steady_bytes(&q, n, n) <= m.available);
        assert!(steady_bytes(&q, n + 1, n + 1) > m.available);
        assert_eq!(
            max_context(&q, 1 << 30),
            0,
            "1 GiB does not hold the weights"
        );
    }

    #[test]
    fn tokens_left_stop_where_the_next_cache_step_does_not_fit() {
        let q = qwen32();
        let per = q.kv_per_token_engine();
        // 3000 tokens held in a 4096-token cache; growing to 8192 needs the
        // whole 8192-token buffer free.
        assert_eq!(tokens_before_memory_runs_out(&q, 3000, 8192 * per), 5192);
        assert_eq!(
            tokens_before_memory_runs_out(&q, 3000, 8192 * per - 1),
            1096
        );
        // Plenty of memory: the trained context is the limit.
        assert_eq!(
            tokens_before_memory_runs_out(&q, 3000, u64::MAX / 4),
            32_768 - 3000
        );
    }
}
