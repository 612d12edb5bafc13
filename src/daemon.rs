//! `kiln daemon`: the workstation and agent runs, outliving the terminals
//! that started them.
//!
//! The daemon owns the model, hosts the workstation's conversation (any
//! number of terminals attached) and runs agents headless. Clients (`kiln`,
//! `kiln attach`, `kiln agent --detach`, `kiln ps`, `kiln stop`) reach it
//! over a Unix socket private to the user (a 0700 folder, a 0600 socket,
//! and a peer-credential check). No TCP listener. One actor task owns the
//! runs and lends the engine to one user at a time (the workstation or an
//! agent run); connections, runs and the workstation talk to it over
//! channels.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::agent::tools::{Limits, Workspace};
use crate::agent::{pressure, Agent, Budgets, GovernorMode, Nobody, Outcome, Progress};
use crate::cli::Common;
use crate::engine::local::Backend;
use crate::engine::{EngineEvent, EngineHandle};
use crate::error::{KilnError, Result};
use crate::launch;
use crate::paths::Paths;
use crate::protocol::{self, FrameError, Open, Reply, Request, RunInfo, Wanted};
use crate::store::SessionStore;
use crate::telemetry;
use crate::workstation::{self, Client, Host, HostIn, Resumed, Screen, CLIENT_BUFFER};

/// Events a subscriber may fall behind by before it is resynced.
const SUBSCRIBER_BUFFER: usize = 256;

/// The socket of the daemon serving `paths`' data folder: in the user's
/// runtime folder when there is one, named after the data folder so that
/// `--data-dir`/`KILN_HOME` folders each get a daemon of their own.
pub fn socket_path(paths: &Paths) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => {
            use sha2::Digest;
            let data = paths.data.to_string_lossy();
            let tag = hex::encode(&sha2::Sha256::digest(data.as_bytes())[..4]);
            Path::new(&dir)
                .join("kiln")
                .join(format!("daemon-{tag}.sock"))
        }
        _ => paths.data.join("run").join("daemon.sock"),
    }
}

/// Bind the socket with its folder private to this user.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path.parent().expect("the socket has a folder");
    std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir.display(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| KilnError::io(dir.display(), e))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(KilnError::Store(format!(
                "{}: a kiln daemon is already running",
                path.display()
            )));
        }
        // Left by a daemon that died.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| KilnError::io(path.display(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| KilnError::io(path.display(), e))?;
    Ok(listener)
}

enum ActorMsg {
    Request(Request, oneshot::Sender<Reply>),
    Attach(String, mpsc::Sender<Reply>, oneshot::Sender<Reply>),
    Progress(String, Progress),
    Done(String, Outcome, mpsc::UnboundedReceiver<EngineEvent>),
    Shutdown(oneshot::Sender<()>),
    /// A run with no agent behind it, fed by `Progress` messages: the
    /// benchmark's event source.
    Open(String),
    /// A terminal for the workstation; answered with the host's inbox.
    Workstation(
        Open,
        Client,
        /// What the client was started with.
        Wanted,
        oneshot::Sender<Result<mpsc::UnboundedSender<HostIn>, String>>,
    ),
    /// The workstation closed and gave the engine back.
    HostGone(Option<mpsc::UnboundedReceiver<EngineEvent>>),
    /// Exit if still idle since this many idle periods began.
    IdleCheck(u64),
}

/// The model as loaded, for each user the engine is lent to.
struct Model {
    common: Common,
    keys: crate::keys::KeyMap,
    paths: crate::paths::Paths,
    config: crate::config::Config,
    shape: Option<crate::budget::ModelShape>,
    model_spec: String,
    fingerprint: Option<String>,
}

/// The workstation as the actor sees it.
struct WorkstationLink {
    inbox: mpsc::UnboundedSender<HostIn>,
    status: tokio::sync::watch::Receiver<workstation::Status>,
    /// The safety settings of the client that opened it.
    workspace: PathBuf,
    approval: crate::agent::Policy,
}

struct Run {
    task: String,
    events: Vec<Progress>,
    outcome: Option<Outcome>,
    stop: Arc<AtomicBool>,
    subscribers: Vec<mpsc::Sender<Reply>>,
}

struct Actor {
    tx: mpsc::UnboundedSender<ActorMsg>,
    engine: EngineHandle,
    /// The engine's events, lent to the run that uses the engine.
    engine_events: Option<mpsc::UnboundedReceiver<EngineEvent>>,
    store: SessionStore,
    samples: tokio::sync::watch::Receiver<telemetry::Sample>,
    runs: BTreeMap<String, Run>,
    shutdown: Option<oneshot::Sender<()>>,
    /// `None` in the benchmark, which has no workstation.
    model: Option<Model>,
    workstation: Option<WorkstationLink>,
    /// Exit this long after the last run and the workstation end (a daemon
    /// a client started); `None` keeps it running.
    idle_exit: Option<Duration>,
    idle_period: u64,
    exit: Arc<tokio::sync::Notify>,
}

