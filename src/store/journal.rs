//! The journal writer: a background thread that owns an open session and
//! writes what the front end sends it. Committed events are fsynced one by
//! one; streamed text is batched and flushed every `CHUNK_FLUSH`, so a crash
//! loses at most that much of an answer. A failed write (a full disk) is
//! reported, kept in memory and retried until it succeeds.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tokio_mpsc;

use super::session::{encode, now_ms, Event, OpenSession, RunMark};

pub const CHUNK_FLUSH: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(1);
/// How long a commit waits for its fsync before calling it unconfirmed.
const COMMIT_WAIT: Duration = Duration::from_secs(15);
/// The title a session has until its first message names it.
pub const UNTITLED: &str = "new session";

enum Write {
    Event(Event),
    /// An event whose writer waits to hear it is on disk.
    Commit(Event, mpsc::Sender<Result<(), String>>),
    Chunk(String),
    /// Answered once everything sent before it is on disk, or why not.
    Sync(mpsc::Sender<Result<(), String>>),
    Close(mpsc::Sender<()>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Writing failed; the events are kept and retried.
    Failed(String),
    Recovered,
}

#[derive(Clone)]
pub struct JournalHandle {
    tx: mpsc::Sender<Write>,
    pub id: String,
    pub dir: std::path::PathBuf,
}

impl JournalHandle {
    pub fn event(&self, event: Event) {
        let _ = self.tx.send(Write::Event(event));
    }

    /// Journal `event` and wait until it is on disk. When it cannot be
    /// written (a full disk), says why; the event stays queued and is
    /// retried, so it still lands once there is room.
    pub fn commit(&self, event: Event) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        self.tx
            .send(Write::Commit(event, ack))
            .map_err(|_| "the journal writer is gone".to_string())?;
        done.recv_timeout(COMMIT_WAIT)
            .unwrap_or_else(|_| Err("the disk did not confirm the write in time".into()))
    }

