//! Serving connections: accepting this user's clients, checking every
//! request, then requests and replies, a terminal's screens, or a run's
//! events.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::host::protocol::{self, FrameError, Open, Reply, Request, Settings};
use crate::host::workstation::{self, Client, HostIn, Screen, CLIENT_BUFFER};

use super::actor::ActorMsg;

/// Events a subscriber may fall behind by before it is resynced.
const SUBSCRIBER_BUFFER: usize = 256;

/// Connections served at once; more are told so and closed.
const MAX_CONNECTIONS: usize = 256;
/// How long a new connection may take to send its first request.
const FIRST_REQUEST: Duration = Duration::from_secs(10);

/// Accept clients of this user only, each served by a task of its own. An
/// accept that fails (out of file descriptors) backs off instead of
/// spinning, so the clients already connected are still served.
pub(super) async fn accept(listener: UnixListener, actor: mpsc::UnboundedSender<ActorMsg>) {
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
pub(super) fn check(req: &Request) -> std::result::Result<(), String> {
    const MAX_TEXT: usize = 1 << 20;
    const MAX_NAME: usize = 4096;
    let long = |what: &str, n: usize, max: usize| {
        (n > max).then(|| format!("{what} of {n} bytes is over the {max}-byte limit"))
    };
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map_or(0, |p| p.as_os_str().len());
    let settings_ok = |s: &Settings| {
        let c = &s.common;
        [
            ("a model name", len(&c.model), MAX_NAME),
            ("an engine name", c.engine.len(), MAX_NAME),
            ("a system prompt", len(&c.system), MAX_TEXT),
            ("a theme name", len(&c.theme), MAX_NAME),
            ("a workspace", path(&c.workspace), MAX_NAME),
            ("a data folder", path(&c.data_dir), MAX_NAME),
            ("a config file", path(&c.config), MAX_NAME),
            ("a folder", s.cwd.as_os_str().len(), MAX_NAME),
        ]
        .into_iter()
        .find_map(|(what, n, max)| long(what, n, max))
    };
    let problem = match req {
        Request::StartAgent { task, settings, .. } => {
            long("a task", task.len(), MAX_TEXT).or_else(|| settings_ok(settings))
        }
        Request::Stop { id } | Request::Attach { id } => long("an id", id.len(), MAX_NAME),
        Request::ResumeAgent { id, settings } => {
            long("an id", id.len(), MAX_NAME).or_else(|| settings_ok(settings))
        }
        Request::Ask {
            question, settings, ..
        } => long("a question", question.len(), protocol::MAX_QUESTION)
            .or_else(|| settings_ok(settings)),
        Request::Workstation {
            open,
            size,
            theme,
            settings,
            ..
        } => workstation::check_size(*size)
            .err()
            .or_else(|| long("a theme name", len(theme), MAX_NAME))
            .or_else(|| match open {
                Open::Session { query } => long("a session id", query.len(), MAX_NAME),
                _ => None,
            })
            .or_else(|| settings_ok(settings)),
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
            Request::Ask {
                question,
                ephemeral,
                settings,
            } => {
                answer(&mut read, &mut write, &actor, question, ephemeral, settings).await;
                return;
            }
            Request::Workstation {
                open,
                size,
                theme,
                no_color,
                settings,
            } => {
                let client = (size, theme, no_color, settings);
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
    (size, theme, no_color, settings): ((u16, u16), Option<String>, bool, Settings),
) {
    let refuse = |message: String| Reply::Error { message };
    let (out, mut screens) = mpsc::channel(CLIENT_BUFFER);
    let client = Client::new(size, theme, no_color, out);
    let id = client.id;
    let (reply_tx, reply_rx) = oneshot::channel();
    let _ = actor.send(ActorMsg::Workstation(open, client, settings, reply_tx));
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

/// Answer one question for `kiln ask` on a conversation the actor leases:
/// the turn's events go to the client as they come and into the session's
/// journal; the client going away cancels the answer, which still ends and
/// is kept.
async fn answer(
    read: &mut tokio::net::unix::OwnedReadHalf,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    actor: &mpsc::UnboundedSender<ActorMsg>,
    question: String,
    ephemeral: bool,
    settings: Settings,
) {
    let (tx, rx) = oneshot::channel();
    if actor
        .send(ActorMsg::Ask(question.clone(), ephemeral, settings, tx))
        .is_err()
    {
        return;
    }
    let (lease, journal) = match rx.await {
        Ok(Ok(leased)) => leased,
        Ok(Err(message)) => {
            let _ = protocol::write(write, &Reply::Error { message }).await;
            return;
        }
        Err(_) => return,
    };
    let session = journal.as_ref().map(|j| j.id.clone());
    let model = lease.info().clone();
    let mut listening = protocol::write(write, &Reply::Asked { session, model })
        .await
        .is_ok();
    let mut turn = lease.chat(question);
    if !listening {
        lease.cancel();
    }
    loop {
        let event = tokio::select! {
            event = turn.next() => event,
            // The client sends nothing more: whatever arrives, or its end,
            // means it is gone.
            _ = protocol::read::<Request, _>(read), if listening => {
                listening = false;
                lease.cancel();
                continue;
            }
        };
        let Some(event) = event else { break };
        if let (Some(j), Some(record)) = (&journal, crate::record::Record::of(&event)) {
            record.write(j);
        }
        let end = matches!(
            event,
            crate::engine::EngineEvent::TurnFinished { .. }
                | crate::engine::EngineEvent::TurnFailed { .. }
        );
        if listening
            && protocol::write(write, &Reply::Turn { event })
                .await
                .is_err()
        {
            listening = false;
            lease.cancel();
        }
        if end {
            break;
        }
    }
    if let Some(j) = journal {
        let _ = tokio::task::spawn_blocking(move || j.close()).await;
    }
    drop(lease);
    let _ = actor.send(ActorMsg::Released);
}
