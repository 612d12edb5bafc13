//! The actor: one task that owns the runs and the workstation link and
//! lends the model's conversations, a lease each. Connections, runs and the
//! workstation talk to it over channels.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::agent::tools::Workspace;
use crate::agent::{self, pressure, resume, Nobody, Outcome, Progress, RunEvent, RunSpec, Start};
use crate::cli::Common;
use crate::engine::{EngineCommand, EngineHandle, Lease};
use crate::error::Result;
use crate::host::launch;
use crate::host::protocol::{Open, Reply, Request, RunInfo, Settings};
use crate::host::workstation::{self, Client, Host, HostIn, Resumed};
use crate::paths::Paths;
use crate::store::journal::{self, JournalHandle};
use crate::store::session::RunHost;
use crate::store::SessionStore;
use crate::telemetry;

use super::settings::{differs, joins, loads_differently};

pub(super) enum ActorMsg {
    Request(Request, oneshot::Sender<Reply>),
    Attach(String, mpsc::Sender<Reply>, oneshot::Sender<Reply>),
    Progress(String, Progress),
    Done(String, Outcome),
    Shutdown(oneshot::Sender<()>),
    /// A run with no agent behind it, fed by `Progress` messages: the
    /// benchmark's event source.
    Open(String),
    /// A terminal for the workstation; answered with the host's inbox.
    Workstation(
        Open,
        Client,
        /// What the client was started with.
        Settings,
        oneshot::Sender<Result<mpsc::UnboundedSender<HostIn>, String>>,
    ),
    /// A workstation closed and gave its conversation back.
    HostGone(u64),
    /// Exit if still idle since this many idle periods began.
    IdleCheck(u64),
    /// `kiln ask`'s question, its `ephemeral` flag and client's settings:
    /// answered with a conversation to ask it on, and the journal it goes
    /// into.
    Ask(
        String,
        bool,
        Settings,
        oneshot::Sender<std::result::Result<(Lease, Option<JournalHandle>), String>>,
    ),
    /// A conversation lent outside a run or workstation was given back.
    Released,
    /// The daemon starts: resume the runs it hosted when it died.
    ResumeInterrupted,
}

/// The model as loaded, for each user the engine is lent to.
pub struct Model {
    /// What it was started with.
    pub(super) settings: Settings,
    pub(super) keys: crate::keys::KeyMap,
    pub(super) paths: crate::paths::Paths,
    pub(super) config: crate::config::Config,
    pub(super) shape: Option<crate::budget::ModelShape>,
    pub(super) model_spec: String,
    pub(super) fingerprint: Option<String>,
}

/// A workstation (one conversation and its terminals) as the actor sees
/// it.
pub(super) struct WorkstationLink {
    /// Which one, for its `HostGone`.
    pub(super) number: u64,
    pub(super) inbox: mpsc::UnboundedSender<HostIn>,
    pub(super) status: tokio::sync::watch::Receiver<workstation::Status>,
    /// The safety settings of the client that opened it.
    pub(super) workspace: PathBuf,
    pub(super) approval: crate::agent::Policy,
}

struct Run {
    task: String,
    log: RunLog,
    outcome: Option<Outcome>,
    stop: Arc<AtomicBool>,
    /// Set as the daemon shuts down: the run stops without ending.
    suspend: Arc<AtomicBool>,
    subscribers: Vec<mpsc::Sender<Reply>>,
}

/// Bytes of a run's newest events the daemon keeps for a terminal that
/// attaches: half a frame, so the snapshot always fits one. A run going
/// around the clock must not grow the daemon (every result up to 16 KiB,
/// a write's diff up to 32 KiB more) or outgrow the frame.
const KEPT_EVENT_BYTES: usize = crate::host::protocol::MAX_FRAME / 2;

