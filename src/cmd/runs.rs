//! The daemon's clients: `kiln agent --detach`, `kiln ps`, `kiln stop` and
//! `kiln attach` (which hands a session to the workstation's terminal).

use std::io::Write;

use crate::agent::{lines, Outcome, Progress};
use crate::cli::{AgentArgs, Common};
use crate::error::{KilnError, Result};
use crate::host::daemon::{ask, connect};
use crate::host::protocol::{self, Reply, Request};
use crate::store::session::RunHost;
use crate::store::SessionStore;
use crate::visible::visible_line;

fn unexpected(reply: Reply) -> KilnError {
    match reply {
        Reply::Error { message } => KilnError::Store(format!("daemon: {message}")),
        other => KilnError::Store(format!("daemon: unexpected reply {other:?}")),
    }
}

/// Start an agent run in the daemon (starting the daemon if none runs),
/// or resume one there.
pub async fn detach(args: AgentArgs, common: &Common) -> Result<i32> {
    let root = common.workspace();
    let workspace = root
        .canonicalize()
        .map_err(|e| KilnError::BadArgument(format!("{}: {e}", root.display())))?;
    let mut settings = protocol::Settings::of(common);
    settings.common.workspace = Some(workspace);
    let mut stream = connect(common, true).await?;
    let (request, verb) = match args.resume {
        Some(id) => (Request::ResumeAgent { id, settings }, "resumed"),
        None => (
            Request::StartAgent {
                task: args.task.unwrap_or_default(),
                settings,
            },
            "started",
        ),
    };
    match ask(&mut stream, &request).await? {
        Reply::Started { id } => {
            println!("{id}");
            eprintln!("kiln: run {id} {verb} in the daemon; `kiln attach {id}` follows it");
            Ok(0)
        }
        other => Err(unexpected(other)),
    }
}

/// `kiln ps`: what the daemon holds, then the runs that were interrupted
/// (whose process died) and can be resumed.
pub async fn ps(common: &Common) -> Result<i32> {
    let (paths, _) = crate::host::launch::paths_and_config(common)?;
    let interrupted = SessionStore::new(&paths).interrupted_runs();
    match connect(common, false).await {
        Ok(mut stream) => daemon_ps(&mut stream).await?,
        Err(e) if interrupted.is_empty() => return Err(e),
        Err(e) => eprintln!("kiln: {e}"),
    }
    if !interrupted.is_empty() {
        println!();
        println!(
            "{:<22} {:<11} {:<20}  TITLE",
            "INTERRUPTED RUN", "HOST", "LAST STEP"
        );
        for (l, host) in &interrupted {
            let meta = l.meta.as_ref().expect("a run's session has its meta");
            let title: String = meta.title.chars().take(60).collect();
            let host = match host {
                RunHost::Headless => "kiln agent",
                RunHost::Daemon => "daemon",
                RunHost::Workstation => "workstation",
            };
            println!(
                "{:<22} {host:<11} {:<20}  {}",
                l.id,
                crate::store::display_time(meta.updated_ms),
                visible_line(&title)
            );
        }
        println!("`kiln agent --resume RUN` goes on with one (with --detach, in the daemon)");
    }
    Ok(0)
}

