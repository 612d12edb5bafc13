//! `kiln fit` and the check before loading: will this model, at this
//! context, fit in the memory this machine has free?

use crate::budget::{self, gib, Budget, ModelShape};
use crate::cli::{Common, FitArgs};
use crate::error::{KilnError, Result};
use crate::gguf;
use crate::host::launch::paths_and_config;
use crate::machines;
use crate::models::{self, ModelSpec};
use crate::telemetry::MemorySnapshot;

pub fn run(args: FitArgs, common: &Common) -> Result<i32> {
    if args.list_machines {
        for m in machines::MACHINES {
            println!(
                "{:<26}{:>4} GiB  {:>4.0} GB/s  {}",
                m.name, m.memory_gib, m.bandwidth_gbs, m.source
            );
        }
        return Ok(0);
    }
    let (paths, config) = paths_and_config(common)?;
    let spec = ModelSpec::parse(args.model.as_deref().or(config.model.as_deref()));
    // A downloaded model is measured from its file; a preset that is not
    // downloaded yet uses its built-in dimensions.
    let from_file = |path: &std::path::Path| -> Result<_> {
        let info = gguf::inspect(path)?;
        Ok((
            ModelShape::from_gguf(&info),
            path.display().to_string(),
            info.rope,
        ))
    };
    let of = |spec: &ModelSpec| -> Result<_> {
        Ok(match spec {
            ModelSpec::Local(path) => {
                let (shape, source, rope) = from_file(path)?;
                (shape, source, rope, None)
            }
            ModelSpec::Preset(name) => {
                let p = models::preset(name).expect("parsed presets exist");
                let (shape, source, rope) = match models::cached_path(p, &paths) {
                    Some(path) => from_file(&path)?,
                    None => (
                        ModelShape::from_preset(p),
                        format!("preset {} (built-in dimensions)", p.name),
                        Default::default(),
                    ),
                };
                (shape, source, rope, p.yarn)
            }
        })
    };
    let (shape, source, rope, recipe) = of(&spec)?;
    let draft = match &common.window.draft {
        Some(name) => Some(of(&ModelSpec::parse(Some(name)))?),
        None => None,
    };
    // For the engine `--engine` names (llama.cpp unless it says kalosm).
    let backend = crate::engine::local::Backend::parse(&common.engine)
        .unwrap_or(crate::engine::local::Backend::LlamaCpp);
    backend.check(common.kv_type, &common.window)?;
    let window = crate::window::plan(
        config.context.map(|c| c as u64),
        shape.context_length,
        &rope,
        &common.window,
        recipe,
        &shape.name,
    )
    .map_err(KilnError::BadArgument)?;
    let (mem, machine) = memory(&args)?;
    let context = window.tokens;
    let shape = match &draft {
        Some((d, ..)) => shape.with_draft(d.clone()),
        None => shape,
    };
    let shape = shape
        .with_window_limit(window.tokens)
        .with_kv_layout(backend.kv_layout(context as usize, common.kv_type, &common.window))
        .with_sequences(backend.sequences(&common.window));
    let b = budget::budget(&shape, context, &mem);
    let decode = machine.map(|m| machines::decode_estimate(&shape, context, m.bandwidth_gbs));
    if args.json {
        let out = serde_json::json!({
            "model": shape,
            "source": source,
            "window": window,
            "memory": mem,
            "machine": machine.map(|m| serde_json::json!({
                "name": m.name,
                "memory": m.memory_bytes(),
                "default_wired_limit": m.default_wired_limit(),
                "bandwidth_gbs": m.bandwidth_gbs,
                "source": m.source,
            })),
            "decode": decode,
            "budget": b,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
    } else {
        let limit = match machine {
            Some(m) => Some(m.default_wired_limit()),
            None => crate::telemetry::gpu_wired_limit(),
        };
        let metal = machine.is_some() || limit.is_some();
        print_table(&shape, &source, &mem, &b, &window, (metal, limit));
        if let (Some(m), Some(d)) = (machine, decode) {
            print_machine(m, &d);
        }
        if let Some((_, source, ..)) = &draft {
            print_draft(&shape, source, common.window.draft_max as usize);
        }
    }
    Ok(0)
}

/// The memory to plan against: this machine's, `--memory`, or a preset
/// machine's GPU wired limit (what Metal lets a model hold).
fn memory(args: &FitArgs) -> Result<(MemorySnapshot, Option<&'static machines::Machine>)> {
    if let Some(name) = &args.machine {
        let m = machines::machine(name).ok_or_else(|| {
            let names: Vec<&str> = machines::MACHINES.iter().map(|m| m.name).collect();
            KilnError::BadArgument(format!(
                "--machine {}: not a preset; choose one of {}",
                crate::visible::visible_line(name),
                names.join(", ")
            ))
        })?;
        let planned = MemorySnapshot {
            total: m.memory_bytes(),
            available: m.default_wired_limit(),
            swap_total: 0,
            swap_free: 0,
        };
        return Ok((planned, Some(m)));
    }
    if let Some(size) = &args.memory {
        let bytes = parse_size(size).ok_or_else(|| {
            KilnError::BadArgument(format!(
                "--memory {}: give a size such as 48GiB, 64GB or 128G",
                crate::visible::visible_line(size)
            ))
        })?;
        let planned = MemorySnapshot {
            total: bytes,
            available: bytes,
            swap_total: 0,
            swap_free: 0,
        };
        return Ok((planned, None));
    }
    let mem = MemorySnapshot::read()
        .ok_or_else(|| KilnError::Io("cannot read this machine's memory figures".into()))?;
    Ok((mem, None))
}

/// `48GiB`, `48G`, `64GB`, `512MiB`: a machine's memory. A machine's "GB"
/// of RAM are GiB, so GB and GiB mean the same here.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "t" | "tb" | "tib" => 40,
        "g" | "gb" | "gib" | "" => 30,
        "m" | "mb" | "mib" => 20,
        _ => return None,
    };
    let bytes = n * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 1.0 && bytes < (1u64 << 50) as f64).then_some(bytes as u64)
}

