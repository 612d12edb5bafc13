//! `kiln ask`: one question, the answer streamed to stdout.

use std::io::{IsTerminal, Read, Write};

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::cli::{AskArgs, Common};
use crate::engine::{EngineEvent, FinishReason, Lease, ModelInfo, TurnStream};
use crate::error::{KilnError, Result};
use crate::host::daemon;
use crate::host::launch::{self, Started};
use crate::host::protocol::{self, Reply, Request, Settings};
use crate::record::Record;
use crate::store::journal::JournalHandle;
use crate::store::SessionStore;
use crate::visible::for_output;

/// Exit code when the user interrupted the answer.
pub const EXIT_INTERRUPTED: i32 = 130;

/// A question larger than this is refused rather than read without bound.
const MAX_QUESTION_BYTES: usize = 16 << 20;

pub async fn run(args: AskArgs, common: &Common) -> Result<i32> {
    let question = read_question(args.question.as_deref())?;
    let mut source = match Source::daemon_for(&question, args.ephemeral, common).await {
        Some(source) => source,
        None => Source::local(question, args.ephemeral, common).await?,
    };
    let raw = !std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let info = serde_json::json!({ "event": "model", "model": source.info() });
        let _ = writeln!(stdout, "{info}");
    }

    let mut interrupted = false;
    let mut ended_with_newline = true;
    let mut parts = crate::engine::thinking::Stream::default();
    let mut thinking_shown = false;
    loop {
        let event = tokio::select! {
            ev = source.next() => match ev {
                Some(ev) => ev,
                None => return Err(KilnError::Engine("the engine stopped unexpectedly".into())),
            },
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                source.cancel();
                continue;
            }
        };
        let written = if args.json {
            serde_json::to_string(&event)
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(stdout, "{line}"))
        } else {
            match &event {
                EngineEvent::Token { text, .. } => {
                    // Thinking goes to stderr, so stdout is the answer alone.
                    let (thought, answer) = parts.push(text);
                    if !thought.is_empty() {
                        eprint!("{}", for_output(&thought, raw));
                        thinking_shown = true;
                    }
                    if !answer.is_empty() {
                        if std::mem::take(&mut thinking_shown) {
                            eprintln!();
                        }
                        ended_with_newline = answer.ends_with('\n');
                    }
                    stdout.write_all(for_output(&answer, raw).as_bytes())
                }
                _ => Ok(()),
            }
        };
        let _ = stdout.flush();
        if written.is_err() {
            // The reader went away (`kiln ask … | head`): stop generating.
            source.cancel();
        }
        match event {
            EngineEvent::TurnFinished { finish, stats, .. } => {
                let session = source.close().await;
                if !args.json {
                    if !ended_with_newline {
                        let _ = writeln!(stdout);
                    }
                    eprintln!("kiln: {}{session}", stats.summary(finish));
                }
                return Ok(if finish == FinishReason::Cancelled && interrupted {
                    EXIT_INTERRUPTED
                } else {
                    0
                });
            }
            EngineEvent::TurnFailed { error, .. } => {
                source.close().await;
                return Err(KilnError::Engine(error));
            }
            _ => {}
        }
    }
}

/// Where the answer comes from: the model a running daemon holds already
/// (the default: a second copy of a 32B model would need its memory
/// again), or one this process loads.
enum Source {
    Local {
        engine: Lease,
        turn: TurnStream,
        journal: Option<JournalHandle>,
    },
    Daemon {
        read: OwnedReadHalf,
        /// Dropped to cancel: the daemon reads the end of the stream.
        write: Option<OwnedWriteHalf>,
        model: ModelInfo,
        session: Option<String>,
    },
}

