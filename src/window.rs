//! The context window a model runs with: how many tokens, whether rope
//! scaling stretches it past the window the model was trained for, and
//! how llama.cpp stores and attends over it (`--kv-type-k/-v`,
//! `--flash-attn`).
//!
//! A context above the trained window is honoured with rope scaling or
//! refused in one line, never clamped without a word. Static YaRN can hurt
//! short texts (Qwen's documentation), so the presets that carry a YaRN
//! recipe turn it on only when `--ctx` asks for more than the native
//! window.

use serde::{Deserialize, Serialize};

use crate::budget::KvType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RopeScaling {
    None,
    Linear,
    Yarn,
}

impl RopeScaling {
    pub fn name(self) -> &'static str {
        match self {
            RopeScaling::None => "none",
            RopeScaling::Linear => "linear",
            RopeScaling::Yarn => "yarn",
        }
    }

    fn parse(s: &str) -> Option<RopeScaling> {
        match s {
            "none" => Some(RopeScaling::None),
            "linear" => Some(RopeScaling::Linear),
            "yarn" => Some(RopeScaling::Yarn),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttn {
    On,
    Off,
    /// llama.cpp decides per device (its default).
    #[default]
    Auto,
}

impl FlashAttn {
    pub fn name(self) -> &'static str {
        match self {
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
            FlashAttn::Auto => "auto",
        }
    }
}

/// The flags that shape the window, as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct WindowArgs {
    /// Rope scaling past the trained window: none, linear or yarn
    /// (default: what the file says; the Qwen2.5 presets add YaRN only
    /// when --ctx exceeds their native window).
    #[arg(long, global = true, value_enum)]
    pub rope_scaling: Option<RopeScaling>,
    /// How many times the original window rope scaling stretches to
    /// (YaRN's factor; 4 takes 32k to 128k).
    #[arg(long, global = true, value_name = "FACTOR")]
    pub rope_scale: Option<f32>,
    /// The window the model was trained for, which YaRN scales from
    /// (default: the file's).
    #[arg(long, global = true, value_name = "TOKENS")]
    pub yarn_orig_ctx: Option<u64>,
    /// Flash attention in llama.cpp: on, off or auto. A quantized V cache
    /// needs it.
    #[arg(long, global = true, value_enum, default_value_t = FlashAttn::Auto)]
    pub flash_attn: FlashAttn,
    /// How K values are stored (default: --kv-type).
    #[arg(long, global = true, value_enum)]
    pub kv_type_k: Option<KvType>,
    /// How V values are stored (default: --kv-type).
    #[arg(long, global = true, value_enum)]
    pub kv_type_v: Option<KvType>,
    /// Conversations one loaded llama.cpp model runs at once (chat, agent
    /// runs, scripts), batched together.
    #[arg(long, global = true, value_name = "N",
          default_value_t = DEFAULT_CONVERSATIONS,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    #[serde(default = "default_conversations")]
    pub conversations: u32,
    /// The most tokens all conversations hold in the KV cache together
    /// (default: what fits in the memory free at load, at least one
    /// window).
    #[arg(long, global = true, value_name = "TOKENS")]
    pub kv_budget: Option<u64>,
    /// A small model with the model's vocabulary that drafts tokens for it
    /// to verify, several a decode (speculative decoding): a GGUF file or
    /// a preset name. llama.cpp engine only.
    #[arg(long, global = true, value_name = "MODEL|PRESET")]
    pub draft: Option<String>,
    /// The most tokens the draft model drafts a step.
    #[arg(long, global = true, value_name = "N",
          default_value_t = DRAFT.max as u32,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    #[serde(default = "default_draft_max")]
    pub draft_max: u32,
    /// A shorter draft is not verified.
    #[arg(long, global = true, value_name = "N", default_value_t = DRAFT.min as u32)]
    #[serde(default)]
    pub draft_min: u32,
    /// Drafting stops at a token the draft model gives less than this
    /// probability.
    #[arg(long, global = true, value_name = "P",
          default_value_t = DRAFT.p_min, value_parser = probability)]
    #[serde(default = "default_draft_p_min")]
    pub draft_p_min: f32,
    /// Draft every step (--draft, --lookup), even while drafting does not
    /// pay, as llama.cpp's own tools do: for comparing with them.
    #[arg(long, global = true)]
    #[serde(default)]
    pub draft_always: bool,
}

