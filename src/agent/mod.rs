//! The agent loop: the model calls a tool (JSON held to a grammar by
//! constrained decoding), kiln checks and approves it, runs it inside the
//! workspace, and hands the result back, until `finish` or a budget ends.
//! Every call is journaled before it runs and its result after.

mod calls;
pub mod diff;
pub mod mcp;
mod messages;
pub mod resume;
pub mod sandbox;
pub mod tools;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::tool_format::ToolFormat;
use crate::engine::{
    EngineCommand, EngineEvent, EngineHandle, FinishReason, Format, GenStats, Message, Priority,
    Role, SamplerSettings,
};
use crate::record::Record;
use crate::store::journal::JournalHandle;
use crate::store::session::{Event, RunHost};
use crate::telemetry::alarms::{AlarmDetector, AlarmKind};
use crate::telemetry::Sample;
use tools::{Effect, Limits, ToolCall, ToolResult, Workspace};

/// Invalid replies in a row before the run fails.
const MAX_RETRIES: u32 = 3;
/// Share of the context window at which older steps are summarised.
pub const COMPACT_AT: f64 = 0.75;
/// Tool output handed back to the model; the journal keeps more.
const RESULT_FOR_MODEL: usize = 4 << 10;

/// The project's instructions for agents, at the workspace's root.
pub const INSTRUCTIONS: &str = "AGENTS.md";
/// Bytes of it that go into the system prompt; the rest is cut.
pub const MAX_INSTRUCTIONS: usize = 32 << 10;

pub const SYSTEM_PROMPT: &str = r#"You are an agent working in a folder. Reply to every message with exactly one tool call, as JSON, and nothing else:
{"tool": "list_dir", "path": "."}
{"tool": "read_file", "path": "notes.txt"}
{"tool": "search", "query": "TODO"}
{"tool": "write_file", "path": "out.txt", "content": "the whole new file"}
{"tool": "write_file", "path": "out.txt", "find": "old text", "replace": "new text"}
{"tool": "shell", "command": "ls -la"}
{"tool": "shell", "command": "sed -i s/old/new/ out.txt", "edits": ["out.txt"]}
{"tool": "finish", "summary": "what you did"}
Paths are relative to the folder. Each reply gets the tool's result; a shell command's "edits" get back what it changed in them. Call finish when the task is done."#;

/// The system prompt where the model calls tools in its own format (the
/// template lists them): it may think before it acts.
pub const NATIVE_PROMPT: &str = "You are an agent working in a folder, with tools to read, search and change it and to run shell commands. Before each call, say in a sentence or two what you will do and why. Paths are relative to the folder. Each call gets its result. Look before you change anything, check your work, and call finish when the task is done.";

/// Whether a run may use the model's own tool-call format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CallMode {
    /// The model's own format where its template lists tools, else JSON.
    #[default]
    Auto,
    /// One JSON call per answer, held whole to a grammar.
    Json,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Every call but `finish` needs a yes.
    #[default]
    Ask,
    /// Reads run; writes and shell commands need a yes.
    AutoRead,
    /// Everything runs.
    Auto,
}

