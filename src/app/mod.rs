//! The workstation's state and its one entry point, `update`: a message in
//! (a key, a paste, an engine event, a telemetry sample), effects out. No IO,
//! no clocks (instants arrive inside messages), no locks.

mod events;
mod input;
mod scroll;

pub use events::outgrows_local;
use events::{on_agent, on_engine, on_sample};
use input::{on_key, on_paste};

use std::collections::VecDeque;
use std::time::Instant;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use tui_textarea::TextArea;

use crate::agent::{Approval, Outcome, Progress, Question};
use crate::budget::ModelShape;
use crate::engine::{EngineEvent, FinishReason, GenStats, Message, ModelInfo};
use crate::keys::{Action, KeyMap};
use crate::store::journal::{title_from, Report};
use crate::store::session::Event;
use crate::store::transcript::Transcript;
use crate::telemetry::alarms::{AlarmDetector, AlarmEvent, AlarmKind};
use crate::telemetry::Sample;

pub use crate::store::transcript::{Entry, EntryKind};
pub use scroll::Scroll;

/// A paste larger than this is cut: more text than any local context holds,
/// and a bound on what the editor has to lay out.
pub const MAX_PASTE_BYTES: usize = 1 << 20;
/// Points kept in the sparklines.
const HISTORY: usize = 120;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Chat,
    Help,
    EditSystem,
    ConfirmQuit,
    Picker,
    /// The agent waits for a yes or no on a tool call.
    Approve,
}

/// What the agent tells the front end.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentMsg {
    Progress(Progress),
    /// A tool call needs a yes or no (answered with `Effect::Approve`).
    Approval(Question),
    /// The run has a conversation and a session of its own (this one):
    /// the chat goes on beside it.
    Apart(String),
    Done(Outcome),
}

/// The agent run in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentView {
    pub task: String,
    pub step: u32,
    pub pending: Option<Question>,
    /// How far the approval question is scrolled.
    pub approval_scroll: usize,
    /// The sandbox its shell commands get, once the run says.
    pub sandbox: Option<crate::agent::sandbox::Sandbox>,
    /// How its calls are written (the model's own format, or JSON-only
    /// as `None`), once the run says.
    pub calls: Option<Option<crate::engine::tool_format::ToolFormat>>,
    pub stopping: bool,
    /// The run's own session, when it runs on a conversation of its own
    /// beside the chat (else it drives the chat's conversation).
    pub apart: Option<String>,
}

/// A saved session as the picker lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct PickerItem {
    pub dir: std::path::PathBuf,
    pub title: String,
    pub updated: String,
    pub messages: usize,
    /// Lower-cased text of the conversation, for filtering by content.
    pub text: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Picker {
    pub filter: String,
    pub items: Vec<PickerItem>,
    pub selected: usize,
}

impl Picker {
    /// Items whose title or conversation holds every word of the filter.
    pub fn visible(&self) -> Vec<&PickerItem> {
        let words: Vec<String> = self
            .filter
            .split_whitespace()
            .map(str::to_lowercase)
            .collect();
        self.items
            .iter()
            .filter(|i| {
                let title = i.title.to_lowercase();
                words
                    .iter()
                    .all(|w| title.contains(w.as_str()) || i.text.contains(w.as_str()))
            })
            .collect()
    }
}

/// The answer being generated.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Index of its entry in the transcript.
    pub entry: usize,
    pub first_token_at: Option<Instant>,
    pub tokens: usize,
    /// Tokens per second since the first token, updated as tokens arrive.
    pub live_tok_s: Option<f64>,
    pub cancelling: bool,
    /// The machine's power in the samples taken during the turn: their sum
    /// and count.
    pub power: (f64, u32),
}

/// What a turn cost in energy: the machine's mean power over it, and that
/// power times the turn's time over the tokens it generated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TurnEnergy {
    pub watts: f64,
    pub joules_per_token: f64,
}