/// A run's events: the newest that fit `KEPT_EVENT_BYTES`, how many older
/// ones were dropped, and what `kiln ps` says of all of them.
#[derive(Default)]
struct RunLog {
    /// Each event with its size as JSON.
    kept: std::collections::VecDeque<(Progress, usize)>,
    bytes: usize,
    dropped: u64,
    steps: u32,
    /// The decode speed and context tokens of the latest call.
    last_call: (Option<f64>, usize),
}

impl RunLog {
    /// Keep `event`; returns its number (from 1).
    fn push(&mut self, event: Progress) -> u64 {
        if let Progress::Call {
            tok_s,
            context_tokens,
            ..
        } = &event
        {
            self.steps += 1;
            self.last_call = (*tok_s, *context_tokens);
        }
        let size = serde_json::to_vec(&event).map_or(0, |v| v.len());
        self.kept.push_back((event, size));
        self.bytes += size;
        while self.bytes > KEPT_EVENT_BYTES && self.kept.len() > 1 {
            if let Some((_, size)) = self.kept.pop_front() {
                self.bytes -= size;
                self.dropped += 1;
            }
        }
        self.dropped + self.kept.len() as u64
    }

    fn snapshot(&self) -> (u64, Vec<Progress>) {
        (
            self.dropped,
            self.kept.iter().map(|(e, _)| e.clone()).collect(),
        )
    }
}

pub(super) struct Actor {
    tx: mpsc::UnboundedSender<ActorMsg>,
    /// The model: each of the workstation and the agent runs leases a
    /// conversation of its own.
    engine: EngineHandle,
    store: SessionStore,
    samples: tokio::sync::watch::Receiver<telemetry::Sample>,
    runs: BTreeMap<String, Run>,
    shutdown: Option<oneshot::Sender<()>>,
    /// `None` in the benchmark, which has no workstation.
    model: Option<Model>,
    /// The open workstations, oldest first: each holds its own session
    /// on a conversation of its own.
    workstations: Vec<WorkstationLink>,
    opened: u64,
    /// Exit this long after the last run and the workstation end (a daemon
    /// a client started); `None` keeps it running.
    idle_exit: Option<Duration>,
    idle_period: u64,
    exit: Arc<tokio::sync::Notify>,
    /// The API's requests in flight, where the daemon serves it.
    served: Option<tokio::sync::watch::Receiver<crate::serve::ledger::Served>>,
}

impl Model {
    /// A scripted engine's model with default settings, for the
    /// benchmarks and tests.
    pub fn fake(common: Common, paths: &Paths) -> Model {
        Model {
            settings: Settings {
                common,
                ..Settings::default()
            },
            keys: crate::keys::KeyMap::default(),
            paths: paths.clone(),
            config: crate::config::Config::default(),
            shape: None,
            model_spec: "fake".into(),
            fingerprint: None,
        }
    }
}

impl Actor {
    /// The actor for `engine`, which it lends and never holds; `model` is
    /// `None` in the benchmark, which has no workstation.
    pub(super) fn new(
        tx: mpsc::UnboundedSender<ActorMsg>,
        engine: EngineHandle,
        store: SessionStore,
        samples: tokio::sync::watch::Receiver<telemetry::Sample>,
        model: Option<Model>,
        idle_exit: Option<Duration>,
        exit: Arc<tokio::sync::Notify>,
    ) -> Actor {
        Actor {
            tx,
            engine,
            store,
            samples,
            runs: BTreeMap::new(),
            shutdown: None,
            model,
            workstations: Vec::new(),
            opened: 0,
            idle_exit,
            idle_period: 0,
            exit,
            served: None,
        }
    }