impl Policy {
    /// Whether this policy asks for at least every yes `other` asks for.
    pub fn asks_at_least(self, other: Policy) -> bool {
        let rank = |p: Policy| match p {
            Policy::Ask => 2,
            Policy::AutoRead => 1,
            Policy::Auto => 0,
        };
        rank(self) >= rank(other)
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Ask => "ask",
            Policy::AutoRead => "auto-read",
            Policy::Auto => "auto",
        }
    }

    fn needs_approval(self, call: &ToolCall) -> bool {
        !matches!(call, ToolCall::Finish { .. }) && self.asks(call.effect())
    }

    /// Whether a call that may do `effect` needs a yes.
    fn asks(self, effect: Effect) -> bool {
        match self {
            Policy::Ask => true,
            Policy::AutoRead => effect != Effect::Read,
            Policy::Auto => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GovernorMode {
    /// Wait between steps until the pressure is gone.
    Pause,
    /// Wait a while between steps, then go on.
    Slow,
    /// Go on regardless.
    Ignore,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    pub max_steps: u32,
    pub max_time: Duration,
    /// Prompt plus completion tokens over the whole run.
    pub max_tokens: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approval {
    Yes,
    No,
    /// Yes, and do not ask again for this exact call.
    Always,
}

/// A call that needs a yes, and what it would change: a write's unified
/// diff as the file stands when it is asked (`tools::preview`), and for a
/// shell command the sandbox it runs under.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub call: ToolCall,
    pub diff: Option<String>,
    pub sandbox: Option<sandbox::Sandbox>,
}

/// Who answers approval questions: a person in the TUI, or nobody.
pub trait Approver {
    fn approve(
        &mut self,
        question: &Question,
    ) -> impl std::future::Future<Output = Approval> + Send;
}

/// Headless with nobody to ask: every step that needs a yes is refused.
pub struct Nobody;

impl Approver for Nobody {
    async fn approve(&mut self, _question: &Question) -> Approval {
        Approval::No
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Call {
        step: u32,
        call: ToolCall,
        /// The decode speed of the turn that chose the call, and the tokens
        /// the run's conversation then held (for `kiln ps`).
        #[serde(default)]
        tok_s: Option<f64>,
        #[serde(default)]
        context_tokens: usize,
    },
    Result {
        step: u32,
        ok: bool,
        output: String,
        /// What a write changed, as a unified diff.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
    },
    Refused {
        step: u32,
        call: ToolCall,
        reason: String,
    },
    Invalid {
        step: u32,
        reply: String,
        error: String,
    },
    Paused {
        reason: String,
    },
    Resumed,
    Compacted {
        context_tokens: usize,
    },
    /// The sandbox the run's shell commands get, said as it starts.
    Confined {
        sandbox: sandbox::Sandbox,
    },
    /// Something the run says that is not a step: one line.
    Notice {
        text: String,
    },
    /// What the model wrote before its calls (native calls only): its
    /// reasoning, shown dimmed and folded.
    Thought {
        step: u32,
        text: String,
    },
    /// How the run's calls are written, said as it starts: the model's
    /// own format, or JSON-only (`None`).
    Calls {
        native: Option<ToolFormat>,
    },
    /// The workspace's AGENTS.md went into the system prompt: its size,
    /// what it costs in tokens (where the engine counts them), and whether
    /// it was cut to `MAX_INSTRUCTIONS` bytes.
    Instructions {
        bytes: usize,
        #[serde(default)]
        tokens: Option<usize>,
        #[serde(default)]
        cut: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    Finished(String),
    Failed(String),
    BudgetExhausted(String),
    Stopped,
}

impl Outcome {
    /// 0 finished, 1 failed, 3 budget exhausted, 4 stopped by the user.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Finished(_) => 0,
            Outcome::Failed(_) => 1,
            Outcome::BudgetExhausted(_) => 3,
            Outcome::Stopped => 4,
        }
    }
}

/// Where a run stands between steps: what it has spent, and what goes to
/// the model next. A fresh run starts from its task; a resumed one from
/// its journal (`resume::replay`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunState {
    /// Steps taken.
    pub step: u32,
    /// Prompt plus completion tokens spent.
    pub tokens: usize,
    /// Wall time spent before this process took the run on.
    pub spent: Duration,
    /// Invalid replies in a row.
    pub retries: u32,
    /// Calls approved with "always", by `messages::key`.
    pub always: HashSet<String>,
    /// What goes to the model next: a user message (the task, a word on
    /// an answer it could not act on), or the last calls' results in the
    /// template's tool role.
    pub input: Vec<Message>,
    /// The input is journaled already: the process died before the
    /// model answered it.
    pub journaled: bool,
}

pub struct Agent<'a, A: Approver> {
    pub engine: &'a EngineHandle,
    pub workspace: Workspace,
    pub policy: Policy,
    pub budgets: Budgets,
    pub limits: Limits,
    pub approver: A,
    pub journal: Option<&'a JournalHandle>,
    /// Memory and heat pressure, from `pressure()`.
    pub pressure: Option<watch::Receiver<Option<String>>>,
    pub governor: GovernorMode,
    pub stop: Arc<AtomicBool>,
    /// The workspace's AGENTS.md in the system prompt.
    pub instructions: bool,
    /// The model's own tool-call format, or `None` for JSON-only calls.
    pub native: Option<ToolFormat>,
    /// The run's MCP servers.
    pub mcp: mcp::Servers,
}

/// One progress line for people: whatever the model or a tool wrote in it
/// made visible (`visible_line`), so it cannot act on the terminal.
pub fn line(p: &Progress) -> String {
    crate::visible::visible_line(&raw_line(p)).into_owned()
}

/// An event as a person reads it in a log: its line, then what a write
/// changed.
pub fn lines(p: &Progress) -> impl Iterator<Item = String> {
    std::iter::once(line(p)).chain(diff_lines(p))
}

/// What a result's write changed, a line each, made visible: plain text
/// for logs, coloured where the TUI draws it.
pub fn diff_lines(p: &Progress) -> Vec<String> {
    match p {
        Progress::Result {
            diff: Some(diff), ..
        } => diff
            .lines()
            .map(|l| crate::visible::visible_line(l).into_owned())
            .collect(),
        _ => Vec::new(),
    }
}