fn print_machine(m: &machines::Machine, d: &machines::DecodeEstimate) {
    let row = |k: &str, v: String| println!("  {k:<26}{v}");
    println!("planned for {} ({})", m.description, m.source);
    row(
        "GPU wired limit",
        format!(
            "{} of {} (default; an estimate, see `kiln fit --help`)",
            gib(m.default_wired_limit()),
            gib(m.memory_bytes())
        ),
    );
    row("decode speed", machines::describe(d, m.bandwidth_gbs));
}

/// The draft model's share of the budget, and what it buys where decoding
/// is bound by memory bandwidth.
fn print_draft(shape: &ModelShape, source: &str, k: usize) {
    let Some(d) = &shape.draft else { return };
    let row = |k: &str, v: String| println!("  {k:<26}{v}");
    println!("draft model {} · {source}", d.name);
    row(
        "its share",
        format!(
            "weights {} and KV cache {:.1} KiB a token (counted above)",
            gib(d.own_weight_bytes()),
            d.own_kv_per_token() as f64 / 1024.0
        ),
    );
    let (model, draft) = (shape.active_weight_bytes(), d.active_weight_bytes());
    let at = |a: f64| format!("×{:.2}", machines::draft_speedup(model, draft, k, a));
    row(
        "bandwidth-bound speed-up",
        format!(
            "{} at 60% of drafts kept, {} at 80%, {} at 90% ({k} a step); it pays from {}",
            at(0.6),
            at(0.8),
            at(0.9),
            machines::draft_break_even(model, draft, k).map_or(
                "no acceptance rate".into(),
                |a| format!("{:.0}% kept", a * 100.0)
            )
        ),
    );
    row(
        "on a few CPU cores",
        "verifying costs nearly what decoding the drafted tokens does; kiln measures and rests drafting that does not pay".into(),
    );
}

/// `metal` when the plan is for a Mac, where the model lives under the GPU
/// wired `limit`.
fn print_table(
    shape: &ModelShape,
    source: &str,
    mem: &MemorySnapshot,
    b: &Budget,
    window: &crate::window::Window,
    (metal, limit): (bool, Option<u64>),
) {
    println!("{} · {} · {source}", shape.name, shape.architecture);
    println!(
        "  {} layers · {} heads ({} KV heads) × {} · trained context {}",
        shape.n_layer, shape.n_head, shape.n_kv_head, shape.head_dim, shape.context_length
    );
    let row = |k: &str, v: String| println!("  {k:<26}{v}");
    row("layers", shape.layers.describe());
    if let Some(rope) = window.describe() {
        row("rope scaling", rope);
    }
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
    match &b.unmodelled {
        Some(what) => row(
            "verdict",
            format!("unknown: kiln does not model {what}; the KV figures above count every layer as full attention"),
        ),
        None => row("verdict", b.verdict.describe_here(metal).to_string()),
    }
    if let Some(advice) = limit.and_then(|l| budget::wired_limit_advice(b.total, l, mem.total)) {
        row("advice", advice);
    }
    row(
        "largest context that fits",
        format!("{} tokens", b.max_context),
    );
    let prefill = match shape.kv_layout {
        budget::KvLayout::KalosmF32 => format!(
            "+{} briefly (attention scores for the whole prompt at once)",
            gib(b.full_prefill_peak)
        ),
        budget::KvLayout::Gqa { flash: true, .. } => {
            "nothing more: flash attention computes the scores in tiles".into()
        }
        budget::KvLayout::Gqa { flash: false, .. } => format!(
            "counted above: with flash attention off llama.cpp keeps {} of scores for {} tokens at a time",
            gib(shape.score_matrix_bytes(b.context, b.context)),
            budget::PREFILL_CHUNK
        ),
    };
    row("prefilling a full window", prefill);
}