    /// The actor of a daemon that serves the API: `kiln ps` lists its
    /// requests.
    pub(super) fn serving(
        mut self,
        served: Option<tokio::sync::watch::Receiver<crate::serve::ledger::Served>>,
    ) -> Actor {
        self.served = served;
        self
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ActorMsg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                ActorMsg::Request(req, reply) => {
                    let _ = reply.send(self.request(req));
                }
                ActorMsg::Attach(id, sub, reply) => {
                    let answer = match self.runs.get_mut(&id) {
                        Some(run) => {
                            // The snapshot and the subscription happen in one
                            // step of the actor: no event falls between them.
                            run.subscribers.push(sub);
                            let (dropped, events) = run.log.snapshot();
                            Reply::Snapshot {
                                id,
                                dropped,
                                events,
                                outcome: run.outcome.clone(),
                            }
                        }
                        None => Reply::Error {
                            message: format!("no run '{id}' (see `kiln ps`)"),
                        },
                    };
                    let _ = reply.send(answer);
                }
                ActorMsg::Progress(id, event) => {
                    if let Some(run) = self.runs.get_mut(&id) {
                        let seq = run.log.push(event.clone());
                        let reply = Reply::Event {
                            id: id.clone(),
                            seq,
                            event,
                        };
                        // A full or closed subscriber is dropped; its
                        // connection attaches again for a fresh snapshot.
                        run.subscribers
                            .retain(|s| s.try_send(reply.clone()).is_ok());
                    }
                }
                ActorMsg::Done(id, outcome) => {
                    if let Some(run) = self.runs.get_mut(&id) {
                        run.outcome = Some(outcome.clone());
                        let reply = Reply::Done { id, outcome };
                        for s in run.subscribers.drain(..) {
                            let _ = s.try_send(reply.clone());
                        }
                    }
                    self.check_done();
                }
                ActorMsg::Workstation(open, client, model, reply) => {
                    let _ = reply.send(self.workstation(open, client, model));
                }
                ActorMsg::Ask(question, ephemeral, client, reply) => {
                    let _ = reply.send(self.ask(&question, ephemeral, &client));
                }
                ActorMsg::Released => self.check_done(),
                ActorMsg::ResumeInterrupted => self.resume_interrupted(),
                ActorMsg::HostGone(number) => {
                    self.workstations.retain(|w| w.number != number);
                    self.check_done();
                }
                ActorMsg::IdleCheck(period) => {
                    if period == self.idle_period && self.idle() {
                        tracing::info!("daemon idle: exiting");
                        self.exit.notify_one();
                    }
                }
                ActorMsg::Open(id) => {
                    self.runs.insert(
                        id,
                        Run {
                            task: "benchmark".into(),
                            log: RunLog::default(),
                            outcome: None,
                            stop: Arc::new(AtomicBool::new(false)),
                            suspend: Arc::new(AtomicBool::new(false)),
                            subscribers: Vec::new(),
                        },
                    );
                }
                ActorMsg::Shutdown(done) => {
                    // Runs stop with their daemon but do not end: a daemon
                    // started again resumes them (`--resume-on-start`).
                    for run in self.runs.values() {
                        run.suspend.store(true, Ordering::SeqCst);
                        run.stop.store(true, Ordering::SeqCst);
                    }
                    for w in &self.workstations {
                        let _ = w.inbox.send(HostIn::Stop);
                    }
                    if self.all_done() {
                        let _ = done.send(());
                    } else {
                        self.shutdown = Some(done);
                    }
                }
            }
        }
    }

    fn all_done(&self) -> bool {
        self.workstations.is_empty() && self.runs.values().all(|r| r.outcome.is_some())
    }

    /// Who has the model's conversations, said so that the user knows how
    /// to get one back.
    fn engine_holder(&self) -> String {
        let (held, limit) = self.engine.seats();
        let mut holders: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, r)| r.outcome.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let sessions = self
            .workstations
            .iter()
            .filter_map(|w| w.status.borrow().session.clone());
        holders.splice(0..0, sessions);
        let conversations = match limit {
            1 => "the model's one conversation is in use".to_string(),
            _ => format!("all {held} conversations the model runs at once are in use (--conversations {limit})"),
        };
        match holders.first() {
            Some(id) => format!(
                "{conversations}, by {}; `kiln attach {id}` shows one, `kiln stop {id}` ends it",
                holders.join(", ")
            ),
            None => format!("{conversations}; `kiln ps` shows by whom"),
        }
    }

    /// No lease is held and no session is open.
    fn idle(&self) -> bool {
        self.all_done() && !self.engine.leased()
    }

    /// After a run or the workstation ended: finish a shutdown waiting on
    /// it, or start the idle countdown.
    fn check_done(&mut self) {
        if !self.idle() {
            return;
        }
        if let Some(done) = self.shutdown.take() {
            let _ = done.send(());
            return;
        }
        if let Some(after) = self.idle_exit {
            self.idle_period += 1;
            let period = self.idle_period;
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(ActorMsg::IdleCheck(period));
            });
        }
    }

    /// Attach a terminal to a workstation: the one showing the session it
    /// asks for, or the newest for no session in particular. A session no
    /// workstation shows gets a workstation of its own, on a conversation
    /// of its own, where the model has one free; where it has none, the
    /// newest workstation moves to that session.
    fn workstation(
        &mut self,
        open: Open,
        terminal: Client,
        client: Settings,
    ) -> Result<mpsc::UnboundedSender<HostIn>, String> {
        if self.shutdown.is_some() {
            return Err("the daemon is shutting down".into());
        }
        let Some(model) = &self.model else {
            return Err("this daemon has no workstation".into());
        };
        if let Some(asked) = differs(&client, &model.settings) {
            return Err(format!(
                "the daemon runs {} with other settings than {asked}; `kiln stop --daemon` ends it, or use --no-daemon",
                model.model_spec
            ));
        }
        let wanted = match &open {
            Open::Session { query } => {
                Some(self.store.resolve(Some(query)).map_err(|e| e.to_string())?)
            }
            Open::Current | Open::New | Open::Last => None,
        };
        self.idle_period += 1;
        let shows = |w: &WorkstationLink, dir: &std::path::Path| {
            dir.file_name().and_then(|n| n.to_str()) == w.status.borrow().session.as_deref()
        };
        let showing = match (&open, &wanted) {
            (Open::New, _) => None,
            (_, Some(dir)) => self.workstations.iter().find(|w| shows(w, dir)),
            (_, None) => self.workstations.last(),
        };
        if let Some(w) = showing {
            joins(w, &client)?;
            let _ = w.inbox.send(HostIn::Attach(terminal));
            return Ok(w.inbox.clone());
        }
        let Some(lease) = self.engine.lease() else {
            // No conversation free: the newest workstation changes session.
            let (Some(w), Some(dir)) = (self.workstations.last(), wanted) else {
                return Err(self.engine_holder());
            };
            joins(w, &client)?;
            let _ = w.inbox.send(HostIn::Open(dir));
            let _ = w.inbox.send(HostIn::Attach(terminal));
            return Ok(w.inbox.clone());
        };
        let query = match (&open, wanted) {
            (Open::Current | Open::New, _) => None,
            // Nothing saved yet: a new conversation.
            (Open::Last, _) if self.store.list().is_empty() => None,
            (Open::Last, _) => Some(None),
            (Open::Session { .. }, dir) => dir.map(|d| Some(crate::store::id_of(&d))),
        };
        let resumed = match query.map(|q| Resumed::open(&self.store, q.as_deref())) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => return Err(e.to_string()),
        };
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = tokio::sync::watch::channel(workstation::Status::default());
        let mut config = model.config.clone();
        config.agent = client.common.agent.over(config.agent);
        let started = launch::Started {
            paths: model.paths.clone(),
            config,
            engine: lease,
            shape: model.shape.clone(),
            model_spec: model.model_spec.clone(),
            fingerprint: model.fingerprint.clone(),
        };
        // The conversation's agents work where, and ask as, this client said.
        let mut common = model.settings.common.clone();
        common.workspace = Some(client.workspace().to_path_buf());
        common.approval = client.common.approval;
        let keys = model.keys.clone();
        let samples = self.samples.clone();
        let tx = self.tx.clone();
        self.opened += 1;
        let number = self.opened;
        let _ = inbox.send(HostIn::Attach(terminal));
        tokio::spawn(async move {
            let host = Host::new(common, started, keys, samples, resumed).await;
            host.run(inbox_rx, status_tx).await;
            let _ = tx.send(ActorMsg::HostGone(number));
        });
        self.workstations.push(WorkstationLink {
            number,
            inbox: inbox.clone(),
            status,
            workspace: client.workspace().to_path_buf(),
            approval: client.common.approval,
        });
        Ok(inbox)
    }

    /// A conversation for one `kiln ask`, set up as the client's settings
    /// say over the daemon's config, and its question journaled first
    /// unless it is ephemeral.
    fn ask(
        &mut self,
        question: &str,
        ephemeral: bool,
        client: &Settings,
    ) -> std::result::Result<(Lease, Option<JournalHandle>), String> {
        if self.shutdown.is_some() {
            return Err("the daemon is shutting down".into());
        }
        let Some(model) = &self.model else {
            return Err("this daemon answers no questions".into());
        };
        if let Some(asked) = loads_differently(client, &model.settings) {
            return Err(format!(
                "the daemon runs {} with other settings than {asked}",
                model.model_spec
            ));
        }
        let lease = self.engine.lease().ok_or_else(|| self.engine_holder())?;
        let config = model.config.clone().merge(&client.common);
        lease.send(EngineCommand::Reset);
        lease.send(EngineCommand::SetSampler(config.sampling.clone()));
        lease.send(EngineCommand::SetSystemPrompt(config.system_prompt.clone()));
        self.idle_period += 1;
        if ephemeral {
            return Ok((lease, None));
        }
        let journal = self
            .store
            .start_with_question(
                &model.model_spec,
                model.fingerprint.clone(),
                lease.info().context_limit,
                config.system_prompt.as_deref(),
                question,
            )
            .map_err(|why| {
                format!("{why}: the question could not be saved, so it was not answered (--ephemeral answers without saving)")
            })?;
        Ok((lease, Some(journal)))
    }

    fn request(&mut self, req: Request) -> Reply {
        match req {
            Request::List => Reply::Runs {
                runs: self
                    .runs
                    .iter()
                    .map(|(id, r)| {
                        let (tok_s, context_tokens) = r.log.last_call;
                        RunInfo {
                            id: id.clone(),
                            task: r.task.clone(),
                            steps: r.log.steps,
                            outcome: r.outcome.clone(),
                            tok_s,
                            context_tokens,
                        }
                    })
                    .collect(),
                workstations: self
                    .workstations
                    .iter()
                    .map(|w| w.status.borrow().clone())
                    .collect(),
                served: self
                    .served
                    .as_ref()
                    .map(|s| s.borrow().active.clone())
                    .unwrap_or_default(),
            },
            Request::Stop { id } => {
                if let Some(run) = self.runs.get(&id) {
                    run.stop.store(true, Ordering::SeqCst);
                    return Reply::Stopping { id };
                }
                let showing = self
                    .workstations
                    .iter()
                    .find(|w| w.status.borrow().session.as_ref() == Some(&id));
                match showing {
                    Some(w) => {
                        let _ = w.inbox.send(HostIn::Stop);
                        Reply::Stopping { id }
                    }
                    None => Reply::Error {
                        message: format!("no session or run '{id}' in the daemon (see `kiln ps`)"),
                    },
                }
            }
            Request::Shutdown => {
                self.exit.notify_one();
                Reply::ShuttingDown
            }
            Request::Attach { .. }
            | Request::Workstation { .. }
            | Request::Input { .. }
            | Request::Ask { .. } => Reply::Error {
                message: "a terminal attaches with its first request".into(),
            },
            Request::StartAgent { task, settings } => self
                .other_model(&settings)
                .unwrap_or_else(|| self.start(task, &settings)),
            Request::ResumeAgent { id, settings } => self
                .other_model(&settings)
                .unwrap_or_else(|| self.resume(&id, Some(&settings))),
        }
    }

    /// The refusal of a run asked for with other model settings than the
    /// daemon's: one model, loaded once.
    fn other_model(&self, client: &Settings) -> Option<Reply> {
        let asked = differs(client, &self.model.as_ref()?.settings)?;
        Some(Reply::Error {
            message: format!(
                "the daemon runs its model with other settings than {asked}; `kiln stop --daemon` ends it"
            ),
        })
    }

    /// A detached run of `task`, as the client's settings say: its
    /// workspace, approval policy and agent settings, on the daemon's model.
    fn start(&mut self, task: String, client: &Settings) -> Reply {
        let config = self
            .model
            .as_ref()
            .map(|m| m.config.clone())
            .unwrap_or_default();
        let spec = RunSpec::new(
            task,
            client.workspace().to_path_buf(),
            client.common.approval,
            &client.common.agent.over(config.agent),
            &config.sampling,
            &config.mcp,
        );
        if let Err(e) = Workspace::new(&spec.workspace) {
            return Reply::Error {
                message: format!("{}: {e}", spec.workspace.display()),
            };
        }
        let Some(lease) = self.engine.lease() else {
            return Reply::Error {
                message: self.engine_holder(),
            };
        };
        let info = self.engine.info().clone();
        let (journal, _reports) = match self.store.start(&info.name, None, info.context_limit, None)
        {
            Ok(j) => j,
            Err(e) => {
                return Reply::Error {
                    message: format!("cannot journal the run: {e}"),
                }
            }
        };
        self.host(Start::Fresh(spec), journal, lease)
    }

    /// Go on with the run journaled in session `query`, with the budget
    /// flags of the client that asks (`None`: the daemon itself, resuming
    /// what it hosted when it died).
    fn resume(&mut self, query: &str, client: Option<&Settings>) -> Reply {
        let resumable = match resume::open(&self.store, query) {
            Ok(r) => r,
            Err(e) => {
                return Reply::Error {
                    message: e.to_string(),
                }
            }
        };
        let Some(lease) = self.engine.lease() else {
            return Reply::Error {
                message: self.engine_holder(),
            };
        };
        for warning in &resumable.warnings {
            tracing::warn!("{warning}");
        }
        let mut replay = resumable.replay;
        if let Some(client) = client {
            client.common.agent.over_budgets(&mut replay.spec.budgets);
        }
        let (journal, _reports) = journal::spawn(resumable.session);
        self.host(Start::Resume(Box::new(replay)), journal, lease)
    }

    /// On start: resume every run this daemon's store says a daemon hosted
    /// and that never ended (the daemon died under it), as far as the
    /// model has conversations for them.
    fn resume_interrupted(&mut self) {
        let interrupted: Vec<String> = self
            .store
            .interrupted_runs()
            .into_iter()
            .filter(|(_, host)| *host == RunHost::Daemon)
            .map(|(l, _)| l.id)
            .collect();
        for id in interrupted {
            match self.resume(&id, None) {
                Reply::Started { id } => tracing::info!("resumed run {id}"),
                Reply::Error { message } => tracing::warn!("run {id} not resumed: {message}"),
                _ => {}
            }
        }
    }

    /// Host a run on `lease`, journaled to `journal`: its events go to the
    /// actor, and through it to `kiln attach`.
    fn host(&mut self, start: Start, journal: JournalHandle, lease: Lease) -> Reply {
        let id = journal.id.clone();
        self.idle_period += 1;
        let task = start.spec().task.clone();
        let mut run = agent::spawn(
            start,
            RunHost::Daemon,
            (*lease).clone(),
            Some(journal.clone()),
            Nobody,
            Some(pressure(self.samples.clone())),
        );
        self.runs.insert(
            id.clone(),
            Run {
                task,
                log: RunLog::default(),
                outcome: None,
                stop: run.stop.clone(),
                suspend: run.suspend.clone(),
                subscribers: Vec::new(),
            },
        );
        let tx = self.tx.clone();
        let run_id = id.clone();
        tokio::spawn(async move {
            let outcome = loop {
                match run.next().await {
                    Some(RunEvent::Progress(p)) => {
                        let _ = tx.send(ActorMsg::Progress(run_id.clone(), p));
                    }
                    Some(RunEvent::Done(outcome)) => break outcome,
                    None => break Outcome::Failed("the run ended without an outcome".into()),
                }
            };
            let _ = tokio::task::spawn_blocking(move || journal.close()).await;
            drop(lease);
            let _ = tx.send(ActorMsg::Done(run_id, outcome));
        });
        Reply::Started { id }
    }
}