/// How the draft model drafts (`--draft-max`, `--draft-min`, `--draft-p-min`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftSettings {
    /// The most tokens drafted a step.
    pub max: usize,
    /// A shorter draft is not verified at all.
    pub min: usize,
    /// Drafting stops at a token the draft model itself gives less than
    /// this probability (llama.cpp's `--draft-p-min`).
    pub p_min: f32,
    /// Draft every step, even while drafting does not pay (`--draft-always`;
    /// prompt lookup too).
    pub always: bool,
}

impl DraftSettings {
    /// llama.cpp's defaults.
    pub const LLAMA_CPP: DraftSettings = DraftSettings {
        max: 16,
        min: 0,
        p_min: 0.75,
        always: false,
    };
}

/// llama.cpp's drafting defaults.
const DRAFT: DraftSettings = DraftSettings::LLAMA_CPP;

fn default_draft_max() -> u32 {
    DRAFT.max as u32
}

fn default_draft_p_min() -> f32 {
    DRAFT.p_min
}

fn probability(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{text} is not a probability from 0 to 1")),
    }
}

/// Conversations at once by default: a chat and three agent runs. Each
/// costs a sliding window of KV cells on models with windowed layers
/// (Gemma 3: a window of 1,024 tokens in 52 of its 62 layers).
pub const DEFAULT_CONVERSATIONS: u32 = 4;

fn default_conversations() -> u32 {
    DEFAULT_CONVERSATIONS
}

impl Default for WindowArgs {
    fn default() -> WindowArgs {
        WindowArgs {
            rope_scaling: None,
            rope_scale: None,
            yarn_orig_ctx: None,
            flash_attn: FlashAttn::Auto,
            kv_type_k: None,
            kv_type_v: None,
            conversations: DEFAULT_CONVERSATIONS,
            kv_budget: None,
            draft: None,
            draft_max: default_draft_max(),
            draft_min: DRAFT.min as u32,
            draft_p_min: DRAFT.p_min,
            draft_always: false,
        }
    }
}

impl WindowArgs {
    /// K and V storage, from `--kv-type-k/-v` or else `--kv-type`.
    pub fn kv(&self, kv_type: KvType) -> (KvType, KvType) {
        (
            self.kv_type_k.unwrap_or(kv_type),
            self.kv_type_v.unwrap_or(kv_type),
        )
    }

    /// The flags as given, each with its value, for starting the daemon
    /// and for saying where two clients differ.
    pub fn flags(&self) -> Vec<(&'static str, String)> {
        let mut f = Vec::new();
        if let Some(r) = self.rope_scaling {
            f.push(("--rope-scaling", r.name().to_string()));
        }
        if let Some(x) = self.rope_scale {
            f.push(("--rope-scale", x.to_string()));
        }
        if let Some(n) = self.yarn_orig_ctx {
            f.push(("--yarn-orig-ctx", n.to_string()));
        }
        if self.flash_attn != FlashAttn::Auto {
            f.push(("--flash-attn", self.flash_attn.name().to_string()));
        }
        if let Some(k) = self.kv_type_k {
            f.push(("--kv-type-k", k.name().to_string()));
        }
        if let Some(v) = self.kv_type_v {
            f.push(("--kv-type-v", v.name().to_string()));
        }
        if self.conversations != DEFAULT_CONVERSATIONS {
            f.push(("--conversations", self.conversations.to_string()));
        }
        if let Some(n) = self.kv_budget {
            f.push(("--kv-budget", n.to_string()));
        }
        if let Some(d) = &self.draft {
            f.push(("--draft", d.clone()));
        }
        if self.draft_max != DRAFT.max as u32 {
            f.push(("--draft-max", self.draft_max.to_string()));
        }
        if self.draft_min != DRAFT.min as u32 {
            f.push(("--draft-min", self.draft_min.to_string()));
        }
        if self.draft_p_min != DRAFT.p_min {
            f.push(("--draft-p-min", self.draft_p_min.to_string()));
        }
        if self.draft_always {
            f.push(("--draft-always", "on".into()));
        }
        f
    }

