//! The daemon protocol: versioned, length-delimited JSON frames.
//!
//! A frame is a 4-byte big-endian length, then that many bytes of JSON
//! `{"v": VERSION, ...}`. A frame over `MAX_FRAME`, one that does not parse,
//! or one of another version is an error that closes that one client.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent::{Outcome, Progress};
use crate::app::Pasted;

/// 2: the workstation over the socket; 3: clients send their settings;
/// 6: kiln's own input types, agent settings with the client's settings;
/// 7: several workstations, speed and KV tokens in `kiln ps`, `kiln ask`
/// through the daemon; 8: top-k, min-p, penalties and prompt lookup in the
/// client's sampling settings, decode and draft figures in turn stats;
/// 9: the draft model and its settings among the window flags; 10: a
/// write's diff with its result in an agent's progress, AGENTS.md and
/// notices among its events, the attach snapshot's dropped count; 11: an
/// agent resumed; 12: native tool calls (the run's reasoning and how it
/// calls tools in its progress, `--tool-calls` among the agent flags).
pub const VERSION: u32 = 13;
/// Room for a cut paste (1 MiB) even where JSON escapes every byte.
pub const MAX_FRAME: usize = 8 << 20;
/// The largest question `kiln ask` sends the daemon (one that JSON
/// escapes whole still fits a frame); a larger one is answered by a model
/// the client loads itself.
pub const MAX_QUESTION: usize = MAX_FRAME / 8;
/// How long the rest of a frame may take once its length has arrived.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The command line as one value: what a client's `kiln` was started
/// with. A client that starts the daemon hands it its `Settings` (on the
/// daemon's stdin), and every client sends its own when it attaches, to be
/// compared with the daemon's field by field. Model and engine settings
/// are the daemon's, so one the client gave that differs is refused,
/// naming it (one the client left at its default is not compared, so a
/// plain `kiln attach` takes whatever runs). Safety settings are the
/// client's own: a conversation or run opened for this client gets its
/// workspace, approval policy and agent settings, and joining one that asks
/// less than the client asked for is refused; approval is never downgraded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Every flag as given, `--workspace` made absolute.
    pub common: crate::cli::Common,
    /// The client's folder: the workspace when none was given.
    pub cwd: PathBuf,
}

impl Settings {
    pub fn of(common: &crate::cli::Common) -> Settings {
        let absolute = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let mut common = common.clone();
        common.workspace = common.workspace.as_deref().map(absolute);
        Settings {
            common,
            cwd: absolute(Path::new(".")),
        }
    }

    /// The workspace a conversation or run opened for this client uses.
    pub fn workspace(&self) -> &Path {
        self.common.workspace.as_deref().unwrap_or(&self.cwd)
    }

    /// The model and engine settings given, each as its flag and value;
    /// those at their defaults are left out. Read from the settings' serde
    /// form, so a flag added to `Common`'s model settings is compared
    /// without being listed here.
    pub fn model_flags(&self) -> Vec<(String, String)> {
        let c = &self.common;
        let backend = crate::engine::local::Backend::parse(&c.engine);
        let view = ModelView {
            model: c.model.as_deref(),
            engine: (backend != Some(crate::engine::local::Backend::LlamaCpp))
                .then_some(c.engine.as_str()),
            kv_type: c.kv_type,
            window: &c.window,
            ctx: c.ctx,
            system: c.system.as_deref(),
            sampling: &c.sampling,
        };
        let defaults = ModelView {
            model: None,
            engine: None,
            kv_type: Default::default(),
            window: &Default::default(),
            ctx: None,
            system: None,
            sampling: &Default::default(),
        };
        let (given, default) = (json_map(&view), json_map(&defaults));
        given
            .into_iter()
            .filter(|(k, v)| !v.is_null() && default.get(k) != Some(v))
            .map(|(k, v)| (format!("--{}", k.replace('_', "-")), flag_value(&v)))
            .collect()
    }
}