fn raw_line(p: &Progress) -> String {
    let first = |s: &str| -> String { s.lines().next().unwrap_or("").chars().take(100).collect() };
    match p {
        Progress::Call { step, call, .. } => format!("step {step}: {}", call.describe()),
        Progress::Result {
            step, ok, output, ..
        } => {
            format!(
                "step {step}: {} {}",
                if *ok { "ok" } else { "error" },
                first(output)
            )
        }
        Progress::Refused { step, reason, .. } => format!("step {step}: {reason}"),
        Progress::Invalid { step, error, .. } => {
            format!("step {step}: not a valid tool call ({error}); asking again")
        }
        Progress::Paused { reason } => format!("paused: {reason}"),
        Progress::Resumed => "resumed".to_string(),
        Progress::Compacted { context_tokens } => {
            format!("compacted older steps at {context_tokens} tokens")
        }
        Progress::Notice { text } => text.clone(),
        Progress::Thought { step, text } => format!("step {step}: thinks: {}", first(text)),
        Progress::Calls { native } => format!("tool calls: {}", calls_mode(*native)),
        Progress::Confined { sandbox } => format!("shell commands: {}", sandbox.describe()),
        Progress::Instructions { bytes, tokens, cut } => {
            let cost = tokens.map_or(format!("{bytes} bytes"), |t| format!("{t} tokens"));
            let cut = match cut {
                true => format!(", cut to its first {MAX_INSTRUCTIONS} bytes"),
                false => String::new(),
            };
            format!(
                "{INSTRUCTIONS} loaded into the system prompt ({cost}{cut}); --no-agents-md leaves it out"
            )
        }
    }
}

/// How a run's calls are written, for people.
pub fn calls_mode(native: Option<ToolFormat>) -> &'static str {
    match native {
        Some(f) => f.describe(),
        None => "JSON only",
    }
}

/// Everything that makes a run, built once from the settings (config file
/// and flags) by whichever front end starts it: the workstation's `/agent`,
/// the daemon's detached runs and headless `kiln agent` alike. Journaled
/// as the run starts, so that it can be resumed as it was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub task: String,
    pub workspace: PathBuf,
    pub policy: Policy,
    pub budgets: Budgets,
    pub governor: GovernorMode,
    /// The sampler for the run's turns: the chat's, with answers capped at
    /// the agent's reply budget (a long answer is a model lost in a string).
    pub sampler: SamplerSettings,
    /// The workspace's AGENTS.md in the system prompt.
    pub instructions: bool,
    /// What the run's shell commands may do.
    pub sandbox: sandbox::Sandbox,
    /// Whether the run may call tools in the model's own format.
    #[serde(default)]
    pub tool_calls: CallMode,
    /// The format it calls them in, decided as it starts from the model's
    /// template; `None` is JSON-only.
    #[serde(default)]
    pub native: Option<ToolFormat>,
    /// The MCP servers it starts, as config.toml declared them.
    #[serde(default)]
    pub mcp: std::collections::BTreeMap<String, mcp::ServerConfig>,
}

/// The agent settings every front end reads: `[agent]` in config.toml,
/// overridden by the flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    pub max_steps: u32,
    pub max_minutes: u64,
    /// Prompt plus completion tokens over the whole run.
    pub max_run_tokens: usize,
    /// Most tokens in one tool call.
    pub max_reply_tokens: u32,
    pub governor: GovernorMode,
    /// The workspace's AGENTS.md in the system prompt.
    pub project_instructions: bool,
    /// What shell commands may write, and whether they reach the network.
    pub sandbox: sandbox::SandboxMode,
    pub sandbox_network: bool,
    /// A daemon that starts resumes the detached runs it was hosting when
    /// it died (`kiln daemon --resume-on-start`).
    pub resume_on_start: bool,
    /// The model's own tool-call format where its template has one
    /// (`auto`), or JSON-only calls (`json`).
    pub tool_calls: CallMode,
}

impl AgentSettings {
    /// The shell commands' sandbox these settings ask for.
    pub fn sandbox(&self) -> sandbox::Sandbox {
        sandbox::Sandbox {
            mode: self.sandbox,
            network: self.sandbox_network,
        }
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            max_steps: 30,
            max_minutes: 60,
            max_run_tokens: 200_000,
            max_reply_tokens: 512,
            governor: GovernorMode::Pause,
            project_instructions: true,
            sandbox: sandbox::SandboxMode::default(),
            sandbox_network: false,
            resume_on_start: false,
            tool_calls: CallMode::Auto,
        }
    }
}

