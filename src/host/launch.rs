//! The start-up every model-running command shares: folders, config, the
//! model file, then the engine.

use std::io::IsTerminal;
use std::time::Instant;

use std::path::PathBuf;

use crate::budget::{self, gib, ModelShape, Verdict};
use crate::cli::Common;
use crate::config::Config;
use crate::engine::kalosm::EngineOptions;
use crate::engine::local::{Backend, LocalEngine};
use crate::engine::remote::RemoteEngine;
use crate::engine::{self, Lease};
use crate::error::{KilnError, Result};
use crate::gguf;
use crate::models::{self, ModelSpec, ResolvedModel};
use crate::paths::Paths;
use crate::store::prompt_cache::PromptCache;
use crate::store::snapshot::fingerprint;
use crate::telemetry::MemorySnapshot;
use crate::window::{Window, WindowArgs};

pub struct Launched {
    pub paths: Paths,
    pub config: Config,
    pub model: ResolvedModel,
    /// The draft model `--draft` named.
    pub draft: Option<ResolvedModel>,
    pub engine: LocalEngine,
    pub backend: Backend,
    pub kv_type: crate::budget::KvType,
    pub window_args: WindowArgs,
    /// The context window the engine was made with.
    pub context: usize,
    /// The KV cells all its conversations may hold together, and how many
    /// run at once.
    pub kv_budget: u64,
    pub sequences: u64,
    pub window: Window,
    pub load_seconds: f64,
    /// What KV states of this model and context depend on.
    pub fingerprint: Option<String>,
}

impl Launched {
    /// The model's dimensions with the engine's KV layout, for budgets.
    pub fn shape(&self) -> ModelShape {
        with_draft(ModelShape::from_gguf(&self.model.info), self.draft.as_ref())
            .with_window_limit(self.window.tokens)
            .with_kv_layout(self.backend.kv_layout(
                self.kv_budget as usize,
                self.kv_type,
                &self.window_args,
            ))
            .with_sequences(self.sequences)
    }

    /// How the model is named in a session, so resume can load it again:
    /// the preset name, or the file's path.
    pub fn model_spec(&self) -> String {
        self.model
            .preset
            .map(str::to_string)
            .unwrap_or_else(|| self.model.path.display().to_string())
    }
}

pub fn paths_and_config(common: &Common) -> Result<(Paths, Config)> {
    let paths = Paths::resolve(common.data_dir.as_deref());
    let config_file = common
        .config
        .clone()
        .unwrap_or_else(|| paths.config_file.clone());
    let config = Config::load(&config_file)?.merge(common);
    Ok((paths, config))
}

/// Resolve and load the model. `adjust` may change the engine options (the
/// benchmark pins sampling). Progress goes to stderr only when it is a
/// terminal, so scripts see just the answer and the stats line.
pub async fn launch(common: &Common, adjust: impl FnOnce(&mut EngineOptions)) -> Result<Launched> {
    let (paths, config) = paths_and_config(common)?;
    let backend = Backend::parse(&common.engine).ok_or_else(|| {
        KilnError::BadArgument(format!(
            "--engine {}: a local model runs on llamacpp or kalosm",
            common.engine
        ))
    })?;
    backend.check(common.kv_type, &common.window)?;
    let spec = ModelSpec::parse(config.model.as_deref());
    let model = models::resolve(&spec, &paths).await?;
    if backend == Backend::Kalosm {
        crate::engine::kalosm::check_model(&model.info)?;
    }
    let draft = match &common.window.draft {
        Some(name) => Some(models::resolve(&ModelSpec::parse(Some(name)), &paths).await?),
        None => None,
    };
    let planned = model.window(config.context, &common.window)?;
    let context = planned.tokens as usize;
    let label = backend.label(common.kv_type, &common.window, planned.rope);
    let fingerprint = match fingerprint(&model.path, &label, context) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("{}: cannot fingerprint: {e}", model.path.display());
            None
        }
    };
    let cap = config.prompt_cache_bytes();
    let prompt_cache = fingerprint.clone().filter(|_| cap > 0).map(|f| {
        let cache: std::sync::Arc<dyn crate::chat::PrefixCache> = std::sync::Arc::new(
            PromptCache::new(paths.prompt_cache(), cap).within(config.kv_budget(&paths)),
        );
        (cache, f)
    });
    let mut options = EngineOptions {
        context: config.context,
        sampler: config.sampling.clone(),
        system_prompt: config.system_prompt.clone(),
        ignore_eos: false,
        prompt_cache,
        kv_type: common.kv_type,
        window: common.window.clone(),
        draft: draft.clone(),
    };
    adjust(&mut options);
    let window = model.window(options.context, &common.window)?;
    let context = window.tokens as usize;
    let sequences = backend.sequences(&options.window);
    guard(
        &model.info,
        draft.as_ref(),
        &window,
        common.allow_swap,
        backend.kv_layout(context, common.kv_type, &common.window),
        sequences,
    )?;
    let kv_budget = match backend {
        Backend::LlamaCpp => {
            let layout = backend.kv_layout(context, common.kv_type, &common.window);
            let shape = with_draft(ModelShape::from_gguf(&model.info), draft.as_ref())
                .with_window_limit(window.tokens)
                .with_kv_layout(layout)
                .with_sequences(sequences);
            let given = options.window.kv_budget;
            let available = MemorySnapshot::read().map(|m| m.available);
            let parallel = options.window.conversations as u64;
            given.unwrap_or_else(|| {
                budget::shared_kv_cells(&shape, window.tokens, parallel, available)
            })
        }
        Backend::Kalosm => context as u64,
    };
    options.window.kv_budget = Some(kv_budget);
    let show = std::io::stderr().is_terminal();
    let name = model.info.display_name();
    let started = Instant::now();
    if show {
        eprint!("\rkiln: loading {name}…");
    }
    let engine = LocalEngine::load(backend, &model, options, move |f| {
        if show {
            eprint!("\rkiln: loading {name} {:>3.0}%", f * 100.0);
        }
    })
    .await?;
    if show {
        eprint!("\r\x1b[2K");
    }
    Ok(Launched {
        paths,
        config,
        model,
        draft,
        engine,
        backend,
        kv_type: common.kv_type,
        window_args: common.window.clone(),
        context,
        kv_budget,
        sequences,
        window,
        load_seconds: started.elapsed().as_secs_f64(),
        fingerprint,
    })
}