impl Model {
    /// A scripted engine's model with default settings, for the
    /// benchmarks and tests.
    fn fake(common: Common, paths: &Paths) -> Model {
        Model {
            common,
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
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ActorMsg>) {
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
                            Reply::Snapshot {
                                id,
                                events: run.events.clone(),
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
                        run.events.push(event.clone());
                        let seq = run.events.len() as u64;
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
                ActorMsg::Done(id, outcome, events) => {
                    self.engine_events = Some(events);
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
                ActorMsg::HostGone(events) => {
                    self.workstation = None;
                    if events.is_some() {
                        self.engine_events = events;
                    }
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
                            events: Vec::new(),
                            outcome: None,
                            stop: Arc::new(AtomicBool::new(false)),
                            subscribers: Vec::new(),
                        },
                    );
                }
                ActorMsg::Shutdown(done) => {
                    for run in self.runs.values() {
                        run.stop.store(true, Ordering::SeqCst);
                    }
                    if let Some(w) = &self.workstation {
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
        self.workstation.is_none() && self.runs.values().all(|r| r.outcome.is_some())
    }

    /// Who has the engine, said so that the user knows how to get it back.
    fn engine_holder(&self) -> String {
        let id = match &self.workstation {
            Some(w) => w.status.borrow().session.clone(),
            None => self
                .runs
                .iter()
                .find(|(_, r)| r.outcome.is_none())
                .map(|(id, _)| id.clone()),
        };
        let what = if self.workstation.is_some() {
            "the workstation's session"
        } else {
            "agent run"
        };
        match id {
            Some(id) => format!(
                "{what} {id} is using the model; `kiln attach {id}` shows it, `kiln stop {id}` ends it"
            ),
            None => format!("{what} is using the model; `kiln ps` shows it"),
        }
    }

    fn idle(&self) -> bool {
        self.all_done() && self.engine_events.is_some()
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

    /// Attach a terminal to the workstation, opening one (it borrows the
    /// engine) when none is open.
    fn workstation(
        &mut self,
        open: Open,
        client: Client,
        wanted: Wanted,
    ) -> Result<mpsc::UnboundedSender<HostIn>, String> {
        if self.shutdown.is_some() {
            return Err("the daemon is shutting down".into());
        }
        let Some(model) = &self.model else {
            return Err("this daemon has no workstation".into());
        };
        if let Some(asked) = differs(&wanted, &model.common) {
            return Err(format!(
                "the daemon runs {} with other settings than {asked}; `kiln stop --daemon` ends it, or use --no-daemon",
                model.model_spec
            ));
        }
        if let Some(w) = &self.workstation {
            joins(w, &wanted)?;
        }
        let client_settings = wanted;
        let wanted = match &open {
            Open::Session { query } => {
                Some(self.store.resolve(Some(query)).map_err(|e| e.to_string())?)
            }
            Open::Current | Open::Last => None,
        };
        self.idle_period += 1;
        if let Some(w) = &self.workstation {
            if let Some(dir) = wanted {
                let showing = w.status.borrow().session.clone();
                if dir.file_name().and_then(|n| n.to_str()) != showing.as_deref() {
                    let _ = w.inbox.send(HostIn::Open(dir));
                }
            }
            let _ = w.inbox.send(HostIn::Attach(client));
            return Ok(w.inbox.clone());
        }
        let Some(events) = self.engine_events.take() else {
            return Err(self.engine_holder());
        };
        let query = match (&open, wanted) {
            (Open::Current, _) => None,
            // Nothing saved yet: a new conversation.
            (Open::Last, _) if self.store.list().is_empty() => None,
            (Open::Last, _) => Some(None),
            (Open::Session { .. }, dir) => dir.map(|d| Some(crate::store::id_of(&d))),
        };
        let resumed = match query.map(|q| Resumed::open(&self.store, q.as_deref())) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                self.engine_events = Some(events);
                return Err(e.to_string());
            }
        };
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = tokio::sync::watch::channel(workstation::Status::default());
        let started = launch::Started {
            paths: model.paths.clone(),
            config: model.config.clone(),
            handle: self.engine.clone(),
            events,
            shape: model.shape.clone(),
            model_spec: model.model_spec.clone(),
            fingerprint: model.fingerprint.clone(),
        };
        // The conversation's agents work where, and ask as, this client said.
        let mut common = model.common.clone();
        common.workspace = Some(client_settings.workspace().to_path_buf());
        common.approval = client_settings.approval;
        let keys = model.keys.clone();
        let samples = self.samples.clone();
        let tx = self.tx.clone();
        let _ = inbox.send(HostIn::Attach(client));
        tokio::spawn(async move {
            let host = Host::new(common, started, keys, samples, resumed).await;
            let events = host.run(inbox_rx, status_tx).await;
            let _ = tx.send(ActorMsg::HostGone(events));
        });
        self.workstation = Some(WorkstationLink {
            inbox: inbox.clone(),
            status,
            workspace: client_settings.workspace().to_path_buf(),
            approval: client_settings.approval,
        });
        Ok(inbox)
    }

    fn request(&mut self, req: Request) -> Reply {
        match req {
            Request::List => Reply::Runs {
                runs: self
                    .runs
                    .iter()
                    .map(|(id, r)| RunInfo {
                        id: id.clone(),
                        task: r.task.clone(),
                        steps: r
                            .events
                            .iter()
                            .filter(|e| matches!(e, Progress::Call { .. }))
                            .count() as u32,
                        outcome: r.outcome.clone(),
                    })
                    .collect(),
                workstation: self.workstation.as_ref().map(|w| w.status.borrow().clone()),
            },
            Request::Stop { id } => {
                if let Some(run) = self.runs.get(&id) {
                    run.stop.store(true, Ordering::SeqCst);
                    return Reply::Stopping { id };
                }
                match &self.workstation {
                    Some(w) if w.status.borrow().session.as_ref() == Some(&id) => {
                        let _ = w.inbox.send(HostIn::Stop);
                        Reply::Stopping { id }
                    }
                    _ => Reply::Error {
                        message: format!("no session or run '{id}' in the daemon (see `kiln ps`)"),
                    },
                }
            }
            Request::Shutdown => {
                self.exit.notify_one();
                Reply::ShuttingDown
            }
            Request::Attach { .. } | Request::Workstation { .. } | Request::Input { .. } => {
                Reply::Error {
                    message: "a terminal attaches with its first request".into(),
                }
            }
            Request::StartAgent {
                task,
                max_steps,
                max_minutes,
                max_run_tokens,
                governor,
                wanted,
            } => {
                if let Some(asked) = self
                    .model
                    .as_ref()
                    .and_then(|m| differs(&wanted, &m.common))
                {
                    return Reply::Error {
                        message: format!(
                            "the daemon runs its model with other settings than {asked}; `kiln stop --daemon` ends it"
                        ),
                    };
                }
                let budgets = Budgets {
                    max_steps,
                    max_time: Duration::from_secs(max_minutes.saturating_mul(60)),
                    max_tokens: max_run_tokens,
                };
                self.start(task, &wanted, budgets, governor)
            }
        }
    }

    fn start(
        &mut self,
        task: String,
        wanted: &Wanted,
        budgets: Budgets,
        governor: GovernorMode,
    ) -> Reply {
        let workspace = wanted.workspace().to_path_buf();
        let policy = wanted.approval;
        let Some(mut events) = self.engine_events.take() else {
            return Reply::Error {
                message: self.engine_holder(),
            };
        };
        let workspace = match Workspace::new(&workspace) {
            Ok(w) => w,
            Err(e) => {
                self.engine_events = Some(events);
                return Reply::Error {
                    message: format!("{}: {e}", workspace.display()),
                };
            }
        };
        let info = self.engine.info().clone();
        let (journal, _reports) = match self.store.start(&info.name, None, info.context_limit, None)
        {
            Ok(j) => j,
            Err(e) => {
                self.engine_events = Some(events);
                return Reply::Error {
                    message: format!("cannot journal the run: {e}"),
                };
            }
        };
        let id = journal.id.clone();
        self.idle_period += 1;
        let stop = Arc::new(AtomicBool::new(false));
        self.runs.insert(
            id.clone(),
            Run {
                task: task.clone(),
                events: Vec::new(),
                outcome: None,
                stop: stop.clone(),
                subscribers: Vec::new(),
            },
        );
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let samples = self.samples.clone();
        let run_id = id.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let progress_id = run_id.clone();
            let outcome = Agent {
                engine: &engine,
                events: &mut events,
                workspace,
                policy,
                budgets,
                limits: Limits::default(),
                approver: Nobody,
                journal: Some(&journal),
                pressure: Some(pressure(samples)),
                governor,
                stop,
            }
            .run(&task, |p| {
                let _ = progress_tx.send(ActorMsg::Progress(progress_id.clone(), p));
            })
            .await;
            let _ = tokio::task::spawn_blocking(move || journal.close()).await;
            let _ = tx.send(ActorMsg::Done(run_id, outcome, events));
        });
        Reply::Started { id }
    }
}