/// The model and engine settings, flat, keyed by their flags' names.
#[derive(Serialize)]
struct ModelView<'a> {
    model: Option<&'a str>,
    engine: Option<&'a str>,
    kv_type: crate::budget::KvType,
    #[serde(flatten)]
    window: &'a crate::window::WindowArgs,
    ctx: Option<usize>,
    system: Option<&'a str>,
    #[serde(flatten)]
    sampling: &'a crate::cli::SamplingArgs,
}

/// Through JSON text rather than `to_value`, which widens an f32 to the
/// f64 nearest it (0.9 would read 0.8999999761581421).
fn json_map(view: &ModelView) -> serde_json::Map<String, serde_json::Value> {
    let text = serde_json::to_string(view).expect("settings serialize");
    serde_json::from_str(&text).expect("settings read back")
}

/// A setting's value as it is typed after its flag (`on`/`off` for
/// switches; text quoted and made visible).
fn flag_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Bool(true) => "on".into(),
        serde_json::Value::Bool(false) => "off".into(),
        serde_json::Value::String(s) if s.contains(char::is_whitespace) || s.is_empty() => {
            format!("{:?}", crate::visible::visible_line(s))
        }
        serde_json::Value::String(s) => crate::visible::visible_line(s).into_owned(),
        other => other.to_string(),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    StartAgent {
        task: String,
        /// The client's settings; its workspace, policy and agent settings
        /// are the run's.
        settings: Settings,
    },
    /// Go on with the interrupted or stopped run journaled in session
    /// `id`; the client's budget flags replace the journaled budgets.
    ResumeAgent {
        id: String,
        settings: Settings,
    },
    List,
    Stop {
        id: String,
    },
    /// A snapshot of the run, then its live events.
    Attach {
        id: String,
    },
    /// One question for the loaded model, on a conversation of its own:
    /// `Asked`, then the turn's events as `Turn` replies to its end. The
    /// client closing its side cancels the answer.
    Ask {
        question: String,
        /// Answer without keeping the exchange as a session.
        ephemeral: bool,
        settings: Settings,
    },
    /// Attach a terminal to the workstation: `Screen` replies follow, and
    /// the client sends `Input` until it goes.
    Workstation {
        open: Open,
        /// Columns and rows.
        size: (u16, u16),
        theme: Option<String>,
        no_color: bool,
        /// What the client was asked to run, checked against the daemon's.
        settings: Settings,
    },
    Input {
        input: Input,
    },
    /// Stop every run, save the workstation, exit.
    Shutdown,
}

/// Which conversation a terminal attaches to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Open {
    /// The one open in the daemon, else a new one (`kiln`).
    Current,
    /// A new one beside any open (`kiln new`).
    New,
    /// The one open in the daemon, else the most recent (`kiln attach`).
    Last,
    /// This session (`kiln attach ID`, `kiln resume ID`).
    Session { query: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub task: String,
    pub steps: u32,
    /// `None` while running.
    pub outcome: Option<Outcome>,
    /// The last step's decode speed, and the tokens its conversation held
    /// in the model's KV cache.
    #[serde(default)]
    pub tok_s: Option<f64>,
    #[serde(default)]
    pub context_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Started {
        id: String,
    },
    /// The question's conversation is leased; the session that keeps it.
    Asked {
        session: Option<String>,
        model: crate::engine::ModelInfo,
    },
    /// One of the asked question's turn events.
    Turn {
        event: crate::engine::EngineEvent,
    },
    Runs {
        runs: Vec<RunInfo>,
        /// The conversations open in workstations, oldest first.
        #[serde(default)]
        workstations: Vec<crate::host::workstation::Status>,
        /// The API's requests in flight, where the daemon serves it.
        #[serde(default)]
        served: Vec<crate::telemetry::remote::ServedRequest>,
    },
    Stopping {
        id: String,
    },
    /// The run's events so far, numbered from 1: the newest the daemon
    /// keeps, after the `dropped` oldest.
    Snapshot {
        id: String,
        #[serde(default)]
        dropped: u64,
        events: Vec<Progress>,
        outcome: Option<Outcome>,
    },
    /// The next event: number `seq` follows the snapshot without a gap.
    Event {
        id: String,
        seq: u64,
        event: Progress,
    },
    Done {
        id: String,
        outcome: Outcome,
    },
    Error {
        message: String,
    },
    /// Escape sequences for the attached terminal.
    Screen {
        text: String,
    },
    /// The workstation closed; why, or empty after a quit.
    Closed {
        reason: String,
    },
    ShuttingDown,
}

