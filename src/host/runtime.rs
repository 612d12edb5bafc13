//! The runtime behind the workstation: performs the effects `update`
//! returns and answers with messages. It owns the engines, the session
//! journal, the running turn's stream and a running agent; it never writes
//! the workstation's `State`, which only `update` does.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::{self, Approval, Approver, Question, RunEvent, RunHandle, RunSpec};
use crate::app::{AgentMsg, Effect, MovedTo, Msg, PickerItem, Resumed};
use crate::cli::Common;
use crate::engine::{self, EngineCommand, EngineEvent, EngineHandle, Lease, TurnStream};
use crate::host::launch;
use crate::store::journal::{self, JournalHandle, Report};
use crate::store::session::{self, OpenSession};
use crate::store::transcript::Transcript;
use crate::store::{kv_budget, snapshot, Loaded, SessionStore};
use crate::telemetry::Sample;

/// The KV snapshot in a session folder, written when a session closes.
pub use crate::store::SNAPSHOT;
/// Terminals drop OSC 52 payloads beyond about this size.
const MAX_COPY_BYTES: usize = 512 * 1024;

/// What the runtime holds besides the state: the engine, and the session
/// journal once there is something to write.
pub struct Runtime {
    /// The model this conversation was given, held until it closes.
    home: Lease,
    /// The engine chats go to now.
    engine: EngineHandle,
    /// Every other engine started so far, by spec ("smollm2-…",
    /// "remote:NAME"), kept so a session can move back without a reload.
    engines: Vec<(String, EngineHandle)>,
    config: crate::config::Config,
    common: Common,
    store: SessionStore,
    /// The disk budget of every KV snapshot and prompt-cache entry.
    kv_budget: kv_budget::KvBudget,
    journal: Option<JournalHandle>,
    reports: Option<mpsc::UnboundedReceiver<Report>>,
    model_spec: String,
    fingerprint: Option<String>,
    /// The system prompt the engine was last given, for a new session.
    system_prompt: Option<String>,
    samples: watch::Receiver<Sample>,
    /// The answer being generated.
    turn: Option<TurnStream>,
    agent: Option<AgentLink>,
    /// Escape sequences for the attached terminals (OSC 52 copies).
    pub outbox: Vec<String>,
    /// Why the user's last message could not be committed: the model is
    /// not asked about a message that is not on disk.
    not_committed: Option<String>,
    /// The session's measured prefill speed, from its last turn that read
    /// at least `PREFILL_SAMPLE_TOKENS`.
    prefill_tok_s: Option<f64>,
}

/// A prompt this long measures prefill; a shorter one is mostly overhead.
const PREFILL_SAMPLE_TOKENS: usize = 32;

/// The runtime's side of a running agent: its progress and approval
/// questions come back.
struct AgentLink {
    run: RunHandle,
    /// A run beside the chat: its own conversation of the model, and its
    /// own session's journal.
    apart: Option<(Lease, JournalHandle)>,
    /// The approval question waiting for the user's answer.
    asking: Option<oneshot::Sender<Approval>>,
    questions: mpsc::UnboundedReceiver<(Question, oneshot::Sender<Approval>)>,
}

/// Approval questions go to the TUI; an unanswered one is a no.
struct AskTheUser(mpsc::UnboundedSender<(Question, oneshot::Sender<Approval>)>);

impl Approver for AskTheUser {
    async fn approve(&mut self, question: &Question) -> Approval {
        let (tx, rx) = oneshot::channel();
        if self.0.send((question.clone(), tx)).is_err() {
            return Approval::No;
        }
        rx.await.unwrap_or(Approval::No)
    }
}

