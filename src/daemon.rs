//! `kiln daemon`: agent runs that outlive the terminal that started them.
//!
//! The daemon owns the model and runs agents headless; clients (`kiln agent
//! --detach`, `kiln ps`, `kiln stop`, `kiln attach`) reach it over a Unix
//! socket private to the user (a 0700 folder, a 0600 socket, and a
//! peer-credential check). No TCP listener. One actor task owns the runs;
//! connections and agent runs talk to it over channels.

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
use crate::engine::{EngineEvent, EngineHandle};
use crate::error::{KilnError, Result};
use crate::launch;
use crate::paths::Paths;
use crate::protocol::{self, FrameError, Reply, Request, RunInfo};
use crate::store::SessionStore;
use crate::telemetry;

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
                    if self.engine_events.is_some() && self.all_done() {
                        if let Some(done) = self.shutdown.take() {
                            let _ = done.send(());
                        }
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
        self.runs.values().all(|r| r.outcome.is_some())
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
            },
            Request::Stop { id } => match self.runs.get(&id) {
                Some(run) => {
                    run.stop.store(true, Ordering::SeqCst);
                    Reply::Stopping { id }
                }
                None => Reply::Error {
                    message: format!("no run '{id}' (see `kiln ps`)"),
                },
            },
            Request::Attach { .. } => Reply::Error {
                message: "attach goes through its own path".into(),
            },
            Request::StartAgent {
                task,
                workspace,
                policy,
                max_steps,
                max_minutes,
            } => self.start(task, workspace, policy, max_steps, max_minutes),
        }
    }

    fn start(
        &mut self,
        task: String,
        workspace: PathBuf,
        policy: crate::agent::Policy,
        max_steps: u32,
        max_minutes: u64,
    ) -> Reply {
        let Some(mut events) = self.engine_events.take() else {
            let running = self
                .runs
                .iter()
                .find(|(_, r)| r.outcome.is_none())
                .map(|(id, _)| id.clone())
                .unwrap_or_default();
            return Reply::Error {
                message: format!("run {running} is using the model; stop it or wait"),
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
                budgets: Budgets {
                    max_steps,
                    max_time: Duration::from_secs(max_minutes * 60),
                    max_tokens: 200_000,
                },
                limits: Limits::default(),
                approver: Nobody,
                journal: Some(&journal),
                pressure: Some(pressure(samples)),
                governor: GovernorMode::Pause,
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

pub async fn run(common: &Common) -> Result<i32> {
    let (paths, _) = launch::paths_and_config(common)?;
    let path = socket_path(&paths);
    let listener = bind(&path)?;
    let started = launch::start(common).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let actor = Actor {
        tx: tx.clone(),
        engine: started.handle,
        engine_events: Some(started.events),
        store: SessionStore::new(&started.paths),
        samples: telemetry::spawn(Duration::from_secs(1)),
        runs: BTreeMap::new(),
        shutdown: None,
    };
    tokio::spawn(actor.run(rx));
    eprintln!("kiln: daemon listening on {}", path.display());
    tracing::info!("daemon listening on {}", path.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| KilnError::io("signal handler", e))?;
    tokio::select! {
        _ = accept(listener, tx.clone()) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Stop every run and let each close its journal before exiting.
    let (done_tx, done_rx) = oneshot::channel();
    let _ = tx.send(ActorMsg::Shutdown(done_tx));
    let _ = tokio::time::timeout(Duration::from_secs(30), done_rx).await;
    let _ = std::fs::remove_file(&path);
    tracing::info!("daemon stopped");
    Ok(0)
}

/// Accept clients of this user only, each served by a task of its own.
async fn accept(listener: UnixListener, actor: mpsc::UnboundedSender<ActorMsg>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {
                tokio::spawn(serve(stream, actor.clone()));
            }
            Ok(cred) => tracing::warn!("refused a client of uid {}", cred.uid()),
            Err(e) => tracing::warn!("refused a client: {e}"),
        }
    }
}

/// One client connection: requests in, replies out. A malformed or
/// oversized frame closes this client only.
async fn serve(stream: UnixStream, actor: mpsc::UnboundedSender<ActorMsg>) {
    let (mut read, mut write) = stream.into_split();
    loop {
        let req: Request = match protocol::read(&mut read).await {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(e) => {
                tracing::warn!("closing a client: {e}");
                let _ = protocol::write(
                    &mut write,
                    &Reply::Error {
                        message: e.to_string(),
                    },
                )
                .await;
                return;
            }
        };
        if let Request::Attach { id } = req {
            follow(&mut write, &actor, id).await;
            return;
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
    cmd.arg("daemon");
    if let Some(m) = &common.model {
        cmd.args(["--model", m]);
    }
    if let Some(d) = &common.data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    if let Some(c) = &common.config {
        cmd.arg("--config").arg(c);
    }
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // A session of its own, so the terminal hanging up does not reach it.
    // SAFETY: setsid in the child before exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| KilnError::io("kiln daemon", e))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = UnixStream::connect(&path).await {
            return Ok(s);
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

/// `kiln bench --daemon`: the daemon's own actor, framing and socket, with
/// an event source in place of an agent. Latency is from publishing an event
/// to a client having decoded it, at 1,000 events/s; throughput publishes as
/// fast as the actor takes them.
pub async fn bench_delivery(clients: usize, events: usize) -> Result<DeliveryFigures> {
    let dir = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let path = dir.path().join("daemon.sock");
    let listener = bind(&path)?;
    let (engine, engine_events) =
        crate::engine::spawn(crate::engine::fake::FakeEngine::new(Vec::<String>::new()));
    let (tx, rx) = mpsc::unbounded_channel();
    let actor = Actor {
        tx: tx.clone(),
        engine,
        engine_events: Some(engine_events),
        store: SessionStore {
            root: dir.path().join("sessions"),
        },
        samples: telemetry::spawn(Duration::from_secs(3600)),
        runs: BTreeMap::new(),
        shutdown: None,
    };
    tokio::spawn(actor.run(rx));
    tokio::spawn(accept(listener, tx.clone()));
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
