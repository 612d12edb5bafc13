//! The workstation host: one conversation's `State` and `Runtime`, and the
//! terminals attached to it.
//!
//! Terminal input from any attached client becomes a `Msg`; `update` runs
//! once for everyone; each client gets the screen drawn at its own size as
//! the escape sequences its terminal needs (ratatui diffs against what that
//! client was last sent). The same host serves `kiln --no-daemon` in one
//! process and the daemon's clients over its socket, so a dropped client
//! costs nothing: the conversation, the model and an agent run go on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::app::{self, Msg, State};
use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::launch::Started;
use crate::host::protocol::Input;
use crate::host::runtime::Runtime;
use crate::keys::KeyMap;
use crate::store::session::OpenSession;
use crate::store::{Loaded, SessionStore};
use crate::telemetry::remote::RemoteNode;
use crate::telemetry::Sample;
use crate::theme::{self, Theme};
use crate::ui;

/// At most ~30 frames a second.
const FRAME: Duration = Duration::from_millis(33);
/// Rows one wheel step scrolls, the most a client's step may ask for.
pub const WHEEL_ROWS: i16 = 3;
/// Frames queued for a client before it counts as fallen behind.
pub const CLIENT_BUFFER: usize = 64;
/// The largest terminal drawn: wider than any real screen at a readable
/// font, and bounded because each attached terminal holds two buffers of
/// this many cells.
pub const MAX_COLS: u16 = 1000;
pub const MAX_ROWS: u16 = 400;
/// Terminals one conversation may have attached at once.
pub const MAX_TERMINALS: usize = 16;

/// Whether a terminal size a client sent can be drawn.
pub fn check_size((w, h): (u16, u16)) -> std::result::Result<(), String> {
    if w > MAX_COLS || h > MAX_ROWS {
        return Err(format!(
            "a terminal of {w}x{h} is larger than the {MAX_COLS}x{MAX_ROWS} kiln draws"
        ));
    }
    Ok(())
}

/// Sizes are kept within bounds whoever sends them.
fn bounded((w, h): (u16, u16)) -> (u16, u16) {
    (w.min(MAX_COLS), h.min(MAX_ROWS))
}

/// What a client receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Screen {
    /// Escape sequences to write to the terminal as they are.
    Frame(String),
    /// The conversation ended (quit, `kiln stop`, an error); why, or empty.
    Closed(String),
}

/// A terminal attaching to the host.
pub struct Client {
    pub id: u64,
    pub size: (u16, u16),
    /// The client's `--theme` (else the config's).
    pub theme: Option<String>,
    pub no_color: bool,
    pub out: mpsc::Sender<Screen>,
}

impl Client {
    pub fn new(
        size: (u16, u16),
        theme: Option<String>,
        no_color: bool,
        out: mpsc::Sender<Screen>,
    ) -> Client {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Client {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            size,
            theme,
            no_color,
            out,
        }
    }
}

pub enum HostIn {
    Attach(Client),
    Input {
        client: u64,
        input: Input,
    },
    Detach(u64),
    /// Show the session in this folder (`kiln attach ID` while another one
    /// is open).
    Open(PathBuf),
    /// Save and close (`kiln stop`, daemon shutdown, the one terminal of a
    /// `--no-daemon` workstation gone).
    Stop,
}

/// What `kiln ps` shows of the workstation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The session id, once the conversation has been saved.
    pub session: Option<String>,
    pub title: Option<String>,
    /// "idle", "answering", "agent step N".
    pub activity: String,
    pub clients: usize,
    /// The last answer's decode speed, and the tokens the conversation
    /// holds in the model's KV cache.
    #[serde(default)]
    pub tok_s: Option<f64>,
    #[serde(default)]
    pub context_tokens: usize,
}

/// A saved session to show, read and locked before a model loads so a bad
/// id or a locked session fails first.
pub struct Resumed {
    loaded: Loaded,
    open: OpenSession,
    dir: PathBuf,
}