impl Runtime {
    pub fn new(
        common: Common,
        started: launch::Started,
        samples: watch::Receiver<Sample>,
    ) -> Runtime {
        let engine = (*started.engine).clone();
        let system_prompt = started.config.system_prompt.clone();
        // The engine may come from a daemon that served someone else.
        engine.send(EngineCommand::Reset);
        engine.send(EngineCommand::SetSampler(started.config.sampling.clone()));
        engine.send(EngineCommand::SetSystemPrompt(system_prompt.clone()));
        Runtime {
            engines: vec![(started.model_spec.clone(), engine.clone())],
            engine,
            home: started.engine,
            kv_budget: started.config.kv_budget(&started.paths),
            config: started.config,
            store: SessionStore::new(&started.paths),
            common,
            journal: None,
            reports: None,
            model_spec: started.model_spec,
            fingerprint: started.fingerprint,
            system_prompt,
            samples,
            turn: None,
            agent: None,
            outbox: Vec::new(),
            not_committed: None,
            prefill_tok_s: None,
        }
    }

    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// The session being journaled, once there is one.
    pub fn session(&self) -> Option<&JournalHandle> {
        self.journal.as_ref()
    }

    /// Stop the answer being generated, if any.
    pub fn cancel(&self) {
        self.engine.cancel();
    }

    /// What the turn, the agent or the journal sends next; pending while
    /// none has anything.
    pub async fn next_msg(&mut self) -> Msg {
        loop {
            tokio::select! {
                event = next_event(&mut self.turn) => match event {
                    Some(event) => return Msg::Engine(event, Instant::now()),
                    None => self.turn = None,
                },
                from_agent = next_from_agent(&mut self.agent) => match from_agent {
                    Some(msg) => return Msg::Agent(msg),
                    None => {
                        let apart = self.agent.take().and_then(|a| a.apart);
                        if let Some((lease, journal)) = apart {
                            let _ = tokio::task::spawn_blocking(move || journal.close()).await;
                            drop(lease);
                        }
                    }
                },
                report = next_report(&mut self.reports) => match report {
                    Some(report) => return Msg::Journal(report),
                    None => self.reports = None,
                },
            }
        }
    }

    /// Save the session and give the model back; what is left of closing
    /// it (the KV snapshot's write) is the caller's to finish.
    pub async fn finish(mut self) -> Option<Closing> {
        let closing = self.close().await;
        drop(self.home);
        closing
    }

    /// Bring the engine to where a session read from disk was: from its KV
    /// snapshot when one fits, else by re-reading the transcript on the next
    /// message. The message says what to show.
    pub async fn resume(&mut self, loaded: Loaded, open: OpenSession, source: &Path) -> Msg {
        let messages = Transcript::messages(&loaded.transcript.entries);
        let count = messages.len();
        let title = loaded.meta.title.clone();
        let system = loaded.transcript.system_prompt.clone();
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let snapshot_path = source.join(SNAPSHOT);
        if system.is_some() {
            self.system_prompt = system.clone();
            self.engine.send(EngineCommand::SetSystemPrompt(system));
        }
        self.engine.send(EngineCommand::SetHistory(messages));
        let (journal, reports) = journal::spawn(open);
        self.journal = Some(journal);
        self.reports = Some(reports);

        let mut line = format!("resumed {count} messages");
        match loaded.warnings.len() {
            0 => {}
            1 => line.push_str("; 1 damaged journal line skipped (see the log)"),
            n => line.push_str(&format!(
                "; {n} damaged journal lines skipped (see the log)"
            )),
        }
        let kv_tokens = self.restore_snapshot(&snapshot_path, &mut line).await;
        Msg::Resumed(Box::new(Resumed {
            title,
            transcript: loaded.transcript,
            kv_tokens,
            line,
        }))
    }

