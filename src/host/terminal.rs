//! The terminal side of the workstation: raw mode and the alternate screen
//! (always restored), terminal input out to the workstation host, its
//! screens in. The host runs in this process (`--no-daemon`) or in the
//! daemon; only the transport differs. Over the daemon, Ctrl-\ or a hangup
//! detaches and leaves the conversation running.

use std::io::{IsTerminal, Write};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    KeyCode, KeyEvent, KeyModifiers,
};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use tokio::sync::{mpsc, watch};

use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::daemon;
use crate::host::launch;
use crate::host::protocol::{self, Input, Open, Reply, Request, Settings};
use crate::host::workstation::{
    self, Client, Host, HostIn, Resumed, Screen, Status, CLIENT_BUFFER,
};
use crate::store::SessionStore;
use crate::telemetry;
use crate::theme;

/// What the workstation opens with.
pub enum Start {
    /// The conversation the daemon has open, else a new one.
    Current,
    /// A new conversation, beside any open.
    New,
    /// A session by id, id prefix or folder; `None` is the most recent.
    Resume(Option<String>),
}

/// How the terminal session ended.
enum Ending {
    /// The host closed the conversation (quit, `kiln stop`); why, if not a
    /// quit.
    Closed(String),
    Detached,
    /// SSH dropped, or SIGTERM: the terminal is gone or going.
    HungUp,
}

pub async fn run(common: &Common, start: Start) -> Result<i32> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(KilnError::BadArgument(
            "the workstation needs a terminal; for scripts use `kiln ask`".into(),
        ));
    }
    let size = crossterm::terminal::size().map_err(|e| KilnError::io("terminal", e))?;
    if common.no_daemon {
        return in_process(common, start, size).await;
    }
    let open = match resume_id(common, start)? {
        Start::Current => Open::Current,
        Start::New => Open::New,
        Start::Resume(None) => Open::Last,
        Start::Resume(Some(query)) => Open::Session { query },
    };
    attach(common, open, size).await
}

/// A session folder named for `resume` is copied into the store here, so
/// that only ids travel and are opened (the daemon's working folder also
/// differs from this terminal's).
fn resume_id(common: &Common, start: Start) -> Result<Start> {
    match start {
        Start::Resume(Some(query)) => {
            let (paths, _) = launch::paths_and_config(common)?;
            let id = SessionStore::new(&paths).resolve_or_import(&query)?;
            Ok(Start::Resume(Some(id)))
        }
        other => Ok(other),
    }
}

/// `--no-daemon`: the host runs here and ends with the terminal.
async fn in_process(common: &Common, start: Start, size: (u16, u16)) -> Result<i32> {
    // Read the session first: a bad id or a locked session fails before a
    // model is loaded.
    let start = resume_id(common, start)?;
    let (paths, _) = launch::paths_and_config(common)?;
    let store = SessionStore::new(&paths);
    let mut common = common.clone();
    let resumed = match start {
        Start::Current | Start::New => None,
        Start::Resume(query) => {
            let resumed = Resumed::open(&store, query.as_deref())?;
            // The session's model, unless the user names another.
            if common.model.is_none() {
                match resumed.model().strip_prefix("remote:") {
                    Some(_) if common.engine == "local" => common.engine = resumed.model().into(),
                    Some(_) => {}
                    None => common.model = Some(resumed.model().to_string()),
                }
            }
            Some(resumed)
        }
    };
    let started = launch::start(&common).await?;
    let keys = workstation::key_map(&common, &started)?;
    let samples = telemetry::spawn_with_bandwidth(
        std::time::Duration::from_secs(1),
        started.paths.cache.clone(),
    );
    let host = Host::new(common.clone(), started, keys, samples, resumed).await;
    let (inbox, inbox_rx) = mpsc::unbounded_channel();
    let (status, _) = watch::channel(Status::default());
    let host = tokio::spawn(host.run(inbox_rx, status));
    let (out, screens) = mpsc::channel(CLIENT_BUFFER);
    let client = Client::new(size, common.theme.clone(), theme::no_color_requested(), out);
    let id = client.id;
    let _ = inbox.send(HostIn::Attach(client));
    let to_host = inbox.clone();
    let ending = drive(screens, false, move |input| {
        to_host.send(HostIn::Input { client: id, input }).is_ok()
    })
    .await?;
    if !matches!(ending, Ending::Closed(_)) {
        // The terminal is gone: save the conversation before exiting.
        let _ = inbox.send(HostIn::Stop);
    }
    let _ = host.await;
    finish(ending)
}

