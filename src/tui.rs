//! The workstation's runtime: sets up the terminal (and always restores it),
//! feeds terminal input, engine events and telemetry into `update`, performs
//! the effects, and draws when something changed, at most ~30 frames/s.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use base64::Engine as _;
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    MouseEventKind,
};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::sync::{mpsc, oneshot, watch};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::agent::tools::{Limits, ToolCall, Workspace};
use crate::agent::{self, Agent, Approval, Approver, Budgets, GovernorMode, Outcome};
use crate::app::{self, AgentMsg, Effect, Msg, PickerItem, State};
use crate::budget::ModelShape;
use crate::cli::Common;
use crate::engine::{self, EngineCommand, EngineEvent, EngineHandle};
use crate::error::{KilnError, Result};
use crate::keys::KeyMap;
use crate::launch;
use crate::store::journal::{self, JournalHandle, Report};
use crate::store::session::{self, OpenSession};
use crate::store::{snapshot, Loaded, SessionStore};
use crate::telemetry::{self, Sample};
use crate::theme::{self, Theme};
use crate::transcript::Transcript;
use crate::ui;

/// The KV snapshot in a session folder, written when kiln quits.
pub const SNAPSHOT: &str = "kv.snapshot";
const FRAME: Duration = Duration::from_millis(33);
const WHEEL_ROWS: i16 = 3;
/// Terminals drop OSC 52 payloads beyond about this size.
const MAX_COPY_BYTES: usize = 512 * 1024;

/// What the workstation opens with.
pub enum Start {
    New,
    /// A session by id, id prefix or folder; `None` is the most recent.
    Resume(Option<String>),
}

pub async fn run(common: &Common, start: Start) -> Result<i32> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(KilnError::BadArgument(
            "the workstation needs a terminal; for scripts use `kiln ask`".into(),
        ));
    }
    // Read the session first: a bad id or a locked session fails before a
    // model is loaded.
    let (paths, _) = crate::launch::paths_and_config(common)?;
    let store = SessionStore::new(&paths);
    let mut common = common.clone();
    let resumed = match start {
        Start::New => None,
        Start::Resume(query) => {
            let dir = store.resolve(query.as_deref())?;
            let loaded = store.load(&dir)?;
            let open = store.open_for_resume(&dir)?;
            // The session's model, unless the user names another.
            if common.model.is_none() {
                match loaded.meta.model.strip_prefix("remote:") {
                    Some(_) if common.engine == "local" => {
                        common.engine = loaded.meta.model.clone();
                    }
                    Some(_) => {}
                    None => common.model = Some(loaded.meta.model.clone()),
                }
            }
            Some((loaded, open, dir))
        }
    };

    let started = launch::start(&common).await?;
    let config = &started.config;
    let config_file = common
        .config
        .clone()
        .unwrap_or_else(|| started.paths.config_file.clone());
    let keys = KeyMap::with_overrides(&config.keys)
        .map_err(|e| KilnError::Config(config_file.clone(), e))?;
    let theme_name = common
        .theme
        .clone()
        .or_else(|| config.theme.clone())
        .unwrap_or_else(|| theme::DEFAULT_THEME.to_string());
    let user_themes = config_file.parent().map(|d| d.join("themes"));
    let (theme, warnings) = Theme::load(
        &theme_name,
        user_themes.as_deref(),
        theme::no_color_requested(),
    );
    for w in &warnings {
        tracing::warn!("{w}");
    }

    let system_prompt = config.system_prompt.clone();
    let (merged_tx, events) = mpsc::unbounded_channel();
    let spec = started.model_spec.clone();
    forward(started.events, merged_tx.clone());
    let mut state = State::new(started.handle.info().clone(), started.shape.clone(), keys)
        .with_system_prompt(system_prompt);
    if spec.starts_with("remote:") {
        state.remote = Some(spec.clone());
    }
    state.notice = warnings.into_iter().next();
    let samples = telemetry::spawn(Duration::from_secs(1));
    let mut runtime = Runtime {
        engine: started.handle.clone(),
        engines: vec![(spec.clone(), started.handle)],
        merged: merged_tx,
        config: started.config.clone(),
        common: common.clone(),
        store,
        journal: None,
        reports: None,
        model_spec: spec,
        fingerprint: started.fingerprint,
        samples: samples.clone(),
        agent: None,
    };
    if let Some((loaded, open, source)) = resumed {
        state.notice = Some(runtime.resume(&mut state, loaded, open, &source).await);
    }
    let code = run_terminal(state, &theme, &mut runtime, events, samples).await;
    runtime.close().await;
    code
}

/// What the runtime holds besides the state: the engine, and the session
/// journal once there is something to write.
struct Runtime {
    /// The engine chats go to now.
    engine: EngineHandle,
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
    agent: Option<AgentLink>,
}

