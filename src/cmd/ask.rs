//! `kiln ask`: one question, the answer streamed to stdout.

use std::io::{IsTerminal, Read, Write};

use crate::cli::{AskArgs, Common};
use crate::engine::{EngineEvent, FinishReason};
use crate::error::{KilnError, Result};
use crate::host::launch::{self, Started};
use crate::record::Record;
use crate::store::journal::JournalHandle;
use crate::store::session::Event;
use crate::store::SessionStore;
use crate::visible::for_output;

/// Exit code when the user interrupted the answer.
pub const EXIT_INTERRUPTED: i32 = 130;

/// A question larger than this is refused rather than read without bound.
const MAX_QUESTION_BYTES: usize = 16 << 20;

pub async fn run(args: AskArgs, common: &Common) -> Result<i32> {
    let question = read_question(args.question.as_deref())?;
    let started = launch::start(common).await?;
    let journal = if args.ephemeral {
        None
    } else {
        Some(start_session(&started, &question)?)
    };
    let raw = !std::io::stdout().is_terminal();
    let Started { engine, .. } = started;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let info = serde_json::json!({ "event": "model", "model": engine.info() });
        let _ = writeln!(stdout, "{info}");
    }
    let mut turn = engine.chat(question);

    let mut interrupted = false;
    let mut ended_with_newline = true;
    let mut parts = crate::engine::thinking::Stream::default();
    let mut thinking_shown = false;
    loop {
        let event = tokio::select! {
            ev = turn.next() => match ev {
                Some(ev) => ev,
                None => return Err(KilnError::Engine("the engine stopped unexpectedly".into())),
            },
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                engine.cancel();
                continue;
            }
        };
        if let (Some(j), Some(record)) = (&journal, Record::of(&event)) {
            record.write(j);
        }
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
            engine.cancel();
        }
        match event {
            EngineEvent::TurnFinished { finish, stats, .. } => {
                let session = close(journal).await;
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
                close(journal).await;
                return Err(KilnError::Engine(error));
            }
            _ => {}
        }
    }
}

/// Keep the exchange as a session. The question is on disk before the
/// model sees it; when it cannot be (a full disk), it is not answered, and
/// no half-made session is left behind.
fn start_session(started: &Started, question: &str) -> Result<JournalHandle> {
    let store = SessionStore::new(&started.paths);
    let context = started.engine.info().context_limit;
    let not_saved = |why: String| {
        KilnError::Store(format!(
            "{why}: the question could not be saved, so it was not answered (--ephemeral answers without saving)"
        ))
    };
    let (journal, _reports) = store
        .start(
            &started.model_spec,
            started.fingerprint.clone(),
            context,
            started.config.system_prompt.as_deref(),
        )
        .map_err(|e| not_saved(e.to_string()))?;
    if let Err(why) = journal.commit(Event::User {
        text: question.to_string(),
    }) {
        journal.close();
        let _ = std::fs::remove_dir_all(&journal.dir);
        return Err(not_saved(why));
    }
    Ok(journal)
}

/// Flush the journal; returns " · session ID" for the stats line.
async fn close(journal: Option<JournalHandle>) -> String {
    let Some(journal) = journal else {
        return String::new();
    };
    let id = journal.id.clone();
    let _ = tokio::task::spawn_blocking(move || journal.close()).await;
    format!(" · session {id}")
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