impl RunSpec {
    pub fn new(
        task: impl Into<String>,
        workspace: PathBuf,
        policy: Policy,
        settings: &AgentSettings,
        chat_sampler: &SamplerSettings,
        servers: &std::collections::BTreeMap<String, mcp::ServerConfig>,
    ) -> RunSpec {
        let mut sampler = chat_sampler.clone();
        sampler.max_tokens = sampler.max_tokens.min(settings.max_reply_tokens);
        RunSpec {
            task: task.into(),
            workspace,
            policy,
            budgets: Budgets {
                max_steps: settings.max_steps,
                max_time: Duration::from_secs(settings.max_minutes.saturating_mul(60)),
                max_tokens: settings.max_run_tokens,
            },
            governor: settings.governor,
            instructions: settings.project_instructions,
            sandbox: settings.sandbox(),
            sampler,
            tool_calls: settings.tool_calls,
            native: None,
            mcp: servers.clone(),
        }
    }
}

/// A run going on as a task of its own.
pub struct RunHandle {
    progress: mpsc::UnboundedReceiver<Progress>,
    /// Set to stop the run between steps (a running tool is stopped too).
    pub stop: Arc<AtomicBool>,
    /// Set with `stop` when the host goes away (a daemon shutting down for
    /// a reboot): the run stops without ending, so it can be resumed.
    pub suspend: Arc<AtomicBool>,
    outcome: Option<oneshot::Receiver<Outcome>>,
}

/// What a run reports, in order: its progress, then its outcome once.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    Progress(Progress),
    Done(Outcome),
}

impl RunHandle {
    /// The run's next report; `None` after its outcome.
    pub async fn next(&mut self) -> Option<RunEvent> {
        // The run drops its progress sender before it sends the outcome, so
        // every step is reported before the end.
        if let Some(p) = self.progress.recv().await {
            return Some(RunEvent::Progress(p));
        }
        let outcome = self.outcome.take()?.await;
        Some(RunEvent::Done(outcome.unwrap_or_else(|_| {
            Outcome::Failed("the agent task stopped unexpectedly".into())
        })))
    }
}

/// How a run begins: from its task, or from its journal.
pub enum Start {
    Fresh(RunSpec),
    Resume(Box<resume::Replay>),
}

impl Start {
    pub fn spec(&self) -> &RunSpec {
        match self {
            Start::Fresh(spec) => spec,
            Start::Resume(replay) => &replay.spec,
        }
    }
}

/// Start a run on `engine`, which the caller holds for it (a lease) for as
/// long as the run lasts; `host` says who hosts it. Its start, steps and
/// end are journaled to `journal`; questions go to `approver`; `pressure`
/// (from `pressure()`) feeds the governor.
pub fn spawn<A: Approver + Send + 'static>(
    start: Start,
    host: RunHost,
    engine: EngineHandle,
    journal: Option<JournalHandle>,
    approver: A,
    pressure: Option<watch::Receiver<Option<String>>>,
) -> RunHandle {
    let (progress_tx, progress) = mpsc::unbounded_channel();
    let (outcome_tx, outcome) = oneshot::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let suspend = Arc::new(AtomicBool::new(false));
    let (run_stop, run_suspend) = (stop.clone(), suspend.clone());
    tokio::spawn(async move {
        let mut start = start;
        if let Start::Fresh(spec) = &mut start {
            spec.native = match spec.tool_calls {
                CallMode::Auto => engine.info().tool_format,
                CallMode::Json => None,
            };
        }
        let spec = start.spec().clone();
        let record = |event: Event| {
            if let Some(j) = &journal {
                j.event(event);
            }
        };
        record(Event::RunStarted {
            spec: serde_json::to_value(&spec).expect("specs serialize"),
            host,
            resumed: matches!(start, Start::Resume(_)),
        });
        let outcome = match Workspace::new(&spec.workspace) {
            Err(e) => Outcome::Failed(format!("workspace {}: {e}", spec.workspace.display())),
            Ok(_) if spec.native.is_some() && spec.native != engine.info().tool_format => {
                Outcome::Failed(format!(
                    "the run calls tools in the {} format, which this model's chat template does not speak",
                    calls_mode(spec.native)
                ))
            }
            Ok(workspace) => {
                let report = move |p| {
                    let _ = progress_tx.send(p);
                };
                let (servers, notices) = mcp::Servers::start(&spec.mcp, workspace.root()).await;
                for text in notices {
                    record(Event::Notice { text: text.clone() });
                    report(Progress::Notice { text });
                }
                engine.send(EngineCommand::SetSampler(spec.sampler.clone()));
                let offered: Vec<&mcp::Tool> = servers.tools().collect();
                let tools = match spec.native {
                    Some(_) => calls::schemas(&offered),
                    None => Vec::new(),
                };
                engine.send(EngineCommand::SetTools(tools));
                // A terminal's turns on the same model go before the steps.
                engine.send(EngineCommand::SetPriority(Priority::Background));
                let mut agent = Agent {
                    engine: &engine,
                    workspace,
                    policy: spec.policy,
                    budgets: spec.budgets.clone(),
                    limits: Limits {
                        sandbox: spec.sandbox,
                        ..Limits::default()
                    },
                    approver,
                    journal: journal.as_ref(),
                    pressure,
                    governor: spec.governor,
                    stop: run_stop,
                    instructions: spec.instructions,
                    native: spec.native,
                    mcp: servers,
                };
                let outcome = match start {
                    Start::Fresh(_) => agent.run(&spec.task, report).await,
                    Start::Resume(replay) => agent.resume(*replay, report).await,
                };
                std::mem::take(&mut agent.mcp).shutdown().await;
                engine.send(EngineCommand::SetPriority(Priority::Interactive));
                engine.send(EngineCommand::SetTools(Vec::new()));
                outcome
            }
        };
        if outcome == Outcome::Stopped && run_suspend.load(Ordering::SeqCst) {
            record(Event::Notice {
                text: "the run was suspended with its host; `kiln agent --resume` goes on".into(),
            });
        } else {
            record(Event::RunEnded {
                outcome: serde_json::to_value(&outcome).expect("outcomes serialize"),
            });
        }
        let _ = outcome_tx.send(outcome);
    });
    RunHandle {
        progress,
        stop,
        suspend,
        outcome: Some(outcome),
    }
}

