//! The runtime behind the workstation: performs the effects `update`
//! returns. It owns the engines, the session journal and a running agent;
//! the workstation host feeds what they send back into `update`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::tools::{Limits, ToolCall, Workspace};
use crate::agent::{self, Agent, Approval, Approver, Budgets, GovernorMode, Outcome};
use crate::app::{self, AgentMsg, Effect, Msg, PickerItem, State};
use crate::cli::Common;
use crate::engine::{self, EngineCommand, EngineEvent, EngineHandle};
use crate::launch;
use crate::store::journal::{self, JournalHandle, Report};
use crate::store::session::{self, OpenSession};
use crate::store::{snapshot, Loaded, SessionStore};
use crate::telemetry::Sample;
use crate::transcript::Transcript;

/// The KV snapshot in a session folder, written when a session closes.
pub const SNAPSHOT: &str = "kv.snapshot";
/// Terminals drop OSC 52 payloads beyond about this size.
const MAX_COPY_BYTES: usize = 512 * 1024;

/// What the runtime holds besides the state: the engine, and the session
/// journal once there is something to write.
pub struct Runtime {
    /// The engine chats go to now.
    pub engine: EngineHandle,
    /// Every engine started so far, by spec ("smollm2-…", "remote:NAME"),
    /// kept so a session can move back without a reload.
    engines: Vec<(String, EngineHandle)>,
    /// All engines' events, merged into the one stream `update` reads.
    merged: mpsc::UnboundedSender<EngineEvent>,
    config: crate::config::Config,
    common: Common,
    store: SessionStore,
    journal: Option<JournalHandle>,
    reports: Option<mpsc::UnboundedReceiver<Report>>,
    model_spec: String,
    fingerprint: Option<String>,
    samples: watch::Receiver<Sample>,
    pub agent: Option<AgentLink>,
    /// Escape sequences for the attached terminals (OSC 52 copies).
    pub outbox: Vec<String>,
    /// Why the user's last message could not be committed: the model is
    /// not asked about a message that is not on disk.
    not_committed: Option<String>,
    /// The first engine's forwarder, stopped to hand its events back.
    first: Forwarder,
}

/// The runtime's side of a running agent: engine events go to it, its
/// progress and approval questions come back.
pub struct AgentLink {
    pub events: mpsc::UnboundedSender<EngineEvent>,
    messages: mpsc::UnboundedReceiver<AgentMsg>,
    stop: Arc<AtomicBool>,
    /// The approval question waiting for the user's answer.
    asking: Option<oneshot::Sender<Approval>>,
    questions: mpsc::UnboundedReceiver<(ToolCall, oneshot::Sender<Approval>)>,
}

/// Approval questions go to the TUI; an unanswered one is a no.
struct AskTheUser(mpsc::UnboundedSender<(ToolCall, oneshot::Sender<Approval>)>);

