//! `kiln fit` and the check before loading: will this model, at this
//! context, fit in the memory this machine has free?

use std::path::PathBuf;

use crate::budget::{self, gib, Budget, ModelShape, Verdict};
use crate::cli::{Common, FitArgs};
use crate::error::{KilnError, Result};
use crate::gguf;
use crate::launch::paths_and_config;
use crate::models::{self, ModelSpec};
use crate::telemetry::MemorySnapshot;

pub fn run(args: FitArgs, common: &Common) -> Result<i32> {
    let (paths, config) = paths_and_config(common)?;
    let spec = ModelSpec::parse(args.model.as_deref().or(config.model.as_deref()));
    // A downloaded model is measured from its file; a preset that is not
    // downloaded yet uses its built-in dimensions.
    let (shape, source) = match &spec {
        ModelSpec::Local(path) => (
            ModelShape::from_gguf(&gguf::inspect(path)?),
            path.display().to_string(),
        ),
        ModelSpec::Preset(name) => {
            let p = models::preset(name).expect("parsed presets exist");
            match models::cached_path(p, &paths) {
                Some(path) => (
                    ModelShape::from_gguf(&gguf::inspect(&path)?),
                    path.display().to_string(),
                ),
                None => (
                    ModelShape::from_preset(p),
                    format!("preset {} (built-in dimensions)", p.name),
                ),
            }
        }
    };
    let mem = memory()?;
    let context = config.context.map_or(shape.context_length, |c| c as u64);
    // For the engine `--engine` names (llama.cpp unless it says kalosm).
    let backend = crate::engine::local::Backend::parse(&common.engine)
        .unwrap_or(crate::engine::local::Backend::LlamaCpp);
    let shape = shape.with_kv_layout(backend.kv_layout(context as usize, common.kv_type));
    let b = budget::budget(&shape, context, &mem);
    if args.json {
        let out =
            serde_json::json!({ "model": shape, "source": source, "memory": mem, "budget": b });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
    } else {
        print_table(&shape, &source, &mem, &b);
    }
    Ok(0)
}

fn memory() -> Result<MemorySnapshot> {
    MemorySnapshot::read()
        .ok_or_else(|| KilnError::Io("cannot read this machine's memory figures".into()))
}

fn print_table(shape: &ModelShape, source: &str, mem: &MemorySnapshot, b: &Budget) {
    println!("{} · {} · {source}", shape.name, shape.architecture);
    println!(
        "  {} layers · {} heads ({} KV heads) × {} · trained context {}",
        shape.n_layer, shape.n_head, shape.n_kv_head, shape.head_dim, shape.context_length
    );
    let row = |k: &str, v: String| println!("  {k:<26}{v}");
    if !shape.tensor_types.is_empty() {
        let types: Vec<String> = shape
            .tensor_types
            .iter()
            .map(|(t, bytes)| {
                format!(
                    "{t} {:.0}%",
                    *bytes as f64 * 100.0 / shape.tensor_bytes.max(1) as f64
                )
            })
            .collect();
        row("tensor types", types.join(", "));
    }
    row("weights in memory", gib(b.weights));
    row(
        "KV cache per token",
        format!(
            "{:.1} KiB ({}); f16 per KV head would be {:.1} KiB",
            b.kv_per_token as f64 / 1024.0,
            shape.kv_layout.describe(),
            b.kv_per_token_f16_gqa as f64 / 1024.0
        ),
    );
    row(
        &format!("KV cache at {} tokens", b.context),
        format!(
            "{} (f16 per KV head: {})",
            gib(b.kv_at_context),
            gib(b.kv_at_context_f16_gqa)
        ),
    );
    row("runtime overhead", gib(b.overhead));
    row("total", gib(b.total));
    row(
        "available",
        format!(
            "{} of {} (swap free: {})",
            gib(mem.available),
            gib(mem.total),
            gib(mem.swap_free)
        ),
    );
    row("verdict", b.verdict.describe().to_string());
    row(
        "largest context that fits",
        format!("{} tokens", b.max_context),
    );
    let at_once = match shape.kv_layout {
        budget::KvLayout::KalosmF32 => b.context,
        budget::KvLayout::Gqa { .. } => b.context.min(budget::PREFILL_CHUNK),
    };
    row(
        "prefilling a full window",
        format!(
            "+{} briefly (attention scores, {at_once} tokens at a time)",
            gib(b.full_prefill_peak),
        ),
    );
}

/// Refuse to load a model whose budget at `context` will swap or does not
/// fit, unless the user said `--allow-swap`.
pub fn guard(
    info: &gguf::GgufInfo,
    context: usize,
    allow_swap: bool,
    layout: crate::budget::KvLayout,
) -> Result<()> {
    let Some(mem) = MemorySnapshot::read() else {
        tracing::warn!("no memory figures; skipping the budget check");
        return Ok(());
    };
    let shape = ModelShape::from_gguf(info).with_kv_layout(layout);
    let b = budget::budget(&shape, context as u64, &mem);
    tracing::info!(
        "budget at {context} tokens: {} needed, {} available: {:?}",
        gib(b.total),
        gib(b.available),
        b.verdict
    );
    if allow_swap || matches!(b.verdict, Verdict::Fits | Verdict::Tight) {
        return Ok(());
    }
    let advice = if b.max_context >= 512 {
        format!(
            "use --ctx {} (the largest that fits) or a smaller quantization",
            b.max_context
        )
    } else {
        "use a smaller model or quantization".into()
    };
    Err(KilnError::WontFit(format!(
        "{}: at {} tokens it needs {} (weights {} + KV cache {} + overhead {}) but {} is available: it {}; {advice}, or pass --allow-swap",
        PathBuf::from(&info.path).display(),
        b.context,
        gib(b.total),
        gib(b.weights),
        gib(b.kv_at_context),
        gib(b.overhead),
        gib(b.available),
        b.verdict.describe(),
    )))
}