    /// How the draft model drafts, as the flags say.
    pub fn drafting(&self) -> DraftSettings {
        DraftSettings {
            max: self.draft_max as usize,
            min: (self.draft_min as usize).min(self.draft_max as usize),
            p_min: self.draft_p_min,
            always: self.draft_always,
        }
    }

    /// Whether any rope flag was given.
    pub fn rope_given(&self) -> bool {
        self.rope_scaling.is_some() || self.rope_scale.is_some() || self.yarn_orig_ctx.is_some()
    }
}

/// A preset's recipe for going past its native window (Qwen2.5: YaRN,
/// factor 4, from 32,768 tokens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YarnRecipe {
    pub factor: f32,
    pub original: u64,
}

/// Rope scaling as llama.cpp is asked to apply it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rope {
    pub scaling: RopeScaling,
    pub factor: f32,
    pub original: u64,
    /// Turned on by the preset because `--ctx` exceeded the native window.
    pub automatic: bool,
}

/// The window a model runs with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Window {
    pub tokens: u64,
    /// The file's context length.
    pub trained: u64,
    /// Scaling kiln passes to llama.cpp; `None` leaves the file's own.
    pub rope: Option<Rope>,
}

impl Window {
    /// The status bar's few words for the scaling, if any.
    pub fn note(&self) -> Option<String> {
        let r = self.rope?;
        let name = match r.scaling {
            RopeScaling::None => return Some("rope scaling off".into()),
            RopeScaling::Yarn => "YaRN",
            RopeScaling::Linear => "linear rope",
        };
        let auto = if r.automatic { ", auto" } else { "" };
        Some(format!("{name} ×{}{auto}", r.factor))
    }

    /// `kiln fit`'s words for the scaling, if any.
    pub fn describe(&self) -> Option<String> {
        let r = self.rope?;
        if r.scaling == RopeScaling::None {
            return Some("rope scaling off".into());
        }
        let why = if r.automatic {
            format!(" (on because --ctx exceeds the native {})", r.original)
        } else {
            String::new()
        };
        Some(format!(
            "{} ×{} from {}{why}",
            if r.scaling == RopeScaling::Yarn {
                "YaRN"
            } else {
                "linear rope"
            },
            r.factor,
            r.original
        ))
    }
}

pub use crate::gguf::FileRope;