    /// Load the session's KV snapshot into the engine when there is one and
    /// it fits; the tokens it holds, and why not in `line`.
    async fn restore_snapshot(&self, path: &Path, line: &mut String) -> Option<usize> {
        if !path.exists() {
            line.push_str("; the model re-reads it on your next message");
            return None;
        }
        let fingerprint = self.fingerprint.as_ref()?;
        match snapshot::read(path, fingerprint) {
            Ok(kv) => {
                let tokens = kv.kv_tokens;
                let (tx, rx) = oneshot::channel();
                self.engine.send(EngineCommand::Restore(kv, tx));
                match rx.await {
                    Ok(Ok(())) => {
                        line.push_str(&format!("; KV snapshot loaded ({tokens} tokens)"));
                        return Some(tokens);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("restoring the KV snapshot: {e}");
                        line.push_str(
                            "; the KV snapshot did not load, the model re-reads it instead",
                        );
                    }
                    Err(_) => line.push_str("; the engine stopped"),
                }
            }
            Err(e) => {
                tracing::warn!("{e}");
                line.push_str(&format!("; {e}; the model re-reads it instead"));
            }
        }
        None
    }

    /// The journal, creating the session on the first thing worth keeping.
    /// When the session cannot be created the conversation goes on in memory
    /// and the next record tries again; the error says why.
    fn journal(&mut self) -> Result<&JournalHandle, String> {
        if self.journal.is_none() {
            let info = self.engine.info();
            let (journal, reports) = self
                .store
                .start(
                    &self.model_spec,
                    self.fingerprint.clone(),
                    info.context_limit,
                    self.system_prompt.as_deref(),
                )
                .map_err(|e| format!("cannot save this session: {e}"))?;
            self.journal = Some(journal);
            self.reports = Some(reports);
        }
        Ok(self.journal.as_ref().expect("made above"))
    }

    /// Journal `record`; a session that cannot be made says so.
    fn record(&mut self, write: impl FnOnce(&JournalHandle)) -> Vec<Msg> {
        match self.journal() {
            Ok(j) => {
                write(j);
                Vec::new()
            }
            Err(why) => vec![Msg::Notice(why)],
        }
    }

    /// Perform one effect; the messages it brings back go to `update`.
    pub async fn perform(&mut self, effect: Effect) -> Vec<Msg> {
        match effect {
            Effect::Chat(text) => {
                if let Some(error) = self.not_committed.take() {
                    let failed = EngineEvent::TurnFailed { turn: 0, error };
                    return vec![Msg::Engine(failed, Instant::now())];
                }
                self.turn = Some(self.engine.chat(text));
            }
            Effect::Regenerate { history, message } => {
                self.engine.send(EngineCommand::SetHistory(history));
                self.turn = Some(self.engine.chat(message));
            }
            Effect::Continue { history } => {
                self.engine.send(EngineCommand::SetHistory(history));
                self.turn = Some(self.engine.continue_last());
            }
            Effect::Cancel => self.engine.cancel(),
            Effect::SetSystemPrompt(p) => {
                self.system_prompt = p.clone();
                self.engine.send(EngineCommand::SetSystemPrompt(p));
            }
            Effect::Copy(text) => self.outbox.push(osc52(&text)),
            Effect::Record(event @ session::Event::User { .. }) => {
                let j = match self.journal() {
                    Ok(j) => j.clone(),
                    Err(why) => {
                        self.not_committed = Some(format!(
                            "{why}; so your message was not sent to the model: send it again (Up recalls it) when the disk has room"
                        ));
                        return vec![Msg::Notice(why)];
                    }
                };
                let committed = tokio::task::spawn_blocking(move || j.commit(event))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                self.not_committed = committed.err().map(|why| {
                    format!(
                        "your message could not be saved ({why}), so it was not sent to the model; it is kept and written when the disk has room"
                    )
                });
            }
            Effect::Record(event) => {
                if let session::Event::Answer { stats, .. } = &event {
                    // A turn that read a real prompt tells what re-reading
                    // the session would cost, for the snapshot's worth.
                    if stats.prompt_tokens >= PREFILL_SAMPLE_TOKENS {
                        self.prefill_tok_s = stats.prefill_tok_s.or(self.prefill_tok_s);
                    }
                }
                return self.record(|j| j.event(event));
            }
            Effect::RecordChunk(text) => return self.record(|j| j.chunk(text)),
            Effect::ListSessions => {
                // Reading every journal is disk work: keep it off the UI loop.
                let store = self.store.clone();
                let items = tokio::task::spawn_blocking(move || picker_items(&store))
                    .await
                    .unwrap_or_default();
                return vec![Msg::Sessions(items)];
            }
            Effect::OpenSession(dir) => return self.switch(dir).await,
            Effect::StartAgent(task) => return self.start_agent(task),
            Effect::SwitchEngine {
                target,
                history,
                system_prompt,
                offload,
            } => {
                let (to, line) = self.switch_engine(target, history, system_prompt).await;
                return vec![Msg::Moved { to, line, offload }];
            }
            Effect::StopAgent => {
                if let Some(a) = &self.agent {
                    a.run.stop.store(true, Ordering::SeqCst);
                }
            }
            Effect::Approve(answer) => {
                if let Some(tx) = self.agent.as_mut().and_then(|a| a.asking.take()) {
                    let _ = tx.send(answer);
                }
            }
            Effect::RestoreChat {
                system_prompt,
                history,
            } => {
                self.agent = None;
                self.system_prompt = system_prompt.clone();
                self.engine
                    .send(EngineCommand::SetSampler(self.config.sampling.clone()));
                self.engine
                    .send(EngineCommand::SetSystemPrompt(system_prompt));
                self.engine.send(EngineCommand::SetHistory(history));
            }
            Effect::Quit => {}
        }
        Vec::new()
    }