enum TurnError {
    Stopped,
    Failed(String),
}

impl<A: Approver> Agent<'_, A> {
    fn record(&self, event: Event) {
        if let Some(j) = self.journal {
            j.event(event);
        }
    }

    /// The system prompt: how to call the tools, then the project's
    /// instructions (`AGENTS.md` at the workspace's root) where it has them
    /// and the run takes them. An unreadable file is said once and left out.
    async fn system_prompt(&mut self, report: &mut impl FnMut(Progress)) -> String {
        let offered: Vec<&mcp::Tool> = self.mcp.tools().collect();
        let base = match self.native {
            Some(_) => NATIVE_PROMPT.to_string(),
            None => format!("{SYSTEM_PROMPT}{}", calls::json_prompt_lines(&offered)),
        };
        if !self.instructions {
            return base;
        }
        let text = match self.workspace.instructions(INSTRUCTIONS, MAX_INSTRUCTIONS) {
            Ok(Some(text)) => text,
            Ok(None) => return base,
            Err(e) => {
                let text = format!("{e}; the run goes on without it");
                self.record(Event::Notice { text: text.clone() });
                report(Progress::Notice { text });
                return base;
            }
        };
        let block = format!(
            "\n\nThe project's instructions ({INSTRUCTIONS} at the folder's root):\n{}",
            text.text
        );
        report(Progress::Instructions {
            bytes: text.text.len(),
            tokens: self.engine.count_tokens(&block).await,
            cut: text.cut,
        });
        format!("{base}{block}")
    }

    /// Run `task` from its start.
    pub async fn run(&mut self, task: &str, mut report: impl FnMut(Progress)) -> Outcome {
        report(Progress::Confined {
            sandbox: self.limits.sandbox,
        });
        report(Progress::Calls {
            native: self.native,
        });
        let system = self.system_prompt(&mut report).await;
        self.engine
            .send(EngineCommand::SetSystemPrompt(Some(system.clone())));
        self.record(Event::SystemPrompt { text: Some(system) });
        let state = RunState {
            input: vec![Message::new(Role::User, messages::task(task))],
            ..RunState::default()
        };
        self.drive(task, state, report).await
    }

    /// Go on with a run from its journal: the conversation, system prompt
    /// and spending it had. Calls cut by the process's death are reported
    /// to the model as interrupted (and journaled so), never re-run.
    pub async fn resume(
        &mut self,
        replay: resume::Replay,
        mut report: impl FnMut(Progress),
    ) -> Outcome {
        report(Progress::Confined {
            sandbox: self.limits.sandbox,
        });
        report(Progress::Calls {
            native: self.native,
        });
        let task = replay.spec.task.clone();
        let mut state = replay.state;
        report(Progress::Notice {
            text: format!(
                "resumed from the journal after {} steps, {} tokens and {} s",
                state.step,
                state.tokens,
                state.spent.as_secs()
            ),
        });
        self.engine
            .send(EngineCommand::SetSystemPrompt(replay.system));
        self.engine.send(EngineCommand::SetHistory(replay.history));
        for cut in replay.interrupted {
            if !cut.journaled {
                self.record(Event::ToolCall {
                    step: cut.step,
                    call: serde_json::to_value(&cut.call).expect("calls serialize"),
                });
            }
            let output = cut.output();
            self.record(Event::ToolResult {
                step: cut.step,
                ok: false,
                refused: false,
                output: output.clone(),
                diff: None,
                interrupted: true,
            });
            report(Progress::Result {
                step: cut.step,
                ok: false,
                output: output.clone(),
                diff: None,
            });
            state
                .input
                .push(self.said(cut.id, messages::result(false, output)));
        }
        if let Some(context_tokens) = replay.compact_first {
            let input = std::mem::take(&mut state.input);
            match self
                .compact(&task, input, context_tokens, &mut report)
                .await
            {
                Ok(input) => state.input = input,
                Err(TurnError::Stopped) => return Outcome::Stopped,
                Err(TurnError::Failed(e)) => return Outcome::Failed(e),
            }
        }
        self.drive(&task, state, report).await
    }

    /// Whether `call` needs a yes: the policy on what it may do, an MCP
    /// tool reading only where config.toml says so.
    fn needs_approval(&self, call: &ToolCall) -> bool {
        match call {
            // A tool no server offers runs nothing: refused without a
            // question.
            ToolCall::Mcp { name, .. } => match self.mcp.tool(name) {
                None => false,
                Some(t) if t.read_only => self.policy.asks(Effect::Read),
                Some(_) => self.policy.asks(Effect::Write),
            },
            _ => self.policy.needs_approval(call),
        }
    }

    /// What a call's result becomes for the model: a tool message for its
    /// call where calls are native, else a user message.
    fn said(&self, id: Option<String>, text: String) -> Message {
        match (self.native, id) {
            (Some(_), Some(id)) => Message::tool(id, text),
            _ => Message::new(Role::User, text),
        }
    }

    /// The steps, from `state` on, until the run ends. Every call is a
    /// step; so is an answer with no call to act on.
    async fn drive(
        &mut self,
        task: &str,
        mut state: RunState,
        mut report: impl FnMut(Progress),
    ) -> Outcome {
        let started = Instant::now();
        let context_limit = self.engine.info().context_limit;
        // After an answer that called nothing, the next is held to calls
        // from its first token.
        let mut forced = false;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Outcome::Stopped;
            }
            let step = state.step;
            if step >= self.budgets.max_steps {
                return Outcome::BudgetExhausted(format!("{step} steps"));
            }
            if state.spent + started.elapsed() >= self.budgets.max_time {
                return Outcome::BudgetExhausted(format!(
                    "{} s of wall time",
                    self.budgets.max_time.as_secs()
                ));
            }
            if state.tokens >= self.budgets.max_tokens {
                return Outcome::BudgetExhausted(format!("{} tokens", state.tokens));
            }
            if !self.govern(&mut report).await {
                return Outcome::Stopped;
            }
            let input = std::mem::take(&mut state.input);
            if !std::mem::take(&mut state.journaled) {
                // Tool results are journaled as they come; a user message
                // here.
                for m in input.iter().filter(|m| m.role == Role::User) {
                    self.record(Event::User {
                        text: m.content.clone(),
                    });
                }
            }
            let offered: Vec<&mcp::Tool> = self.mcp.tools().collect();
            let format = calls::format(self.native, std::mem::take(&mut forced), &offered);
            let (reply, finish, stats) = match self.turn(input, Some(&format)).await {
                Ok(r) => r,
                Err(TurnError::Stopped) => return Outcome::Stopped,
                Err(TurnError::Failed(e)) => return Outcome::Failed(e),
            };
            state.tokens += stats.prompt_tokens + stats.completion_tokens;
            let answer = match calls::read(self.native, &reply, finish) {
                Ok(a) => {
                    state.retries = 0;
                    a
                }
                Err(error) => {
                    state.step += 1;
                    state.retries += 1;
                    report(Progress::Invalid {
                        step: state.step,
                        reply: reply.clone(),
                        error: error.clone(),
                    });
                    if state.retries >= MAX_RETRIES {
                        return Outcome::Failed(format!(
                            "{MAX_RETRIES} replies in a row were not valid tool calls"
                        ));
                    }
                    state.input = vec![Message::new(
                        Role::User,
                        messages::invalid(&error, self.native.is_some()),
                    )];
                    forced = self.native.is_some();
                    continue;
                }
            };
            if !answer.text.is_empty() {
                report(Progress::Thought {
                    step: state.step + 1,
                    text: answer.text.clone(),
                });
            }
            for (id, call) in answer.calls {
                state.step += 1;
                let said = match self
                    .act(state.step, call, &stats, &mut state, &mut report)
                    .await
                {
                    Ok(said) => said,
                    Err(outcome) => return outcome,
                };
                state.input.push(self.said(id, said));
            }
            if stats.context_tokens as f64 > COMPACT_AT * context_limit as f64 {
                let input = std::mem::take(&mut state.input);
                match self
                    .compact(task, input, stats.context_tokens, &mut report)
                    .await
                {
                    Ok(input) => state.input = input,
                    Err(TurnError::Stopped) => return Outcome::Stopped,
                    Err(TurnError::Failed(e)) => return Outcome::Failed(e),
                }
            }
        }
    }

    /// One call: journaled, approved where the policy asks, run, and its
    /// result journaled; what the model is told of it, or how the run
    /// ends (`finish`, a stop).
    async fn act(
        &mut self,
        step: u32,
        call: ToolCall,
        stats: &GenStats,
        state: &mut RunState,
        report: &mut impl FnMut(Progress),
    ) -> Result<String, Outcome> {
        self.record(Event::ToolCall {
            step,
            call: serde_json::to_value(&call).expect("calls serialize"),
        });
        if !settle(self.journal.cloned(), &self.stop, report).await {
            return Err(Outcome::Stopped);
        }
        report(Progress::Call {
            step,
            call: call.clone(),
            tok_s: stats.decode_tok_s,
            context_tokens: stats.context_tokens,
        });
        if let ToolCall::Finish { summary } = &call {
            self.record(Event::ToolResult {
                step,
                ok: true,
                refused: false,
                output: summary.clone(),
                diff: None,
                interrupted: false,
            });
            return Err(Outcome::Finished(summary.clone()));
        }
        let key = messages::key(&call);
        if self.needs_approval(&call) && !state.always.contains(&key) {
            let question = Question {
                diff: tools::preview(&call, &self.workspace),
                sandbox: matches!(call, ToolCall::Shell { .. }).then_some(self.limits.sandbox),
                call: call.clone(),
            };
            let answer = self.approver.approve(&question).await;
            if answer == Approval::No {
                let reason = format!(
                    "refused: {} needs approval under the {:?} policy and was not approved",
                    call.label(),
                    self.policy
                );
                self.record(Event::ToolResult {
                    step,
                    ok: false,
                    refused: true,
                    output: reason.clone(),
                    diff: None,
                    interrupted: false,
                });
                report(Progress::Refused {
                    step,
                    call,
                    reason: reason.clone(),
                });
                return Ok(messages::refused(&reason));
            }
            let always = answer == Approval::Always;
            if always {
                state.always.insert(key);
            }
            self.record(Event::Approved { step, always });
            if !settle(self.journal.cloned(), &self.stop, report).await {
                return Err(Outcome::Stopped);
            }
        }
        let result: ToolResult = match &call {
            ToolCall::Mcp { name, arguments } => {
                self.mcp.call(name, arguments, self.limits.max_output).await
            }
            _ => tools::execute(&call, &self.workspace, &self.limits, &self.stop).await,
        };
        self.record(Event::ToolResult {
            step,
            ok: result.ok,
            refused: false,
            output: result.output.clone(),
            diff: result.diff.clone(),
            interrupted: false,
        });
        if !settle(self.journal.cloned(), &self.stop, report).await {
            return Err(Outcome::Stopped);
        }
        report(Progress::Result {
            step,
            ok: result.ok,
            output: result.output.clone(),
            diff: result.diff.clone(),
        });
        Ok(messages::result(result.ok, result.output))
    }

    /// Ask the model to summarise the run so far, start its conversation
    /// afresh from that summary, and journal it; returns the next input
    /// (`input` after the summary, as one user message: the calls it
    /// answered are gone with the conversation).
    async fn compact(
        &mut self,
        task: &str,
        input: Vec<Message>,
        context_tokens: usize,
        report: &mut impl FnMut(Progress),
    ) -> Result<Vec<Message>, TurnError> {
        let ask = Message::new(
            Role::User,
            format!("Summarize in under 100 words what you have done and learned so far for the task: {task}"),
        );
        // Results that are due go in before the question, so the
        // conversation stays well formed for the template.
        let mut asked = input.clone();
        asked.push(ask);
        let (summary, _, _) = self.turn(asked, None).await?;
        let summary = summary.trim().to_string();
        self.engine
            .send(EngineCommand::SetHistory(Vec::<Message>::new()));
        report(Progress::Compacted { context_tokens });
        self.record(Event::Compacted {
            summary: summary.clone(),
            context_tokens,
        });
        Ok(vec![Message::new(
            Role::User,
            messages::compacted(task, &summary, &crate::engine::as_one_message(&input)),
        )])
    }

    /// One model turn on `input`; its reply, how it ended and its stats.
    async fn turn(
        &mut self,
        input: Vec<Message>,
        format: Option<&Format>,
    ) -> Result<(String, FinishReason, GenStats), TurnError> {
        let mut turn = match format {
            Some(f) => self.engine.respond(input, Some(f.clone())),
            None => self.engine.chat(crate::engine::as_one_message(&input)),
        };
        loop {
            let event = tokio::select! {
                ev = turn.next() => ev,
                _ = wait_for(&self.stop) => {
                    self.engine.cancel();
                    return Err(TurnError::Stopped);
                }
            };
            let Some(event) = event else {
                return Err(TurnError::Failed("the engine stopped".into()));
            };
            // A tool call's answer is kept; a compaction's summary is not
            // part of the run.
            let kept = format.is_some() && matches!(event, EngineEvent::TurnFinished { .. });
            if let (true, Some(Record::Event(e))) = (kept, Record::of(&event)) {
                self.record(e);
            }
            match event {
                EngineEvent::TurnFinished {
                    reply,
                    finish,
                    stats,
                    ..
                } => return Ok((reply, finish, stats)),
                EngineEvent::TurnFailed { error, .. } => return Err(TurnError::Failed(error)),
                _ => {}
            }
        }
    }

    /// Between steps: wait while the machine is under pressure (pause),
    /// or slow down (slow). Returns false when the user stopped the run.
    async fn govern(&mut self, report: &mut impl FnMut(Progress)) -> bool {
        let Some(rx) = self.pressure.as_mut() else {
            return true;
        };
        let Some(reason) = rx.borrow_and_update().clone() else {
            return true;
        };
        match self.governor {
            GovernorMode::Ignore => return true,
            GovernorMode::Slow => {
                tracing::info!("agent slowed: {reason}");
                tokio::time::sleep(Duration::from_secs(10)).await;
                return true;
            }
            GovernorMode::Pause => {}
        }
        report(Progress::Paused {
            reason: reason.clone(),
        });
        if let Some(j) = self.journal {
            j.event(Event::Notice {
                text: format!("agent paused: {reason}"),
            });
        }
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if rx.borrow_and_update().is_none() {
                        break;
                    }
                }
                _ = wait_for(&self.stop) => return false,
            }
        }
        report(Progress::Resumed);
        if let Some(j) = self.journal {
            j.event(Event::Notice {
                text: "agent resumed: the pressure is gone".into(),
            });
        }
        true
    }
}