/// Attach to the daemon's workstation, starting the daemon when none runs.
pub async fn attach(common: &Common, open: Open, size: (u16, u16)) -> Result<i32> {
    let stream = daemon::connect(common, true).await?;
    let (mut read, mut write) = stream.into_split();
    let hello = Request::Workstation {
        open,
        size,
        theme: common.theme.clone(),
        no_color: theme::no_color_requested(),
        settings: Settings::of(common),
    };
    protocol::write(&mut write, &hello)
        .await
        .map_err(|e| KilnError::io("daemon", e))?;
    // The first reply says whether the daemon took the terminal; a daemon
    // just started replies once its model is loaded.
    let first = {
        let reply = protocol::read::<Reply, _>(&mut read);
        tokio::pin!(reply);
        match tokio::time::timeout(std::time::Duration::from_secs(1), &mut reply).await {
            Ok(reply) => reply,
            Err(_) => {
                eprintln!("kiln: the daemon is loading the model…");
                reply.await
            }
        }
    };
    let first = first.map_err(|e| match daemon::why_it_stopped(common) {
        Some(why) => KilnError::Store(why),
        None => KilnError::Store(format!("daemon: {e}")),
    })?;
    let (out, screens) = mpsc::channel(CLIENT_BUFFER);
    match first {
        Reply::Screen { text } => {
            let _ = out.send(Screen::Frame(text)).await;
        }
        Reply::Error { message } => return Err(KilnError::Store(message)),
        Reply::Closed { reason } => return Err(KilnError::Store(reason)),
        other => return Err(KilnError::Store(format!("daemon: unexpected {other:?}"))),
    }
    tokio::spawn(async move {
        loop {
            let screen = match protocol::read::<Reply, _>(&mut read).await {
                Ok(Reply::Screen { text }) => Screen::Frame(text),
                Ok(Reply::Closed { reason }) => Screen::Closed(reason),
                Ok(Reply::Error { message }) => Screen::Closed(message),
                Ok(_) => continue,
                Err(protocol::FrameError::Closed) => {
                    Screen::Closed("the daemon closed the connection".into())
                }
                Err(e) => Screen::Closed(format!("daemon: {e}")),
            };
            let closed = matches!(screen, Screen::Closed(_));
            if out.send(screen).await.is_err() || closed {
                return;
            }
        }
    });
    let (input, mut input_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(input) = input_rx.recv().await {
            if protocol::write(&mut write, &Request::Input { input })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let ending = drive(screens, true, move |i| input.send(i).is_ok()).await?;
    finish(ending)
}

fn finish(ending: Ending) -> Result<i32> {
    match ending {
        Ending::Closed(reason) if reason.is_empty() => Ok(0),
        Ending::Closed(reason) => {
            eprintln!("kiln: {reason}");
            Ok(0)
        }
        Ending::Detached => {
            eprintln!("kiln: detached; the session goes on in the daemon (`kiln attach` returns to it, `kiln ps` lists it)");
            Ok(0)
        }
        Ending::HungUp => Ok(0),
    }
}

/// Ctrl-\ as terminals send it (0x1c, which crossterm reads as Ctrl-4).
fn is_detach(key: &KeyEvent) -> bool {
    key.modifiers.contains(KeyModifiers::CONTROL)
        && matches!(key.code, KeyCode::Char('\\') | KeyCode::Char('4'))
}

/// Run the terminal: input to `send`, screens to stdout, until the host
/// closes, the user detaches (`detachable`), or the terminal goes.
async fn drive(
    mut screens: mpsc::Receiver<Screen>,
    detachable: bool,
    send: impl Fn(Input) -> bool,
) -> Result<Ending> {
    let signal_error = |e| KilnError::io("signal handler", e);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(signal_error)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(signal_error)?;
    let _guard = TerminalGuard::enter().map_err(|e| KilnError::io("terminal", e))?;
    let mut input = spawn_input_reader();
    loop {
        tokio::select! {
            ev = input.recv() => match ev {
                Some(Event::Key(key)) if detachable && is_detach(&key) => return Ok(Ending::Detached),
                Some(ev) => {
                    let Some(ev) = Input::from_event(ev) else {
                        continue;
                    };
                    if !send(ev) {
                        return Ok(Ending::Closed("the workstation is gone".into()));
                    }
                }
                None => {
                    release_terminal();
                    return Ok(Ending::HungUp);
                }
            },
            screen = screens.recv() => match screen {
                Some(Screen::Frame(text)) => {
                    let mut out = std::io::stdout().lock();
                    if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
                        release_terminal();
                        return Ok(Ending::HungUp);
                    }
                }
                Some(Screen::Closed(reason)) => return Ok(Ending::Closed(reason)),
                None => return Ok(Ending::Closed("the workstation is gone".into())),
            },
            _ = hangup.recv() => {
                release_terminal();
                return Ok(Ending::HungUp);
            }
            _ = terminate.recv() => return Ok(Ending::HungUp),
        }
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
