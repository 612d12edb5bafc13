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
use tokio::sync::{mpsc, watch};

use crate::app::{self, Effect, Msg, State};
use crate::budget::ModelShape;
use crate::cli::Common;
use crate::engine::{self, EngineCommand, EngineEvent, EngineHandle};
use crate::error::{KilnError, Result};
use crate::keys::KeyMap;
use crate::launch::launch;
use crate::telemetry::{self, Sample};
use crate::theme::{self, Theme};
use crate::ui;

const FRAME: Duration = Duration::from_millis(33);
const WHEEL_ROWS: i16 = 3;
/// Terminals drop OSC 52 payloads beyond about this size.
const MAX_COPY_BYTES: usize = 512 * 1024;

pub async fn run(common: &Common) -> Result<i32> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(KilnError::BadArgument(
            "the workstation needs a terminal; for scripts use `kiln ask`".into(),
        ));
    }
    let launched = launch(common, |_| {}).await?;
    let config = &launched.config;
    let config_file = common
        .config
        .clone()
        .unwrap_or_else(|| launched.paths.config_file.clone());
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

    let shape = ModelShape::from_gguf(&launched.model.info);
    let system_prompt = config.system_prompt.clone();
    let (engine, events) = engine::spawn(launched.engine);
    let mut state =
        State::new(engine.info().clone(), Some(shape), keys).with_system_prompt(system_prompt);
    state.notice = warnings.into_iter().next();
    let samples = telemetry::spawn(Duration::from_secs(1));
    run_terminal(state, &theme, engine, events, samples).await
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
    engine: EngineHandle,
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
                None => break,
            },
            ev = events.recv() => match ev {
                Some(ev) => Msg::Engine(ev, Instant::now()),
                None => return Err(KilnError::Engine("the engine stopped unexpectedly".into())),
            },
            changed = samples.changed() => match changed {
                Ok(()) => Msg::Telemetry(samples.borrow_and_update().clone()),
                Err(_) => continue,
            },
            _ = hangup.recv() => break,
            _ = terminate.recv() => break,
            _ = tokio::time::sleep_until(next_frame), if dirty => continue,
        };
        for effect in app::update(&mut state, msg) {
            perform(effect, &engine);
        }
        dirty = true;
    }
    engine.cancel();
    Ok(0)
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

fn perform(effect: Effect, engine: &EngineHandle) {
    match effect {
        Effect::Chat(text) => {
            engine.chat(text);
        }
        Effect::Regenerate { history, message } => {
            engine.send(EngineCommand::SetHistory(history));
            engine.chat(message);
        }
        Effect::Cancel => engine.cancel(),
        Effect::SetSystemPrompt(p) => engine.send(EngineCommand::SetSystemPrompt(p)),
        Effect::Copy(text) => copy_osc52(&text),
        Effect::Quit => {}
    }
}

/// OSC 52 asks the terminal to set the clipboard, which works through SSH
/// and (with `set-clipboard on`) tmux.
fn copy_osc52(text: &str) {
    let mut end = text.len().min(MAX_COPY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[..end]);
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\x1b]52;c;{encoded}\x07");
    let _ = out.flush();
}