impl Resumed {
    pub fn open(store: &SessionStore, query: Option<&str>) -> Result<Resumed> {
        let dir = store.resolve(query)?;
        let loaded = store.load(&dir)?;
        let open = store.open_for_resume(&dir)?;
        Ok(Resumed { loaded, open, dir })
    }

    /// How the session names its model (a preset, a path, `remote:NAME`).
    pub fn model(&self) -> &str {
        &self.loaded.meta.model
    }
}

fn config_file(common: &Common, paths: &crate::paths::Paths) -> PathBuf {
    common
        .config
        .clone()
        .unwrap_or_else(|| paths.config_file.clone())
}

/// The key map the config asks for; a bad `[keys]` entry names the file.
pub fn key_map(common: &Common, started: &Started) -> Result<KeyMap> {
    KeyMap::with_overrides(&started.config.keys)
        .map_err(|e| KilnError::Config(config_file(common, &started.paths), e))
}

/// One attached terminal as the host sees it.
struct Attached {
    id: u64,
    size: (u16, u16),
    theme: Theme,
    terminal: Terminal<CrosstermBackend<Vec<u8>>>,
    out: mpsc::Sender<Screen>,
    /// Frames were dropped: repaint everything once it has room again.
    stale: bool,
}

pub struct Host {
    state: State,
    runtime: Runtime,
    samples: watch::Receiver<Sample>,
    clients: Vec<Attached>,
    /// Where user themes live, and the config's theme.
    themes_dir: Option<PathBuf>,
    default_theme: String,
    /// The endpoints a conversation can run on, for their nodes' figures.
    config: crate::config::Config,
    /// The node followed while the conversation runs on an endpoint: its
    /// `remote:NAME`, and its reports.
    node: Option<(String, watch::Receiver<RemoteNode>)>,
}

impl Host {
    /// The host for a loaded model; `keys` from `key_map` (checked before,
    /// so that a bad config fails before the engine is lent).
    pub async fn new(
        common: Common,
        started: Started,
        keys: KeyMap,
        samples: watch::Receiver<Sample>,
        resumed: Option<Resumed>,
    ) -> Host {
        let config_file = config_file(&common, &started.paths);
        let default_theme = started
            .config
            .theme
            .clone()
            .unwrap_or_else(|| theme::DEFAULT_THEME.to_string());
        let spec = started.model_spec.clone();
        let mut state = State::new(started.engine.info().clone(), started.shape.clone(), keys)
            .with_system_prompt(started.config.system_prompt.clone())
            .with_offload(
                started.config.auto_offload.clone(),
                started.config.sampling.max_tokens as usize,
            );
        if spec.starts_with("remote:") {
            state.remote = Some(spec);
        }
        let config = started.config.clone();
        let runtime = Runtime::new(common, started, samples.clone());
        let mut host = Host {
            state,
            runtime,
            samples,
            clients: Vec::new(),
            themes_dir: config_file.parent().map(|d| d.join("themes")),
            default_theme,
            config,
            node: None,
        };
        host.follow_node();
        if let Some(r) = resumed {
            let msg = host.runtime.resume(r.loaded, r.open, &r.dir).await;
            host.apply(msg).await;
        }
        host
    }

