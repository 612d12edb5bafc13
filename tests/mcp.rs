//! MCP servers in agent runs, against real servers: the official
//! filesystem server from npm, driven through a scripted run that lists
//! and reads files through it under the approval policy and an allow-list;
//! and a Python server (the `mcp` package) that crashes on one call and
//! never answers another; and `kiln mcp list`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::agent::mcp::ServerConfig;
use kiln::agent::{
    AgentSettings, Approval, Approver, Outcome, Policy, Progress, Question, RunSpec, Start,
};
use kiln::engine::fake::FakeEngine;
use kiln::engine::{self, SamplerSettings};
use kiln::store::SessionStore;

/// Says yes to everything, counting the questions and keeping what they
/// were about.
struct Yes(Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>);

impl Approver for Yes {
    async fn approve(&mut self, question: &Question) -> Approval {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.lock().unwrap().push(question.call.describe());
        Approval::Yes
    }
}

fn server(command: &std::path::Path, args: &[&str]) -> ServerConfig {
    ServerConfig {
        command: command.to_string_lossy().into_owned(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        tools: None,
        read_only: Vec::new(),
        timeout_s: None,
    }
}

/// A scripted run with `servers`; its progress, outcome, and the calls it
/// asked about.
async fn run(
    ws: &std::path::Path,
    policy: Policy,
    servers: BTreeMap<String, ServerConfig>,
    script: Vec<String>,
) -> (Vec<Progress>, Outcome, Vec<String>) {
    run_on(FakeEngine::new(script), ws, policy, servers).await
}

async fn run_on(
    fake: FakeEngine,
    ws: &std::path::Path,
    policy: Policy,
    servers: BTreeMap<String, ServerConfig>,
) -> (Vec<Progress>, Outcome, Vec<String>) {
    let home = tempfile::tempdir().unwrap();
    let store = SessionStore {
        root: home.path().to_path_buf(),
    };
    let spec = RunSpec::new(
        "use the tools",
        ws.to_path_buf(),
        policy,
        &AgentSettings::default(),
        &SamplerSettings::default(),
        &servers,
    );
    let (journal, _) = store.start("fake", None, 4096, None).unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let about = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (progress, outcome) = common::run_headless(
        Start::Fresh(spec),
        engine::spawn(fake),
        journal,
        Yes(asked.clone(), about.clone()),
    )
    .await;
    let about = about.lock().unwrap().clone();
    (progress, outcome, about)
}

fn mcp_call(name: &str, arguments: serde_json::Value) -> String {
    serde_json::json!({"tool": "mcp", "name": name, "arguments": arguments}).to_string()
}

fn results(progress: &[Progress]) -> Vec<(bool, String)> {
    progress
        .iter()
        .filter_map(|p| match p {
            Progress::Result { ok, output, .. } => Some((*ok, output.clone())),
            Progress::Refused { reason, .. } => Some((false, reason.clone())),
            _ => None,
        })
        .collect()
}

const FINISH: &str = r#"{"tool": "finish", "summary": "done"}"#;

/// The filesystem server lists and reads the workspace for the run; the
/// tool marked read-only runs under auto-read without a question, the
/// other is asked; a tool left out of the allow-list is not offered, and a
/// call to it is refused by kiln without reaching the server.
#[tokio::test(flavor = "multi_thread")]
async fn the_npm_filesystem_server_lists_and_reads_under_the_policy_and_allow_list() {
    let bin = tokio::task::spawn_blocking(common::npm_filesystem_server)
        .await
        .unwrap();
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path().canonicalize().unwrap();
    std::fs::write(root.join("notes.txt"), "glaze at cone 6\n").unwrap();
    std::fs::create_dir(root.join("kilns")).unwrap();
    let mut fs = server(&bin, &[root.to_str().unwrap()]);
    fs.tools = Some(vec!["list_directory".into(), "read_text_file".into()]);
    fs.read_only = vec!["list_directory".into()];
    let servers = BTreeMap::from([("fs".to_string(), fs)]);
    let path = |p: &str| root.join(p).to_string_lossy().into_owned();
    // In the model's own format, with the server's tools listed by the
    // template beside the built-in ones.
    let native = format!(
        "The notes first.\n<tool_call>\n{}\n</tool_call>",
        serde_json::json!({"name": "fs__read_text_file", "arguments": {"path": path("notes.txt")}})
    );
    let fake = FakeEngine::new([
        native,
        r#"<tool_call>
{"name": "finish", "arguments": {"summary": "read"}}
</tool_call>"#
            .to_string(),
    ])
    .with_tool_format(kiln::engine::tool_format::ToolFormat::Hermes);
    let (progress, outcome, _) = run_on(fake, &root, Policy::Auto, servers.clone()).await;
    assert_eq!(outcome, Outcome::Finished("read".into()), "{progress:#?}");
    assert!(
        results(&progress)[0].1.contains("glaze at cone 6"),
        "{progress:#?}"
    );
    let script = vec![
        mcp_call("fs__list_directory", serde_json::json!({"path": path(".")})),
        mcp_call(
            "fs__read_text_file",
            serde_json::json!({"path": path("notes.txt")}),
        ),
        mcp_call(
            "fs__write_file",
            serde_json::json!({"path": path("out.txt"), "content": "x"}),
        ),
        FINISH.to_string(),
    ];
    let (progress, outcome, asked) = run(&root, Policy::AutoRead, servers, script).await;
    assert_eq!(outcome, Outcome::Finished("done".into()), "{progress:#?}");
    let r = results(&progress);
    assert!(
        r[0].0 && r[0].1.contains("notes.txt") && r[0].1.contains("kilns"),
        "{r:?}"
    );
    assert!(r[1].0 && r[1].1.contains("glaze at cone 6"), "{r:?}");
    assert!(!r[2].0 && r[2].1.contains("offers no such tool"), "{r:?}");
    assert!(!root.join("out.txt").exists());
    assert_eq!(asked.len(), 1, "only the read was asked: {asked:?}");
    assert!(asked[0].starts_with("fs__read_text_file"), "{asked:?}");
}

/// The Python server: a call answers; a server that never answers is
/// timed out in its time and its tools are refused at once after; one
/// that crashes mid-call is said to have stopped, and the run goes on;
/// a tool whose name is not plain is left out with a line.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_server_that_crashes_or_hangs_costs_its_own_tools_only() {
    let python = tokio::task::spawn_blocking(common::mcp_python)
        .await
        .unwrap();
    let script_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp/moody_server.py");
    let script = script_path.to_str().unwrap();
    let mut slow = server(&python, &[script]);
    slow.timeout_s = Some(3);
    let servers = BTreeMap::from([
        ("moody".to_string(), server(&python, &[script])),
        ("slow".to_string(), slow),
        (
            "missing".to_string(),
            server(std::path::Path::new("/nonexistent/server"), &[]),
        ),
    ]);
    let ws = tempfile::tempdir().unwrap();
    let script = vec![
        mcp_call("moody__echo", serde_json::json!({"text": "hi"})),
        mcp_call("slow__hang", serde_json::json!({})),
        mcp_call("slow__echo", serde_json::json!({"text": "again"})),
        mcp_call("moody__crash", serde_json::json!({})),
        mcp_call("moody__echo", serde_json::json!({"text": "after"})),
        r#"{"tool": "list_dir", "path": "."}"#.to_string(),
        FINISH.to_string(),
    ];
    let started = Instant::now();
    let (progress, outcome, asked) = run(ws.path(), Policy::Ask, servers, script).await;
    assert_eq!(outcome, Outcome::Finished("done".into()), "{progress:#?}");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    let notices: Vec<String> = progress
        .iter()
        .filter_map(|p| match p {
            Progress::Notice { text } => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("mcp server missing: cannot start")
                && n.ends_with("the run goes on without it")),
        "{notices:?}"
    );
    assert!(
        notices
            .iter()
            .any(|n| n.contains("bad name; rm -rf") && n.contains("left out")),
        "{notices:?}"
    );
    let r = results(&progress);
    assert_eq!(r[0], (true, "echo: hi".to_string()), "{r:?}");
    assert!(!r[1].0 && r[1].1.contains("did not answer in 3 s"), "{r:?}");
    assert!(!r[2].0 && r[2].1.contains("not running"), "{r:?}");
    assert!(!r[3].0 && r[3].1.contains("stopped"), "{r:?}");
    assert!(!r[4].0 && r[4].1.contains("not running"), "{r:?}");
    assert!(r[5].0, "the run's own tools go on: {r:?}");
    // Under "ask" every call to a running server was asked; one to a
    // server that stopped is refused without a question.
    let asked: Vec<&str> = asked.iter().map(|a| a.split(' ').next().unwrap()).collect();
    assert_eq!(
        asked,
        ["moody__echo", "slow__hang", "moody__crash", "list_dir"],
        "{r:?}"
    );
}

/// `kiln mcp list --json` starts each server from config.toml, shows its
/// state and the tools it offers (the allow-list applied), and stops it.
#[test]
fn kiln_mcp_list_shows_each_servers_state_and_tools() {
    let python = common::mcp_python();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp/moody_server.py");
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[mcp.moody]\ncommand = {:?}\nargs = [{:?}]\ntools = [\"echo\", \"hang\"]\nread_only = [\"echo\"]\n\n[mcp.missing]\ncommand = \"/nonexistent/server\"\n",
            python.to_str().unwrap(),
            script.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_LOG", "warn")
        .args(["--data-dir"])
        .arg(home.path())
        .args(["mcp", "list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let listed = common::json_stdout(&out);
    let by_name = |n: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap_or_else(|| panic!("{n} in {listed}"))
            .clone()
    };
    let moody = by_name("moody");
    assert_eq!(moody["state"], "running", "{moody}");
    let tools: Vec<&str> = moody["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools, ["moody__echo", "moody__hang"]);
    assert_eq!(moody["tools"][0]["read_only"], true);
    let missing = by_name("missing");
    assert_eq!(missing["state"], "failed");
    assert!(
        missing["reason"].as_str().unwrap().contains("cannot start"),
        "{missing}"
    );
}