/// Terminal input as it travels to the host, in kiln's own form (so the
/// protocol does not depend on crossterm's serde form). Pastes are cut
/// where they arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    Key {
        key: Key,
    },
    Paste {
        pasted: Pasted,
    },
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Mouse wheel: positive scrolls down, negative up, in rows.
    Wheel {
        rows: i16,
    },
}

/// A key press (or release) with its modifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub code: KeyName,
    #[serde(default)]
    pub ctrl: bool,
    #[serde(default)]
    pub alt: bool,
    #[serde(default)]
    pub shift: bool,
    /// A key let go, where the terminal reports releases.
    #[serde(default)]
    pub release: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "char", rename_all = "snake_case")]
pub enum KeyName {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Tab,
    BackTab,
    Up,
    Down,
    Left,
    Right,
    Home,
    End,
    PageUp,
    PageDown,
    Delete,
    Insert,
    /// F1 to F24.
    F(u8),
}

impl Input {
    /// What a terminal event becomes on the wire; `None` for events the
    /// workstation has no use for (focus, mouse moves and clicks).
    pub fn from_event(event: crossterm::event::Event) -> Option<Input> {
        use crossterm::event::{Event, MouseEventKind};
        match event {
            Event::Key(key) => Key::of(key).map(|key| Input::Key { key }),
            Event::Paste(text) => Some(Input::Paste {
                pasted: Pasted::new(text),
            }),
            Event::Resize(cols, rows) => Some(Input::Resize { cols, rows }),
            Event::Mouse(m) => match m.kind {
                MouseEventKind::ScrollUp => Some(Input::Wheel {
                    rows: -crate::host::workstation::WHEEL_ROWS,
                }),
                MouseEventKind::ScrollDown => Some(Input::Wheel {
                    rows: crate::host::workstation::WHEEL_ROWS,
                }),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the host can take this input from a client.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            Input::Resize { cols, rows } => crate::host::workstation::check_size((*cols, *rows)),
            Input::Key {
                key:
                    Key {
                        code: KeyName::F(n),
                        ..
                    },
            } if !(1..=24).contains(n) => Err(format!("no key F{n}")),
            _ => Ok(()),
        }
    }
}

impl Key {
    /// A key as crossterm reads it; `None` for keys kiln binds nothing to
    /// (media keys, lone modifiers).
    pub fn of(key: crossterm::event::KeyEvent) -> Option<Key> {
        use crossterm::event::{KeyCode, KeyEventKind, KeyModifiers};
        let code = match key.code {
            KeyCode::Char(c) => KeyName::Char(c),
            KeyCode::Enter => KeyName::Enter,
            KeyCode::Esc => KeyName::Esc,
            KeyCode::Backspace => KeyName::Backspace,
            KeyCode::Tab => KeyName::Tab,
            KeyCode::BackTab => KeyName::BackTab,
            KeyCode::Up => KeyName::Up,
            KeyCode::Down => KeyName::Down,
            KeyCode::Left => KeyName::Left,
            KeyCode::Right => KeyName::Right,
            KeyCode::Home => KeyName::Home,
            KeyCode::End => KeyName::End,
            KeyCode::PageUp => KeyName::PageUp,
            KeyCode::PageDown => KeyName::PageDown,
            KeyCode::Delete => KeyName::Delete,
            KeyCode::Insert => KeyName::Insert,
            KeyCode::F(n) => KeyName::F(n),
            _ => return None,
        };
        Some(Key {
            code,
            ctrl: key.modifiers.contains(KeyModifiers::CONTROL),
            alt: key.modifiers.contains(KeyModifiers::ALT),
            shift: key.modifiers.contains(KeyModifiers::SHIFT),
            release: key.kind == KeyEventKind::Release,
        })
    }

