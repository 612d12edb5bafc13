//! What llama.cpp keeps in memory for each layer of a model, read from the
//! GGUF's metadata the way llama.cpp reads it (`src/models/*.cpp`,
//! `llama-hparams.cpp`, `llama-kv-cache-iswa.cpp` in the llama.cpp that
//! `llama-cpp-sys-2` builds).
//!
//! A layer either attends over the whole context (its K and V grow with
//! it), attends over a sliding window (its cache holds the window and one
//! batch, whatever the context), keeps a recurrent state of fixed size, or
//! keeps nothing (a layer that shares another's cache). Multi-head latent
//! attention (DeepSeek) keeps one compressed row per token and no V.
//! Layouts this module does not know are named in `unmodelled`, so a
//! budget can say it does not know instead of guessing.

use serde::Serialize;

/// Recurrent architectures: every layer keeps a fixed-size state.
const RECURRENT: &[&str] = &["mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"];
/// Hybrids whose recurrent layers are the ones without KV heads.
const HYBRID_BY_KV_HEADS: &[&str] = &["jamba", "granitehybrid"];
/// Hybrids with layouts of their own (linear attention, short
/// convolutions, parallel SSM heads), not modelled here.
const HYBRID_OTHER: &[&str] = &[
    "falcon-h1",
    "plamo2",
    "lfm2",
    "lfm2moe",
    "nemotron_h",
    "nemotron_h_moe",
    "qwen3next",
    "kimi-linear",
    "bailingmoe3",
    "minimax-01",
];
/// Architectures with sliding-window or shared-KV layers whose rules this
/// module does not carry.
const SWA_OTHER: &[&str] = &[
    "gemma3n",
    "afmoe",
    "mellum",
    "plamo3",
    "muse-glimmer",
    "laguna",
];
/// Bounds on metadata before it is multiplied: a hostile file must not
/// overflow the arithmetic or make kiln allocate per-layer vectors of
/// absurd length.
pub const MAX_LAYERS: u64 = 4096;
const MAX_DIM: u64 = 1 << 24;

/// Metadata as the GGUF gives it, by key.
pub trait Meta {
    fn uint(&self, key: &str) -> Option<u64>;
    /// An array of unsigned integers (per-layer values).
    fn uints(&self, key: &str) -> Option<Vec<u64>>;
    fn bools(&self, key: &str) -> Option<Vec<bool>>;
}

/// K and V values per token summed over a set of layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvWidth {
    pub layers: u64,
    pub k: u64,
    pub v: u64,
}

impl KvWidth {
    fn add(&mut self, k: u64, v: u64) {
        self.layers += 1;
        self.k += k;
        self.v += v;
    }
}

/// How sliding-window layers attend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `window` tokens.
    Sliding,
    /// Tokens in the same `window`-token chunk (Llama 4).
    Chunked,
}

/// A model's memory by layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Layers {
    pub n_layer: u64,
    /// Layers that attend over the whole context.
    pub full: KvWidth,
    /// Layers that attend over a window of `window` tokens.
    pub swa: KvWidth,
    pub window: u64,
    pub window_kind: Option<WindowKind>,
    /// Layers with a recurrent state, and the state's bytes (f32, one
    /// sequence) summed over them.
    pub recurrent: u64,
    pub recurrent_bytes: u64,
    /// Multi-head latent attention: K is the compressed row, V is not kept.
    pub mla: bool,
    /// Experts per MoE layer and experts used per token; every expert's
    /// weights are resident, the file's tensors count them all.
    pub experts: Option<(u64, u64)>,
    /// Why this layout is not modelled, when it is not.
    pub unmodelled: Option<String>,
}

/// Per-layer values: an array of `n` values, or one value for every layer.
fn per_layer(meta: &dyn Meta, key: &str, n: usize) -> Option<Vec<u64>> {
    if let Some(v) = meta.uints(key) {
        if v.len() == n {
            return Some(v);
        }
        return v.first().map(|&x| vec![x; n]);
    }
    meta.uint(key).map(|x| vec![x; n])
}

