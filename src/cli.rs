//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "A terminal workstation for local LLM agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    /// Without a command, kiln opens the workstation.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options every command that runs a model shares.
#[derive(Debug, Args, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Common {
    /// A local GGUF file or a preset name (see `kiln models`).
    #[arg(long, short, global = true, env = "KILN_MODEL")]
    pub model: Option<String>,
    /// Put data, cache, config and logs under this folder.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (default: config.toml in kiln's config folder).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Context window in tokens (default: the model's trained context).
    #[arg(long, global = true, value_name = "TOKENS")]
    pub ctx: Option<usize>,
    /// System prompt.
    #[arg(long, global = true)]
    pub system: Option<String>,
    /// Load a model even when its memory budget says it will swap or not fit.
    #[arg(long, global = true)]
    pub allow_swap: bool,
    /// The folder agents work in; their tools cannot leave it (default:
    /// the current folder).
    #[arg(long, global = true, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Which agent tool calls run without a yes (`auto` runs everything).
    /// Headless, nobody answers, so a call that needs a yes is refused.
    #[arg(long, global = true, value_enum, default_value_t = crate::agent::Policy::Ask)]
    pub approval: crate::agent::Policy,
    /// `local` (llama.cpp on this machine; `llamacpp` too), `kalosm`
    /// (kalosm's own Llama), or `remote:NAME`, an endpoint from config.toml.
    #[arg(long, global = true, default_value = "local")]
    pub engine: String,
    /// How the llama.cpp engine stores KV values: f16, q8_0 in about half
    /// the memory (slightly less exact), or q4_0 in about a quarter.
    #[arg(long, global = true, value_enum, default_value_t = crate::budget::KvType::F16)]
    pub kv_type: crate::budget::KvType,
    #[command(flatten)]
    pub window: crate::window::WindowArgs,
    /// Colour theme: dark, light, contrast, or a file in the themes folder.
    #[arg(long, global = true, env = "KILN_THEME")]
    pub theme: Option<String>,
    /// Keep the workstation in this process instead of the daemon: closing
    /// the terminal then ends the conversation (saved) and frees the model.
    #[arg(long, global = true)]
    pub no_daemon: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub agent: AgentFlags,
}

/// Agent settings, for `kiln agent` and the workstation's `/agent` alike;
/// each overrides `[agent]` in config.toml.
#[derive(Debug, Args, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentFlags {
    /// What an agent does between steps while the machine swaps or
    /// throttles (default: pause).
    #[arg(long, global = true, value_enum)]
    pub governor: Option<crate::agent::GovernorMode>,
    /// Most steps in an agent run (default 30).
    #[arg(long, global = true)]
    pub max_steps: Option<u32>,
    /// Most minutes an agent run takes (default 60).
    #[arg(long, global = true)]
    pub max_minutes: Option<u64>,
    /// Prompt plus completion tokens over a whole agent run (default 200000).
    #[arg(long, global = true)]
    pub max_run_tokens: Option<usize>,
    /// Most tokens in one tool call (default 512).
    #[arg(long, global = true)]
    pub max_reply_tokens: Option<u32>,
    /// Leave the workspace's AGENTS.md out of the agent's system prompt.
    #[arg(long, global = true)]
    pub no_agents_md: bool,
    /// What the agent's shell commands may write: the workspace (its .git
    /// read-only) and their temporary folder (default), only the
    /// temporary folder, or anything (off: all your rights).
    #[arg(long, global = true, value_enum, value_name = "MODE")]
    pub sandbox: Option<crate::agent::sandbox::SandboxMode>,
    /// Let the agent's shell commands reach the network.
    #[arg(long, global = true)]
    pub sandbox_network: bool,
    /// How the agent's model writes tool calls: its own format where its
    /// chat template has one, thinking first (auto, the default), or one
    /// JSON call per answer (json).
    #[arg(long, global = true, value_enum, value_name = "MODE")]
    pub tool_calls: Option<crate::agent::CallMode>,
}

impl AgentFlags {
    /// The budget flags given, on top of a resumed run's journaled budgets.
    pub fn over_budgets(&self, budgets: &mut crate::agent::Budgets) {
        if let Some(v) = self.max_steps {
            budgets.max_steps = v;
        }
        if let Some(v) = self.max_minutes {
            budgets.max_time = std::time::Duration::from_secs(v.saturating_mul(60));
        }
        if let Some(v) = self.max_run_tokens {
            budgets.max_tokens = v;
        }
    }

    /// These flags on top of `settings`.
    pub fn over(&self, mut settings: crate::agent::AgentSettings) -> crate::agent::AgentSettings {
        if let Some(v) = self.governor {
            settings.governor = v;
        }
        if let Some(v) = self.max_steps {
            settings.max_steps = v;
        }
        if let Some(v) = self.max_minutes {
            settings.max_minutes = v;
        }
        if let Some(v) = self.max_run_tokens {
            settings.max_run_tokens = v;
        }
        if let Some(v) = self.max_reply_tokens {
            settings.max_reply_tokens = v;
        }
        if self.no_agents_md {
            settings.project_instructions = false;
        }
        if let Some(mode) = self.sandbox {
            settings.sandbox = mode;
        }
        if self.sandbox_network {
            settings.sandbox_network = true;
        }
        if let Some(mode) = self.tool_calls {
            settings.tool_calls = mode;
        }
        settings
    }
}

