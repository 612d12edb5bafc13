//! `kiln daemon`: the workstation and agent runs, outliving the terminals
//! that started them.
//!
//! The daemon owns the model, hosts workstations (a session each, any
//! number of terminals attached to each) and runs agents headless, all on
//! the one loaded model, batched together. Clients (`kiln`,
//! `kiln attach`, `kiln agent --detach`, `kiln ps`, `kiln stop`) reach it
//! over a Unix socket private to the user (a 0700 folder, a 0600 socket,
//! and a peer-credential check). No TCP listener. One actor task owns the
//! runs and lends each user (a workstation, an agent run) a conversation of
//! the model's own; connections, runs and workstations talk to it over
//! channels.

mod actor;
mod client;
mod serve;
mod settings;
mod socket;

pub use actor::{bench_actor, BenchActor, Model};
pub use client::{ask, connect, settings_from_stdin, why_it_stopped};
pub use socket::{bind, socket_path};

use actor::{Actor, ActorMsg};
use serve::accept;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::error::{KilnError, Result};
use crate::host::launch;
use crate::host::protocol::Settings;
use crate::host::workstation::{self};
use crate::store::SessionStore;
use crate::telemetry;

/// `idle_exit`: exit this long after the last terminal's conversation and
/// run end (a daemon a client started); `None` runs until SIGTERM.
/// `resume_on_start` (or `[agent] resume_on_start`): resume the detached
/// runs the daemon was hosting when it died. `serve` (`kiln serve`), or
/// `listen` in `[serve]`: serve the model's OpenAI-compatible API too, for
/// as long as the daemon runs.
pub async fn run(
    settings: Settings,
    idle_exit: Option<Duration>,
    resume_on_start: bool,
    serve: Option<&crate::serve::ServeArgs>,
) -> Result<i32> {
    let common = &settings.common;
    let (paths, config) = launch::paths_and_config(common)?;
    // Checked and bound before the model loads, so a refusal costs nothing.
    let listening = config
        .serve
        .with(serve)
        .map(|c| crate::serve::bind(&c))
        .transpose()?;
    // A daemon serving the API stays up for its clients.
    let idle_exit = idle_exit.filter(|_| listening.is_none());
    let path = socket_path(&paths);
    let listener = bind(&path).map_err(|e| match serve {
        Some(_) => KilnError::Store(format!(
            "{e}: stop it first (kiln stop --daemon), or set listen in [serve] in config.toml so that it serves"
        )),
        None => e,
    })?;
    let started = launch::start(common).await?;
    let keys = workstation::key_map(common, &started)?;
    let resume_on_start = resume_on_start || started.config.agent.resume_on_start;
    // The daemon lends the model; it does not hold it.
    let engine = (*started.engine).clone();
    drop(started.engine);
    let (tx, rx) = mpsc::unbounded_channel();
    let exit = Arc::new(tokio::sync::Notify::new());
    let samples =
        telemetry::spawn_with_bandwidth(Duration::from_secs(1), started.paths.cache.clone());
    let served = match listening {
        Some(listening) => {
            let addr = listening.addr;
            let served = crate::serve::start(
                listening,
                engine.clone(),
                started.config.sampling.clone(),
                samples.clone(),
                Some(SessionStore::new(&started.paths)),
            )?;
            eprintln!("kiln: serving the OpenAI API on http://{addr}/v1");
            // It serves for as long as the daemon runs.
            Some(served.served)
        }
        None => None,
    };
    let actor = Actor::new(
        tx.clone(),
        engine,
        SessionStore::new(&started.paths),
        samples,
        Some(Model {
            settings: settings.clone(),
            keys,
            paths: started.paths,
            config: started.config,
            shape: started.shape,
            model_spec: started.model_spec,
            fingerprint: started.fingerprint,
        }),
        idle_exit,
        exit.clone(),
    )
    .serving(served);
    tokio::spawn(actor.run(rx));
    if resume_on_start {
        let _ = tx.send(ActorMsg::ResumeInterrupted);
    }
    eprintln!("kiln: daemon listening on {}", path.display());
    tracing::info!("daemon listening on {}", path.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| KilnError::io("signal handler", e))?;
    // A daemon no one asked for yet counts as idle from the start.
    let _ = tx.send(ActorMsg::HostGone(0));
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

#[cfg(test)]
mod tests {
    use super::actor::WorkstationLink;
    use super::settings::{differs, joins};
    use super::*;
    use crate::budget::KvType;
    use crate::cli::Common;
    use crate::host::protocol::{self, Open, Reply, Request};
    use crate::paths::Paths;
    use std::path::{Path, PathBuf};
    use tokio::net::UnixStream;

    fn started_with(common: Common) -> Settings {
        Settings {
            common,
            ..Settings::default()
        }
    }

    #[test]
    fn a_terminal_started_with_other_settings_is_told_what_differs() {
        let daemon = started_with(Common {
            engine: "llamacpp".into(),
            model: Some("a.gguf".into()),
            ..Default::default()
        });
        let same = started_with(Common {
            model: Some("a.gguf".into()),
            engine: "local".into(),
            kv_type: KvType::F16,
            ..Default::default()
        });
        assert_eq!(differs(&same, &daemon), None);
        assert_eq!(differs(&Settings::default(), &daemon), None);
        let other = started_with(Common {
            model: Some("b.gguf".into()),
            engine: "kalosm".into(),
            kv_type: KvType::Q8_0,
            ..Default::default()
        });
        assert_eq!(
            differs(&other, &daemon).unwrap(),
            "--model b.gguf --engine kalosm --kv-type q8_0"
        );
    }

    /// A daemon with the workstation over a scripted engine, on a socket in
    /// `dir`, started with `common`.
    fn fake_daemon_with(dir: &Path, common: Common) -> PathBuf {
        let engine = crate::engine::fake::FakeEngine::new(["hello there"]);
        fake_daemon_on(dir, common, engine)
    }

    fn fake_daemon_on(
        dir: &Path,
        common: Common,
        engine: crate::engine::fake::FakeEngine,
    ) -> PathBuf {
        let path = dir.join("daemon.sock");
        let listener = bind(&path).unwrap();
        let paths = Paths::under(dir);
        let model = Model::fake(common, &paths);
        bench_actor(listener, crate::engine::spawn(engine), &paths, Some(model));
        path
    }

    /// `kiln agent --detach --max-steps STEPS --approval auto` in `ws` on
    /// the daemon at `path`: the run's id.
    async fn start_run(path: &Path, ws: PathBuf, steps: u32) -> String {
        let client = Settings {
            common: Common {
                agent: crate::cli::AgentFlags {
                    max_steps: Some(steps),
                    ..Default::default()
                },
                approval: crate::agent::Policy::Auto,
                workspace: Some(ws),
                ..Default::default()
            },
            cwd: "/".into(),
        };
        let mut s = UnixStream::connect(path).await.unwrap();
        let start = Request::StartAgent {
            task: "look around".into(),
            settings: client,
        };
        protocol::write(&mut s, &start).await.unwrap();
        let Reply::Started { id } = protocol::read::<Reply, _>(&mut s).await.unwrap() else {
            panic!("the run starts");
        };
        id
    }

    /// `kiln agent --detach --max-steps 2`: the run in the daemon takes the
    /// agent flags of the client that started it, over the daemon's own.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_detached_run_honours_the_clients_agent_flags() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let listing = r#"{"tool": "list_dir", "path": "."}"#;
        let engine = crate::engine::fake::FakeEngine::new(vec![listing; 40]);
        let path = fake_daemon_on(dir.path(), Common::default(), engine);
        let id = start_run(&path, ws, 2).await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        protocol::write(&mut s, &Request::Attach { id })
            .await
            .unwrap();
        let outcome = loop {
            let reply =
                tokio::time::timeout(Duration::from_secs(10), protocol::read::<Reply, _>(&mut s))
                    .await
                    .expect("the run ends")
                    .unwrap();
            match reply {
                Reply::Done { outcome, .. } => break outcome,
                Reply::Snapshot {
                    outcome: Some(outcome),
                    ..
                } => break outcome,
                _ => {}
            }
        };
        assert_eq!(
            outcome,
            crate::agent::Outcome::BudgetExhausted("2 steps".into())
        );
    }

    /// A daemon told to exit suspends its runs (they stop without ending);
    /// the next daemon, started to resume, goes on with them where they
    /// stopped, and they end there.
    #[tokio::test(flavor = "multi_thread")]
    async fn runs_suspended_by_a_shutdown_are_resumed_by_the_next_daemon() {
        use crate::store::session::{read_events, Event};
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let paths = Paths::under(dir.path());
        let listing = r#"{"tool": "list_dir", "path": "."}"#;
        let engine = crate::engine::fake::FakeEngine::new(vec![listing; 400])
            .with_delay(Duration::from_millis(2));
        let first_path = dir.path().join("first.sock");
        let first = bench_actor(
            bind(&first_path).unwrap(),
            crate::engine::spawn(engine),
            &paths,
            Some(Model::fake(Common::default(), &paths)),
        );
        let id = start_run(&first_path, ws, 400).await;
        let store = SessionStore::new(&paths);
        let events_path = store.resolve(Some(&id)).unwrap().join("events.jsonl");
        let results = |events: &[(u64, Event)]| -> Vec<u32> {
            events
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::ToolResult { step, .. } => Some(*step),
                    _ => None,
                })
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while results(&read_events(&events_path).unwrap().events).len() < 3 {
            assert!(std::time::Instant::now() < deadline, "the run steps");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.shutdown().await;
        let suspended = store.interrupted_runs();
        assert_eq!(suspended.len(), 1, "suspended, not ended");
        let before = results(&read_events(&events_path).unwrap().events);

        let finish = r#"{"tool": "finish", "summary": "looked"}"#;
        let second = bench_actor(
            bind(&dir.path().join("second.sock")).unwrap(),
            crate::engine::spawn(crate::engine::fake::FakeEngine::new([finish])),
            &paths,
            Some(Model::fake(Common::default(), &paths)),
        );
        second.resume_interrupted();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let meta = crate::store::session::read_meta(&store.resolve(Some(&id)).unwrap());
            let ended = meta.ok().and_then(|m| m.run).and_then(|r| r.ended);
            if ended.as_deref() == Some("finished") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "resumed: {ended:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = results(&read_events(&events_path).unwrap().events);
        assert_eq!(after.len(), before.len() + 1, "{before:?} {after:?}");
        assert_eq!(after, (1..=after.len() as u32).collect::<Vec<_>>());
        assert!(store.interrupted_runs().is_empty());
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
            settings: Settings {
                common: Common {
                    approval,
                    workspace: Some(workspace.into()),
                    ..Default::default()
                },
                cwd: "/".into(),
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
            settings: Settings::default(),
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
            input: crate::host::protocol::Input::Resize {
                cols: 65535,
                rows: 65535,
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
                settings: Settings::default(),
            },
            Request::List,
            Request::Stop { id: "x".into() },
            Request::Attach { id: "x".into() },
            hello((80, 24)),
            Request::Input {
                input: crate::host::protocol::Input::Paste {
                    pasted: crate::app::Pasted::new("p".into()),
                },
            },
            Request::Input {
                input: crate::host::protocol::Input::Resize { cols: 80, rows: 24 },
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
            number: 1,
            inbox: inbox.clone(),
            status: status.clone(),
            workspace: "/work/a".into(),
            approval,
        };
        let client = |approval, workspace: Option<&str>| Settings {
            common: Common {
                approval,
                workspace: workspace.map(PathBuf::from),
                ..Default::default()
            },
            cwd: "/elsewhere".into(),
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
        let daemon = started_with(Common {
            sampling: crate::cli::SamplingArgs {
                temperature: Some(0.0),
                ..Default::default()
            },
            ..Default::default()
        });
        let hot = started_with(Common {
            sampling: crate::cli::SamplingArgs {
                temperature: Some(0.9),
                ..Default::default()
            },
            ctx: Some(1024),
            ..Default::default()
        });
        assert_eq!(
            differs(&hot, &daemon).unwrap(),
            "--ctx 1024 --temperature 0.9"
        );
        // A question brings its own sampling and system prompt; only what
        // the load decides must match.
        assert_eq!(
            super::settings::loads_differently(&hot, &daemon).unwrap(),
            "--ctx 1024"
        );
        let own_sampling = started_with(Common {
            system: Some("Be brief.".into()),
            ..hot.common.clone()
        });
        let own_sampling = Settings {
            common: Common {
                ctx: daemon.common.ctx,
                ..own_sampling.common
            },
            ..own_sampling
        };
        assert_eq!(
            super::settings::loads_differently(&own_sampling, &daemon),
            None
        );
    }
}