/// `idle_exit`: exit this long after the last terminal's conversation and
/// run end (a daemon a client started); `None` runs until SIGTERM.
pub async fn run(common: &Common, idle_exit: Option<Duration>) -> Result<i32> {
    let (paths, _) = launch::paths_and_config(common)?;
    let path = socket_path(&paths);
    let listener = bind(&path)?;
    let started = launch::start(common).await?;
    let keys = workstation::key_map(common, &started)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let exit = Arc::new(tokio::sync::Notify::new());
    let actor = Actor {
        tx: tx.clone(),
        engine: started.handle,
        engine_events: Some(started.events),
        store: SessionStore::new(&started.paths),
        samples: telemetry::spawn_with_bandwidth(
            Duration::from_secs(1),
            started.paths.cache.clone(),
        ),
        runs: BTreeMap::new(),
        shutdown: None,
        model: Some(Model {
            common: common.clone(),
            keys,
            paths: started.paths,
            config: started.config,
            shape: started.shape,
            model_spec: started.model_spec,
            fingerprint: started.fingerprint,
        }),
        workstation: None,
        idle_exit,
        idle_period: 0,
        exit: exit.clone(),
    };
    tokio::spawn(actor.run(rx));
    eprintln!("kiln: daemon listening on {}", path.display());
    tracing::info!("daemon listening on {}", path.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| KilnError::io("signal handler", e))?;
    // A daemon no one asked for yet counts as idle from the start.
    let _ = tx.send(ActorMsg::HostGone(None));
    tokio::select! {
        _ = accept(listener, tx.clone()) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = exit.notified() => {}
    }
    // Stop every run and the workstation, and let each close its journal
    // before exiting.
    let (done_tx, done_rx) = oneshot::channel();
    let _ = tx.send(ActorMsg::Shutdown(done_tx));
    let _ = tokio::time::timeout(Duration::from_secs(30), done_rx).await;
    let _ = std::fs::remove_file(&path);
    tracing::info!("daemon stopped");
    Ok(0)
}

/// Connections served at once; more are told so and closed.
const MAX_CONNECTIONS: usize = 256;
/// How long a new connection may take to send its first request.
const FIRST_REQUEST: Duration = Duration::from_secs(10);

/// Accept clients of this user only, each served by a task of its own. An
/// accept that fails (out of file descriptors) backs off instead of
/// spinning, so the clients already connected are still served.
async fn accept(listener: UnixListener, actor: mpsc::UnboundedSender<ActorMsg>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; waiting {} ms", backoff.as_millis());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                tracing::warn!("refused a client of uid {}", cred.uid());
                continue;
            }
            Err(e) => {
                tracing::warn!("refused a client: {e}");
                continue;
            }
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("refused a client: {MAX_CONNECTIONS} connections are open");
            tokio::spawn(async move {
                let mut stream = stream;
                let busy = Reply::Error {
                    message: format!("the daemon serves {MAX_CONNECTIONS} connections already"),
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    protocol::write(&mut stream, &busy),
                )
                .await;
            });
            continue;
        };
        let actor = actor.clone();
        tokio::spawn(async move {
            serve(stream, actor).await;
            drop(slot);
        });
    }
}

/// Whether the daemon can take a request from a client at all: every size
/// and length in it within bounds. Anything else closes that client.
fn check(req: &Request) -> std::result::Result<(), String> {
    const MAX_TEXT: usize = 1 << 20;
    const MAX_NAME: usize = 4096;
    let long = |what: &str, n: usize, max: usize| {
        (n > max).then(|| format!("{what} of {n} bytes is over the {max}-byte limit"))
    };
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let wanted_ok = |w: &Wanted| {
        [
            ("a model name", len(&w.model), MAX_NAME),
            ("an engine name", len(&w.engine), MAX_NAME),
            ("a KV type", len(&w.kv_type), MAX_NAME),
            ("a system prompt", len(&w.system), MAX_TEXT),
            (
                "a workspace",
                w.workspace.as_ref().map_or(0, |p| p.as_os_str().len()),
                MAX_NAME,
            ),
            ("a folder", w.cwd.as_os_str().len(), MAX_NAME),
        ]
        .into_iter()
        .find_map(|(what, n, max)| long(what, n, max))
    };
    let problem = match req {
        Request::StartAgent { task, wanted, .. } => {
            long("a task", task.len(), MAX_TEXT).or_else(|| wanted_ok(wanted))
        }
        Request::Stop { id } | Request::Attach { id } => long("an id", id.len(), MAX_NAME),
        Request::Workstation {
            open,
            size,
            theme,
            wanted,
            ..
        } => workstation::check_size(*size)
            .err()
            .or_else(|| long("a theme name", len(theme), MAX_NAME))
            .or_else(|| match open {
                Open::Session { query } => long("a session id", query.len(), MAX_NAME),
                _ => None,
            })
            .or_else(|| wanted_ok(wanted)),
        Request::Input { input } => input.check().err(),
        Request::List | Request::Shutdown => None,
    };
    problem.map_or(Ok(()), Err)
}