    /// Serve the attached terminals until the conversation is closed; then
    /// save it and give the model back.
    pub async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<HostIn>,
        status: watch::Sender<Status>,
    ) {
        let telemetry = self.samples.borrow_and_update().clone();
        app::update(&mut self.state, Msg::Telemetry(telemetry));
        let mut dirty = true;
        let mut last_draw = Instant::now() - FRAME;
        let mut reason = String::new();
        loop {
            if dirty && last_draw.elapsed() >= FRAME {
                self.draw();
                last_draw = Instant::now();
                dirty = false;
            }
            self.report(&status);
            if self.state.quit {
                break;
            }
            let next_frame = tokio::time::Instant::from_std(last_draw + FRAME);
            let msg = tokio::select! {
                input = inbox.recv() => match input {
                    Some(HostIn::Attach(client)) => {
                        if let Some(msg) = self.attach(client) {
                            self.apply(msg).await;
                        }
                        dirty = true;
                        continue;
                    }
                    Some(HostIn::Input { client, input }) => match self.input(client, input) {
                        Some(msg) => msg,
                        None => {
                            dirty = true;
                            continue;
                        }
                    },
                    Some(HostIn::Detach(id)) => {
                        self.clients.retain(|c| c.id != id);
                        continue;
                    }
                    Some(HostIn::Open(dir)) => {
                        if self.state.generating() || self.state.agent.is_some() {
                            let line = "still working; another session opens when it is done";
                            self.apply(Msg::Notice(line.into())).await;
                        } else {
                            for msg in self.runtime.switch(dir).await {
                                self.apply(msg).await;
                            }
                        }
                        dirty = true;
                        continue;
                    }
                    Some(HostIn::Stop) | None => {
                        reason = "the session was stopped".into();
                        break;
                    }
                },
                msg = self.runtime.next_msg() => msg,
                changed = self.samples.changed() => match changed {
                    Ok(()) => Msg::Telemetry(self.samples.borrow_and_update().clone()),
                    Err(_) => continue,
                },
                node = node_report(&mut self.node) => Msg::Node(node),
                _ = tokio::time::sleep_until(next_frame), if dirty => continue,
            };
            self.apply(msg).await;
            dirty = true;
        }
        self.close(&reason).await;
        status.send_replace(Status::default());
        let closing = self.runtime.finish().await;
        // The session is on disk: the terminals go now, and the KV
        // snapshot is written after, so quitting never waits on it.
        for c in &self.clients {
            let _ = c.out.send(Screen::Closed(reason.clone())).await;
        }
        if let Some(closing) = closing {
            let _ = tokio::task::spawn_blocking(move || closing.finish()).await;
        }
    }

    /// Follow the node of the endpoint the conversation runs on, if it
    /// changed.
    fn follow_node(&mut self) {
        let wanted = self.state.remote.clone();
        if self.node.as_ref().map(|(name, _)| name) == wanted.as_ref() {
            return;
        }
        self.node = wanted.and_then(|spec| {
            let name = spec.strip_prefix("remote:")?.to_string();
            let endpoint = self.config.endpoint(&name).ok()?;
            Some((spec, crate::telemetry::remote::follow(&name, &endpoint)))
        });
    }

    /// `update` with `msg`, then the effects it returns, and so on with the
    /// messages they bring back, in order.
    async fn apply(&mut self, msg: Msg) {
        let mut queue = std::collections::VecDeque::from([msg]);
        while let Some(msg) = queue.pop_front() {
            for effect in app::update(&mut self.state, msg) {
                queue.extend(self.runtime.perform(effect).await);
            }
        }
        self.follow_node();
        for seq in std::mem::take(&mut self.runtime.outbox) {
            for c in &self.clients {
                let _ = c.out.try_send(Screen::Frame(seq.clone()));
            }
        }
    }

    /// Leaving mid-answer: stop it, and give the stopped answer a moment to
    /// come back so it is committed to the journal, not left as chunks.
    async fn close(&mut self, reason: &str) {
        if !reason.is_empty() {
            tracing::info!("closing the workstation: {reason}");
        }
        self.runtime.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.state.generating() {
            match tokio::time::timeout_at(deadline, self.runtime.next_msg()).await {
                Ok(msg) => self.apply(msg).await,
                Err(_) => break,
            }
        }
    }

    /// A terminal joins; what the status bar says of it, if anything.
    fn attach(&mut self, client: Client) -> Option<Msg> {
        let name = client.theme.unwrap_or_else(|| self.default_theme.clone());
        let (theme, warnings) = Theme::load(&name, self.themes_dir.as_deref(), client.no_color);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let warning = warnings.into_iter().next().map(Msg::Notice);
        if self.clients.len() >= MAX_TERMINALS {
            let _ = client.out.try_send(Screen::Closed(format!(
                "{MAX_TERMINALS} terminals are attached already"
            )));
            return warning;
        }
        let (w, h) = bounded(client.size);
        let terminal = Terminal::with_options(
            CrosstermBackend::new(Vec::new()),
            TerminalOptions {
                viewport: Viewport::Fixed(Rect::new(0, 0, w, h)),
            },
        )
        .expect("a terminal over a buffer cannot fail");
        self.clients.push(Attached {
            id: client.id,
            size: (w, h),
            theme,
            terminal,
            out: client.out,
            stale: false,
        });
        app::update(&mut self.state, Msg::Resize(w, h));
        match self.clients.len() {
            1 => warning,
            n => Some(Msg::Notice(format!("{n} terminals attached"))),
        }
    }

    /// A terminal event from one client. Resizes apply to that client's
    /// screen; everything else goes to `update`, laid out for the size of
    /// the terminal the user is typing in.
    fn input(&mut self, client: u64, input: Input) -> Option<Msg> {
        let c = self.clients.iter_mut().find(|c| c.id == client)?;
        if let Input::Resize { cols, rows } = input {
            let (w, h) = bounded((cols, rows));
            c.size = (w, h);
            let _ = c.terminal.resize(Rect::new(0, 0, w, h));
        }
        let (w, h) = c.size;
        if self.state.size != (w, h) {
            app::update(&mut self.state, Msg::Resize(w, h));
        }
        match input {
            Input::Key { key } => Some(Msg::Key(key.event())),
            Input::Paste { pasted } => Some(Msg::Paste(pasted)),
            Input::Wheel { rows } => Some(Msg::Wheel(rows.clamp(-WHEEL_ROWS, WHEEL_ROWS))),
            Input::Resize { .. } => None,
        }
    }

    /// Draw the state on every attached terminal. A client whose queue is
    /// full misses frames and is repainted whole once it has room; a gone
    /// client is dropped. Neither slows the others.
    fn draw(&mut self) {
        let state = &self.state;
        self.clients.retain_mut(|c| {
            if c.out.is_closed() {
                return false;
            }
            if c.out.capacity() == 0 {
                c.stale = true;
                return true;
            }
            if c.stale {
                let _ = c.terminal.clear();
                c.stale = false;
            }
            // Each terminal is drawn at its own size (the frame's area).
            let theme = &c.theme;
            let _ = c.terminal.draw(|f| ui::render(f, state, theme));
            let bytes = std::mem::take(c.terminal.backend_mut().writer_mut());
            if bytes.is_empty() {
                return true;
            }
            let frame = String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            match c.out.try_send(Screen::Frame(frame)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    c.stale = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn report(&self, status: &watch::Sender<Status>) {
        let activity = match (&self.state.agent, self.state.generating()) {
            (Some(a), _) => format!("agent step {}", a.step),
            (None, true) => "answering".to_string(),
            (None, false) => "idle".to_string(),
        };
        let now = Status {
            session: self.runtime.session().map(|j| j.id.clone()),
            title: self.state.title.clone(),
            activity,
            clients: self.clients.len(),
            tok_s: self.state.last_stats.as_ref().and_then(|s| s.decode_tok_s),
            context_tokens: self
                .state
                .last_stats
                .as_ref()
                .map_or(0, |s| s.context_tokens),
        };
        status.send_if_modified(|s| {
            if *s == now {
                return false;
            }
            *s = now;
            true
        });
    }
}

/// The followed node's next report; never, when none is followed.
async fn node_report(node: &mut Option<(String, watch::Receiver<RemoteNode>)>) -> RemoteNode {
    if let Some((_, reports)) = node {
        if reports.changed().await.is_ok() {
            return reports.borrow_and_update().clone();
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::FakeEngine;
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    fn started(dir: &std::path::Path, engine: FakeEngine) -> Started {
        Started {
            paths: crate::paths::Paths::under(dir),
            config: crate::config::Config::default(),
            engine: crate::host::launch::leased(crate::engine::spawn(engine)),
            shape: None,
            model_spec: "fake".into(),
            fingerprint: None,
        }
    }

    fn key(code: KeyCode) -> Input {
        Input::from_event(crossterm::event::Event::Key(KeyEvent::new(
            code,
            KeyModifiers::NONE,
        )))
        .expect("a key is input")
    }

    /// Everything a client was sent, as one string, once `done` holds.
    async fn read_until(
        rx: &mut mpsc::Receiver<Screen>,
        seen: &mut String,
        done: impl Fn(&str) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done(seen) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Screen::Frame(f))) => seen.push_str(&f),
                other => panic!("{other:?} before {seen:?}"),
            }
        }
    }

    /// Two terminals on one conversation: both are drawn the answer at their
    /// own size; one that stops reading misses frames, never holds up the
    /// other, and is repainted whole once it reads again; a detached one is
    /// forgotten.
    #[tokio::test]
    async fn terminals_share_a_conversation_and_a_stalled_one_is_repainted() {
        let dir = tempfile::tempdir().unwrap();
        let words = (0..150)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let engine = FakeEngine::new([words]).with_delay(Duration::from_millis(5));
        let started = started(dir.path(), engine);
        let model = (*started.engine).clone();
        let keys = key_map(&Common::default(), &started).unwrap();
        let (_tx, samples) = watch::channel(Sample::default());
        let host = Host::new(Common::default(), started, keys, samples, None).await;
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (status_tx, mut status) = watch::channel(Status::default());
        let host = tokio::spawn(host.run(inbox_rx, status_tx));

        let (a_out, mut a) = mpsc::channel(CLIENT_BUFFER);
        let (b_out, mut b) = mpsc::channel(2);
        let client_a = Client::new((100, 30), None, true, a_out);
        let client_b = Client::new((60, 20), None, true, b_out);
        let (ida, idb) = (client_a.id, client_b.id);
        inbox.send(HostIn::Attach(client_a)).unwrap();
        inbox.send(HostIn::Attach(client_b)).unwrap();
        let mut seen_a = String::new();
        // Escape sequences move over unchanged cells: look for single words.
        read_until(&mut a, &mut seen_a, |s| s.contains("Type")).await;

        for c in "hello".chars() {
            let input = key(KeyCode::Char(c));
            inbox.send(HostIn::Input { client: ida, input }).unwrap();
        }
        let input = key(KeyCode::Enter);
        inbox.send(HostIn::Input { client: ida, input }).unwrap();
        // A sees every word of the answer arrive while B reads nothing.
        read_until(&mut a, &mut seen_a, |s| s.contains("w149")).await;
        status
            .wait_for(|s| s.activity == "idle" && s.session.is_some())
            .await
            .unwrap();
        assert_eq!(status.borrow().clients, 2);

        // B's two queued frames are stale; the next one repaints everything
        // (ratatui clears the viewport first), drawn at B's 60 columns.
        let mut seen_b = String::new();
        while let Ok(Screen::Frame(f)) = b.try_recv() {
            seen_b.push_str(&f);
        }
        let input = key(KeyCode::Char('x'));
        inbox.send(HostIn::Input { client: idb, input }).unwrap();
        let mut repaint = String::new();
        read_until(&mut b, &mut repaint, |s| s.contains("w149")).await;
        assert!(repaint.contains("\u{1b}[J"), "a full repaint: {repaint:?}");
        assert!(repaint.contains("hello"), "{repaint:?}");
        assert!(!repaint.contains("memory"), "60 columns: no side panels");
        assert!(seen_a.contains("memory"), "100 columns: side panels");

        inbox.send(HostIn::Detach(idb)).unwrap();
        status.wait_for(|s| s.clients == 1).await.unwrap();
        inbox.send(HostIn::Stop).unwrap();
        host.await.unwrap();
        assert!(model.lease().is_some(), "the engine is handed back");
        // The conversation was journaled once, whatever the terminals.
        let store = SessionStore::new(&crate::paths::Paths::under(dir.path()));
        let listing = store.list();
        assert_eq!(listing.len(), 1);
        let loaded = store.load(&listing[0].dir).unwrap();
        let messages = crate::store::transcript::Transcript::messages(&loaded.transcript.entries);
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[1].content.ends_with("w149"));
    }
}
