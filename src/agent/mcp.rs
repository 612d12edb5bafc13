//! MCP servers an agent run uses (the `rmcp` SDK, stdio servers declared
//! as `[mcp.NAME]` in config.toml): started with the run in its
//! workspace, their tools offered to the model as `NAME__tool`, their
//! calls timed out, their results capped and treated as data. A server
//! that fails to start, crashes or stops answering is said in one line
//! and the run goes on without it.
//!
//! A server is a program the user chose, not the model: it runs with the
//! user's rights, outside the shell sandbox. What it returns is hostile
//! like any tool output, and what it says of its tools (descriptions,
//! schemas, read-only hints) is bounded and never decides an approval:
//! only `read_only` in the config does.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::{RoleClient, RunningService, ServiceExt};
use rmcp::transport::TokioChildProcess;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tools::{cap, ToolResult};

/// Servers in one run at most, and tools offered from one server.
pub const MAX_SERVERS: usize = 16;
pub const MAX_TOOLS: usize = 64;
/// A tool's description and input schema as the model sees them, at most;
/// a longer description is cut, a larger schema replaced by "an object".
const MAX_DESCRIPTION: usize = 1 << 10;
const MAX_SCHEMA: usize = 16 << 10;
/// What every server's tools may add to the prompt together (names,
/// descriptions, schemas); tools past it are left out with a line.
const MAX_OFFERED: usize = 64 << 10;
/// How long a server has to start and list its tools.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Between a server's name and its tool's in what the model calls.
pub const SEPARATOR: &str = "__";

/// A stdio MCP server as `[mcp.NAME]` in config.toml declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Only these of its tools are offered; all when absent.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// Its tools that only read: they run without a yes under the
    /// auto-read policy. Every other tool of it is asked like a write.
    #[serde(default)]
    pub read_only: Vec<String>,
    /// Seconds one call may take (default 60).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

impl ServerConfig {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s.unwrap_or(60).clamp(1, 3600))
    }
}

/// A server's name as config.toml may give it: it prefixes its tools'.
pub fn valid_server_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A tool's name as a server may give it, to be offered.
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// One tool of a running server, as offered to the model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tool {
    /// What the model calls: `SERVER__tool`.
    pub name: String,
    /// The tool's own name on its server.
    pub tool: String,
    pub server: String,
    pub description: String,
    /// Its arguments' JSON Schema, bounded.
    pub schema: Value,
    pub read_only: bool,
}

impl Tool {
    /// As a chat template lists a function.
    pub fn function(&self) -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.schema,
            }
        })
    }
}

/// Where a server stands, for `kiln mcp list` and the run's notices.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum State {
    Running,
    /// It never came up: the one line why.
    Failed(String),
    /// It came up and then went away (crashed, or stopped answering).
    Stopped(String),
}

struct Server {
    name: String,
    config: ServerConfig,
    state: State,
    client: Option<RunningService<RoleClient, ()>>,
    tools: Vec<Tool>,
}

/// The run's MCP servers.
#[derive(Default)]
pub struct Servers {
    servers: Vec<Server>,
}

/// A server's state and tools, as `kiln mcp list --json` prints them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    pub name: String,
    #[serde(flatten)]
    pub state: State,
    pub tools: Vec<Tool>,
}

impl Servers {
    /// Start every server in `config`, in name order, in `cwd`; one line
    /// for each that does not come up (the run goes on without it).
    pub async fn start(
        config: &BTreeMap<String, ServerConfig>,
        cwd: &Path,
    ) -> (Servers, Vec<String>) {
        let mut servers = Servers::default();
        let mut notices = Vec::new();
        let mut room = MAX_OFFERED;
        for (i, (name, server)) in config.iter().enumerate() {
            if i == MAX_SERVERS {
                notices.push(format!(
                    "mcp: only the first {MAX_SERVERS} servers are started"
                ));
                break;
            }
            let (state, client, mut tools, mut said) = match valid_server_name(name) {
                false => (
                    State::Failed("a server's name is letters, digits and '-', at most 32".into()),
                    None,
                    Vec::new(),
                    Vec::new(),
                ),
                true => match tokio::time::timeout(START_TIMEOUT, connect(name, server, cwd)).await
                {
                    Ok(Ok((client, tools, said))) => (State::Running, Some(client), tools, said),
                    Ok(Err(why)) => (State::Failed(why), None, Vec::new(), Vec::new()),
                    Err(_) => (
                        State::Failed(format!(
                            "no answer in {} s; not started",
                            START_TIMEOUT.as_secs()
                        )),
                        None,
                        Vec::new(),
                        Vec::new(),
                    ),
                },
            };
            if let State::Failed(why) = &state {
                notices.push(format!(
                    "mcp server {}: {why}; the run goes on without it",
                    crate::visible::visible_line(name)
                ));
            }
            notices.append(&mut said);
            let fits = tools
                .iter()
                .take_while(|t| match room.checked_sub(t.function().to_string().len()) {
                    Some(left) => {
                        room = left;
                        true
                    }
                    None => false,
                })
                .count();
            if fits < tools.len() {
                notices.push(format!(
                    "mcp server {name}: {} of its tools are left out, past the {} KiB the servers' tools may add to the prompt",
                    tools.len() - fits,
                    MAX_OFFERED >> 10
                ));
                tools.truncate(fits);
            }
            servers.servers.push(Server {
                name: name.clone(),
                config: server.clone(),
                state,
                client,
                tools,
            });
        }
        (servers, notices)
    }