/// One client connection: requests in, replies out. A malformed or
/// oversized frame, or one with a field out of bounds, closes this client
/// only.
async fn serve(stream: UnixStream, actor: mpsc::UnboundedSender<ActorMsg>) {
    let (mut read, mut write) = stream.into_split();
    let mut first = true;
    loop {
        let next = protocol::read(&mut read);
        let req: std::result::Result<Request, FrameError> = if first {
            match tokio::time::timeout(FIRST_REQUEST, next).await {
                Ok(r) => r,
                Err(_) => Err(FrameError::Malformed(format!(
                    "no request within {} s",
                    FIRST_REQUEST.as_secs()
                ))),
            }
        } else {
            next.await
        };
        first = false;
        let req = match req {
            Ok(r) => check(&r).map(|_| r),
            Err(FrameError::Closed) => return,
            Err(e) => Err(e.to_string()),
        };
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("closing a client: {e}");
                let _ = protocol::write(&mut write, &Reply::Error { message: e }).await;
                return;
            }
        };
        match req {
            Request::Attach { id } => {
                follow(&mut write, &actor, id).await;
                return;
            }
            Request::Workstation {
                open,
                size,
                theme,
                no_color,
                wanted,
            } => {
                let client = (size, theme, no_color, wanted);
                terminal(&mut read, &mut write, &actor, open, client).await;
                return;
            }
            _ => {}
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        if actor.send(ActorMsg::Request(req, reply_tx)).is_err() {
            return;
        }
        let Ok(reply) = reply_rx.await else { return };
        if protocol::write(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

/// Serve one terminal of the workstation: its input to the host, the
/// host's screens back, until either side goes. The client going detaches
/// it; the conversation goes on.
async fn terminal(
    read: &mut tokio::net::unix::OwnedReadHalf,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    actor: &mpsc::UnboundedSender<ActorMsg>,
    open: Open,
    (size, theme, no_color, wanted): ((u16, u16), Option<String>, bool, Wanted),
) {
    let refuse = |message: String| Reply::Error { message };
    let (out, mut screens) = mpsc::channel(CLIENT_BUFFER);
    let client = Client::new(size, theme, no_color, out);
    let id = client.id;
    let (reply_tx, reply_rx) = oneshot::channel();
    let _ = actor.send(ActorMsg::Workstation(open, client, wanted, reply_tx));
    let inbox = match reply_rx.await {
        Ok(Ok(inbox)) => inbox,
        Ok(Err(message)) => {
            let _ = protocol::write(write, &refuse(message)).await;
            return;
        }
        Err(_) => return,
    };
    loop {
        tokio::select! {
            req = protocol::read::<Request, _>(read) => match req {
                Ok(Request::Input { input }) => {
                    if let Err(e) = input.check() {
                        tracing::warn!("closing a terminal: {e}");
                        let _ = protocol::write(write, &refuse(e)).await;
                        break;
                    }
                    if inbox.send(HostIn::Input { client: id, input }).is_err() {
                        break;
                    }
                }
                Ok(other) => {
                    tracing::warn!("closing a terminal: {other:?} while attached");
                    let reply = refuse("only input while attached".into());
                    let _ = protocol::write(write, &reply).await;
                    break;
                }
                Err(FrameError::Closed) => break,
                Err(e) => {
                    tracing::warn!("closing a terminal: {e}");
                    let _ = protocol::write(write, &refuse(e.to_string())).await;
                    break;
                }
            },
            screen = screens.recv() => {
                let (reply, last) = match screen {
                    Some(Screen::Frame(text)) => (Reply::Screen { text }, false),
                    Some(Screen::Closed(reason)) => (Reply::Closed { reason }, true),
                    None => (Reply::Closed { reason: "the workstation is gone".into() }, true),
                };
                if protocol::write(write, &reply).await.is_err() || last {
                    break;
                }
            }
        }
    }
    let _ = inbox.send(HostIn::Detach(id));
}

/// Stream a run to an attached client: a snapshot, then live events. When
/// the client falls behind (its buffer filled and the actor dropped it), it
/// gets a fresh snapshot and goes on.
async fn follow(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    actor: &mpsc::UnboundedSender<ActorMsg>,
    id: String,
) {
    loop {
        let (sub_tx, mut sub_rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let (reply_tx, reply_rx) = oneshot::channel();
        if actor
            .send(ActorMsg::Attach(id.clone(), sub_tx, reply_tx))
            .is_err()
        {
            return;
        }
        let Ok(snapshot) = reply_rx.await else { return };
        let finished = matches!(
            &snapshot,
            Reply::Snapshot {
                outcome: Some(_),
                ..
            } | Reply::Error { .. }
        );
        if protocol::write(write, &snapshot).await.is_err() || finished {
            return;
        }
        while let Some(reply) = sub_rx.recv().await {
            let done = matches!(reply, Reply::Done { .. });
            if protocol::write(write, &reply).await.is_err() || done {
                return;
            }
        }
    }
}

/// Connect to the daemon, starting one in the background when none runs.
pub async fn connect(common: &Common, start: bool) -> Result<UnixStream> {
    let (paths, _) = launch::paths_and_config(common)?;
    let path = socket_path(&paths);
    if let Ok(s) = UnixStream::connect(&path).await {
        return Ok(s);
    }
    if !start {
        return Err(KilnError::Store(format!(
            "no kiln daemon runs ({}); `kiln agent --detach` starts one",
            path.display()
        )));
    }
    let exe = std::env::current_exe().map_err(|e| KilnError::io("kiln", e))?;
    let mut cmd = std::process::Command::new(exe);
    // It exits a minute after its last conversation and run end, so a
    // model no one uses does not stay in memory.
    cmd.args(["daemon", "--idle-exit", "60"]);
    cmd.args(daemon_args(common));
    use std::os::unix::process::CommandExt;
    // Its one-line error (a bad model, a bad config) is kept for the client.
    let stderr = std::fs::create_dir_all(&paths.logs)
        .and_then(|_| crate::store::atomic::open_private(&startup_log(&paths), true))
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    // A session of its own, so the terminal hanging up does not reach it.
    // SAFETY: setsid in the child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| KilnError::io("kiln daemon", e))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = UnixStream::connect(&path).await {
            // Reap it whenever it exits.
            std::thread::spawn(move || child.wait());
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(KilnError::Store(
                why_it_stopped(common)
                    .unwrap_or_else(|| format!("the kiln daemon exited ({status})")),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(KilnError::Store(format!(
                "the kiln daemon did not start (see the log); {}",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a daemon a client started writes its stderr.
fn startup_log(paths: &Paths) -> PathBuf {
    paths.logs.join("daemon-stderr.log")
}

/// Why the daemon went away: the last line it wrote, when a client
/// started it.
pub fn why_it_stopped(common: &Common) -> Option<String> {
    let (paths, _) = launch::paths_and_config(common).ok()?;
    let text = std::fs::read_to_string(startup_log(&paths)).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.contains("daemon listening"))
        .map(|l| l.trim_start_matches("kiln: ").to_string())
}

/// What a client wants that the daemon's model and engine settings are
/// not, in words (each setting as its flag).
fn differs(wanted: &Wanted, common: &Common) -> Option<String> {
    let mut asked = Vec::new();
    if let Some(m) = wanted
        .model
        .as_ref()
        .filter(|m| Some(*m) != common.model.as_ref())
    {
        asked.push(format!("--model {m}"));
    }
    if let Some(e) = &wanted.engine {
        let same = match (Backend::parse(e), Backend::parse(&common.engine)) {
            (Some(a), Some(b)) => a == b,
            _ => *e == common.engine,
        };
        if !same {
            asked.push(format!("--engine {e}"));
        }
    }
    if let Some(kv) = wanted
        .kv_type
        .as_ref()
        .filter(|kv| **kv != common.kv_type.name())
    {
        asked.push(format!("--kv-type {kv}"));
    }
    let window = wanted.window.clone().unwrap_or_default();
    if window != common.window {
        let theirs = common.window.flags();
        let before = asked.len();
        for (flag, v) in window.flags() {
            if !theirs.contains(&(flag, v.clone())) {
                asked.push(format!("{flag} {v}"));
            }
        }
        if asked.len() == before {
            // Only defaults asked where the daemon has flags.
            asked.push("the default rope, flash-attention and K/V settings".into());
        }
    }
    fn text<T: ToString>(v: Option<T>) -> Option<String> {
        v.map(|v| v.to_string())
    }
    let quoted = |v: &Option<String>| {
        v.as_ref()
            .map(|v| format!("{:?}", crate::visible::visible_line(v)))
    };
    let s = &common.sampling;
    let settings = [
        ("--ctx", text(wanted.ctx), text(common.ctx)),
        ("--system", quoted(&wanted.system), quoted(&common.system)),
        (
            "--temperature",
            text(wanted.temperature),
            text(s.temperature),
        ),
        ("--top-p", text(wanted.top_p), text(s.top_p)),
        (
            "--repeat-penalty",
            text(wanted.repeat_penalty),
            text(s.repeat_penalty),
        ),
        ("--seed", text(wanted.seed), text(s.seed)),
        ("--max-tokens", text(wanted.max_tokens), text(s.max_tokens)),
        ("--think", wanted.think.map(on_off), s.think.map(on_off)),
    ];
    for (flag, mine, theirs) in settings {
        if let Some(v) = mine.filter(|v| Some(v) != theirs.as_ref()) {
            asked.push(format!("{flag} {v}"));
        }
    }
    (!asked.is_empty()).then(|| asked.join(" "))
}

/// Whether a client may join the open conversation: its agents must work
/// where the client said (when it said) and ask at least what it asked.
fn joins(w: &WorkstationLink, wanted: &Wanted) -> std::result::Result<(), String> {
    if let Some(ws) = wanted.workspace.as_ref().filter(|ws| **ws != w.workspace) {
        return Err(format!(
            "the open session's agents work in {}, not --workspace {}; `kiln stop ID` closes it first",
            crate::visible::visible_line(&w.workspace.to_string_lossy()),
            crate::visible::visible_line(&ws.to_string_lossy())
        ));
    }
    if !w.approval.asks_at_least(wanted.approval) {
        return Err(format!(
            "the open session runs agents with --approval {}, which asks less than this terminal's --approval {}; attach with --approval {} to accept that",
            w.approval.name(),
            wanted.approval.name(),
            w.approval.name()
        ));
    }
    Ok(())
}

fn on_off(v: bool) -> String {
    match v {
        true => "on".into(),
        false => "off".into(),
    }
}

fn daemon_args(common: &Common) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut pair = |flag: &str, value: Option<std::ffi::OsString>| {
        if let Some(v) = value {
            args.push(flag.into());
            args.push(v);
        }
    };
    pair("--model", common.model.clone().map(Into::into));
    pair("--data-dir", common.data_dir.clone().map(Into::into));
    pair("--config", common.config.clone().map(Into::into));
    pair("--ctx", common.ctx.map(|c| c.to_string().into()));
    pair("--system", common.system.clone().map(Into::into));
    pair("--engine", Some(common.engine.clone().into()));
    pair("--kv-type", Some(common.kv_type.name().into()));
    for (flag, value) in common.window.flags() {
        pair(flag, Some(value.into()));
    }
    pair(
        "--workspace",
        common
            .workspace
            .as_ref()
            .map(|w| w.canonicalize().unwrap_or_else(|_| w.clone()).into()),
    );
    let policy = clap::ValueEnum::to_possible_value(&common.approval)
        .map(|v| v.get_name().to_string().into());
    pair("--approval", policy);
    let s = &common.sampling;
    pair("--temperature", s.temperature.map(|v| v.to_string().into()));
    pair("--top-p", s.top_p.map(|v| v.to_string().into()));
    pair(
        "--repeat-penalty",
        s.repeat_penalty.map(|v| v.to_string().into()),
    );
    pair("--seed", s.seed.map(|v| v.to_string().into()));
    pair("--max-tokens", s.max_tokens.map(|v| v.to_string().into()));
    pair("--think", s.think.map(|v| on_off(v).into()));
    if common.allow_swap {
        args.push("--allow-swap".into());
    }
    args
}

/// One request, one reply.
pub async fn ask(stream: &mut UnixStream, req: &Request) -> Result<Reply> {
    protocol::write(stream, req)
        .await
        .map_err(|e| KilnError::io("daemon", e))?;
    protocol::read(stream)
        .await
        .map_err(|e| KilnError::Store(format!("daemon: {e}")))
}

#[derive(Debug, serde::Serialize)]
pub struct DeliveryFigures {
    pub clients: usize,
    pub events: usize,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// Events per second each client received, publishing flat out.
    pub throughput_per_client: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ScreenFigures {
    pub clients: usize,
    /// From a key sent by one terminal to the frame showing it, at every
    /// attached terminal.
    pub echo_p50_ms: f64,
    pub echo_p99_ms: f64,
    /// Tokens of a streamed answer per second until each terminal shows the
    /// last one (the fake engine streams as fast as the host takes them).
    pub tokens_per_s_per_client: f64,
}

/// `kiln bench --daemon`, the workstation part: the real actor, host,
/// socket and framing, with a scripted engine. Each round types a key in
/// the first terminal and waits until every terminal shows it.
pub async fn bench_screens(clients: usize, rounds: usize) -> Result<ScreenFigures> {
    use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
    let bench_error = |e: std::io::Error| KilnError::io("bench client", e);
    let dir = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let path = dir.path().join("daemon.sock");
    let listener = bind(&path)?;
    const TOKENS: usize = 500;
    let answer = (0..TOKENS)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let paths = Paths::under(dir.path());
    let model = Model::fake(Common::default(), &paths);
    let engine = crate::engine::fake::FakeEngine::new([answer]);
    bench_daemon(listener, engine, &paths, Some(model));

    let mut readers = Vec::new();
    let mut writer = None;
    let mut idle_writers = Vec::new();
    // Each terminal reports when it sees `marker`, asked for by the bench.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, std::time::Instant)>();
    let mut markers = Vec::new();
    for i in 0..clients {
        let s = UnixStream::connect(&path).await.map_err(bench_error)?;
        let (mut read, mut write) = s.into_split();
        let hello = Request::Workstation {
            open: Open::Current,
            size: (120, 40),
            theme: None,
            no_color: true,
            wanted: Wanted::default(),
        };
        protocol::write(&mut write, &hello)
            .await
            .map_err(bench_error)?;
        let (marker_tx, mut marker_rx) = tokio::sync::watch::channel(String::new());
        markers.push(marker_tx);
        let seen = seen_tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Reply::Screen { text }) = protocol::read::<Reply, _>(&mut read).await {
                let marker = marker_rx.borrow_and_update().clone();
                if !marker.is_empty() && text.contains(&marker) {
                    let _ = seen.send((i, std::time::Instant::now()));
                }
            }
        }));
        if i == 0 {
            writer = Some(write);
        } else {
            // Kept open: dropping it would detach this terminal.
            idle_writers.push(write);
        }
    }
    let mut write = writer.expect("one client at least");
    let send_key = |code: KeyCode| {
        let input = crate::workstation::Input::Event {
            event: Event::Key(KeyEvent::new(code, KeyModifiers::NONE)),
        };
        protocol::encode(&Request::Input { input })
    };
    use tokio::io::AsyncWriteExt;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut echo = Vec::new();
    for round in 0..rounds {
        // A letter no escape sequence or other text on screen holds.
        let marker = if round % 2 == 0 { "Q" } else { "Z" };
        for m in &markers {
            m.send_replace(marker.to_string());
        }
        let code = KeyCode::Char(marker.chars().next().expect("one letter"));
        let sent = std::time::Instant::now();
        write
            .write_all(&send_key(code))
            .await
            .map_err(bench_error)?;
        for at in seen_by_all(&mut seen_rx, clients).await {
            echo.push(at.duration_since(sent).as_secs_f64() * 1e3);
        }
        write
            .write_all(&send_key(KeyCode::Backspace))
            .await
            .map_err(bench_error)?;
        // Past the ~30 frames/s cap, so that the key is drawn at once:
        // what is measured is the path, not the frame pacing.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in &markers {
        m.send_replace(format!("t{}", TOKENS - 1));
    }
    let sent = std::time::Instant::now();
    write
        .write_all(&send_key(KeyCode::Char('g')))
        .await
        .map_err(bench_error)?;
    write
        .write_all(&send_key(KeyCode::Enter))
        .await
        .map_err(bench_error)?;
    let delivered = seen_by_all(&mut seen_rx, clients).await;
    let slowest = delivered.iter().max().copied().unwrap_or(sent);
    for r in readers {
        r.abort();
    }
    drop(idle_writers);
    echo.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        echo.get(((echo.len() as f64 * q) as usize).min(echo.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(ScreenFigures {
        clients,
        echo_p50_ms: pick(0.5),
        echo_p99_ms: pick(0.99),
        tokens_per_s_per_client: if delivered.len() == clients {
            TOKENS as f64 / slowest.duration_since(sent).as_secs_f64()
        } else {
            f64::NAN
        },
    })
}

/// A daemon for the benchmarks: the real actor and socket, a scripted
/// engine, and the workstation when `model` is given.
fn bench_daemon(
    listener: UnixListener,
    engine: crate::engine::fake::FakeEngine,
    paths: &Paths,
    model: Option<Model>,
) -> mpsc::UnboundedSender<ActorMsg> {
    let (engine, engine_events) = crate::engine::spawn(engine);
    let (tx, rx) = mpsc::unbounded_channel();
    let actor = Actor {
        tx: tx.clone(),
        engine,
        engine_events: Some(engine_events),
        store: SessionStore::new(paths),
        samples: telemetry::spawn(Duration::from_secs(3600)),
        runs: BTreeMap::new(),
        shutdown: None,
        model,
        workstation: None,
        idle_exit: None,
        idle_period: 0,
        exit: Arc::new(tokio::sync::Notify::new()),
    };
    tokio::spawn(actor.run(rx));
    tokio::spawn(accept(listener, tx.clone()));
    tx
}

/// When each of `n` terminals reported its marker (fewer after 10 s).
async fn seen_by_all(
    seen: &mut mpsc::UnboundedReceiver<(usize, std::time::Instant)>,
    n: usize,
) -> Vec<std::time::Instant> {
    let mut at = Vec::with_capacity(n);
    while at.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
            Ok(Some((_, t))) => at.push(t),
            _ => break,
        }
    }
    at
}

/// `kiln bench --daemon`: the daemon's own actor, framing and socket, with
/// an event source in place of an agent. Latency is from publishing an event
/// to a client having decoded it, at 1,000 events/s; throughput publishes as
/// fast as the actor takes them.
pub async fn bench_delivery(clients: usize, events: usize) -> Result<DeliveryFigures> {
    let dir = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let path = dir.path().join("daemon.sock");
    let listener = bind(&path)?;
    let engine = crate::engine::fake::FakeEngine::new(Vec::<String>::new());
    let tx = bench_daemon(listener, engine, &Paths::under(dir.path()), None);
    let mut figures = Vec::new();
    for (round, paced) in [("latency", true), ("throughput", false)] {
        let id = format!("bench-{round}");
        let _ = tx.send(ActorMsg::Open(id.clone()));
        let mut readers = Vec::new();
        for _ in 0..clients {
            let mut s = UnixStream::connect(&path)
                .await
                .map_err(|e| KilnError::io("bench client", e))?;
            protocol::write(&mut s, &Request::Attach { id: id.clone() })
                .await
                .map_err(|e| KilnError::io("bench client", e))?;
            let _snapshot: Reply = protocol::read(&mut s)
                .await
                .map_err(|e| KilnError::Store(e.to_string()))?;
            readers.push(tokio::spawn(async move {
                let mut got = Vec::with_capacity(events);
                while got.len() < events {
                    match protocol::read::<Reply, _>(&mut s).await {
                        Ok(Reply::Event { .. }) => got.push(std::time::Instant::now()),
                        // Fell behind and was resynced: the snapshot delivers
                        // what was missed, now.
                        Ok(Reply::Snapshot { events: all, .. }) => {
                            let now = std::time::Instant::now();
                            got.resize(all.len().max(got.len()), now);
                        }
                        _ => break,
                    }
                }
                got
            }));
        }
        let start = std::time::Instant::now();
        let mut sent = Vec::with_capacity(events);
        for i in 0..events {
            sent.push(std::time::Instant::now());
            let _ = tx.send(ActorMsg::Progress(id.clone(), Progress::Resumed));
            if paced {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else if i % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut latencies = Vec::new();
        let mut last = start;
        for r in readers {
            let got = r.await.map_err(|e| KilnError::Engine(e.to_string()))?;
            for (i, at) in got.iter().enumerate() {
                latencies.push(at.duration_since(sent[i]).as_secs_f64() * 1e6);
                last = last.max(*at);
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pick =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        figures.push((
            pick(0.5),
            pick(0.99),
            events as f64 / last.duration_since(start).as_secs_f64(),
        ));
    }
    Ok(DeliveryFigures {
        clients,
        events,
        latency_p50_us: figures[0].0,
        latency_p99_us: figures[0].1,
        throughput_per_client: figures[1].2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_started_with_other_settings_is_told_what_differs() {
        let daemon = Common {
            engine: "llamacpp".into(),
            model: Some("a.gguf".into()),
            ..Default::default()
        };
        let same = Wanted {
            model: Some("a.gguf".into()),
            engine: Some("local".into()),
            kv_type: Some("f16".into()),
            ..Wanted::default()
        };
        assert_eq!(differs(&same, &daemon), None);
        assert_eq!(differs(&Wanted::default(), &daemon), None);
        let other = Wanted {
            model: Some("b.gguf".into()),
            engine: Some("kalosm".into()),
            kv_type: Some("q8_0".into()),
            ..Wanted::default()
        };
        assert_eq!(
            differs(&other, &daemon).unwrap(),
            "--model b.gguf --engine kalosm --kv-type q8_0"
        );
    }

    /// A daemon with the workstation over a scripted engine, on a socket in
    /// `dir`, started with `common`.
    fn fake_daemon_with(dir: &Path, common: Common) -> PathBuf {
        let path = dir.join("daemon.sock");
        let listener = bind(&path).unwrap();
        let paths = Paths::under(dir);
        let model = Model::fake(common, &paths);
        let engine = crate::engine::fake::FakeEngine::new(["hello there"]);
        bench_daemon(listener, engine, &paths, Some(model));
        path
    }

    fn fake_daemon(dir: &Path) -> PathBuf {
        fake_daemon_with(dir, Common::default())
    }

    /// A daemon started by `kiln agent --detach --approval auto` in one
    /// folder: a terminal asking for `ask` in another gets a conversation
    /// of its own settings, not the daemon's.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_daemon_never_lends_its_settings_to_a_terminal() {
        use crate::agent::Policy;
        let dir = tempfile::tempdir().unwrap();
        let daemon = Common {
            approval: Policy::Auto,
            workspace: Some("/daemon/folder".into()),
            ..Default::default()
        };
        let path = fake_daemon_with(dir.path(), daemon);
        let terminal = |approval, workspace: &str| Request::Workstation {
            open: Open::Current,
            size: (80, 24),
            theme: None,
            no_color: true,
            wanted: Wanted {
                approval,
                workspace: Some(workspace.into()),
                cwd: "/".into(),
                ..Wanted::default()
            },
        };
        let mut first = UnixStream::connect(&path).await.unwrap();
        protocol::write(&mut first, &terminal(Policy::Ask, "/mine"))
            .await
            .unwrap();
        let reply = protocol::read::<Reply, _>(&mut first).await.unwrap();
        assert!(matches!(reply, Reply::Screen { .. }), "{reply:?}");
        // The conversation asks, and works in /mine: another terminal that
        // asks the same joins; one naming the daemon's folder does not.
        let mut same = UnixStream::connect(&path).await.unwrap();
        protocol::write(&mut same, &terminal(Policy::Ask, "/mine"))
            .await
            .unwrap();
        let reply = protocol::read::<Reply, _>(&mut same).await.unwrap();
        assert!(matches!(reply, Reply::Screen { .. }), "{reply:?}");
        let reply = exchange(
            &path,
            &protocol::encode(&terminal(Policy::Ask, "/daemon/folder")),
        )
        .await;
        assert!(
            matches!(&reply, Some(Reply::Error { message }) if message.contains("/mine")),
            "{reply:?}"
        );
    }

    /// Send `bytes` on a new connection; the first reply, if any comes
    /// within a second.
    async fn exchange(path: &Path, bytes: &[u8]) -> Option<Reply> {
        use tokio::io::AsyncWriteExt;
        let mut s = UnixStream::connect(path).await.unwrap();
        let _ = s.write_all(bytes).await;
        tokio::time::timeout(Duration::from_secs(1), protocol::read::<Reply, _>(&mut s))
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    async fn still_serves(path: &Path) {
        let reply = exchange(path, &protocol::encode(&Request::List)).await;
        assert!(matches!(reply, Some(Reply::Runs { .. })), "{reply:?}");
    }

    fn frame(value: &serde_json::Value) -> Vec<u8> {
        let body = serde_json::to_vec(value).unwrap();
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    }

    /// Every leaf of `v` replaced, with some probability, by a hostile
    /// value: huge and negative numbers, long strings with escapes, paths,
    /// wrong types.
    fn mutate(v: &mut serde_json::Value, rng: &mut rand::rngs::StdRng) {
        use rand::Rng;
        use serde_json::{json, Value};
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k != "v" && k != "type" {
                        mutate(child, rng);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|c| mutate(c, rng)),
            leaf => {
                if rng.gen_bool(0.5) {
                    let choices = [
                        json!(65535),
                        json!(0),
                        json!(-1),
                        json!(4294967295u64),
                        json!(u64::MAX),
                        json!(1e300),
                        json!(null),
                        json!([65535, 65535]),
                        json!({"kind": "session", "query": "../../../etc"}),
                        json!("/"),
                        json!("../../.."),
                        json!("\u{1b}]2;x\u{7}"),
                        json!("x".repeat(rng.gen_range(0..300_000))),
                        json!(true),
                    ];
                    *leaf = choices[rng.gen_range(0..choices.len())].clone();
                }
            }
        }
    }

    /// Sizes, lengths and counts that arrive from a client are bounded
    /// before use, in every message type and field: a frame over a bound
    /// closes that client only, the daemon serves the next, and what it
    /// allocates follows the bytes that arrived.
    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_clients_close_only_themselves() {
        use rand::SeedableRng;
        let dir = tempfile::tempdir().unwrap();
        let path = fake_daemon(dir.path());
        let hello = |size: (u16, u16)| Request::Workstation {
            open: Open::Current,
            size,
            theme: None,
            no_color: true,
            wanted: Wanted::default(),
        };
        // A terminal of 65535x65535, at attach and in a resize.
        for size in [(65535, 65535), (u16::MAX, 1), (1, u16::MAX)] {
            let reply = exchange(&path, &protocol::encode(&hello(size))).await;
            assert!(
                matches!(&reply, Some(Reply::Error { message }) if message.contains("larger than")),
                "{reply:?}"
            );
            still_serves(&path).await;
        }
        let mut s = UnixStream::connect(&path).await.unwrap();
        protocol::write(&mut s, &hello((80, 24))).await.unwrap();
        let resize = Request::Input {
            input: crate::workstation::Input::Event {
                event: crossterm::event::Event::Resize(65535, 65535),
            },
        };
        protocol::write(&mut s, &resize).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), protocol::read::<Reply, _>(&mut s))
                .await
                .expect("an answer")
            {
                Ok(Reply::Screen { .. }) => continue,
                Ok(Reply::Error { message }) => {
                    assert!(message.contains("larger than"), "{message}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        still_serves(&path).await;

        // Lengths announced and never sent: memory follows the bytes.
        let before = crate::procinfo::current_rss_bytes().unwrap_or(0);
        let mut idle = Vec::new();
        for _ in 0..200 {
            use tokio::io::AsyncWriteExt;
            let mut c = UnixStream::connect(&path).await.unwrap();
            c.write_all(&(protocol::MAX_FRAME as u32).to_be_bytes())
                .await
                .unwrap();
            c.write_all(&[b'{'; 1000]).await.unwrap();
            idle.push(c);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        still_serves(&path).await;
        let grown = crate::procinfo::current_rss_bytes()
            .unwrap_or(0)
            .saturating_sub(before);
        assert!(grown < 200 << 20, "200 half-sent frames took {grown} bytes");
        drop(idle);

        // Every message type with its fields mutated.
        let templates = [
            Request::StartAgent {
                task: "t".into(),
                max_steps: 1,
                max_minutes: 1,
                max_run_tokens: 10,
                governor: GovernorMode::Ignore,
                wanted: Wanted::default(),
            },
            Request::List,
            Request::Stop { id: "x".into() },
            Request::Attach { id: "x".into() },
            hello((80, 24)),
            Request::Input {
                input: crate::workstation::Input::Paste {
                    pasted: crate::app::Pasted::new("p".into()),
                },
            },
            Request::Input {
                input: crate::workstation::Input::Event {
                    event: crossterm::event::Event::Resize(80, 24),
                },
            },
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for round in 0..300 {
            let mut value: serde_json::Value =
                serde_json::from_slice(&protocol::encode(&templates[round % templates.len()])[4..])
                    .unwrap();
            mutate(&mut value, &mut rng);
            let bytes = frame(&value);
            if bytes.len() - 4 > protocol::MAX_FRAME {
                continue;
            }
            let _ = exchange(&path, &bytes).await;
            if round % 20 == 0 {
                still_serves(&path).await;
            }
        }
        still_serves(&path).await;
    }

    /// A paste is cut to the terminal's limit however a client sends it.
    #[test]
    fn a_paste_from_a_client_is_cut_again() {
        let big = serde_json::json!({"text": "x".repeat(3 << 20), "total": 5});
        let pasted: crate::app::Pasted = serde_json::from_value(big).unwrap();
        assert_eq!(pasted.text.len(), crate::app::MAX_PASTE_BYTES);
        assert_eq!(pasted.total, 3 << 20);
    }

    /// A client's safety settings are its own: it joins an open
    /// conversation only where that asks at least as much and works where
    /// the client said.
    #[test]
    fn joining_never_downgrades_approval_or_moves_the_workspace() {
        use crate::agent::Policy;
        let (inbox, _) = mpsc::unbounded_channel();
        let (_, status) = tokio::sync::watch::channel(workstation::Status::default());
        let open = |approval| WorkstationLink {
            inbox: inbox.clone(),
            status: status.clone(),
            workspace: "/work/a".into(),
            approval,
        };
        let client = |approval, workspace: Option<&str>| Wanted {
            approval,
            workspace: workspace.map(PathBuf::from),
            cwd: "/elsewhere".into(),
            ..Wanted::default()
        };
        let auto = open(Policy::Auto);
        let e = joins(&auto, &client(Policy::Ask, None)).unwrap_err();
        assert!(e.contains("--approval auto"), "{e}");
        assert!(joins(&auto, &client(Policy::AutoRead, None)).is_err());
        assert!(joins(&auto, &client(Policy::Auto, None)).is_ok());
        let ask = open(Policy::Ask);
        for p in [Policy::Ask, Policy::AutoRead, Policy::Auto] {
            assert!(joins(&ask, &client(p, None)).is_ok());
        }
        let e = joins(&ask, &client(Policy::Ask, Some("/work/b"))).unwrap_err();
        assert!(e.contains("/work/b"), "{e}");
        assert!(joins(&ask, &client(Policy::Ask, Some("/work/a"))).is_ok());
        // Settings of the model the client names are refused by name.
        let daemon = Common {
            sampling: crate::cli::SamplingArgs {
                temperature: Some(0.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let hot = Wanted {
            temperature: Some(0.9),
            ctx: Some(1024),
            ..Wanted::default()
        };
        assert_eq!(
            differs(&hot, &daemon).unwrap(),
            "--ctx 1024 --temperature 0.9"
        );
    }
}