impl Layers {
    /// Every layer attends over the whole context with `n_kv_head` heads of
    /// `head_dim` (the layout of a preset's built-in dimensions).
    pub fn uniform(n_layer: u64, n_kv_head: u64, head_dim: u64) -> Layers {
        let w = n_kv_head * head_dim;
        Layers {
            n_layer,
            full: KvWidth {
                layers: n_layer,
                k: n_layer * w,
                v: n_layer * w,
            },
            ..Layers::default()
        }
    }

    /// Read from the GGUF's metadata; `n_embd` and `n_layer` are the
    /// architecture's `embedding_length` and `block_count`.
    pub fn read(meta: &dyn Meta, arch: &str, n_layer: u64, n_embd: u64) -> Layers {
        let n_layer = n_layer.min(MAX_LAYERS);
        let n = n_layer as usize;
        let key = |k: &str| format!("{arch}.{k}");
        let dim = |v: u64| v.min(MAX_DIM);
        let heads: Vec<u64> = per_layer(meta, &key("attention.head_count"), n)
            .unwrap_or_else(|| vec![0; n])
            .into_iter()
            .map(dim)
            .collect();
        let kv_heads: Vec<u64> = per_layer(meta, &key("attention.head_count_kv"), n)
            .map(|v| v.into_iter().map(dim).collect())
            .unwrap_or_else(|| heads.clone());
        // llama.cpp: head size is n_embd / n_head unless the file says.
        let default_head = heads.first().filter(|&&h| h > 0).map_or(0, |&h| n_embd / h);
        let k_len = dim(meta
            .uint(&key("attention.key_length"))
            .unwrap_or(default_head));
        let v_len = dim(meta
            .uint(&key("attention.value_length"))
            .unwrap_or(default_head));
        let mla = meta
            .uint(&key("attention.key_length_mla"))
            .is_some_and(|x| x > 0)
            && meta
                .uint(&key("attention.value_length_mla"))
                .is_some_and(|x| x > 0);
        let mut layers = Layers {
            n_layer,
            mla,
            ..Layers::default()
        };
        if let Some(count) = meta.uint(&key("expert_count")).filter(|&c| c > 0) {
            layers.experts = Some((count, meta.uint(&key("expert_used_count")).unwrap_or(0)));
        }

        let recurrent: Vec<bool> = if RECURRENT.contains(&arch) {
            vec![true; n]
        } else if HYBRID_BY_KV_HEADS.contains(&arch) {
            kv_heads.iter().map(|&h| h == 0).collect()
        } else {
            if HYBRID_OTHER.contains(&arch) {
                layers.unmodelled = Some(format!("the hybrid layers of {arch}"));
            }
            vec![false; n]
        };
        let window = meta.uint(&key("attention.sliding_window"));
        let swa = match swa_rule(arch, n_layer, window) {
            Rule::None => vec![false; n],
            Rule::Unknown => {
                layers.unmodelled = Some(format!("the sliding-window layers of {arch}"));
                vec![false; n]
            }
            Rule::Window {
                window,
                pattern,
                dense_first,
                kind,
            } => {
                layers.window = dim(window);
                layers.window_kind = Some(kind);
                let pattern = meta
                    .uint(&key("attention.sliding_window_pattern"))
                    .unwrap_or(pattern);
                match meta.bools(&key("attention.sliding_window_pattern")) {
                    Some(v) if v.len() == n => v,
                    _ => (0..n_layer)
                        .map(|il| {
                            pattern == 0
                                || if dense_first {
                                    il % pattern != 0
                                } else {
                                    il % pattern < pattern - 1
                                }
                        })
                        .collect(),
                }
            }
        };
        let state = recurrent_state(meta, arch, n_embd);
        for il in 0..n {
            if recurrent[il] {
                layers.recurrent += 1;
                layers.recurrent_bytes += state;
                continue;
            }
            if kv_heads[il] == 0 {
                continue;
            }
            let k = kv_heads[il] * k_len;
            let v = if mla { 0 } else { kv_heads[il] * v_len };
            if swa[il] {
                layers.swa.add(k, v);
            } else {
                layers.full.add(k, v);
            }
        }
        if layers.recurrent > 0 && state == 0 {
            layers.unmodelled = Some(format!("the recurrent state of {arch}"));
        }
        layers
    }