    /// Move the conversation to another engine: `Some(NAME)` an endpoint,
    /// `None` the local model. The transcript and journal stay here; the
    /// target gets the conversation and re-reads it on the next message.
    async fn switch_engine(
        &mut self,
        target: Option<String>,
        history: Vec<crate::engine::Message>,
        system_prompt: Option<String>,
    ) -> (Option<Box<MovedTo>>, String) {
        let spec = match &target {
            Some(name) => format!("remote:{name}"),
            None => self
                .engines
                .iter()
                .map(|(s, _)| s.clone())
                .find(|s| !s.starts_with("remote:"))
                .unwrap_or_else(|| "local".to_string()),
        };
        let mut shape = None;
        let handle = match self.engines.iter().find(|(s, _)| *s == spec) {
            Some((_, h)) => h.clone(),
            None => {
                let started = match &target {
                    Some(name) => launch::remote_engine(&self.config, name).map(engine::spawn),
                    None => {
                        let mut common = self.common.clone();
                        common.engine = "local".into();
                        launch::launch(&common, |_| {}).await.map(|l| {
                            shape = Some(l.shape());
                            engine::spawn(l.engine)
                        })
                    }
                };
                match started {
                    Ok(handle) => {
                        self.engines.push((spec.clone(), handle.clone()));
                        handle
                    }
                    Err(e) => return (None, format!("cannot move the session: {e}")),
                }
            }
        };
        handle.send(EngineCommand::SetSystemPrompt(system_prompt));
        handle.send(EngineCommand::SetHistory(history));
        self.engine = handle;
        let to = MovedTo {
            model: self.engine.info().clone(),
            shape,
            remote: target.as_ref().map(|_| spec.clone()),
        };
        let line = match target {
            Some(name) => format!(
                "moved to endpoint {name}; this machine no longer holds the conversation's KV cache"
            ),
            None => {
                "moved back to the local model; it re-reads the conversation on the next message"
                    .to_string()
            }
        };
        (Some(Box::new(to)), line)
    }

