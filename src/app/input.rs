//! What keys and pastes do: the workstation's actions, sending a message,
//! regenerating, continuing, recalling history.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::*;

pub(super) fn on_key(state: &mut State, key: KeyEvent) -> Vec<Effect> {
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
                let question = a.pending.as_ref()?;
                Some(crate::layout::approval::page(
                    question,
                    area,
                    a.approval_scroll,
                ))
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
pub(super) fn applies(state: &State, action: Action, key: &KeyEvent) -> bool {
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

pub(super) fn on_action(state: &mut State, action: Action) -> Vec<Effect> {
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

pub(super) fn on_picker_key(
    state: &mut State,
    action: Option<Action>,
    key: KeyEvent,
) -> Vec<Effect> {
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

pub(super) fn send(state: &mut State) -> Vec<Effect> {
    let text = state.input_text();
    if text.trim().is_empty() {
        return Vec::new();
    }
    let command = text.trim();
    let beside = state.agent.as_ref().is_some_and(|a| a.apart.is_some());
    if state.agent.is_some() && (!beside || command.starts_with('/')) {
        state.notice = Some(format!(
            "the agent is running; {} stops it",
            state.keys.hint(Action::Cancel)
        ));
        return Vec::new();
    }
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
            sandbox: None,
            calls: None,
            stopping: false,
            apart: None,
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
pub(super) fn start_generation(state: &mut State) {
    state.transcript.push(Entry::new(EntryKind::Assistant, ""));
    generate_into_last(state);
}

/// The transcript's last entry receives the tokens that arrive next, and
/// the view follows it.
pub(super) fn generate_into_last(state: &mut State) {
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

pub(super) fn stop_agent(state: &mut State, first: Option<Effect>) -> Vec<Effect> {
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

pub(super) fn cancel(state: &mut State) -> Vec<Effect> {
    // An answer streaming beside an agent is stopped first.
    if state.agent.is_some() && !state.generating() {
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

pub(super) fn quit(state: &mut State) -> Vec<Effect> {
    state.quit = true;
    let mut effects = Vec::new();
    if state.generating() {
        effects.push(Effect::Cancel);
    }
    effects.push(Effect::Quit);
    effects
}

pub(super) fn regenerate(state: &mut State) -> Vec<Effect> {
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

pub(super) fn continue_answer(state: &mut State) -> Vec<Effect> {
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

pub(super) fn recall(state: &mut State, step: i64) {
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

pub(super) fn on_paste(state: &mut State, pasted: Pasted) {
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