impl TurnEnergy {
    pub fn of(power: (f64, u32), stats: &GenStats) -> Option<TurnEnergy> {
        let (sum, n) = power;
        if n == 0 || stats.completion_tokens == 0 {
            return None;
        }
        let watts = sum / n as f64;
        Some(TurnEnergy {
            watts,
            joules_per_token: watts * stats.total_ms / 1000.0 / stats.completion_tokens as f64,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panels {
    /// Full panels on wide screens, a one-line summary on narrow ones.
    Auto,
    Full,
    Summary,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Chat(String),
    /// Replace the engine's conversation, then answer `message` again.
    Regenerate {
        history: Vec<Message>,
        message: String,
    },
    /// Replace the engine's conversation (ending with the cut answer), then
    /// continue that answer.
    Continue {
        history: Vec<Message>,
    },
    Cancel,
    SetSystemPrompt(Option<String>),
    /// Put text on the clipboard through the terminal (OSC 52).
    Copy(String),
    /// Append to the session's journal.
    Record(Event),
    /// Streamed answer text, journaled in batches.
    RecordChunk(String),
    /// Read the saved sessions for the picker (answered by `Msg::Sessions`).
    ListSessions,
    /// Leave this session for the one in this folder.
    OpenSession(std::path::PathBuf),
    /// Run an agent on this task in the workspace.
    StartAgent(String),
    StopAgent,
    Approve(Approval),
    /// Move the conversation to endpoint `Some(NAME)`, or back to the local
    /// model (`None`); the target gets `history` and re-reads it on the
    /// next message. `offload`: moved because the next turn would outgrow
    /// this machine (answered by `Msg::Moved`).
    SwitchEngine {
        target: Option<String>,
        history: Vec<Message>,
        system_prompt: Option<String>,
        offload: bool,
    },
    /// Give the engine the chat back after an agent run.
    RestoreChat {
        system_prompt: Option<String>,
        history: Vec<Message>,
    },
    Quit,
}

impl From<crate::record::Record> for Effect {
    fn from(record: crate::record::Record) -> Effect {
        match record {
            crate::record::Record::Chunk(text) => Effect::RecordChunk(text),
            crate::record::Record::Event(event) => Effect::Record(event),
        }
    }
}

/// Pasted text, cut to `MAX_PASTE_BYTES` where it arrives (so that a huge
/// paste never travels further), with the size it had. A paste read from
/// a client is cut again: the daemon does not take a terminal's word for it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "PastedFrame")]
pub struct Pasted {
    pub text: String,
    pub total: usize,
}

/// A paste as it arrives over the socket, before it is cut.
#[derive(serde::Deserialize)]
struct PastedFrame {
    text: String,
    total: usize,
}

impl From<PastedFrame> for Pasted {
    fn from(frame: PastedFrame) -> Pasted {
        let mut pasted = Pasted::new(frame.text);
        pasted.total = pasted.total.max(frame.total);
        pasted
    }
}

impl Pasted {
    pub fn new(mut text: String) -> Pasted {
        let total = text.len();
        if total > MAX_PASTE_BYTES {
            let mut cut = MAX_PASTE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Pasted { text, total }
    }
}

#[derive(Clone, Debug)]
pub enum Msg {
    Key(KeyEvent),
    Paste(Pasted),
    /// Mouse wheel: positive scrolls down, negative up, in rows.
    Wheel(i16),
    Resize(u16, u16),
    Engine(EngineEvent, Instant),
    Telemetry(Sample),
    /// The endpoint's node, as its telemetry says.
    Node(crate::telemetry::remote::RemoteNode),
    Journal(Report),
    Sessions(Vec<PickerItem>),
    Agent(AgentMsg),
    /// A line for the status bar from the runtime.
    Notice(String),
    /// The conversation moved to another engine (`to`), or could not.
    Moved {
        to: Option<Box<MovedTo>>,
        line: String,
        offload: bool,
    },
    /// A saved session read back and handed to the engine.
    Resumed(Box<Resumed>),
}

/// The engine a conversation moved to.
#[derive(Clone, Debug)]
pub struct MovedTo {
    pub model: ModelInfo,
    /// The local model's dimensions, when it was loaded for the move.
    pub shape: Option<ModelShape>,
    /// `remote:NAME`, or `None` for the local model.
    pub remote: Option<String>,
}

/// A session read from disk, as the workstation shows it.
#[derive(Clone, Debug)]
pub struct Resumed {
    pub title: String,
    pub transcript: Transcript,
    /// Tokens in the KV state loaded from its snapshot, if one loaded.
    pub kv_tokens: Option<usize>,
    /// What the status bar says of it.
    pub line: String,
}

#[derive(Clone)]
pub struct State {
    pub model: ModelInfo,
    pub shape: Option<ModelShape>,
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub transcript: Vec<Entry>,
    pub generation: Option<Generation>,
    pub input: TextArea<'static>,
    pub system_editor: TextArea<'static>,
    history: Vec<String>,
    history_pos: Option<usize>,
    pub scroll: Scroll,
    pub unseen_output: bool,
    pub mode: Mode,
    pub picker: Picker,
    pub agent: Option<AgentView>,
    /// `remote:NAME` while the conversation runs on an endpoint.
    pub remote: Option<String>,
    /// What the endpoint's node reports of itself, while on one.
    pub node: crate::telemetry::remote::RemoteNode,
    pub panels: Panels,
    /// Whether answers show their thinking whole rather than folded.
    pub show_thinking: bool,
    pub size: (u16, u16),
    pub telemetry: Sample,
    /// Swap-in rate per sample, bytes per second (0 where not available).
    pub swap_in_history: VecDeque<u64>,
    /// Decode tok/s of finished turns.
    pub decode_history: VecDeque<f64>,
    pub last_stats: Option<GenStats>,
    /// The last turn's energy, where the machine reports its power.
    pub last_energy: Option<TurnEnergy>,
    pub context_tokens: usize,
    alarms: AlarmDetector,
    pub active_alarms: Vec<(AlarmKind, String)>,
    /// One line for the status bar, replaced by the next.
    pub notice: Option<String>,
    interrupt_armed: bool,
    pub keys: KeyMap,
    pub quit: bool,
    /// The endpoint a conversation moves to before a turn that would
    /// outgrow this machine (`auto_offload` in config.toml).
    pub auto_offload: Option<String>,
    /// The longest answer a turn may need, for that decision.
    pub answer_tokens: usize,
}

impl State {
    pub fn new(model: ModelInfo, shape: Option<ModelShape>, keys: KeyMap) -> State {
        let mut state = State {
            model,
            shape,
            title: None,
            system_prompt: None,
            transcript: Vec::new(),
            generation: None,
            input: TextArea::default(),
            system_editor: TextArea::default(),
            history: Vec::new(),
            history_pos: None,
            scroll: Scroll::Follow,
            unseen_output: false,
            mode: Mode::Chat,
            picker: Picker::default(),
            agent: None,
            remote: None,
            node: Default::default(),
            panels: Panels::Auto,
            show_thinking: false,
            size: (80, 24),
            telemetry: Sample::default(),
            swap_in_history: VecDeque::new(),
            decode_history: VecDeque::new(),
            last_stats: None,
            last_energy: None,
            context_tokens: 0,
            alarms: AlarmDetector::default(),
            active_alarms: Vec::new(),
            notice: None,
            interrupt_armed: false,
            keys,
            quit: false,
            auto_offload: None,
            answer_tokens: 0,
        };
        state.reset_input();
        state
    }

    /// Move to endpoint `name` before a turn of up to `answer_tokens` that
    /// would outgrow this machine.
    pub fn with_offload(mut self, name: Option<String>, answer_tokens: usize) -> State {
        self.auto_offload = name;
        self.answer_tokens = answer_tokens;
        self
    }

    /// The state for a preset's model without loading it, for benchmarks
    /// and snapshot tests.
    pub fn for_preset(preset: &crate::models::Preset, context_limit: usize) -> State {
        let info = ModelInfo {
            name: preset.name.into(),
            engine: "kalosm".into(),
            architecture: preset.shape.architecture.into(),
            path: None,
            context_limit,
            notes: Vec::new(),
            tool_format: None,
        };
        State::new(
            info,
            Some(ModelShape::from_preset(preset)),
            KeyMap::default(),
        )
    }

    pub fn with_system_prompt(mut self, prompt: Option<String>) -> State {
        self.system_prompt = prompt;
        self
    }

    pub fn generating(&self) -> bool {
        self.generation.is_some()
    }

    /// Whether the side panels are drawn in full at the width of the
    /// terminal being typed in.
    pub fn full_panels(&self) -> bool {
        self.full_panels_at(self.size.0)
    }

    /// Whether the side panels are drawn in full on a terminal this wide.
    pub fn full_panels_at(&self, width: u16) -> bool {
        match self.panels {
            Panels::Auto => width >= crate::layout::FULL_PANELS_MIN_WIDTH,
            Panels::Full => true,
            Panels::Summary => false,
        }
    }

    /// Width and height of the conversation text on the terminal being
    /// typed in, for scrolling and paging.
    pub fn chat_viewport(&self) -> (u16, usize) {
        crate::layout::chat_viewport(self.size, self.full_panels(), self.input.lines().len())
    }

    /// How transcript entries are laid out as rows.
    pub fn entry_view(&self) -> crate::layout::entries::EntryView<'_> {
        crate::layout::entries::EntryView {
            model: &self.model.name,
            streaming: self.generation.as_ref().map(|g| g.entry),
            show_thinking: self.show_thinking,
            keys: &self.keys,
        }
    }

    fn input_text(&self) -> String {
        self.input.lines().join("\n")
    }

    fn input_is_empty(&self) -> bool {
        self.input.lines().iter().all(|l| l.is_empty())
    }

    fn reset_input(&mut self) {
        self.input = TextArea::default();
        self.input.set_placeholder_text(format!(
            "Message {} · {} help",
            self.model.name,
            self.keys.hint(Action::Help)
        ));
    }

    fn set_input(&mut self, text: &str) {
        self.input = TextArea::new(text.split('\n').map(str::to_string).collect());
        self.input.move_cursor(tui_textarea::CursorMove::Bottom);
        self.input.move_cursor(tui_textarea::CursorMove::End);
    }

    pub fn push_notice(&mut self, text: String) {
        self.push_entry(Entry::new(EntryKind::Notice, text));
    }

    fn push_entry(&mut self, entry: Entry) {
        self.transcript.push(entry);
        self.output_arrived();
    }

    fn output_arrived(&mut self) {
        if !matches!(self.scroll, Scroll::Follow) {
            self.unseen_output = true;
        }
    }

    /// The conversation as the engine sees it: user and assistant turns.
    fn conversation(&self) -> Vec<Message> {
        Transcript::messages(&self.transcript)
    }

    /// Show a session read back from disk.
    pub fn restore(&mut self, title: &str, transcript: Transcript) {
        self.title = Some(title.to_string());
        self.context_tokens = transcript
            .last_stats
            .as_ref()
            .map_or(0, |s| s.context_tokens);
        if let Some(d) = transcript.last_stats.as_ref().and_then(|s| s.decode_tok_s) {
            push_bounded(&mut self.decode_history, d);
        }
        self.last_stats = transcript.last_stats;
        self.system_prompt = transcript.system_prompt;
        self.transcript = transcript.entries;
        self.scroll = Scroll::Follow;
    }
}

pub fn update(state: &mut State, msg: Msg) -> Vec<Effect> {
    match msg {
        Msg::Key(key) => on_key(state, key),
        Msg::Paste(pasted) => {
            on_paste(state, pasted);
            Vec::new()
        }
        Msg::Wheel(rows) => {
            scroll::by(state, rows as i64);
            Vec::new()
        }
        Msg::Resize(w, h) => {
            state.size = (w, h);
            scroll::clamp(state);
            Vec::new()
        }
        Msg::Engine(event, at) => on_engine(state, event, at),
        Msg::Telemetry(sample) => on_sample(state, sample),
        Msg::Node(node) => {
            state.node = node;
            Vec::new()
        }
        Msg::Agent(msg) => on_agent(state, msg),
        Msg::Sessions(items) => {
            state.picker = Picker {
                filter: String::new(),
                items,
                selected: 0,
            };
            state.mode = Mode::Picker;
            Vec::new()
        }
        Msg::Journal(report) => {
            state.notice = Some(match report {
                Report::Failed(e) => e,
                Report::Recovered => "the session journal is being written again".into(),
            });
            Vec::new()
        }
        Msg::Notice(line) => {
            state.notice = Some(line);
            Vec::new()
        }
        Msg::Moved { to, line, offload } => {
            if let Some(to) = to.map(|to| *to) {
                state.model = to.model;
                if to.shape.is_some() {
                    state.shape = to.shape;
                }
                state.remote = to.remote;
                state.node = Default::default();
            }
            let line = match offload {
                true => format!("the next turn would outgrow this machine: {line}"),
                false => {
                    state.push_notice(line.clone());
                    line
                }
            };
            state.notice = Some(line.clone());
            vec![Effect::Record(Event::Notice { text: line })]
        }
        Msg::Resumed(resumed) => {
            let Resumed {
                title,
                transcript,
                kv_tokens,
                line,
            } = *resumed;
            state.restore(&title, transcript);
            if let Some(tokens) = kv_tokens {
                state.context_tokens = tokens;
            }
            state.notice = Some(line);
            Vec::new()
        }
    }
}

pub(super) fn push_bounded<T>(v: &mut VecDeque<T>, x: T) {
    if v.len() == HISTORY {
        v.pop_front();
    }
    v.push_back(x);
}

/// Ctrl-C as crossterm reports it, for tests and the runtime.
pub fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
}

#[cfg(test)]
mod tests;