    /// Every tool offered, server by server.
    pub fn tools(&self) -> impl Iterator<Item = &Tool> {
        self.servers
            .iter()
            .filter(|s| s.state == State::Running)
            .flat_map(|s| s.tools.iter())
    }

    /// The tool the model calls `name`, if it is offered.
    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools().find(|t| t.name == name)
    }

    pub fn status(&self) -> Vec<Status> {
        self.servers
            .iter()
            .map(|s| Status {
                name: s.name.clone(),
                state: s.state.clone(),
                tools: s.tools.clone(),
            })
            .collect()
    }

    /// Call the tool the model calls `name`. Its result is data, capped at
    /// `max_output` bytes; a server that crashed or did not answer in its
    /// time is marked stopped, and its tools are then refused at once.
    pub async fn call(&mut self, name: &str, arguments: &Value, max_output: usize) -> ToolResult {
        let shown = crate::visible::visible_line(name).into_owned();
        let Some(server) = self.servers.iter_mut().find(|s| {
            name.strip_prefix(s.name.as_str())
                .is_some_and(|rest| rest.starts_with(SEPARATOR))
        }) else {
            return ToolResult::err(format!("{shown}: no MCP server offers this tool"));
        };
        if let State::Failed(why) | State::Stopped(why) = &server.state {
            return ToolResult::err(format!(
                "{shown}: MCP server {} is not running ({why})",
                server.name
            ));
        }
        let Some(tool) = server.tools.iter().find(|t| t.name == name) else {
            return ToolResult::err(format!(
                "{shown}: MCP server {} offers no such tool",
                server.name
            ));
        };
        let Some(client) = &server.client else {
            return ToolResult::err(format!(
                "{shown}: MCP server {} is not running",
                server.name
            ));
        };
        let mut params = CallToolRequestParams::new(tool.tool.clone());
        params.arguments = arguments.as_object().cloned();
        let timeout = server.config.timeout();
        let answer = tokio::time::timeout(timeout, client.peer().call_tool(params)).await;
        let stopped = match answer {
            Ok(Ok(result)) => {
                let text = cap(content_text(&result.content), max_output);
                return match result.is_error {
                    Some(true) => ToolResult::err(text),
                    _ => ToolResult::ok(text),
                };
            }
            // The server answered with an error: the call failed, the
            // server goes on.
            Ok(Err(rmcp::ServiceError::McpError(e))) => {
                return ToolResult::err(cap(format!("{shown}: {}", e.message), max_output));
            }
            Ok(Err(e)) => format!("it stopped ({e})"),
            Err(_) => format!("it did not answer in {} s", timeout.as_secs()),
        };
        tracing::warn!("mcp server {}: {stopped}", server.name);
        server.state = State::Stopped(stopped.clone());
        if let Some(client) = server.client.take() {
            tokio::spawn(async move {
                let _ = client.cancel().await;
            });
        }
        ToolResult::err(format!(
            "{shown}: MCP server {} {stopped}; its tools are unavailable for the rest of the run",
            server.name
        ))
    }

    /// Stop every server.
    pub async fn shutdown(self) {
        for server in self.servers {
            if let Some(client) = server.client {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.cancel()).await;
            }
        }
    }
}

