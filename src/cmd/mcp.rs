//! `kiln mcp list`: each MCP server an agent run would start, started the
//! same way (in the workspace, with its allow-list), its state and tools.

use crate::agent::mcp::{Servers, State};
use crate::cli::{Common, McpAction};
use crate::error::Result;
use crate::host::launch::paths_and_config;
use crate::visible::visible_line;

pub async fn run(action: McpAction, common: &Common) -> Result<i32> {
    let (_, config) = paths_and_config(common)?;
    let McpAction::List { json } = action;
    let (servers, notices) = Servers::start(&config.mcp, &common.workspace()).await;
    let status = servers.status();
    servers.shutdown().await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("serializes")
        );
        return Ok(0);
    }
    if status.is_empty() {
        println!("no MCP servers: declare them as [mcp.NAME] in config.toml");
    }
    for s in &status {
        let state = match &s.state {
            State::Running => format!("running, {} tools", s.tools.len()),
            State::Failed(why) => format!("failed: {}", visible_line(why)),
            State::Stopped(why) => format!("stopped: {}", visible_line(why)),
        };
        println!("{}  {state}", s.name);
        for t in &s.tools {
            let first = t.description.lines().next().unwrap_or("");
            let mode = if t.read_only { "read-only" } else { "asks" };
            println!("  {}  ({mode})  {}", t.name, visible_line(first));
        }
    }
    for n in notices
        .iter()
        .filter(|n| !n.contains("the run goes on without it"))
    {
        eprintln!("kiln: {}", visible_line(n));
    }
    Ok(0)
}