    /// Wait until every event sent before is on disk. When it cannot be
    /// written (a full disk), says why; the events stay queued and are
    /// retried, so a later `sync` succeeds once there is room.
    pub fn sync(&self) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        self.tx
            .send(Write::Sync(ack))
            .map_err(|_| "the journal writer is gone".to_string())?;
        done.recv_timeout(COMMIT_WAIT)
            .unwrap_or_else(|_| Err("the disk did not confirm the write in time".into()))
    }

    pub fn chunk(&self, text: impl Into<String>) {
        let _ = self.tx.send(Write::Chunk(text.into()));
    }

    /// Flush everything and wait until it is on disk (or has failed) and
    /// the session's lock is let go.
    pub fn close(&self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Write::Close(ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

pub fn spawn(session: OpenSession) -> (JournalHandle, tokio_mpsc::UnboundedReceiver<Report>) {
    let (tx, rx) = mpsc::channel();
    let (report_tx, report_rx) = tokio_mpsc::unbounded_channel();
    let handle = JournalHandle {
        tx,
        id: session.meta.id.clone(),
        dir: session.dir.clone(),
    };
    std::thread::Builder::new()
        .name("kiln-journal".into())
        .spawn(move || Writer::new(session, report_tx).run(rx))
        .expect("spawn the journal thread");
    (handle, report_rx)
}

struct Writer {
    session: OpenSession,
    reports: tokio_mpsc::UnboundedSender<Report>,
    /// Lines not yet on disk.
    pending: String,
    chunks: String,
    chunks_since: Option<Instant>,
    failing: bool,
    /// Why the last write failed, until one succeeds.
    last_error: Option<String>,
    meta_unsaved: bool,
}

impl Writer {
    fn new(session: OpenSession, reports: tokio_mpsc::UnboundedSender<Report>) -> Writer {
        Writer {
            session,
            reports,
            pending: String::new(),
            chunks: String::new(),
            chunks_since: None,
            failing: false,
            last_error: None,
            meta_unsaved: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Write>) {
        loop {
            let wait = match (self.chunks_since, self.failing) {
                (Some(since), _) => CHUNK_FLUSH.saturating_sub(since.elapsed()),
                (None, true) => RETRY,
                (None, false) => Duration::from_secs(3600),
            };
            match rx.recv_timeout(wait) {
                Ok(Write::Event(event)) => self.write_event(event),
                Ok(Write::Commit(event, ack)) => {
                    self.write_event(event);
                    let _ = ack.send(self.last_error.clone().map_or(Ok(()), Err));
                }
                Ok(Write::Sync(ack)) => {
                    self.take_chunks();
                    self.flush();
                    let _ = ack.send(self.last_error.clone().map_or(Ok(()), Err));
                }
                Ok(Write::Chunk(text)) => {
                    self.chunks.push_str(&text);
                    self.chunks_since.get_or_insert_with(Instant::now);
                    if self
                        .chunks_since
                        .is_some_and(|t| t.elapsed() >= CHUNK_FLUSH)
                    {
                        self.take_chunks();
                        self.flush();
                    }
                }
                Ok(Write::Close(ack)) => {
                    self.take_chunks();
                    self.flush();
                    self.touch_meta();
                    // The session's lock goes with it: once `close`
                    // returns, another writer (a resume) may open it.
                    drop(self);
                    let _ = ack.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.take_chunks();
                    self.flush();
                    if self.meta_unsaved {
                        self.touch_meta();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.take_chunks();
                    self.flush();
                    return;
                }
            }
        }
    }

    fn write_event(&mut self, event: Event) {
        self.take_chunks();
        let commits = matches!(
            event,
            Event::User { .. }
                | Event::Answer { .. }
                | Event::RunStarted { .. }
                | Event::RunEnded { .. }
        );
        match &event {
            Event::User { text } => self.name_after(text),
            // The meta says whether the session holds a run that never
            // ended, so `kiln ps` finds interrupted runs without reading
            // every journal.
            Event::RunStarted { host, .. } => {
                self.session.meta.run = Some(RunMark {
                    host: *host,
                    ended: None,
                })
            }
            Event::RunEnded { outcome } => {
                if let Some(mark) = self.session.meta.run.as_mut() {
                    let word = outcome["outcome"].as_str().unwrap_or("ended");
                    mark.ended = Some(word.to_string());
                }
            }
            _ => {}
        }
        self.pending.push_str(&encode(&event));
        self.flush();
        if commits {
            self.touch_meta();
        }
    }

    fn take_chunks(&mut self) {
        if !self.chunks.is_empty() {
            let text = std::mem::take(&mut self.chunks);
            self.pending.push_str(&encode(&Event::Chunk { text }));
        }
        self.chunks_since = None;
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.session.append_lines(&self.pending) {
            Ok(()) => {
                self.pending.clear();
                self.last_error = None;
                if self.failing {
                    self.failing = false;
                    tracing::info!("journal writes resumed: {}", self.session.dir.display());
                    let _ = self.reports.send(Report::Recovered);
                }
            }
            Err(e) => {
                self.last_error = Some(format!("{}: {e}", self.session.events_path().display()));
                if !self.failing {
                    self.failing = true;
                    let message = format!(
                        "{}: cannot write: {e}; kept in memory, retrying",
                        self.session.events_path().display()
                    );
                    tracing::error!("{message}");
                    let _ = self.reports.send(Report::Failed(message));
                }
            }
        }
    }

    fn name_after(&mut self, text: &str) {
        let meta = &mut self.session.meta;
        if meta.renamed || meta.title != UNTITLED {
            return;
        }
        meta.title = title_from(text);
    }

    /// Save the title and time; a failed save is retried with the journal
    /// (the session keeps its last good `meta.json` meanwhile).
    fn touch_meta(&mut self) {
        self.session.meta.updated_ms = now_ms();
        match self.session.save_meta() {
            Ok(()) => {
                self.meta_unsaved = false;
                self.failing = !self.pending.is_empty();
            }
            Err(e) => {
                if !self.meta_unsaved {
                    tracing::warn!("{e}");
                }
                self.meta_unsaved = true;
                self.failing = true;
            }
        }
    }
}

/// The first line of a message, cut to 48 characters.
pub fn title_from(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let line = line.trim();
    match line.char_indices().nth(48) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}