/// Wait until everything journaled is on disk: a call before it runs,
/// its result before the run goes on, so a resumed run never runs a
/// completed call again. A full disk pauses the run (said once) until
/// there is room; false when the user stopped it meanwhile.
async fn settle(
    journal: Option<JournalHandle>,
    stop: &AtomicBool,
    report: &mut impl FnMut(Progress),
) -> bool {
    let Some(journal) = journal else {
        return true;
    };
    let mut paused = false;
    loop {
        let j = journal.clone();
        match tokio::task::spawn_blocking(move || j.sync()).await {
            Ok(Err(why)) => {
                if !paused {
                    paused = true;
                    report(Progress::Paused {
                        reason: format!("the journal cannot be written ({why})"),
                    });
                }
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            _ => break,
        }
    }
    if paused {
        report(Progress::Resumed);
    }
    true
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Memory and heat pressure from telemetry, as the governor needs it: a
/// reason while a swap storm lasts or the machine throttles, `None` when
/// all is well. Every sample goes through the alarm detector, so a storm is
/// judged on consecutive samples, not on the one seen between steps.
pub fn pressure(mut samples: watch::Receiver<Sample>) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut detector = AlarmDetector::default();
        let mut storm = String::new();
        loop {
            let sample = samples.borrow_and_update().clone();
            if let Some(crate::telemetry::alarms::AlarmEvent::Raised { message, .. }) =
                detector.on_sample(&sample, true)
            {
                storm = message;
            }
            let reason = if detector.active(AlarmKind::SwapStorm) {
                Some(storm.clone())
            } else if sample.throttle.throttled() == Some(true) {
                Some("the CPU is throttling".to_string())
            } else if sample.running_hot() {
                sample
                    .hottest()
                    .map(|t| format!("{} at {:.0} °C", t.label, t.celsius))
            } else {
                None
            };
            if *tx.borrow() != reason && tx.send(reason).is_err() {
                return;
            }
            if samples.changed().await.is_err() {
                return;
            }
        }
    });
    rx
}