    /// Words for `kiln fit`: what kinds of layers there are.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.full.layers > 0 {
            parts.push(format!("{} full-attention", self.full.layers));
        }
        if self.swa.layers > 0 {
            let kind = match self.window_kind {
                Some(WindowKind::Chunked) => "chunked",
                _ => "sliding-window",
            };
            parts.push(format!(
                "{} {kind} ({} tokens)",
                self.swa.layers, self.window
            ));
        }
        if self.recurrent > 0 {
            parts.push(format!("{} recurrent", self.recurrent));
        }
        let mut s = format!("{} layers", parts.join(" + "));
        if self.mla {
            s.push_str(", latent attention (K only)");
        }
        if let Some((n, used)) = self.experts {
            s.push_str(&format!(", {n} experts ({used} per token), all resident"));
        }
        s
    }
}

enum Rule {
    None,
    Unknown,
    Window {
        window: u64,
        pattern: u64,
        dense_first: bool,
        kind: WindowKind,
    },
}

/// Which layers llama.cpp runs with a window, per architecture (each
/// `load_arch_hparams` that calls `load_swa_pattern`).
fn swa_rule(arch: &str, n_layer: u64, window: Option<u64>) -> Rule {
    let sliding = |window: u64, pattern: u64, dense_first: bool| {
        if window == 0 {
            Rule::None
        } else {
            Rule::Window {
                window,
                pattern,
                dense_first,
                kind: WindowKind::Sliding,
            }
        }
    };
    let given = window.unwrap_or(0);
    match arch {
        "gemma2" => sliding(window.unwrap_or(4096), 2, false),
        "gemma3" | "olmo2" => sliding(given, if arch == "gemma3" { 6 } else { 4 }, false),
        "cohere2" => sliding(given, 4, false),
        "cohere2moe" => sliding(given, 4, true),
        "gpt-oss" => sliding(given, 2, false),
        "exaone4" if n_layer == 64 => sliding(window.unwrap_or(4096), 4, false),
        "exaone-moe" => sliding(window.unwrap_or(128), 4, false),
        // llama.cpp sets the window itself when the file has one.
        "smallthinker" if given > 0 => sliding(4096, 4, true),
        "llama4" if window == Some(0) => Rule::None,
        "llama4" => Rule::Window {
            window: 8192,
            pattern: 4,
            dense_first: false,
            kind: WindowKind::Chunked,
        },
        a if SWA_OTHER.contains(&a) && given > 0 => Rule::Unknown,
        "gemma3n" => Rule::Unknown,
        _ => Rule::None,
    }
}

