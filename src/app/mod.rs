//! The workstation's state and its one entry point, `update`: a message in
//! (a key, a paste, an engine event, a telemetry sample), effects out. No IO,
//! no clocks (instants arrive inside messages), no locks.

mod scroll;

use std::collections::VecDeque;
use std::time::Instant;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use tui_textarea::TextArea;

use crate::agent::tools::ToolCall;
use crate::agent::{Approval, Outcome, Progress};
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
    Approval(ToolCall),
    Done(Outcome),
}

/// The agent run in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentView {
    pub task: String,
    pub step: u32,
    pub pending: Option<ToolCall>,
    /// How far the approval question is scrolled.
    pub approval_scroll: usize,
    pub stopping: bool,
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
    Journal(Report),
    Sessions(Vec<PickerItem>),
    Agent(AgentMsg),
    /// A line for the status bar from the runtime.
    Notice(String),
    /// The conversation moved to another engine (`to`), or could not.
    Moved {
        to: Option<MovedTo>,
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
            if let Some(to) = to {
                state.model = to.model;
                if to.shape.is_some() {
                    state.shape = to.shape;
                }
                state.remote = to.remote;
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

fn on_key(state: &mut State, key: KeyEvent) -> Vec<Effect> {
    if key.kind == crossterm::event::KeyEventKind::Release {
        return Vec::new();
    }
    let action = state.keys.action(&key);
    if action != Some(Action::Interrupt) {
        state.interrupt_armed = false;
    }
    match state.mode {
        Mode::Help => {
            // Any key closes the help; quitting still works from it.
            state.mode = Mode::Chat;
            if action == Some(Action::Quit) || key.code == KeyCode::Char('q') {
                return quit(state);
            }
            Vec::new()
        }
        Mode::Picker => on_picker_key(state, action, key),
        Mode::Approve => {
            let page = state.agent.as_ref().and_then(|a| {
                let area = ratatui::layout::Rect::new(0, 0, state.size.0, state.size.1);
                let call = a.pending.as_ref()?;
                Some(crate::layout::approval::page(call, area, a.approval_scroll))
            });
            let Some(page) = page else {
                return Vec::new();
            };
            let scroll = match key.code {
                KeyCode::Up => Some(page.first.saturating_sub(1)),
                KeyCode::Down => Some(page.first + 1),
                KeyCode::PageUp => Some(page.first.saturating_sub(page.step())),
                KeyCode::PageDown => Some(page.first + page.step()),
                KeyCode::Home => Some(0),
                KeyCode::End => Some(page.last_first()),
                _ => None,
            };
            if let (Some(to), Some(a)) = (scroll, &mut state.agent) {
                a.approval_scroll = to.min(page.last_first());
                return Vec::new();
            }
            let yes = matches!(key.code, KeyCode::Char('y' | 'Y' | 'a' | 'A'));
            if yes && !page.shows_the_end() {
                state.notice = Some(
                    "the call goes on below: scroll to its end (End) before approving it".into(),
                );
                return Vec::new();
            }
            let answer = match (action, key.code) {
                (_, KeyCode::Char('y' | 'Y')) => Approval::Yes,
                (_, KeyCode::Char('a' | 'A')) => Approval::Always,
                (_, KeyCode::Char('n' | 'N')) | (Some(Action::Cancel), _) => Approval::No,
                (Some(Action::Interrupt), _) => {
                    state.mode = Mode::Chat;
                    return stop_agent(state, Some(Effect::Approve(Approval::No)));
                }
                _ => return Vec::new(),
            };
            state.mode = Mode::Chat;
            if let Some(a) = &mut state.agent {
                a.pending = None;
            }
            vec![Effect::Approve(answer)]
        }
        Mode::ConfirmQuit => match (action, key.code) {
            (Some(Action::Interrupt | Action::Quit), _)
            | (_, KeyCode::Char('y' | 'Y' | 'q'))
            | (_, KeyCode::Enter) => quit(state),
            _ => {
                state.mode = Mode::Chat;
                state.notice = None;
                Vec::new()
            }
        },
        Mode::EditSystem => match action {
            Some(Action::Send) => {
                let text = state.system_editor.lines().join("\n");
                let prompt = (!text.trim().is_empty()).then_some(text);
                state.mode = Mode::Chat;
                state.notice = Some(match &prompt {
                    Some(_) => "system prompt set; it applies from the next message".into(),
                    None => "system prompt cleared".into(),
                });
                state.system_prompt = prompt.clone();
                vec![
                    Effect::Record(Event::SystemPrompt {
                        text: prompt.clone(),
                    }),
                    Effect::SetSystemPrompt(prompt),
                ]
            }
            Some(Action::Newline) => {
                state.system_editor.insert_newline();
                Vec::new()
            }
            Some(Action::Cancel | Action::Interrupt) => {
                state.mode = Mode::Chat;
                Vec::new()
            }
            Some(Action::Quit) => quit(state),
            _ => {
                state.system_editor.input(key);
                Vec::new()
            }
        },
        Mode::Chat => match action {
            Some(action) if applies(state, action, &key) => on_action(state, action),
            _ => {
                state.history_pos = None;
                state.input.input(key);
                Vec::new()
            }
        },
    }
}

/// Keys that double as editing keys (a plain character, Home/End, Up/Down)
/// act only where editing would do nothing useful: on an empty input, or
/// for Up/Down while walking the history.
fn applies(state: &State, action: Action, key: &KeyEvent) -> bool {
    let plain = !key
        .modifiers
        .intersects(KeyModifiers::CONTROL | KeyModifiers::ALT);
    let edits = plain
        && matches!(
            key.code,
            KeyCode::Char(_) | KeyCode::Home | KeyCode::End | KeyCode::Up | KeyCode::Down
        );
    if !edits {
        return true;
    }
    match action {
        Action::HistoryPrev | Action::HistoryNext => {
            state.input.lines().len() <= 1
                && (state.input_is_empty() || state.history_pos.is_some())
        }
        _ => state.input_is_empty(),
    }
}

fn on_action(state: &mut State, action: Action) -> Vec<Effect> {
    match action {
        Action::Send => send(state),
        Action::Newline => {
            state.input.insert_newline();
            Vec::new()
        }
        Action::Cancel => cancel(state),
        Action::Interrupt => {
            if state.generating() || state.agent.is_some() {
                return cancel(state);
            }
            if state.interrupt_armed {
                return quit(state);
            }
            state.interrupt_armed = true;
            state.mode = Mode::ConfirmQuit;
            Vec::new()
        }
        Action::Quit => quit(state),
        Action::ScrollUp => {
            scroll::by(state, -1);
            Vec::new()
        }
        Action::ScrollDown => {
            scroll::by(state, 1);
            Vec::new()
        }
        Action::PageUp => {
            scroll::page(state, -1);
            Vec::new()
        }
        Action::PageDown => {
            scroll::page(state, 1);
            Vec::new()
        }
        Action::Top => {
            scroll::top(state);
            Vec::new()
        }
        Action::Bottom => {
            state.scroll = Scroll::Follow;
            state.unseen_output = false;
            Vec::new()
        }
        Action::HistoryPrev => {
            recall(state, -1);
            Vec::new()
        }
        Action::HistoryNext => {
            recall(state, 1);
            Vec::new()
        }
        Action::Regenerate => regenerate(state),
        Action::Continue => continue_answer(state),
        Action::EditSystem => {
            state.system_editor = TextArea::new(
                state
                    .system_prompt
                    .as_deref()
                    .unwrap_or("")
                    .split('\n')
                    .map(str::to_string)
                    .collect(),
            );
            state
                .system_editor
                .move_cursor(tui_textarea::CursorMove::Bottom);
            state
                .system_editor
                .move_cursor(tui_textarea::CursorMove::End);
            state.mode = Mode::EditSystem;
            Vec::new()
        }
        Action::CopyLast => {
            match state
                .transcript
                .iter()
                .rev()
                .find(|e| e.kind == EntryKind::Assistant && !e.text.is_empty())
            {
                Some(e) => {
                    // The answer, not the thinking before it.
                    let text = crate::engine::thinking::split(&e.text)
                        .shown_answer()
                        .to_string();
                    state.notice = Some(format!(
                        "copied the last answer ({} characters) to the clipboard",
                        text.chars().count()
                    ));
                    vec![Effect::Copy(text)]
                }
                None => {
                    state.notice = Some("no answer to copy yet".into());
                    Vec::new()
                }
            }
        }
        Action::Help => {
            state.mode = Mode::Help;
            Vec::new()
        }
        Action::Sessions => {
            if state.generating() {
                state.notice = Some("still answering".into());
                return Vec::new();
            }
            vec![Effect::ListSessions]
        }
        Action::TogglePanels => {
            state.panels = if state.full_panels() {
                Panels::Summary
            } else {
                Panels::Full
            };
            Vec::new()
        }
        Action::ToggleThinking => {
            state.show_thinking = !state.show_thinking;
            Vec::new()
        }
    }
}

fn on_picker_key(state: &mut State, action: Option<Action>, key: KeyEvent) -> Vec<Effect> {
    let count = state.picker.visible().len();
    match (action, key.code) {
        (Some(Action::Cancel | Action::Interrupt | Action::Sessions), _) => {
            state.mode = Mode::Chat;
        }
        (Some(Action::Quit), _) => return quit(state),
        (_, KeyCode::Enter) => {
            let chosen = state
                .picker
                .visible()
                .get(state.picker.selected)
                .map(|i| i.dir.clone());
            state.mode = Mode::Chat;
            if let Some(dir) = chosen {
                return vec![Effect::OpenSession(dir)];
            }
        }
        (_, KeyCode::Up) => state.picker.selected = state.picker.selected.saturating_sub(1),
        (_, KeyCode::Down) => {
            state.picker.selected = (state.picker.selected + 1).min(count.saturating_sub(1))
        }
        (_, KeyCode::Backspace) => {
            state.picker.filter.pop();
            state.picker.selected = 0;
        }
        (_, KeyCode::Char(c)) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
            state.picker.filter.push(c);
            state.picker.selected = 0;
        }
        _ => {}
    }
    Vec::new()
}

fn send(state: &mut State) -> Vec<Effect> {
    let text = state.input_text();
    if text.trim().is_empty() {
        return Vec::new();
    }
    if state.agent.is_some() {
        state.notice = Some(format!(
            "the agent is running; {} stops it",
            state.keys.hint(Action::Cancel)
        ));
        return Vec::new();
    }
    let command = text.trim();
    if command == "/local" || command.starts_with("/offload") {
        if state.generating() {
            state.notice = Some("still answering".into());
            return Vec::new();
        }
        let target = match command.strip_prefix("/offload") {
            Some(name) if !name.trim().is_empty() => Some(name.trim().to_string()),
            Some(_) => {
                state.notice = Some("/offload needs an endpoint name from config.toml".into());
                return Vec::new();
            }
            None => None,
        };
        state.reset_input();
        return vec![Effect::SwitchEngine {
            target,
            history: state.conversation(),
            system_prompt: state.system_prompt.clone(),
            offload: false,
        }];
    }
    if let Some(task) = text.trim().strip_prefix("/agent") {
        let task = task.trim();
        if task.is_empty() {
            state.notice = Some("/agent needs a task: /agent fix the failing test".into());
            return Vec::new();
        }
        if state.generating() {
            state.notice = Some("still answering".into());
            return Vec::new();
        }
        state.reset_input();
        if state.title.is_none() {
            state.title = Some(title_from(task));
        }
        state.push_entry(Entry::new(EntryKind::User, text.trim().to_string()));
        state.agent = Some(AgentView {
            task: task.to_string(),
            step: 0,
            pending: None,
            approval_scroll: 0,
            stopping: false,
        });
        state.scroll = Scroll::Follow;
        return vec![Effect::StartAgent(task.to_string())];
    }
    if state.generating() {
        state.notice = Some(format!(
            "still answering; {} stops it",
            state.keys.hint(Action::Cancel)
        ));
        return Vec::new();
    }
    if state.history.last() != Some(&text) {
        state.history.push(text.clone());
    }
    state.history_pos = None;
    state.reset_input();
    state.notice = None;
    if state.title.is_none() {
        state.title = Some(title_from(&text));
    }
    // The endpoint gets the conversation before the question, then the
    // question.
    let offload = state
        .auto_offload
        .clone()
        .filter(|_| outgrows_local(state, &text, state.answer_tokens))
        .map(|target| Effect::SwitchEngine {
            target: Some(target),
            history: state.conversation(),
            system_prompt: state.system_prompt.clone(),
            offload: true,
        });
    state.push_entry(Entry::new(EntryKind::User, text.clone()));
    start_generation(state);
    let mut effects = vec![Effect::Record(Event::User { text: text.clone() })];
    effects.extend(offload);
    effects.push(Effect::Chat(text));
    effects
}

/// A new, empty answer at the end of the transcript, generating.
fn start_generation(state: &mut State) {
    state.transcript.push(Entry::new(EntryKind::Assistant, ""));
    generate_into_last(state);
}

/// The transcript's last entry receives the tokens that arrive next, and
/// the view follows it.
fn generate_into_last(state: &mut State) {
    state.generation = Some(Generation {
        entry: state.transcript.len() - 1,
        first_token_at: None,
        tokens: 0,
        live_tok_s: None,
        cancelling: false,
        power: (0.0, 0),
    });
    state.scroll = Scroll::Follow;
    state.unseen_output = false;
}

fn stop_agent(state: &mut State, first: Option<Effect>) -> Vec<Effect> {
    let mut effects: Vec<Effect> = first.into_iter().collect();
    if let Some(a) = &mut state.agent {
        if !a.stopping {
            a.stopping = true;
            state.notice = Some("stopping the agent…".into());
            effects.push(Effect::StopAgent);
        }
    }
    effects
}

fn on_agent(state: &mut State, msg: AgentMsg) -> Vec<Effect> {
    match msg {
        AgentMsg::Progress(p) => {
            let text = crate::agent::line(&p);
            if let (Some(a), Progress::Call { step, .. }) = (&mut state.agent, &p) {
                a.step = *step;
            }
            state.push_entry(Entry::new(EntryKind::Notice, text));
            Vec::new()
        }
        AgentMsg::Approval(call) => {
            if let Some(a) = &mut state.agent {
                a.pending = Some(call);
                a.approval_scroll = 0;
            }
            state.mode = Mode::Approve;
            Vec::new()
        }
        AgentMsg::Done(outcome) => {
            let text = match &outcome {
                Outcome::Finished(summary) => format!("agent finished: {summary}"),
                Outcome::Failed(why) => format!("agent failed: {why}"),
                Outcome::BudgetExhausted(what) => format!("agent stopped: budget of {what} used"),
                Outcome::Stopped => "agent stopped".to_string(),
            };
            state.agent = None;
            if state.mode == Mode::Approve {
                state.mode = Mode::Chat;
            }
            state.notice = Some(text.clone());
            state.push_entry(Entry::new(EntryKind::Notice, text));
            vec![Effect::RestoreChat {
                system_prompt: state.system_prompt.clone(),
                history: state.conversation(),
            }]
        }
    }
}

fn cancel(state: &mut State) -> Vec<Effect> {
    if state.agent.is_some() {
        return stop_agent(state, None);
    }
    match &mut state.generation {
        Some(g) if !g.cancelling => {
            g.cancelling = true;
            state.notice = Some("stopping…".into());
            vec![Effect::Cancel]
        }
        _ => Vec::new(),
    }
}

fn quit(state: &mut State) -> Vec<Effect> {
    state.quit = true;
    let mut effects = Vec::new();
    if state.generating() {
        effects.push(Effect::Cancel);
    }
    effects.push(Effect::Quit);
    effects
}

fn regenerate(state: &mut State) -> Vec<Effect> {
    if state.generating() {
        state.notice = Some("still answering".into());
        return Vec::new();
    }
    let Some(user_at) = state
        .transcript
        .iter()
        .rposition(|e| e.kind == EntryKind::User)
    else {
        state.notice = Some("nothing to regenerate yet".into());
        return Vec::new();
    };
    let message = state.transcript[user_at].text.clone();
    // Drop the old answer (and anything after the question), keep the question.
    state.transcript.truncate(user_at + 1);
    let history = {
        let mut h = state.conversation();
        h.pop();
        h
    };
    start_generation(state);
    vec![
        Effect::Record(Event::Regenerate),
        Effect::Regenerate { history, message },
    ]
}

fn continue_answer(state: &mut State) -> Vec<Effect> {
    if state.generating() {
        state.notice = Some("still answering".into());
        return Vec::new();
    }
    let cut = state.transcript.last().is_some_and(|e| {
        e.kind == EntryKind::Assistant
            && !e.text.is_empty()
            && (e.interrupted
                || matches!(
                    e.finish,
                    Some(FinishReason::Cancelled | FinishReason::MaxTokens)
                ))
    });
    if !cut {
        state.notice = Some(format!(
            "no cut-off answer to continue; {} answers again",
            state.keys.hint(Action::Regenerate)
        ));
        return Vec::new();
    }
    let history = state.conversation();
    if let Some(e) = state.transcript.last_mut() {
        e.interrupted = false;
        e.finish = None;
        e.stats = None;
    }
    generate_into_last(state);
    vec![
        Effect::Record(Event::Continue),
        Effect::Continue { history },
    ]
}

fn recall(state: &mut State, step: i64) {
    if state.history.is_empty() {
        return;
    }
    let last = state.history.len() as i64 - 1;
    let next = match state.history_pos {
        None if step < 0 => Some(last as usize),
        None => None,
        Some(p) => {
            let n = p as i64 + step;
            (0..=last).contains(&n).then_some(n as usize)
        }
    };
    match next {
        Some(p) => {
            state.history_pos = Some(p);
            let text = state.history[p].clone();
            state.set_input(&text);
        }
        None if step > 0 => {
            state.history_pos = None;
            state.reset_input();
        }
        None => {}
    }
}

fn on_paste(state: &mut State, pasted: Pasted) {
    let target = match state.mode {
        Mode::Chat => &mut state.input,
        Mode::EditSystem => &mut state.system_editor,
        _ => return,
    };
    // Terminals send pasted line ends as CR.
    let text = pasted.text.replace("\r\n", "\n").replace('\r', "\n");
    target.insert_str(&text);
    if pasted.total > pasted.text.len() {
        state.notice = Some(format!(
            "paste cut to {:.1} MiB of {:.1} MiB",
            pasted.text.len() as f64 / 1048576.0,
            pasted.total as f64 / 1048576.0
        ));
    }
}

fn on_engine(state: &mut State, event: EngineEvent, at: Instant) -> Vec<Effect> {
    match event {
        EngineEvent::TurnStarted { prompt_tokens, .. } => {
            // A long prefill (a resumed session re-read from its transcript)
            // would otherwise look like a hang.
            if prompt_tokens >= 512 {
                state.notice = Some(format!(
                    "reading {} tokens of context…",
                    crate::layout::count(prompt_tokens as u64)
                ));
            }
            Vec::new()
        }
        EngineEvent::ContextTrimmed {
            dropped_messages,
            limit,
            ..
        } => {
            let text = crate::record::trimmed_notice(dropped_messages, limit);
            let entry = Entry::new(EntryKind::Notice, text.clone());
            // Before the answer being generated, so the answer stays last.
            match &mut state.generation {
                Some(g) => {
                    state.transcript.insert(g.entry, entry);
                    g.entry += 1;
                }
                None => state.transcript.push(entry),
            }
            vec![Effect::Record(Event::Notice { text })]
        }
        EngineEvent::Token { text, .. } => {
            let Some(g) = &mut state.generation else {
                return Vec::new();
            };
            let first = *g.first_token_at.get_or_insert(at);
            g.tokens += 1;
            let secs = (at - first).as_secs_f64();
            if g.tokens >= 2 && secs > 0.0 {
                g.live_tok_s = Some((g.tokens - 1) as f64 / secs);
            }
            let entry = g.entry;
            state.transcript[entry].text.push_str(&text);
            if g.tokens == 1
                && state
                    .notice
                    .as_deref()
                    .is_some_and(|n| n.starts_with("reading "))
            {
                state.notice = None;
            }
            state.output_arrived();
            vec![Effect::RecordChunk(text)]
        }
        EngineEvent::TurnFinished {
            reply,
            finish,
            stats,
            ..
        } => {
            let Some(g) = state.generation.take() else {
                return Vec::new();
            };
            let entry = &mut state.transcript[g.entry];
            entry.text = reply.clone();
            entry.finish = Some(finish);
            entry.stats = Some(stats.clone());
            if let Some(d) = stats.decode_tok_s {
                push_bounded(&mut state.decode_history, d);
            }
            state.context_tokens = stats.context_tokens;
            state.last_energy = TurnEnergy::of(g.power, &stats);
            if finish == FinishReason::Cancelled {
                state.notice = Some("stopped".into());
            } else if matches!(state.notice.as_deref(), Some("stopping…")) {
                state.notice = None;
            }
            let mut effects = vec![Effect::Record(Event::Answer {
                text: reply,
                finish,
                stats: stats.clone(),
            })];
            if let Some(event) = state.alarms.on_turn(&stats) {
                effects.extend(on_alarm(state, event));
            }
            state.last_stats = Some(stats);
            state.output_arrived();
            effects
        }
        EngineEvent::TurnFailed { error, .. } => {
            if let Some(g) = state.generation.take() {
                if state.transcript[g.entry].text.is_empty() {
                    state.transcript.remove(g.entry);
                }
            }
            state.push_entry(Entry::new(EntryKind::Error, error.clone()));
            vec![Effect::Record(Event::Error { text: error })]
        }
    }
}

fn on_sample(state: &mut State, sample: Sample) -> Vec<Effect> {
    if let (Some(g), Some(w)) = (state.generation.as_mut(), sample.power_w) {
        g.power = (g.power.0 + w, g.power.1 + 1);
    }
    let rate = sample.swap_rate.map_or(0, |r| r.in_bytes_per_s as u64);
    push_bounded(&mut state.swap_in_history, rate);
    let generating = state.generating();
    let effects = match state.alarms.on_sample(&sample, generating) {
        Some(event) => on_alarm(state, event),
        None => Vec::new(),
    };
    state.telemetry = sample;
    effects
}

fn on_alarm(state: &mut State, event: AlarmEvent) -> Vec<Effect> {
    let (kind, raised, message) = match event {
        AlarmEvent::Raised { kind, message } => {
            state.active_alarms.retain(|(k, _)| *k != kind);
            state.active_alarms.push((kind, message.clone()));
            (kind, true, message)
        }
        AlarmEvent::Cleared { kind } => {
            state.active_alarms.retain(|(k, _)| *k != kind);
            let what = match kind {
                AlarmKind::SwapStorm => "swap storm over",
                AlarmKind::ThermalThrottling => "thermal throttling over",
            };
            (kind, false, what.to_string())
        }
    };
    state.push_entry(Entry::new(EntryKind::Notice, message.clone()));
    vec![Effect::Record(Event::Alarm {
        kind,
        raised,
        message,
    })]
}

fn push_bounded<T>(v: &mut VecDeque<T>, x: T) {
    if v.len() == HISTORY {
        v.pop_front();
    }
    v.push_back(x);
}

/// Whether a turn of `message` with an answer of up to `answer_tokens`
/// would outgrow this machine: the context window, or the memory the KV
/// cache can still take. Used to offload to an endpoint before it happens.
pub fn outgrows_local(state: &State, message: &str, answer_tokens: usize) -> bool {
    if state.remote.is_some() {
        return false;
    }
    // About four bytes of text a token; three errs towards moving early.
    let needed = message.len() / 3 + answer_tokens;
    let context = state.context_tokens;
    if context + needed > state.model.context_limit {
        return true;
    }
    match (&state.shape, state.telemetry.memory) {
        (Some(shape), Some(mem)) => {
            let left =
                crate::budget::tokens_before_memory_runs_out(shape, context as u64, mem.available);
            (left as usize) < needed
        }
        _ => false,
    }
}

/// Ctrl-C as crossterm reports it, for tests and the runtime.
pub fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
}

#[cfg(test)]
mod tests;