/// A daemon for the benchmarks and tests: the real actor and socket, a
/// scripted engine, and the workstation when `model` is given.
pub fn bench_actor(
    listener: UnixListener,
    engine: EngineHandle,
    paths: &Paths,
    model: Option<Model>,
) -> BenchActor {
    let (tx, rx) = mpsc::unbounded_channel();
    let actor = Actor::new(
        tx.clone(),
        engine,
        SessionStore::new(paths),
        telemetry::spawn(Duration::from_secs(3600)),
        model,
        None,
        Arc::new(tokio::sync::Notify::new()),
    );
    tokio::spawn(actor.run(rx));
    tokio::spawn(super::serve::accept(listener, tx.clone()));
    BenchActor(tx)
}

/// A benchmark's way into the actor: a run with no agent behind it, fed
/// with events.
pub struct BenchActor(mpsc::UnboundedSender<ActorMsg>);

impl BenchActor {
    pub fn open(&self, id: String) {
        let _ = self.0.send(ActorMsg::Open(id));
    }

    pub fn progress(&self, id: String, event: Progress) {
        let _ = self.0.send(ActorMsg::Progress(id, event));
    }

    /// What a daemon started with `--resume-on-start` does first.
    pub fn resume_interrupted(&self) {
        let _ = self.0.send(ActorMsg::ResumeInterrupted);
    }