/// Start one server and list its tools: the client, the tools offered,
/// and a line for each tool left out.
async fn connect(
    name: &str,
    config: &ServerConfig,
    cwd: &Path,
) -> Result<(RunningService<RoleClient, ()>, Vec<Tool>, Vec<String>), String> {
    let mut command = tokio::process::Command::new(&config.command);
    command
        .args(&config.args)
        .envs(&config.env)
        .current_dir(cwd);
    // Its stderr would draw over the workstation; its log is its own.
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e}",
                crate::visible::visible_line(&config.command)
            )
        })?;
    let client = ()
        .serve(transport)
        .await
        .map_err(|e| format!("it did not start as an MCP server ({e})"))?;
    let listed = client
        .peer()
        .list_all_tools()
        .await
        .map_err(|e| format!("it did not list its tools ({e})"))?;
    let mut said = Vec::new();
    let mut tools = Vec::new();
    for tool in listed {
        let own = tool.name.to_string();
        if !valid_tool_name(&own) {
            said.push(format!(
                "mcp server {name}: a tool named {} is left out (names are letters, digits, '_', '-' and '.')",
                crate::visible::visible_line(&own.chars().take(64).collect::<String>())
            ));
            continue;
        }
        if config
            .tools
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&own))
        {
            continue;
        }
        if tools.len() == MAX_TOOLS {
            said.push(format!(
                "mcp server {name}: only its first {MAX_TOOLS} tools are offered"
            ));
            break;
        }
        let description = tool.description.as_deref().unwrap_or("");
        let description = crate::visible::visible(description);
        let description = cap(description.into_owned(), MAX_DESCRIPTION);
        let schema = Value::Object((*tool.input_schema).clone());
        let schema = match serde_json::to_vec(&schema).map(|b| b.len()) {
            Ok(n) if n <= MAX_SCHEMA => schema,
            _ => serde_json::json!({"type": "object"}),
        };
        tools.push(Tool {
            name: format!("{name}{SEPARATOR}{own}"),
            read_only: config.read_only.contains(&own),
            tool: own,
            server: name.to_string(),
            description,
            schema,
        });
    }
    Ok((client, tools, said))
}

/// A result's content as text for the model: text as it is, anything else
/// named with its size.
fn content_text(content: &[ContentBlock]) -> String {
    content
        .iter()
        .map(|block| match block {
            ContentBlock::Text(t) => t.text.clone(),
            ContentBlock::Image(i) => format!(
                "[an image, {}, {} bytes of base64]",
                i.mime_type,
                i.data.len()
            ),
            ContentBlock::Audio(a) => {
                format!("[audio, {}, {} bytes of base64]", a.mime_type, a.data.len())
            }
            ContentBlock::Resource(_) => "[an embedded resource]".to_string(),
            ContentBlock::ResourceLink(r) => format!("[a link to {}]", r.uri),
            _ => "[content of a kind kiln does not read]".to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_plain() {
        assert!(valid_server_name("fs"));
        assert!(valid_server_name("my-server-2"));
        assert!(
            !valid_server_name("a__b"),
            "the separator cannot be in a server's name"
        );
        assert!(!valid_server_name(""));
        assert!(!valid_server_name(&"x".repeat(33)));
        assert!(!valid_server_name("fs\u{1b}[2J"));
        assert!(valid_tool_name("read_text_file"));
        assert!(valid_tool_name("git.status"));
        assert!(!valid_tool_name("rm -rf"));
        assert!(!valid_tool_name("\"quoted\""));
        assert!(!valid_tool_name(&"t".repeat(65)));
    }

    #[tokio::test]
    async fn a_server_that_cannot_start_is_one_line_and_the_run_goes_on() {
        let config = BTreeMap::from([
            (
                "gone".to_string(),
                ServerConfig {
                    command: "/nonexistent/mcp-server".into(),
                    args: vec![],
                    env: BTreeMap::new(),
                    tools: None,
                    read_only: vec![],
                    timeout_s: None,
                },
            ),
            (
                "not-mcp".to_string(),
                ServerConfig {
                    command: "true".into(),
                    args: vec![],
                    env: BTreeMap::new(),
                    tools: None,
                    read_only: vec![],
                    timeout_s: None,
                },
            ),
        ]);
        let (mut servers, notices) = Servers::start(&config, Path::new("/")).await;
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(
            notices[0].contains("mcp server gone: cannot start"),
            "{notices:?}"
        );
        assert!(
            notices[1].contains("mcp server not-mcp: it did not start as an MCP server"),
            "{notices:?}"
        );
        assert!(notices
            .iter()
            .all(|n| n.ends_with("the run goes on without it")));
        assert_eq!(servers.tools().count(), 0);
        let r = servers.call("gone__x", &serde_json::json!({}), 100).await;
        assert!(!r.ok && r.output.contains("not running"), "{r:?}");
        let r = servers.call("other__x", &serde_json::json!({}), 100).await;
        assert!(!r.ok && r.output.contains("no MCP server"), "{r:?}");
    }
}