/// Bytes of one layer's recurrent state (conv and SSM/WKV state, f32).
fn recurrent_state(meta: &dyn Meta, arch: &str, n_embd: u64) -> u64 {
    let key = |k: &str| meta.uint(&format!("{arch}.{k}")).unwrap_or(0).min(MAX_DIM);
    if arch.contains("rwkv") {
        let shift = meta
            .uint(&format!("{arch}.token_shift_count"))
            .unwrap_or(2)
            .min(16);
        return 4 * (shift * n_embd + n_embd * key("wkv.head_size"));
    }
    let (d_conv, d_inner, d_state, groups) = (
        key("ssm.conv_kernel"),
        key("ssm.inner_size"),
        key("ssm.state_size"),
        key("ssm.group_count"),
    );
    let conv = d_conv.saturating_sub(1) * (d_inner + 2 * groups * d_state);
    4 * (conv + d_state * d_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct M(HashMap<String, Vec<u64>>, HashMap<String, Vec<bool>>);
    impl M {
        fn with(mut self, k: &str, v: &[u64]) -> M {
            self.0.insert(k.into(), v.to_vec());
            self
        }
    }
    impl Meta for M {
        fn uint(&self, key: &str) -> Option<u64> {
            self.0.get(key).filter(|v| v.len() == 1).map(|v| v[0])
        }
        fn uints(&self, key: &str) -> Option<Vec<u64>> {
            self.0.get(key).filter(|v| v.len() > 1).cloned()
        }
        fn bools(&self, key: &str) -> Option<Vec<bool>> {
            self.1.get(key).cloned()
        }
    }

    /// Gemma 3 27B: 62 layers, 5 of every 6 with a 1,024-token window,
    /// 16 KV heads of 128 (Google's config.json).
    #[test]
    fn gemma3_keeps_a_window_on_five_layers_of_six() {
        let m = M::default()
            .with("gemma3.attention.head_count", &[32])
            .with("gemma3.attention.head_count_kv", &[16])
            .with("gemma3.attention.key_length", &[128])
            .with("gemma3.attention.value_length", &[128])
            .with("gemma3.attention.sliding_window", &[1024]);
        let l = Layers::read(&m, "gemma3", 62, 5376);
        // Layers 5, 11, …, 59 attend globally.
        assert_eq!(l.full.layers, 10);
        assert_eq!(l.swa.layers, 52);
        assert_eq!(l.window, 1024);
        assert_eq!(l.full.k, 10 * 16 * 128);
        assert!(l.unmodelled.is_none());
        // Without the key, every layer attends over the whole context.
        let m = M::default()
            .with("gemma3.attention.head_count", &[8])
            .with("gemma3.attention.head_count_kv", &[4]);
        assert_eq!(Layers::read(&m, "gemma3", 26, 1152).swa.layers, 0);
    }

    #[test]
    fn mla_keeps_one_compressed_row_and_no_v() {
        // DeepSeek-V3 style: kv_lora_rank 512 + rope 64 = key_length 576,
        // one KV head, value_length 512.
        let m = M::default()
            .with("deepseek2.attention.head_count", &[128])
            .with("deepseek2.attention.head_count_kv", &[1])
            .with("deepseek2.attention.key_length", &[576])
            .with("deepseek2.attention.value_length", &[512])
            .with("deepseek2.attention.key_length_mla", &[192])
            .with("deepseek2.attention.value_length_mla", &[128])
            .with("deepseek2.expert_count", &[256])
            .with("deepseek2.expert_used_count", &[8]);
        let l = Layers::read(&m, "deepseek2", 61, 7168);
        assert!(l.mla);
        assert_eq!(l.full.k, 61 * 576);
        assert_eq!(l.full.v, 0);
        assert_eq!(l.experts, Some((256, 8)));
    }

    #[test]
    fn separate_key_and_value_lengths_and_per_layer_heads() {
        let m = M::default()
            .with("x.attention.head_count", &[8])
            .with("x.attention.head_count_kv", &[2, 4, 0, 2])
            .with("x.attention.key_length", &[192])
            .with("x.attention.value_length", &[128]);
        let l = Layers::read(&m, "x", 4, 1024);
        assert_eq!(l.full.layers, 3, "a layer without KV heads keeps none");
        assert_eq!(l.full.k, 8 * 192);
        assert_eq!(l.full.v, 8 * 128);
    }

    #[test]
    fn recurrent_and_hybrid_layers_keep_a_fixed_state() {
        let ssm = |m: M, a: &str| {
            m.with(&format!("{a}.ssm.conv_kernel"), &[4])
                .with(&format!("{a}.ssm.inner_size"), &[1536])
                .with(&format!("{a}.ssm.state_size"), &[16])
        };
        let l = Layers::read(&ssm(M::default(), "mamba"), "mamba", 24, 768);
        assert_eq!(l.recurrent, 24);
        assert_eq!(l.full.layers, 0);
        assert_eq!(l.recurrent_bytes, 24 * 4 * (3 * 1536 + 16 * 1536));
        let m = ssm(M::default(), "jamba")
            .with("jamba.attention.head_count", &[32])
            .with("jamba.attention.head_count_kv", &[0, 0, 0, 8]);
        let l = Layers::read(&m, "jamba", 4, 4096);
        assert_eq!((l.recurrent, l.full.layers), (3, 1));
        let l = Layers::read(&M::default(), "qwen3next", 48, 2048);
        assert!(l.unmodelled.unwrap().contains("hybrid"));
    }

    #[test]
    fn hostile_sizes_are_bounded() {
        let m = M::default()
            .with("x.attention.head_count", &[u64::MAX])
            .with("x.attention.key_length", &[u64::MAX]);
        let l = Layers::read(&m, "x", u64::MAX, u64::MAX);
        assert_eq!(l.n_layer, MAX_LAYERS);
        assert!(l.full.k <= MAX_LAYERS * MAX_DIM * MAX_DIM);
    }
}