impl Approver for AskTheUser {
    async fn approve(&mut self, call: &ToolCall) -> Approval {
        let (tx, rx) = oneshot::channel();
        if self.0.send((call.clone(), tx)).is_err() {
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
    ) -> (Runtime, mpsc::UnboundedReceiver<EngineEvent>) {
        let (merged, events) = mpsc::unbounded_channel();
        let first = forward(started.events, merged.clone());
        let spec = started.model_spec;
        let runtime = Runtime {
            engine: started.handle.clone(),
            engines: vec![(spec.clone(), started.handle)],
            merged,
            config: started.config,
            store: SessionStore::new(&started.paths),
            common,
            journal: None,
            reports: None,
            model_spec: spec,
            fingerprint: started.fingerprint,
            samples,
            agent: None,
            outbox: Vec::new(),
            not_committed: None,
            first,
        };
        (runtime, events)
    }

    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// The session being journaled, once there is one.
    pub fn session(&self) -> Option<&JournalHandle> {
        self.journal.as_ref()
    }

    /// What the agent or the journal sends next; pending while neither
    /// has anything.
    pub async fn next_msg(&mut self) -> Msg {
        loop {
            tokio::select! {
                from_agent = next_from_agent(&mut self.agent) => if let Some(msg) = from_agent {
                    return Msg::Agent(msg);
                },
                report = next_report(&mut self.reports) => match report {
                    Some(report) => return Msg::Journal(report),
                    None => self.reports = None,
                },
            }
        }
    }

    /// Save the session and hand back the first engine's events.
    pub async fn finish(mut self) -> Option<mpsc::UnboundedReceiver<EngineEvent>> {
        self.close().await;
        self.first.take_back().await
    }

    /// Show a session read from disk and bring the engine to where it was:
    /// from its KV snapshot when one fits, else by re-reading the transcript
    /// on the next message. Returns the line the status bar shows.
    pub async fn resume(
        &mut self,
        state: &mut State,
        loaded: Loaded,
        open: OpenSession,
        source: &std::path::Path,
    ) -> String {
        let messages = Transcript::messages(&loaded.transcript.entries);
        let count = messages.len();
        let title = loaded.meta.title.clone();
        let system = loaded.transcript.system_prompt.clone();
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let snapshot_path = source.join(SNAPSHOT);
        state.restore(&title, loaded.transcript);
        if system.is_some() {
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
        if !snapshot_path.exists() {
            line.push_str("; the model re-reads it on your next message");
            return line;
        }
        let Some(fingerprint) = &self.fingerprint else {
            return line;
        };
        match snapshot::read(&snapshot_path, fingerprint) {
            Ok(kv) => {
                let tokens = kv.kv_tokens;
                let (tx, rx) = oneshot::channel();
                self.engine.send(EngineCommand::Restore(kv, tx));
                match rx.await {
                    Ok(Ok(())) => {
                        state.context_tokens = tokens;
                        line.push_str(&format!("; KV snapshot loaded ({tokens} tokens)"));
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
        line
    }

    /// The journal, creating the session on the first thing worth keeping.
    /// When the session cannot be created the conversation goes on in memory
    /// and the next record tries again.
    fn journal(&mut self, state: &mut State) -> Option<&JournalHandle> {
        if self.journal.is_none() {
            let info = self.engine.info();
            match self.store.start(
                &self.model_spec,
                self.fingerprint.clone(),
                info.context_limit,
                state.system_prompt.as_deref(),
            ) {
                Ok((journal, reports)) => {
                    self.journal = Some(journal);
                    self.reports = Some(reports);
                }
                Err(e) => {
                    state.notice = Some(format!("cannot save this session: {e}"));
                    return None;
                }
            }
        }
        self.journal.as_ref()
    }

    pub async fn perform(&mut self, effect: Effect, state: &mut State) {
        match effect {
            Effect::Chat(text) => {
                if let Some(error) = self.not_committed.take() {
                    let failed = EngineEvent::TurnFailed { turn: 0, error };
                    for effect in app::update(state, Msg::Engine(failed, std::time::Instant::now()))
                    {
                        Box::pin(self.perform(effect, state)).await;
                    }
                    return;
                }
                self.offload_if_needed(state, &text).await;
                self.engine.chat(text);
            }
            Effect::Regenerate { history, message } => {
                self.engine.send(EngineCommand::SetHistory(history));
                self.engine.chat(message);
            }
            Effect::Continue { history } => {
                self.engine.send(EngineCommand::SetHistory(history));
                self.engine.continue_last();
            }
            Effect::Cancel => self.engine.cancel(),
            Effect::SetSystemPrompt(p) => self.engine.send(EngineCommand::SetSystemPrompt(p)),
            Effect::Copy(text) => self.outbox.push(osc52(&text)),
            Effect::Record(event @ session::Event::User { .. }) => {
                let Some(j) = self.journal(state).cloned() else {
                    self.not_committed = Some(format!(
                        "{}; so your message was not sent to the model: send it again (Up recalls it) when the disk has room",
                        state.notice.clone().unwrap_or_default()
                    ));
                    return;
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
                if let Some(j) = self.journal(state) {
                    j.event(event);
                }
            }
            Effect::RecordChunk(text) => {
                if let Some(j) = self.journal(state) {
                    j.chunk(text);
                }
            }
            Effect::ListSessions => {
                // Reading every journal is disk work: keep it off the UI loop.
                let store = self.store.clone();
                let items = tokio::task::spawn_blocking(move || picker_items(&store))
                    .await
                    .unwrap_or_default();
                for effect in app::update(state, Msg::Sessions(items)) {
                    Box::pin(self.perform(effect, state)).await;
                }
            }
            Effect::OpenSession(dir) => self.switch(state, dir).await,
            Effect::StartAgent(task) => {
                if let Err(outcome) = self.start_agent(state, task) {
                    for effect in app::update(state, Msg::Agent(AgentMsg::Done(outcome))) {
                        Box::pin(self.perform(effect, state)).await;
                    }
                }
            }
            Effect::SwitchEngine(target) => {
                let history = Transcript::messages(&state.transcript);
                let line = self.switch_engine(state, target, history).await;
                state.notice = Some(line.clone());
                state.push_notice(line.clone());
                if let Some(j) = self.journal(state) {
                    j.event(session::Event::Notice { text: line });
                }
            }
            Effect::StopAgent => {
                if let Some(a) = &self.agent {
                    a.stop.store(true, Ordering::SeqCst);
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
                self.engine
                    .send(EngineCommand::SetSystemPrompt(system_prompt));
                self.engine.send(EngineCommand::SetHistory(history));
            }
            Effect::Quit => {}
        }
    }

    /// Move the conversation to another engine: `Some(NAME)` an endpoint,
    /// `None` the local model. The transcript and journal stay here; the
    /// target gets the conversation and re-reads it on the next message.
    async fn switch_engine(
        &mut self,
        state: &mut State,
        target: Option<String>,
        history: Vec<crate::engine::Message>,
    ) -> String {
        let spec = match &target {
            Some(name) => format!("remote:{name}"),
            None => self
                .engines
                .iter()
                .map(|(s, _)| s.clone())
                .find(|s| !s.starts_with("remote:"))
                .unwrap_or_else(|| "local".to_string()),
        };
        let handle = match self.engines.iter().find(|(s, _)| *s == spec) {
            Some((_, h)) => h.clone(),
            None => {
                let started = match &target {
                    Some(name) => launch::remote_engine(&self.config, name).map(engine::spawn),
                    None => {
                        let mut common = self.common.clone();
                        common.engine = "local".into();
                        launch::launch(&common, |_| {}).await.map(|l| {
                            state.shape = Some(l.shape());
                            engine::spawn(l.engine)
                        })
                    }
                };
                match started {
                    Ok((handle, events)) => {
                        drop(forward(events, self.merged.clone()));
                        self.engines.push((spec.clone(), handle.clone()));
                        handle
                    }
                    Err(e) => return format!("cannot move the session: {e}"),
                }
            }
        };
        handle.send(EngineCommand::SetSystemPrompt(state.system_prompt.clone()));
        handle.send(EngineCommand::SetHistory(history));
        self.engine = handle;
        state.model = self.engine.info().clone();
        state.remote = target.as_ref().map(|_| spec.clone());
        match target {
            Some(name) => format!(
                "moved to endpoint {name}; this machine no longer holds the conversation's KV cache"
            ),
            None => {
                "moved back to the local model; it re-reads the conversation on the next message"
                    .to_string()
            }
        }
    }

    /// With `auto_offload` set, move to that endpoint before a turn that
    /// would outgrow this machine.
    async fn offload_if_needed(&mut self, state: &mut State, message: &str) {
        let Some(name) = self.config.auto_offload.clone() else {
            return;
        };
        let answer = self.config.sampling.max_tokens as usize;
        if !app::outgrows_local(state, message, answer) {
            return;
        }
        // The question and its empty answer are already in the transcript;
        // the engine gets the conversation before them, then the question.
        let before = state.transcript.len().saturating_sub(2);
        let history = Transcript::messages(&state.transcript[..before]);
        let line = self.switch_engine(state, Some(name), history).await;
        let line = format!("the next turn would outgrow this machine: {line}");
        state.notice = Some(line.clone());
        if let Some(j) = self.journal(state) {
            j.event(session::Event::Notice { text: line });
        }
    }

    /// Run an agent as a task of its own: it drives the engine, journals to
    /// this session, and asks the user through `AskTheUser`.
    fn start_agent(&mut self, state: &mut State, task: String) -> Result<(), Outcome> {
        let root = &self.common.workspace();
        let workspace = Workspace::new(root)
            .map_err(|e| Outcome::Failed(format!("workspace {}: {e}", root.display())))?;
        let journal = self.journal(state).cloned();
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (messages_tx, messages_rx) = mpsc::unbounded_channel();
        let (questions_tx, questions_rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let engine = self.engine.clone();
        let pressure = agent::pressure(self.samples.clone());
        let policy = self.common.approval;
        let agent_stop = stop.clone();
        tokio::spawn(async move {
            let progress = messages_tx.clone();
            let outcome = Agent {
                engine: &engine,
                events: &mut events_rx,
                workspace,
                policy,
                budgets: Budgets {
                    max_steps: 30,
                    max_time: Duration::from_secs(3600),
                    max_tokens: 200_000,
                },
                limits: Limits::default(),
                approver: AskTheUser(questions_tx),
                journal: journal.as_ref(),
                pressure: Some(pressure),
                governor: GovernorMode::Pause,
                stop: agent_stop,
            }
            .run(&task, |p| {
                let _ = progress.send(AgentMsg::Progress(p));
            })
            .await;
            let _ = messages_tx.send(AgentMsg::Done(outcome));
        });
        self.agent = Some(AgentLink {
            events: events_tx,
            messages: messages_rx,
            stop,
            asking: None,
            questions: questions_rx,
        });
        Ok(())
    }

    /// Leave the current session (its KV snapshot and journal saved) for
    /// another one.
    pub async fn switch(&mut self, state: &mut State, dir: std::path::PathBuf) {
        if self.journal.as_ref().is_some_and(|j| j.dir == dir) {
            return;
        }
        let opened = self
            .store
            .load(&dir)
            .and_then(|loaded| Ok((loaded, self.store.open_for_resume(&dir)?)));
        let (loaded, open) = match opened {
            Ok(x) => x,
            Err(e) => {
                state.notice = Some(e.to_string());
                return;
            }
        };
        self.close().await;
        self.engine.send(EngineCommand::Reset);
        self.engine.send(EngineCommand::SetSystemPrompt(
            loaded.transcript.system_prompt.clone(),
        ));
        state.notice = Some(self.resume(state, loaded, open, &dir).await);
    }

    /// On the way out: the KV snapshot for a fast resume, then every journal
    /// line on disk.
    async fn close(&mut self) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        if let Some(fingerprint) = &self.fingerprint {
            let (tx, rx) = oneshot::channel();
            self.engine.send(EngineCommand::Snapshot(tx));
            match rx.await {
                Ok(Ok(Some(kv))) => {
                    let path = journal.dir.join(SNAPSHOT);
                    match snapshot::write(&path, fingerprint, &kv) {
                        Ok(bytes) => {
                            tracing::info!("KV snapshot: {} bytes, {} tokens", bytes, kv.kv_tokens)
                        }
                        Err(e) => {
                            tracing::warn!("{}: cannot write the KV snapshot: {e}", path.display())
                        }
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!("cannot take a KV snapshot: {e}"),
                Err(_) => tracing::warn!("the engine stopped before the KV snapshot"),
            }
        }
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
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

/// Passes one engine's events into the merged stream until stopped, then
/// hands the receiver back (the daemon lends its engine to one user at a
/// time).
struct Forwarder {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<mpsc::UnboundedReceiver<EngineEvent>>>,
}

fn forward(
    mut events: mpsc::UnboundedReceiver<EngineEvent>,
    to: mpsc::UnboundedSender<EngineEvent>,
) -> Forwarder {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        // A dropped forwarder forwards for as long as the engine runs.
        let mut stoppable = true;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => if to.send(ev).is_err() {
                        return None;
                    },
                    None => return None,
                },
                stop = &mut stopped, if stoppable => match stop {
                    Ok(()) => return Some(events),
                    Err(_) => stoppable = false,
                },
            }
        }
    });
    Forwarder { stop, task }
}

impl Forwarder {
    async fn take_back(self) -> Option<mpsc::UnboundedReceiver<EngineEvent>> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

/// The next message of a running agent; an approval question is parked in
/// the link until the user answers it.
async fn next_from_agent(agent: &mut Option<AgentLink>) -> Option<AgentMsg> {
    let Some(a) = agent else {
        return std::future::pending().await;
    };
    tokio::select! {
        msg = a.messages.recv() => msg,
        question = a.questions.recv() => {
            let (call, answer) = question?;
            a.asking = Some(answer);
            Some(AgentMsg::Approval(call))
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
    #[test]
    fn osc52_encodes_the_text_and_caps_it() {
        assert_eq!(super::osc52("hé"), "\x1b]52;c;aMOp\x07");
        let big = "é".repeat(super::MAX_COPY_BYTES);
        let seq = super::osc52(&big);
        // Cut on a character boundary, base64 of at most the cap.
        assert!(seq.len() <= super::MAX_COPY_BYTES / 3 * 4 + 16);
    }
}
