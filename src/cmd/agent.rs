//! `kiln agent`: an agent run without the TUI, one progress line per step
//! (or JSON events), for long unattended runs over SSH.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::agent::tools::Workspace;
use crate::agent::{self, pressure, resume, Nobody, Outcome, RunEvent, RunSpec, Start};
use crate::cli::{AgentArgs, Common};
use crate::engine::{self, Engine};
use crate::error::{KilnError, Result};
use crate::host::launch::{launch, leased};
use crate::store::session::RunHost;
use crate::store::{journal, SessionStore};
use crate::telemetry;
use crate::visible::visible;

/// What the command was asked to do before the model is up.
enum Begin {
    Task { task: String, root: PathBuf },
    Resume(Box<resume::Resumable>),
}

pub async fn run(args: AgentArgs, common: &Common) -> Result<i32> {
    // Everything that can be refused is, before the model loads.
    let begin = match &args.resume {
        Some(query) => {
            let (paths, _) = crate::host::launch::paths_and_config(common)?;
            let resumable = resume::open(&SessionStore::new(&paths), query)?;
            for warning in &resumable.warnings {
                eprintln!("kiln: {}", visible(warning));
            }
            Begin::Resume(Box::new(resumable))
        }
        None => {
            let root = common.workspace();
            Workspace::new(&root)
                .map_err(|e| KilnError::BadArgument(format!("{}: {e}", root.display())))?;
            let task = args.task.clone().unwrap_or_default();
            if task.trim().is_empty() {
                return Err(KilnError::BadArgument("the task is empty".into()));
            }
            Begin::Task { task, root }
        }
    };
    let launched = launch(common, |_| {}).await?;
    let (start, journal) = match begin {
        Begin::Task { task, root } => {
            let spec = RunSpec::new(
                task,
                root,
                common.approval,
                &launched.config.agent,
                &launched.config.sampling,
                &launched.config.mcp,
            );
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
            (Start::Fresh(spec), journal)
        }
        Begin::Resume(resumable) => {
            let mut replay = resumable.replay;
            common.agent.over_budgets(&mut replay.spec.budgets);
            let (journal, _reports) = journal::spawn(resumable.session);
            (Start::Resume(Box::new(replay)), journal)
        }
    };
    let engine = leased(engine::spawn(launched.engine));
    let samples = telemetry::spawn(Duration::from_secs(1));
    let json = args.json;
    match &args.resume {
        Some(_) => eprintln!("kiln: resuming agent session {}", journal.id),
        None => eprintln!("kiln: agent session {}", journal.id),
    }
    let mut run = agent::spawn(
        start,
        RunHost::Headless,
        engine.clone(),
        Some(journal.clone()),
        Nobody,
        Some(pressure(samples)),
    );
    let mut interrupted = false;
    let outcome = loop {
        let event = tokio::select! {
            event = run.next() => event,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                run.stop.store(true, Ordering::SeqCst);
                continue;
            }
        };
        match event {
            Some(RunEvent::Progress(p)) => {
                let mut out = std::io::stdout().lock();
                let _ = if json {
                    writeln!(out, "{}", serde_json::to_string(&p).expect("serializes"))
                } else {
                    agent::lines(&p).try_for_each(|l| writeln!(out, "{l}"))
                };
                let _ = out.flush();
            }
            Some(RunEvent::Done(outcome)) => break outcome,
            None => break Outcome::Failed("the run ended without an outcome".into()),
        }
    };
    drop(engine);
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
