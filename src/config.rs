//! `config.toml`: defaults that command-line flags override.

use std::path::Path;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::cli::Common;
use crate::engine::remote::Endpoint;
use crate::engine::SamplerSettings;
use crate::error::{KilnError, Result};
use crate::keys::{KeyMap, KeySpec};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: Option<String>,
    pub context: Option<usize>,
    pub system_prompt: Option<String>,
    pub sampling: SamplerSettings,
    /// Size cap of the prompt cache in GiB (default 4; 0 turns it off).
    pub prompt_cache_gib: Option<f64>,
    /// The disk budget in GiB of every KV state kept: session snapshots
    /// and the prompt cache together (default 16), least recently used
    /// removed first.
    pub kv_disk_gib: Option<f64>,
    /// A session's KV snapshot is written on close only when loading it
    /// beats re-reading the session by this many seconds (default 1; 0
    /// writes every one).
    pub snapshot_min_saved_s: Option<f64>,
    /// Colour theme of the workstation.
    pub theme: Option<String>,
    /// Key bindings: action name = key or list of keys.
    pub keys: BTreeMap<String, KeySpec>,
    /// Move a session to this endpoint when its next turn would outgrow the
    /// local context window or memory.
    pub auto_offload: Option<String>,
    /// OpenAI-compatible endpoints by name, for `--engine remote:NAME`.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Budgets and the governor of agent runs.
    pub agent: crate::agent::AgentSettings,
    /// MCP servers agent runs start, by name: `[mcp.NAME]`.
    pub mcp: BTreeMap<String, crate::agent::mcp::ServerConfig>,
    /// The OpenAI-compatible endpoint a daemon serves while it runs.
    pub serve: crate::serve::ServeConfig,
}

impl Config {
    /// Read `path`; a missing file is an empty config, a bad one an error
    /// that names the file, the line and the problem.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(KilnError::Config(path.to_path_buf(), e.to_string())),
        };
        Config::parse(&text).map_err(|e| KilnError::Config(path.to_path_buf(), e))
    }

    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().replace('\n', " ");
            match line {
                Some(l) => format!("line {l}: {message}"),
                None => message,
            }
        })?;
        config.sampling.validate()?;
        KeyMap::with_overrides(&config.keys)?;
        Ok(config)
    }

    /// The prompt cache's size cap in bytes; 0 means off.
    pub fn prompt_cache_bytes(&self) -> u64 {
        self.prompt_cache_gib
            .map_or(crate::store::prompt_cache::DEFAULT_CAP_BYTES, |g| {
                (g.max(0.0) * (1u64 << 30) as f64) as u64
            })
    }

    /// The KV disk budget over `paths`' sessions and prompt cache.
    pub fn kv_budget(&self, paths: &crate::paths::Paths) -> crate::store::kv_budget::KvBudget {
        crate::store::kv_budget::KvBudget {
            sessions: paths.data.join("sessions"),
            cache: paths.prompt_cache(),
            bytes: self
                .kv_disk_gib
                .map_or(crate::store::kv_budget::DEFAULT_BYTES, |g| {
                    (g.max(0.0) * (1u64 << 30) as f64) as u64
                }),
        }
    }

    /// How much prefill time a session's snapshot must save to be written.
    pub fn snapshot_min_saved(&self) -> std::time::Duration {
        self.snapshot_min_saved_s
            .filter(|s| s.is_finite())
            .map_or(crate::store::kv_budget::MIN_SAVED, |s| {
                std::time::Duration::from_secs_f64(s.clamp(0.0, 86_400.0))
            })
    }

    /// Apply the command line on top of the file.
    pub fn merge(mut self, cli: &Common) -> Config {
        let s = &cli.sampling;
        let t = &mut self.sampling;
        if let Some(v) = s.temperature {
            t.temperature = v;
        }
        if let Some(v) = s.top_p {
            t.top_p = v;
        }
        if let Some(v) = s.lookup {
            t.lookup = v;
        }
        if let Some(v) = s.top_k {
            t.top_k = v;
        }
        if let Some(v) = s.min_p {
            t.min_p = v;
        }
        if let Some(v) = s.repeat_penalty {
            t.repeat_penalty = v;
        }
        if s.seed.is_some() {
            t.seed = s.seed;
        }
        if let Some(v) = s.max_tokens {
            t.max_tokens = v;
        }
        if s.think.is_some() {
            t.thinking = s.think;
        }
        if cli.model.is_some() {
            self.model = cli.model.clone();
        }
        if cli.ctx.is_some() {
            self.context = cli.ctx;
        }
        if cli.system.is_some() {
            self.system_prompt = cli.system.clone();
        }
        self.agent = cli.agent.over(self.agent);
        self
    }

    /// The endpoint `--engine remote:NAME` names, or why there is none.
    pub fn endpoint(&self, name: &str) -> std::result::Result<Endpoint, String> {
        self.endpoints.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.endpoints.keys().map(String::as_str).collect();
            if known.is_empty() {
                format!("no endpoint '{name}': add [endpoints.{name}] with base_url and model to config.toml")
            } else {
                format!("no endpoint '{name}' (config.toml has: {})", known.join(", "))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_merges() {
        let c = Config::parse("context = 2048\n[sampling]\ntemperature = 0.2\nseed = 9\n").unwrap();
        assert_eq!(c.context, Some(2048));
        assert_eq!(c.sampling.seed, Some(9));
        let mut cli = Common::default();
        cli.sampling.temperature = Some(0.0);
        let merged = c.merge(&cli);
        assert_eq!(merged.sampling.temperature, 0.0);
        assert_eq!(merged.sampling.seed, Some(9));
    }

    #[test]
    fn agent_flags_override_the_file() {
        let c = Config::parse("[agent]\nmax_steps = 7\nmax_minutes = 5\ngovernor = \"slow\"\n")
            .unwrap();
        let mut cli = Common::default();
        cli.agent.max_steps = Some(3);
        let merged = c.merge(&cli);
        assert_eq!(merged.agent.max_steps, 3);
        assert_eq!(merged.agent.max_minutes, 5);
        assert_eq!(merged.agent.governor, crate::agent::GovernorMode::Slow);
        assert_eq!(merged.agent.max_run_tokens, 200_000);
    }

    #[test]
    fn bad_config_names_the_line() {
        let err = Config::parse("context = 10\n[sampling]\ntemprature = 1\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
        assert!(err.contains("temprature"), "{err}");
        assert!(!err.contains('\n'));
        let err = Config::parse("[sampling]\ntop_p = 2.0\n").unwrap_err();
        assert!(err.contains("top_p"), "{err}");
    }

    #[test]
    fn missing_file_is_empty_config() {
        assert_eq!(
            Config::load(Path::new("/nonexistent/kiln.toml")).unwrap(),
            Config::default()
        );
    }
}