    /// Stop as a daemon that is told to exit does: its runs suspended.
    pub async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        let _ = self.0.send(ActorMsg::Shutdown(done));
        let _ = stopped.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that goes on for hours keeps its newest events within the
    /// bound, numbers them without a gap, and `kiln ps` still counts every
    /// step.
    #[test]
    fn a_long_run_keeps_its_newest_events_within_the_bound() {
        let mut log = RunLog::default();
        let output = "x".repeat(16 << 10);
        let mut last = 0;
        for step in 1..=2000u32 {
            let call = Progress::Call {
                step,
                call: crate::agent::tools::ToolCall::ReadFile {
                    path: "notes.txt".into(),
                },
                tok_s: Some(step as f64),
                context_tokens: step as usize,
            };
            let result = Progress::Result {
                step,
                ok: true,
                output: output.clone(),
                diff: Some("+".repeat(32 << 10)),
            };
            assert_eq!(log.push(call), last + 1);
            last = log.push(result);
        }
        assert_eq!(last, 4000);
        assert!(log.bytes <= KEPT_EVENT_BYTES, "{}", log.bytes);
        let (dropped, events) = log.snapshot();
        assert!(dropped > 0 && !events.is_empty());
        assert_eq!(dropped + events.len() as u64, 4000);
        assert!(matches!(
            events.last(),
            Some(Progress::Result { step: 2000, .. })
        ));
        assert_eq!(log.steps, 2000);
        assert_eq!(log.last_call, (Some(2000.0), 2000));
        // The snapshot fits one frame.
        let reply = Reply::Snapshot {
            id: "r".into(),
            dropped,
            events,
            outcome: None,
        };
        assert!(serde_json::to_vec(&reply).unwrap().len() < crate::host::protocol::MAX_FRAME);
        // One event bigger than the bound is still kept, alone.
        let mut log = RunLog::default();
        log.push(Progress::Paused {
            reason: "p".repeat(KEPT_EVENT_BYTES + 1),
        });
        assert_eq!(log.snapshot().1.len(), 1);
    }
}