/// The engine a front end talks to, running, whichever kind it is.
pub struct Started {
    pub paths: Paths,
    pub config: Config,
    /// The engine, held for this front end alone.
    pub engine: Lease,
    /// The local model's dimensions, for the memory panel (`None` remote).
    pub shape: Option<ModelShape>,
    /// How a session names the model, so resume can start it again.
    pub model_spec: String,
    pub fingerprint: Option<String>,
}

/// `--engine local` (or nothing) or `--engine remote:NAME`.
pub fn remote_name(common: &Common) -> Result<Option<String>> {
    match common.engine.as_str() {
        other if Backend::parse(other).is_some() => Ok(None),
        other => match other.strip_prefix("remote:") {
            Some(name) if !name.is_empty() => Ok(Some(name.to_string())),
            _ => Err(KilnError::BadArgument(format!(
                "--engine {other}: use local (llamacpp), kalosm or remote:NAME"
            ))),
        },
    }
}

/// A remote endpoint's engine, from `[endpoints.NAME]` in the config.
pub fn remote_engine(config: &Config, name: &str) -> Result<RemoteEngine> {
    let endpoint = config.endpoint(name).map_err(KilnError::BadArgument)?;
    RemoteEngine::new(
        name,
        endpoint,
        config.sampling.clone(),
        config.system_prompt.clone(),
    )
    .map_err(KilnError::Engine)
}

/// Start the engine `--engine` names and spawn it as a background task.
pub async fn start(common: &Common) -> Result<Started> {
    if let Some(name) = remote_name(common)? {
        let (paths, config) = paths_and_config(common)?;
        let engine = remote_engine(&config, &name)?;
        return Ok(Started {
            paths,
            config,
            engine: leased(engine::spawn(engine)),
            shape: None,
            model_spec: format!("remote:{name}"),
            fingerprint: None,
        });
    }
    let launched = launch(common, |_| {}).await?;
    let shape = Some(launched.shape());
    let model_spec = launched.model_spec();
    Ok(Started {
        paths: launched.paths,
        config: launched.config,
        engine: leased(engine::spawn(launched.engine)),
        shape,
        model_spec,
        fingerprint: launched.fingerprint,
    })
}

/// The lease on an engine just started, which nobody else has seen.
pub fn leased(engine: engine::EngineHandle) -> Lease {
    engine.lease().expect("a new engine is free")
}

/// Refuse to load a model whose budget at `context` will swap or does not
/// fit, unless the user said `--allow-swap`.
/// `shape` with the draft model's weights and KV cache, when it has one.
pub fn with_draft(shape: ModelShape, draft: Option<&ResolvedModel>) -> ModelShape {
    match draft {
        Some(d) => shape.with_draft(ModelShape::from_gguf(&d.info)),
        None => shape,
    }
}

pub fn guard(
    info: &gguf::GgufInfo,
    draft: Option<&ResolvedModel>,
    window: &crate::window::Window,
    allow_swap: bool,
    layout: crate::budget::KvLayout,
    sequences: u64,
) -> Result<()> {
    let Some(mem) = MemorySnapshot::read() else {
        tracing::warn!("no memory figures; skipping the budget check");
        return Ok(());
    };
    let context = window.tokens;
    let shape = with_draft(ModelShape::from_gguf(info), draft)
        .with_window_limit(window.tokens)
        .with_kv_layout(layout)
        .with_sequences(sequences);
    let b = budget::budget(&shape, context, &mem);
    if let Some(what) = &b.unmodelled {
        tracing::warn!("budget check skipped: kiln does not model {what}");
        return Ok(());
    }
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
        b.verdict.describe_here(crate::telemetry::gpu_wired_limit().is_some()),
    )))
}