async fn daemon_ps(stream: &mut tokio::net::UnixStream) -> Result<()> {
    match ask(stream, &Request::List).await? {
        Reply::Runs {
            runs,
            workstations,
            served,
        } => {
            println!(
                "{:<22} {:<9} {:<18} {:>7} {:>8}  TITLE",
                "SESSION", "TERMINALS", "STATE", "TOK/S", "KV TOK"
            );
            if workstations.is_empty() {
                println!("(none open)");
            }
            for w in workstations {
                {
                    let id = w.session.unwrap_or_else(|| "(new, unsaved)".into());
                    let title: String = w.title.unwrap_or_default().chars().take(60).collect();
                    let title = visible_line(&title);
                    println!(
                        "{id:<22} {:<9} {:<18} {:>7} {:>8}  {title}",
                        w.clients,
                        w.activity,
                        crate::layout::rate(w.tok_s),
                        w.context_tokens
                    );
                }
            }
            println!();
            println!(
                "{:<22} {:>5}  {:<18} {:>7} {:>8}  TASK",
                "RUN", "STEPS", "STATE", "TOK/S", "KV TOK"
            );
            for r in runs {
                let state = match &r.outcome {
                    None => "running".to_string(),
                    Some(Outcome::Finished(_)) => "finished".into(),
                    Some(Outcome::Failed(_)) => "failed".into(),
                    Some(Outcome::BudgetExhausted(_)) => "budget exhausted".into(),
                    Some(Outcome::Stopped) => "stopped".into(),
                };
                let task: String = r.task.chars().take(60).collect();
                let task = visible_line(&task);
                println!(
                    "{:<22} {:>5}  {:<18} {:>7} {:>8}  {task}",
                    r.id,
                    r.steps,
                    state,
                    crate::layout::rate(r.tok_s),
                    r.context_tokens
                );
            }
            if !served.is_empty() {
                println!();
                println!(
                    "{:<8} {:<11} {:<9} {:>6} {:>8} {:>8}  CLIENT",
                    "REQUEST", "API", "STATE", "SECS", "PROMPT", "TOKENS"
                );
            }
            for s in served {
                println!(
                    "{:<8} {:<11} {:<9} {:>6.1} {:>8} {:>8}  {}",
                    s.id,
                    visible_line(&s.endpoint),
                    visible_line(&s.phase),
                    s.seconds,
                    s.prompt_tokens,
                    s.completion_tokens,
                    visible_line(&s.client)
                );
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `kiln stop ID` (a session or a run) or `kiln stop --daemon`.
pub async fn stop(id: Option<&str>, daemon: bool, common: &Common) -> Result<i32> {
    let mut stream = connect(common, false).await?;
    let request = match id {
        Some(id) if !daemon => Request::Stop { id: id.into() },
        _ => Request::Shutdown,
    };
    match ask(&mut stream, &request).await? {
        Reply::Stopping { id } => {
            eprintln!("kiln: stopping {id}");
            Ok(0)
        }
        Reply::ShuttingDown => {
            eprintln!("kiln: the daemon saves its session, stops its runs and exits");
            Ok(0)
        }
        other => Err(unexpected(other)),
    }
}

/// `kiln attach [ID]`: an agent run is followed line by line; anything
/// else is a session for the workstation's terminal.
pub async fn attach(id: Option<String>, common: &Common) -> Result<i32> {
    let run = match &id {
        Some(id) => match connect(common, false).await {
            Ok(mut stream) => match ask(&mut stream, &Request::List).await? {
                Reply::Runs { runs, .. } => runs.iter().any(|r| &r.id == id),
                other => return Err(unexpected(other)),
            },
            Err(_) => false,
        },
        None => false,
    };
    if run {
        return follow(id.as_deref().unwrap_or_default(), common).await;
    }
    crate::host::terminal::run(common, crate::host::terminal::Start::Resume(id)).await
}

fn print(out: &mut impl Write, event: &Progress) {
    for l in lines(event) {
        let _ = writeln!(out, "{l}");
    }
}

/// Follow a run: everything so far, then each step as it happens. Leaving
/// (Ctrl-C, a dropped connection) leaves the run going.
async fn follow(id: &str, common: &Common) -> Result<i32> {
    let mut stream = connect(common, false).await?;
    protocol::write(&mut stream, &Request::Attach { id: id.into() })
        .await
        .map_err(|e| KilnError::io("daemon", e))?;
    let mut out = std::io::stdout();
    let mut seen = 0u64;
    loop {
        let reply: Reply = match protocol::read(&mut stream).await {
            Ok(r) => r,
            Err(e) => return Err(KilnError::Store(format!("daemon: {e}"))),
        };
        match reply {
            Reply::Snapshot {
                dropped,
                events,
                outcome,
                ..
            } => {
                if dropped > seen {
                    let _ = writeln!(
                        out,
                        "… {} earlier events of this run are no longer kept",
                        dropped - seen
                    );
                }
                // A resync after falling behind repeats nothing shown.
                for (n, e) in (dropped + 1..).zip(&events) {
                    if n > seen {
                        print(&mut out, e);
                    }
                }
                seen = seen.max(dropped + events.len() as u64);
                if let Some(o) = outcome {
                    let _ = writeln!(out, "{}", describe(&o));
                    return Ok(o.exit_code());
                }
            }
            Reply::Event { seq, event, .. } => {
                if seq > seen {
                    print(&mut out, &event);
                    seen = seq;
                }
            }
            Reply::Done { outcome, .. } => {
                let _ = writeln!(out, "{}", describe(&outcome));
                return Ok(outcome.exit_code());
            }
            other => return Err(unexpected(other)),
        }
        let _ = out.flush();
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Finished(summary) => format!("finished: {summary}"),
        Outcome::Failed(why) => format!("failed: {why}"),
        Outcome::BudgetExhausted(what) => format!("budget exhausted: {what}"),
        Outcome::Stopped => "stopped".into(),
    }
}