    /// The key as the workstation's key map reads it.
    pub fn event(self) -> crossterm::event::KeyEvent {
        use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
        let code = match self.code {
            KeyName::Char(c) => KeyCode::Char(c),
            KeyName::Enter => KeyCode::Enter,
            KeyName::Esc => KeyCode::Esc,
            KeyName::Backspace => KeyCode::Backspace,
            KeyName::Tab => KeyCode::Tab,
            KeyName::BackTab => KeyCode::BackTab,
            KeyName::Up => KeyCode::Up,
            KeyName::Down => KeyCode::Down,
            KeyName::Left => KeyCode::Left,
            KeyName::Right => KeyCode::Right,
            KeyName::Home => KeyCode::Home,
            KeyName::End => KeyCode::End,
            KeyName::PageUp => KeyCode::PageUp,
            KeyName::PageDown => KeyCode::PageDown,
            KeyName::Delete => KeyCode::Delete,
            KeyName::Insert => KeyCode::Insert,
            KeyName::F(n) => KeyCode::F(n),
        };
        let mut modifiers = KeyModifiers::NONE;
        modifiers.set(KeyModifiers::CONTROL, self.ctrl);
        modifiers.set(KeyModifiers::ALT, self.alt);
        modifiers.set(KeyModifiers::SHIFT, self.shift);
        let mut event = KeyEvent::new(code, modifiers);
        if self.release {
            event.kind = KeyEventKind::Release;
        }
        event
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("protocol version {0}, this kiln speaks {VERSION}")]
    WrongVersion(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Serialize)]
struct Out<'a, T> {
    v: u32,
    #[serde(flatten)]
    msg: &'a T,
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(&Out { v: VERSION, msg }).expect("messages serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decode one frame from the front of `buf`: the message and the bytes it
/// took, or `None` when more bytes are needed.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[4..4 + len];
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == VERSION as u64 => {}
        Some(v) => return Err(FrameError::WrongVersion(v)),
        None => return Err(FrameError::Malformed("no version".into())),
    }
    let msg = serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(Some((msg, 4 + len)))
}

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> std::io::Result<()> {
    w.write_all(&encode(msg)).await?;
    w.flush().await
}

pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    // Memory follows the bytes that arrived, not the length a peer claims,
    // and a frame that has begun must end in time (no slow drip).
    let mut frame = Vec::with_capacity(4 + n.min(64 << 10));
    frame.extend_from_slice(&len);
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        (&mut *r).take(n as u64).read_to_end(&mut frame),
    )
    .await;
    match body {
        Ok(Ok(got)) if got == n => {}
        Ok(Ok(_)) => return Err(FrameError::Closed),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(FrameError::Malformed(format!(
                "a frame of {n} bytes did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            )))
        }
    }
    match decode(&frame)? {
        Some((msg, _)) => Ok(msg),
        None => Err(FrameError::Malformed("short frame".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Policy;
    use clap::Parser;
    use rand::{Rng, SeedableRng};

    fn sample() -> Request {
        Request::StartAgent {
            task: "tidy the notes ✓".into(),
            settings: Settings {
                common: crate::cli::Common {
                    workspace: Some("/tmp/ws".into()),
                    approval: Policy::AutoRead,
                    ..Default::default()
                },
                cwd: "/tmp".into(),
            },
        }
    }

    /// The settings a client hands a daemon it starts come back whole, and
    /// only the model and engine flags given count as given.
    #[test]
    fn settings_travel_whole_and_list_only_what_was_given() {
        let cli = crate::cli::Cli::try_parse_from([
            "kiln",
            "--model",
            "m.gguf",
            "--kv-type",
            "q8_0",
            "--flash-attn",
            "on",
            "--think",
            "off",
            "--temperature",
            "0.3",
            "--system",
            "be brief",
            "--max-steps",
            "4",
        ])
        .unwrap();
        let settings = Settings::of(&cli.common);
        let back: Settings =
            serde_json::from_slice(&serde_json::to_vec(&settings).unwrap()).unwrap();
        assert_eq!(back, settings);
        let flags: Vec<String> = settings
            .model_flags()
            .into_iter()
            .map(|(f, v)| format!("{f} {v}"))
            .collect();
        assert_eq!(
            flags,
            [
                "--model m.gguf",
                "--kv-type q8_0",
                "--flash-attn on",
                "--system \"be brief\"",
                "--temperature 0.3",
                "--think off"
            ]
        );
        let plain = crate::cli::Cli::try_parse_from(["kiln"]).unwrap();
        assert!(Settings::of(&plain.common).model_flags().is_empty());
    }

    #[test]
    fn round_trip_and_partial_frames() {
        let frame = encode(&sample());
        for cut in 0..frame.len() {
            assert!(decode::<Request>(&frame[..cut]).unwrap().is_none(), "{cut}");
        }
        let (msg, used) = decode::<Request>(&frame).unwrap().unwrap();
        assert_eq!((msg, used), (sample(), frame.len()));
        // Two frames back to back.
        let mut two = frame.clone();
        two.extend_from_slice(&encode(&Request::List));
        let (_, used) = decode::<Request>(&two).unwrap().unwrap();
        assert_eq!(
            decode::<Request>(&two[used..]).unwrap().unwrap().0,
            Request::List
        );
    }

    #[test]
    fn oversized_wrong_version_and_garbage_are_errors() {
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert!(matches!(
            decode::<Request>(&big),
            Err(FrameError::TooLarge(_))
        ));
        let body = br#"{"v": 1, "type": "list"}"#;
        let mut old = (body.len() as u32).to_be_bytes().to_vec();
        old.extend_from_slice(body);
        assert!(matches!(
            decode::<Request>(&old),
            Err(FrameError::WrongVersion(1))
        ));
        let body = format!(r#"{{"v": {VERSION}, "type": "launch_missiles"}}"#);
        let mut bad = (body.len() as u32).to_be_bytes().to_vec();
        bad.extend_from_slice(body.as_bytes());
        assert!(matches!(
            decode::<Request>(&bad),
            Err(FrameError::Malformed(_))
        ));
    }

    /// Random bytes, truncations and bit flips never panic the decoder; it
    /// answers a message, "need more", or an error.
    #[test]
    fn the_decoder_survives_random_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let good = encode(&sample());
        for _ in 0..20_000 {
            let mut bytes = if rng.gen_bool(0.5) {
                let n = rng.gen_range(0..64);
                (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                good.clone()
            };
            if !bytes.is_empty() && rng.gen_bool(0.7) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
            if rng.gen_bool(0.3) {
                bytes.truncate(rng.gen_range(0..=bytes.len()));
            }
            let _ = decode::<Request>(&bytes);
        }
    }

    #[tokio::test]
    async fn async_read_and_write() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write(&mut a, &sample()).await.unwrap();
        write(&mut a, &Request::List).await.unwrap();
        assert_eq!(read::<Request, _>(&mut b).await.unwrap(), sample());
        assert_eq!(read::<Request, _>(&mut b).await.unwrap(), Request::List);
        drop(a);
        assert!(matches!(
            read::<Request, _>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }
}