impl Common {
    /// The folder agents work in.
    pub fn workspace(&self) -> PathBuf {
        self.workspace.clone().unwrap_or_else(|| PathBuf::from("."))
    }
}

#[derive(Debug, Args, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, global = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, global = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (default 40); 0 keeps all.
    #[arg(long, global = true, value_name = "K")]
    pub top_k: Option<u32>,
    /// Drop tokens less likely than P times the most likely one (default 0.05).
    #[arg(long, global = true, value_name = "P")]
    pub min_p: Option<f32>,
    /// Repetition penalty over the last 64 tokens; 1 turns it off.
    #[arg(long, global = true)]
    pub repeat_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Draft up to N tokens a step from the context itself (prompt lookup)
    /// and verify them in one decode; the output does not change. Pays when
    /// answers quote their context; rests when it does not pay. N defaults
    /// to 8.
    #[arg(long, global = true, value_name = "N", num_args = 0..=1, default_missing_value = "8")]
    pub lookup: Option<u32>,
    /// Most tokens in one answer.
    #[arg(long, global = true)]
    pub max_tokens: Option<u32>,
    /// Let a reasoning model (Qwen3, DeepSeek-R1) think before it answers,
    /// where its chat template has the switch (default: the template's).
    #[arg(long, global = true, value_name = "on|off", value_parser = on_off)]
    pub think: Option<bool>,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}': use on or off")),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask one question; the answer streams to stdout, stats to stderr.
    Ask(AskArgs),
    /// Measure TTFT, prefill and decode speed and peak memory on a model.
    Bench(BenchArgs),
    /// List model presets and whether each is downloaded.
    Models,
    /// Will a model fit this machine? Weights, KV cache, verdict, max context.
    Fit(FitArgs),
    /// A new conversation in the workstation, beside any the daemon holds
    /// open (plain `kiln` joins the open one).
    New,
    /// Continue a saved session in the workstation (default: the latest).
    Resume {
        /// Session id (or a unique start of it), or a session folder.
        id: Option<String>,
        /// The most recently used session.
        #[arg(long, conflicts_with = "id")]
        last: bool,
    },
    /// Run an agent on a task in a workspace folder, headless.
    Agent(AgentArgs),
    /// Run the daemon: the model, the workstation's conversation and agent
    /// runs, going on without a terminal. `kiln` starts one when none runs.
    Daemon {
        /// Exit this many seconds after the workstation and every run end
        /// (kiln starts its daemon so); without it the daemon runs until
        /// SIGTERM or `kiln stop --daemon`.
        #[arg(long, value_name = "SECONDS")]
        idle_exit: Option<u64>,
        /// Resume the detached runs a daemon was hosting when it died (the
        /// OOM killer, a crash, a reboot); `[agent] resume_on_start` in
        /// config.toml does it for every daemon.
        #[arg(long)]
        resume_on_start: bool,
        /// Read the settings to run with from stdin, as the client that
        /// starts a daemon writes them.
        #[arg(long, hide = true)]
        settings_stdin: bool,
    },
    /// Serve the model as an OpenAI-compatible API (/v1/chat/completions,
    /// /v1/completions, /v1/models) with its telemetry, from a daemon in
    /// this terminal: `kiln` and agent runs share the loaded model with the
    /// API's clients.
    Serve(crate::serve::ServeArgs),
    /// The daemon's open session and agent runs, with their state.
    Ps,
    /// Stop a session open in the daemon (saving it) or an agent run.
    Stop {
        /// A session open in the workstation, or an agent run.
        #[arg(required_unless_present = "daemon")]
        id: Option<String>,
        /// Stop the daemon: every run, and the workstation after saving it.
        #[arg(long, conflicts_with = "id")]
        daemon: bool,
    },
    /// Attach this terminal to the daemon's workstation (Ctrl-\ detaches),
    /// or follow an agent run: what it did so far, then live.
    Attach {
        /// A session (shown in the workstation) or an agent run (followed
        /// line by line); without it, the workstation as it is.
        id: Option<String>,
    },
    /// Saved sessions: list, show, export, rm, rename.
    Sessions {
        #[command(subcommand)]
        action: SessionsAction,
    },
    /// The prompt cache of system-prompt KV states: list, stats, clear.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// The MCP servers agent runs start (`[mcp.NAME]` in config.toml):
    /// each started in --workspace, its state and tools.
    Mcp {
        #[command(subcommand)]
        action: McpAction,
    },
    /// Print the telemetry the side panels show, one line per sample.
    Monitor(MonitorArgs),
    /// Run a command under exactly the sandbox the agent's shell commands
    /// get (--workspace, --sandbox, --sandbox-network): `kiln sandbox --
    /// CMD ARGS…`.
    Sandbox {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Download a preset ahead of time (default: the default model).
    Fetch {
        /// Preset name, as `kiln models` lists them.
        preset: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question; `-` (or nothing, with piped input) reads stdin.
    pub question: Option<String>,
    /// Print JSON events, one per line, instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not keep the exchange as a session.
    #[arg(long)]
    pub ephemeral: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// What the agent should do.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub task: Option<String>,
    /// Go on with an interrupted or stopped run (a session id, or a unique
    /// start of one) from its journal: its settings, steps, spending and
    /// "always" approvals. Budget flags given here replace the journaled
    /// ones. A call cut while it ran is reported to the model, never re-run.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<String>,
    /// Print JSON events, one per line.
    #[arg(long)]
    pub json: bool,
    /// Run it in the daemon (started if none runs) and return at once; it
    /// survives the terminal. `kiln attach ID` follows it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Subcommand)]
pub enum SessionsAction {
    /// Every session, newest first (damaged ones say what is wrong).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a session's conversation.
    Show { id: String },
    /// Write a session out as Markdown or JSON.
    Export {
        id: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Md)]
        format: ExportFormat,
    },
    /// Delete a session.
    Rm {
        id: String,
        /// Do not ask: needed where no terminal can answer.
        #[arg(long, short)]
        yes: bool,
    },
    /// Give a session a title.
    Rename { id: String, title: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Md,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum McpAction {
    /// Start each server, list its state and tools, and stop it.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Entries, most recently used first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Entry count and size against the cap.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry.
    Clear,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measured runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub prompt_tokens: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Measure the telemetry sampler's CPU cost instead of a model.
    #[arg(long)]
    pub sampler: bool,
    /// Measure drawing a 1,000-message conversation at 160x48 instead.
    #[arg(long)]
    pub render: bool,
    /// Measure the prompt cache and KV snapshots instead.
    #[arg(long)]
    pub cache: bool,
    /// Measure daemon-to-client event latency and throughput instead.
    #[arg(long)]
    pub daemon: bool,
    /// Measure this many conversations streaming at once on one loaded
    /// model instead, for each count given (1,2,4,8).
    #[arg(long, value_name = "COUNTS", value_delimiter = ',')]
    pub parallel: Vec<usize>,
    /// Measure `kiln serve` instead: this many streaming clients at once
    /// through its OpenAI-compatible API, for each count given (1,4,16).
    #[arg(long, value_name = "COUNTS", value_delimiter = ',')]
    pub serve: Vec<usize>,
    /// Measure a chat turn as users run it instead: the configured
    /// sampling, streamed, after a --prompt-tokens conversation.
    #[arg(long)]
    pub turn: bool,
    /// Measure a long unattended agent run instead: detached in the
    /// daemon's actor, journaled, followed over the socket, for --steps
    /// steps (or --minutes): RSS, descriptors, step time, journal and log
    /// growth.
    #[arg(long)]
    pub soak: bool,
    /// With --soak, the steps to run.
    #[arg(long, default_value_t = 10_000)]
    pub steps: u32,
    /// With --soak, stop after this many minutes.
    #[arg(long)]
    pub minutes: Option<u64>,
    /// With --soak, drive the run with the loaded model instead of a
    /// scripted engine.
    #[arg(long)]
    pub real_model: bool,
    /// With --parallel, --serve or --turn, llama.cpp's `llama-server` to measure
    /// beside kiln on the same GGUF and threads.
    #[arg(long, value_name = "PATH")]
    pub peer_server: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Seconds between samples.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many samples.
    #[arg(long)]
    pub count: Option<usize>,
    /// Print each sample as a JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// A GGUF file or a preset name (default: the configured model).
    pub model: Option<String>,
    /// Print the budget as JSON.
    #[arg(long)]
    pub json: bool,
    /// Plan for this much memory instead of this machine's free memory
    /// (48GiB, 64GB, 128G).
    #[arg(long, value_name = "SIZE", conflicts_with = "machine")]
    pub memory: Option<String>,
    /// Plan for a machine you do not have yet: its memory, the GPU's
    /// default wired limit and its bandwidth, with a decode-speed estimate
    /// (see `kiln fit --list-machines`).
    #[arg(long, value_name = "PRESET")]
    pub machine: Option<String>,
    /// List the machine presets with their sources.
    #[arg(long)]
    pub list_machines: bool,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// Every subcommand's arguments and the global ones are told apart
    /// (two with one id only fail when that subcommand parses).
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
        for sub in ["ask", "bench", "agent", "fit", "daemon", "new"] {
            let parsed = super::Cli::try_parse_from(["kiln", sub, "--help"]);
            assert!(
                parsed.is_err_and(|e| e.kind() == clap::error::ErrorKind::DisplayHelp),
                "{sub}"
            );
        }
        let bench = super::Cli::try_parse_from([
            "kiln",
            "--conversations",
            "2",
            "bench",
            "--parallel",
            "1,2",
        ]);
        assert!(bench.is_ok(), "{bench:?}");
    }
}