/// The runtime's side of a running agent: engine events go to it, its
/// progress and approval questions come back.
struct AgentLink {
    events: mpsc::UnboundedSender<EngineEvent>,
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
    /// Show a session read from disk and bring the engine to where it was:
    /// from its KV snapshot when one fits, else by re-reading the transcript
    /// on the next message. Returns the line the status bar shows.
    async fn resume(
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

    async fn perform(&mut self, effect: Effect, state: &mut State) {
        match effect {
            Effect::Chat(text) => {
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
            Effect::Copy(text) => copy_osc52(&text),
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
                            state.shape = Some(ModelShape::from_gguf(&l.model.info));
                            engine::spawn(l.engine)
                        })
                    }
                };
                match started {
                    Ok((handle, events)) => {
                        forward(events, self.merged.clone());
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
        let root = &self.common.workspace;
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
    async fn switch(&mut self, state: &mut State, dir: std::path::PathBuf) {
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

/// The next message of a running agent; an approval question is parked in
/// the link until the user answers it.
/// Pass one engine's events into the merged stream.
fn forward(
    mut events: mpsc::UnboundedReceiver<EngineEvent>,
    to: mpsc::UnboundedSender<EngineEvent>,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if to.send(ev).is_err() {
                return;
            }
        }
    });
}

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
/// Puts the terminal back however kiln leaves: normal return, error or panic.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> std::io::Result<TerminalGuard> {
        enable_raw_mode()?;
        let guard = TerminalGuard;
        crossterm::execute!(
            std::io::stdout(),
            EnterAlternateScreen,
            EnableBracketedPaste,
            EnableMouseCapture
        )?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    let _ = crossterm::execute!(
        std::io::stdout(),
        DisableMouseCapture,
        DisableBracketedPaste,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
    let _ = disable_raw_mode();
}

async fn run_terminal(
    mut state: State,
    theme: &Theme,
    runtime: &mut Runtime,
    mut events: mpsc::UnboundedReceiver<EngineEvent>,
    mut samples: watch::Receiver<Sample>,
) -> Result<i32> {
    let terminal_error = |e: std::io::Error| KilnError::io("terminal", e);
    let _guard = TerminalGuard::enter().map_err(terminal_error)?;
    let mut terminal =
        Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(terminal_error)?;
    let size = terminal.size().map_err(terminal_error)?;
    app::update(&mut state, Msg::Resize(size.width, size.height));
    app::update(
        &mut state,
        Msg::Telemetry(samples.borrow_and_update().clone()),
    );

    let mut input = spawn_input_reader();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| KilnError::io("signal handler", e))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| KilnError::io("signal handler", e))?;

    let mut dirty = true;
    let mut last_draw = Instant::now() - FRAME;
    loop {
        if dirty && last_draw.elapsed() >= FRAME {
            terminal
                .draw(|f| ui::render(f, &state, theme))
                .map_err(terminal_error)?;
            last_draw = Instant::now();
            dirty = false;
        }
        if state.quit {
            break;
        }
        let next_frame = tokio::time::Instant::from_std(last_draw + FRAME);
        let msg = tokio::select! {
            ev = input.recv() => match ev {
                Some(ev) => match to_msg(ev) {
                    Some(msg) => msg,
                    None => continue,
                },
                // The terminal is gone.
                None => {
                    release_terminal();
                    break;
                }
            },
            ev = events.recv() => match ev {
                Some(ev) => {
                    if let Some(agent) = &runtime.agent {
                        let _ = agent.events.send(ev.clone());
                    }
                    Msg::Engine(ev, Instant::now())
                }
                None => return Err(KilnError::Engine("the engine stopped unexpectedly".into())),
            },
            from_agent = next_from_agent(&mut runtime.agent) => match from_agent {
                Some(msg) => Msg::Agent(msg),
                None => continue,
            },
            changed = samples.changed() => match changed {
                Ok(()) => Msg::Telemetry(samples.borrow_and_update().clone()),
                Err(_) => continue,
            },
            report = next_report(&mut runtime.reports) => match report {
                Some(report) => Msg::Journal(report),
                None => {
                    runtime.reports = None;
                    continue;
                }
            },
            _ = hangup.recv() => {
                release_terminal();
                break;
            }
            _ = terminate.recv() => break,
            _ = tokio::time::sleep_until(next_frame), if dirty => continue,
        };
        for effect in app::update(&mut state, msg) {
            runtime.perform(effect, &mut state).await;
        }
        dirty = true;
    }
    // Leaving mid-answer: stop it, and give the stopped answer a moment to
    // come back so it is committed to the journal, not left as chunks.
    runtime.engine.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while state.generating() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) => {
                for effect in app::update(&mut state, Msg::Engine(ev, Instant::now())) {
                    runtime.perform(effect, &mut state).await;
                }
            }
            _ => break,
        }
    }
    Ok(0)
}

/// The terminal hung up (SSH dropped): point stdin, stdout and stderr at
/// /dev/null, so that nothing kiln or its libraries write on the way out
/// fails (a failed `eprintln!` panics) before the journal and the KV
/// snapshot are saved.
fn release_terminal() {
    // SAFETY: open and dup2 on valid descriptors; the old ones are replaced
    // atomically by dup2.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..=2 {
                libc::dup2(null, fd);
            }
            libc::close(null);
        }
    }
}

/// Terminal input arrives on a thread of its own: crossterm's `read` blocks.
fn spawn_input_reader() -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("kiln-input".into())
        .spawn(move || {
            while let Ok(ev) = crossterm::event::read() {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the input thread");
    rx
}

fn to_msg(event: Event) -> Option<Msg> {
    match event {
        Event::Key(key) => Some(Msg::Key(key)),
        Event::Paste(text) => Some(Msg::Paste(text)),
        Event::Resize(w, h) => Some(Msg::Resize(w, h)),
        Event::Mouse(m) => match m.kind {
            MouseEventKind::ScrollUp => Some(Msg::Wheel(-WHEEL_ROWS)),
            MouseEventKind::ScrollDown => Some(Msg::Wheel(WHEEL_ROWS)),
            _ => None,
        },
        _ => None,
    }
}

/// OSC 52 asks the terminal to set the clipboard, which works through SSH
/// and (with `set-clipboard on`) tmux.
fn copy_osc52(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(osc52(text).as_bytes());
    let _ = out.flush();
}

/// The OSC 52 sequence that puts `text` (cut to what terminals accept) on
/// the clipboard.
fn osc52(text: &str) -> String {
    let mut end = text.len().min(MAX_COPY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
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