/// The window for `asked` tokens (`--ctx`) on a model trained for
/// `trained`, or one line saying why not.
pub fn plan(
    asked: Option<u64>,
    trained: u64,
    file: &FileRope,
    args: &WindowArgs,
    recipe: Option<YarnRecipe>,
    name: &str,
) -> Result<Window, String> {
    if let Some(f) = args.rope_scale {
        if !(f.is_finite() && (1.0..=64.0).contains(&f)) {
            return Err(format!("--rope-scale {f}: give a factor from 1 to 64"));
        }
    }
    if let Some(n) = asked {
        if n < 64 {
            return Err(format!("--ctx {n} is too small (at least 64)"));
        }
    }
    let file_scaling = file.scaling.as_deref().and_then(RopeScaling::parse);
    // The window the file's own scaling reaches, which llama.cpp applies
    // without being asked.
    let file_limit = match (file_scaling, file.factor) {
        (Some(RopeScaling::Yarn | RopeScaling::Linear), Some(f)) if f > 1.0 => {
            let base = file.original.unwrap_or(trained);
            ((base as f64 * f as f64) as u64).max(trained)
        }
        _ => trained,
    };
    let original = args
        .yarn_orig_ctx
        .or(file.original)
        .unwrap_or(trained)
        .max(1);
    let rope = match args.rope_scaling {
        Some(RopeScaling::None) => Some(Rope {
            scaling: RopeScaling::None,
            factor: 1.0,
            original,
            automatic: false,
        }),
        Some(scaling) => {
            let factor = args.rope_scale.or(file.factor).unwrap_or_else(|| {
                // Enough to reach the asked window.
                asked.map_or(1.0, |n| (n as f32 / original as f32).ceil().max(1.0))
            });
            Some(Rope {
                scaling,
                factor,
                original,
                automatic: false,
            })
        }
        None if args.rope_scale.is_some() || args.yarn_orig_ctx.is_some() => {
            return Err(
                "--rope-scale and --yarn-orig-ctx need --rope-scaling yarn or linear".into(),
            )
        }
        None => match (recipe, asked) {
            (Some(r), Some(n)) if n > file_limit => Some(Rope {
                scaling: RopeScaling::Yarn,
                factor: r.factor,
                original: r.original,
                automatic: true,
            }),
            _ => None,
        },
    };
    let limit = match rope {
        Some(r) if r.scaling != RopeScaling::None => (r.original as f64 * r.factor as f64) as u64,
        Some(_) => trained,
        None => file_limit,
    };
    let tokens = asked.unwrap_or(trained.min(limit));
    if tokens > limit {
        let how = match rope {
            Some(r) if r.scaling != RopeScaling::None => format!(
                "{} ×{} from {} reaches {limit}; raise --rope-scale",
                r.scaling.name(),
                r.factor,
                r.original
            ),
            _ => format!(
                "add --rope-scaling yarn --rope-scale {} to extend it, or use --ctx {limit} or less",
                (tokens as f64 / trained.max(1) as f64).ceil()
            ),
        };
        return Err(format!(
            "--ctx {tokens} is larger than the {trained} tokens {name} was trained for: {how}"
        ));
    }
    Ok(Window {
        tokens,
        trained,
        rope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN: Option<YarnRecipe> = Some(YarnRecipe {
        factor: 4.0,
        original: 32_768,
    });

    fn args() -> WindowArgs {
        WindowArgs::default()
    }

    #[test]
    fn the_qwen_preset_adds_yarn_only_past_its_native_window() {
        let f = FileRope::default();
        let w = plan(Some(32_768), 32_768, &f, &args(), QWEN, "q").unwrap();
        assert_eq!(w.rope, None);
        let w = plan(Some(131_072), 32_768, &f, &args(), QWEN, "q").unwrap();
        let r = w.rope.unwrap();
        assert_eq!(
            (r.scaling, r.factor, r.original, r.automatic),
            (RopeScaling::Yarn, 4.0, 32_768, true)
        );
        assert!(w.describe().unwrap().contains("exceeds the native 32768"));
        let e = plan(Some(200_000), 32_768, &f, &args(), QWEN, "q").unwrap_err();
        assert!(e.contains("raise --rope-scale"), "{e}");
    }

    #[test]
    fn a_context_past_the_trained_window_is_refused_not_clamped() {
        let f = FileRope::default();
        let e = plan(Some(131_072), 32_768, &f, &args(), None, "m").unwrap_err();
        assert!(e.contains("--rope-scaling yarn --rope-scale 4"), "{e}");
        let a = WindowArgs {
            rope_scaling: Some(RopeScaling::Yarn),
            ..args()
        };
        let w = plan(Some(131_072), 32_768, &f, &a, None, "m").unwrap();
        assert_eq!(w.rope.unwrap().factor, 4.0);
        assert_eq!(w.tokens, 131_072);
        let a = WindowArgs {
            rope_scaling: Some(RopeScaling::None),
            ..args()
        };
        assert!(plan(Some(40_000), 32_768, &f, &a, QWEN, "m").is_err());
        let a = WindowArgs {
            rope_scale: Some(4.0),
            ..args()
        };
        assert!(plan(None, 32_768, &f, &a, None, "m").is_err());
    }

    #[test]
    fn the_files_own_scaling_is_honoured() {
        let f = FileRope {
            scaling: Some("yarn".into()),
            factor: Some(4.0),
            original: Some(32_768),
        };
        let w = plan(Some(131_072), 40_960, &f, &args(), None, "qwen3").unwrap();
        assert_eq!((w.tokens, w.rope), (131_072, None));
        assert_eq!(
            plan(None, 40_960, &f, &args(), None, "q").unwrap().tokens,
            40_960
        );
    }

    #[test]
    fn hostile_factors_are_refused() {
        for f in [f32::NAN, f32::INFINITY, 0.0, -1.0, 1e9] {
            let a = WindowArgs {
                rope_scaling: Some(RopeScaling::Yarn),
                rope_scale: Some(f),
                ..args()
            };
            assert!(plan(Some(1000), 512, &FileRope::default(), &a, None, "m").is_err());
        }
    }
}
