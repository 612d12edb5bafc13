//! `kiln agent`: an agent run without the TUI, one progress line per step
//! (or JSON events), for long unattended runs over SSH.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tools::{Limits, Workspace};
use super::{pressure, Agent, Budgets, Nobody, Outcome, Progress};
use crate::cli::{AgentArgs, Common};
use crate::engine::{self, Engine};
use crate::error::{KilnError, Result};
use crate::launch::launch;
use crate::store::SessionStore;
use crate::telemetry;
use crate::visible::visible;

pub async fn run(args: AgentArgs, common: &Common) -> Result<i32> {
    let root = common.workspace();
    let workspace = Workspace::new(&root)
        .map_err(|e| KilnError::BadArgument(format!("{}: {e}", root.display())))?;
    if args.task.trim().is_empty() {
        return Err(KilnError::BadArgument("the task is empty".into()));
    }
    let launched = launch(common, |o| {
        // Tool calls are short; a long answer is a model lost in a string.
        o.sampler.max_tokens = o.sampler.max_tokens.min(args.max_reply_tokens);
    })
    .await?;
    let store = SessionStore::new(&launched.paths);
    let context = launched.engine.info().context_limit;
    // The agent records its own system prompt.
    let (journal, _reports) = store
        .start(
            &launched.model_spec(),
            launched.fingerprint.clone(),
            context,
            None,
        )
        .map_err(|e| KilnError::Store(format!("cannot journal the run: {e}")))?;
    let (handle, mut events) = engine::spawn(launched.engine);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let samples = telemetry::spawn(Duration::from_secs(1));
    let mut agent = Agent {
        engine: &handle,
        events: &mut events,
        workspace,
        policy: common.approval,
        budgets: Budgets {
            max_steps: args.max_steps,
            max_time: Duration::from_secs(args.max_minutes * 60),
            max_tokens: args.max_run_tokens,
        },
        limits: Limits::default(),
        approver: Nobody,
        journal: Some(&journal),
        pressure: Some(pressure(samples)),
        governor: args.governor,
        stop,
    };
    let json = args.json;
    eprintln!("kiln: agent session {}", journal.id);
    let outcome = agent
        .run(&args.task, |p| {
            let mut out = std::io::stdout().lock();
            let _ = if json {
                writeln!(out, "{}", serde_json::to_string(&p).expect("serializes"))
            } else {
                writeln!(out, "{}", line(&p))
            };
            let _ = out.flush();
        })
        .await;
    let id = journal.id.clone();
    let _ = tokio::task::spawn_blocking(move || journal.close()).await;
    if json {
        println!("{}", serde_json::to_string(&outcome).expect("serializes"));
    } else {
        match &outcome {
            Outcome::Finished(summary) => println!("finished: {}", visible(summary)),
            Outcome::Failed(why) => println!("failed: {}", visible(why)),
            Outcome::BudgetExhausted(what) => println!("budget exhausted: {what}"),
            Outcome::Stopped => println!("stopped"),
        }
    }
    eprintln!("kiln: the run is journaled as session {id}");
    Ok(outcome.exit_code())
}

/// One plain progress line.
/// One progress line for people: whatever the model or a tool wrote in it
/// made visible (`visible_line`), so it cannot act on the terminal.
pub fn line(p: &Progress) -> String {
    crate::visible::visible_line(&raw_line(p)).into_owned()
}

fn raw_line(p: &Progress) -> String {
    let first = |s: &str| -> String { s.lines().next().unwrap_or("").chars().take(100).collect() };
    match p {
        Progress::Call { step, call } => format!("step {step}: {}", call.describe()),
        Progress::Result { step, ok, output } => {
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
    }
}