impl Source {
    /// The daemon's model, when a daemon runs one with these settings and
    /// has a conversation free. It is never started for one question.
    async fn daemon_for(question: &str, ephemeral: bool, common: &Common) -> Option<Source> {
        if common.no_daemon || question.len() > protocol::MAX_QUESTION {
            return None;
        }
        let mut stream = daemon::connect(common, false).await.ok()?;
        let request = Request::Ask {
            question: question.to_string(),
            ephemeral,
            settings: Settings::of(common),
        };
        match daemon::ask(&mut stream, &request).await {
            Ok(Reply::Asked { session, model }) => {
                let (read, write) = stream.into_split();
                Some(Source::Daemon {
                    read,
                    write: Some(write),
                    model,
                    session,
                })
            }
            Ok(Reply::Error { message }) => {
                eprintln!(
                    "kiln: the daemon cannot answer ({}); loading the model here",
                    crate::visible::visible_line(&message)
                );
                None
            }
            _ => None,
        }
    }

    async fn local(question: String, ephemeral: bool, common: &Common) -> Result<Source> {
        let started = launch::start(common).await?;
        let journal = match ephemeral {
            true => None,
            false => Some(start_session(&started, &question)?),
        };
        let engine = started.engine;
        let turn = engine.chat(question);
        Ok(Source::Local {
            engine,
            turn,
            journal,
        })
    }

    fn info(&self) -> ModelInfo {
        match self {
            Source::Local { engine, .. } => engine.info().clone(),
            Source::Daemon { model, .. } => model.clone(),
        }
    }

    /// The turn's next event; this process journals a local one (the
    /// daemon its own).
    async fn next(&mut self) -> Option<EngineEvent> {
        match self {
            Source::Local { turn, journal, .. } => {
                let event = turn.next().await?;
                if let (Some(j), Some(record)) = (journal.as_ref(), Record::of(&event)) {
                    record.write(j);
                }
                Some(event)
            }
            Source::Daemon { read, .. } => loop {
                match protocol::read::<Reply, _>(read).await {
                    Ok(Reply::Turn { event }) => return Some(event),
                    Ok(Reply::Error { message }) => {
                        return Some(EngineEvent::TurnFailed {
                            turn: 0,
                            error: message,
                        })
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            },
        }
    }

    fn cancel(&mut self) {
        match self {
            Source::Local { engine, .. } => engine.cancel(),
            Source::Daemon { write, .. } => drop(write.take()),
        }
    }

    /// Flush the journal; returns " · session ID" for the stats line.
    async fn close(&mut self) -> String {
        let session = match self {
            Source::Local { journal, .. } => match journal.take() {
                None => None,
                Some(journal) => {
                    let id = journal.id.clone();
                    let _ = tokio::task::spawn_blocking(move || journal.close()).await;
                    Some(id)
                }
            },
            Source::Daemon { session, .. } => session.clone(),
        };
        session.map_or(String::new(), |id| format!(" · session {id}"))
    }
}

/// Keep the exchange as a session. The question is on disk before the
/// model sees it; when it cannot be (a full disk), it is not answered.
fn start_session(started: &Started, question: &str) -> Result<JournalHandle> {
    SessionStore::new(&started.paths)
        .start_with_question(
            &started.model_spec,
            started.fingerprint.clone(),
            started.engine.info().context_limit,
            started.config.system_prompt.as_deref(),
            question,
        )
        .map_err(|why| {
            KilnError::Store(format!(
                "{why}: the question could not be saved, so it was not answered (--ephemeral answers without saving)"
            ))
        })
}

fn read_question(arg: Option<&str>) -> Result<String> {
    match arg {
        Some(q) if q != "-" => non_empty(q.to_string()),
        None if std::io::stdin().is_terminal() => Err(KilnError::BadArgument(
            "kiln ask needs a question (or `-` to read it from stdin)".into(),
        )),
        _ => non_empty(read_stdin()?),
    }
}

fn read_stdin() -> Result<String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_QUESTION_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| KilnError::io("stdin", e))?;
    if buf.len() > MAX_QUESTION_BYTES {
        return Err(KilnError::BadArgument(format!(
            "stdin: the question is larger than {} MiB",
            MAX_QUESTION_BYTES >> 20
        )));
    }
    String::from_utf8(buf)
        .map_err(|_| KilnError::BadArgument("stdin: the question is not UTF-8 text".into()))
}

fn non_empty(q: String) -> Result<String> {
    if q.trim().is_empty() {
        return Err(KilnError::BadArgument("the question is empty".into()));
    }
    Ok(q)
}