    /// Run an agent as a task of its own on this conversation's engine: it
    /// journals to this session and asks the user through `AskTheUser`. A
    /// workspace it cannot open ends it at once, as its outcome says.
    /// Start `/agent TASK`: on a conversation of its own beside the chat,
    /// journaled as a session of its own, where the model has one free;
    /// else on the chat's conversation, in the chat's session.
    fn start_agent(&mut self, task: String) -> Vec<Msg> {
        let spec = RunSpec::new(
            task,
            self.common.workspace(),
            self.common.approval,
            &self.config.agent,
            &self.config.sampling,
            &self.config.mcp,
        );
        let info = self.engine.info().clone();
        let apart = self.engine.lease().and_then(|lease| {
            let started = self.store.start(
                &self.model_spec,
                self.fingerprint.clone(),
                info.context_limit,
                None,
            );
            match started {
                Ok((journal, _reports)) => Some((lease, journal)),
                Err(e) => {
                    tracing::warn!(
                        "the agent runs in the chat's session: its own cannot start: {e}"
                    );
                    None
                }
            }
        });
        let (engine, journal) = match &apart {
            Some((lease, journal)) => ((**lease).clone(), Some(journal.clone())),
            None => (self.engine.clone(), self.journal().ok().cloned()),
        };
        let (questions_tx, questions) = mpsc::unbounded_channel();
        let pressure = agent::pressure(self.samples.clone());
        let run = agent::spawn(
            agent::Start::Fresh(spec),
            crate::store::session::RunHost::Workstation,
            engine,
            journal,
            AskTheUser(questions_tx),
            Some(pressure),
        );
        let msgs = apart
            .as_ref()
            .map(|(_, journal)| Msg::Agent(AgentMsg::Apart(journal.id.clone())))
            .into_iter()
            .collect();
        self.agent = Some(AgentLink {
            run,
            apart,
            asking: None,
            questions,
        });
        msgs
    }

    /// Leave the current session (its KV snapshot and journal saved) for
    /// another one.
    pub async fn switch(&mut self, dir: std::path::PathBuf) -> Vec<Msg> {
        if self.journal.as_ref().is_some_and(|j| j.dir == dir) {
            return Vec::new();
        }
        let opened = self
            .store
            .load(&dir)
            .and_then(|loaded| Ok((loaded, self.store.open_for_resume(&dir)?)));
        let (loaded, open) = match opened {
            Ok(x) => x,
            Err(e) => return vec![Msg::Notice(e.to_string())],
        };
        if let Some(closing) = self.close().await {
            // The old session's snapshot is written while the new one opens.
            tokio::task::spawn_blocking(move || closing.finish());
        }
        self.engine.send(EngineCommand::Reset);
        self.system_prompt = loaded.transcript.system_prompt.clone();
        self.engine
            .send(EngineCommand::SetSystemPrompt(self.system_prompt.clone()));
        vec![self.resume(loaded, open, &dir).await]
    }

    /// On the way out: every journal line on disk, and the model's KV
    /// state taken for a fast resume when it is worth its disk; writing it
    /// and closing the journal are left to `Closing::finish`, so that
    /// whoever waits on the session (a terminal quitting, a switch to
    /// another session) does not wait on the snapshot.
    async fn close(&mut self) -> Option<Closing> {
        let journal = self.journal.take()?;
        let synced = journal.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || synced.sync()).await {
            tracing::warn!("closing the session: {e}");
        }
        let path = journal.dir.join(SNAPSHOT);
        let mut snapshot = None;
        if let Some(fingerprint) = &self.fingerprint {
            let (tx, rx) = oneshot::channel();
            self.engine.send(EngineCommand::Snapshot(tx));
            match rx.await {
                Ok(Ok(Some(kv))) => {
                    let bytes = kv.bytes.len() as u64;
                    let min_saved = self.config.snapshot_min_saved();
                    if kv_budget::worth_writing(kv.kv_tokens, bytes, self.prefill_tok_s, min_saved)
                    {
                        snapshot = Some((fingerprint.clone(), kv));
                    } else {
                        tracing::info!(
                            "no KV snapshot: {} tokens re-read at {} tok/s in less than the {:.1} s it must save",
                            kv.kv_tokens,
                            crate::layout::rate(self.prefill_tok_s),
                            min_saved.as_secs_f64()
                        );
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!("cannot take a KV snapshot: {e}"),
                Err(_) => tracing::warn!("the engine stopped before the KV snapshot"),
            }
        }
        Some(Closing {
            journal,
            path,
            snapshot,
            budget: self.kv_budget.clone(),
        })
    }
}

/// A session on its way out: its journal is on disk; the KV snapshot, if
/// one is worth writing, is written by `finish`.
pub struct Closing {
    journal: JournalHandle,
    path: std::path::PathBuf,
    snapshot: Option<(String, crate::chat::KvState)>,
    budget: kv_budget::KvBudget,
}

impl Closing {
    /// Write the snapshot (or remove an older one, which no longer matches
    /// the session), keep the KV disk budget, then let the session go.
    /// Blocking: disk work.
    pub fn finish(self) {
        match &self.snapshot {
            Some((fingerprint, kv)) => match snapshot::write(&self.path, fingerprint, kv) {
                Ok(bytes) => {
                    tracing::info!("KV snapshot: {} bytes, {} tokens", bytes, kv.kv_tokens);
                    self.budget.enforce(Some(&self.path));
                }
                Err(e) => {
                    tracing::warn!("{}: cannot write the KV snapshot: {e}", self.path.display());
                    let _ = std::fs::remove_file(&self.path);
                }
            },
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        self.journal.close();
    }
}

/// Every saved session, for the picker.
fn picker_items(store: &SessionStore) -> Vec<PickerItem> {
    store
        .list()
        .into_iter()
        .filter_map(|l| {
            let meta = l.meta?;
            let loaded = store.load(&l.dir).ok()?;
            let entries = &loaded.transcript.entries;
            let text = entries
                .iter()
                .map(|e| e.text.to_lowercase())
                .collect::<Vec<_>>()
                .join("\n");
            Some(PickerItem {
                dir: l.dir,
                title: meta.title,
                updated: crate::store::display_time(meta.updated_ms),
                messages: Transcript::messages(entries).len(),
                text,
            })
        })
        .collect()
}

/// The next event of the answer being generated; pending while none is.
async fn next_event(turn: &mut Option<TurnStream>) -> Option<EngineEvent> {
    match turn {
        Some(t) => t.next().await,
        None => std::future::pending().await,
    }
}

/// The next message of a running agent; an approval question is parked in
/// the link until the user answers it. `None` once the run has reported
/// its outcome.
async fn next_from_agent(agent: &mut Option<AgentLink>) -> Option<AgentMsg> {
    let Some(a) = agent else {
        return std::future::pending().await;
    };
    tokio::select! {
        event = a.run.next() => match event? {
            RunEvent::Progress(p) => Some(AgentMsg::Progress(p)),
            RunEvent::Done(outcome) => Some(AgentMsg::Done(outcome)),
        },
        Some((question, answer)) = a.questions.recv() => {
            a.asking = Some(answer);
            Some(AgentMsg::Approval(question))
        }
    }
}

async fn next_report(reports: &mut Option<mpsc::UnboundedReceiver<Report>>) -> Option<Report> {
    match reports {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The OSC 52 sequence that puts `text` (cut to what terminals accept) on
/// the clipboard. OSC 52 works through SSH and (with `set-clipboard on`)
/// tmux.
fn osc52(text: &str) -> String {
    let mut end = text.len().min(MAX_COPY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[..end]);
    format!("\x1b]52;c;{encoded}\x07")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Outcome;
    use clap::Parser;

    /// A runtime on a scripted engine whose every reply lists the folder
    /// (a step takes a while), with the settings `args` give, on a machine
    /// swapping hard: a sampler reports the swapping every 10 ms.
    async fn runtime_for(args: &[&str], dir: &Path) -> (Runtime, tokio::task::JoinHandle<()>) {
        let mut argv = vec!["kiln", "--workspace", dir.to_str().unwrap()];
        argv.extend(args);
        let common = crate::cli::Cli::parse_from(argv).common;
        let listing = r#"{"tool": "list_dir", "path": "."}"#;
        let engine = crate::engine::fake::FakeEngine::new(vec![listing; 50])
            .with_delay(std::time::Duration::from_millis(30));
        let started = launch::Started {
            paths: crate::paths::Paths::under(dir),
            config: crate::config::Config::default().merge(&common),
            engine: launch::leased(engine::spawn(engine)),
            shape: None,
            model_spec: "fake".into(),
            fingerprint: None,
        };
        let (tx, samples) = watch::channel(Sample::default());
        let swapping = Sample {
            swap_rate: Some(crate::telemetry::SwapRate {
                in_bytes_per_s: 64.0 * 1048576.0,
                out_bytes_per_s: 0.0,
            }),
            ..Sample::default()
        };
        let runtime = Runtime::new(common, started, samples);
        let sampler = tokio::spawn(async move {
            while tx.send(swapping.clone()).is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        (runtime, sampler)
    }

    /// What the agent reports until `done` says so, at most 10 s.
    async fn agent_msgs(runtime: &mut Runtime, done: impl Fn(&AgentMsg) -> bool) -> Vec<AgentMsg> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Ok(msg) = tokio::time::timeout_at(deadline, runtime.next_msg()).await {
            if let Msg::Agent(m) = msg {
                let end = done(&m);
                seen.push(m);
                if end {
                    break;
                }
            }
        }
        seen
    }

    /// `/agent` in the workstation runs with the agent flags: the step
    /// budget and the governor come from the settings, not from constants.
    #[tokio::test]
    async fn slash_agent_honours_the_agent_flags() {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "--max-steps",
            "2",
            "--governor",
            "ignore",
            "--approval",
            "auto",
        ];
        let (mut runtime, sampler) = runtime_for(&args, dir.path()).await;
        assert!(runtime
            .perform(Effect::StartAgent("look around".into()))
            .await
            .is_empty());
        let seen = agent_msgs(&mut runtime, |m| matches!(m, AgentMsg::Done(_))).await;
        assert_eq!(
            seen.last(),
            Some(&AgentMsg::Done(Outcome::BudgetExhausted("2 steps".into()))),
            "{seen:?}"
        );
        let paused = |m: &AgentMsg| matches!(m, AgentMsg::Progress(agent::Progress::Paused { .. }));
        assert!(
            !seen.iter().any(paused),
            "the governor was told to ignore the swapping: {seen:?}"
        );
        sampler.abort();

        // Without the flags, the same machine pauses the run.
        let (mut runtime, sampler) = runtime_for(&["--approval", "auto"], dir.path()).await;
        runtime
            .perform(Effect::StartAgent("look around".into()))
            .await;
        let seen = agent_msgs(&mut runtime, paused).await;
        assert!(seen.last().is_some_and(paused), "{seen:?}");
        runtime.perform(Effect::StopAgent).await;
        let seen = agent_msgs(&mut runtime, |m| matches!(m, AgentMsg::Done(_))).await;
        assert_eq!(seen.last(), Some(&AgentMsg::Done(Outcome::Stopped)));
        sampler.abort();
    }

    #[test]
    fn osc52_encodes_the_text_and_caps_it() {
        assert_eq!(super::osc52("hé"), "\x1b]52;c;aMOp\x07");
        let big = "é".repeat(super::MAX_COPY_BYTES);
        let seq = super::osc52(&big);
        // Cut on a character boundary, base64 of at most the cap.
        assert!(seq.len() <= super::MAX_COPY_BYTES / 3 * 4 + 16);
    }
}
