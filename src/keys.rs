//! Key bindings: which key press becomes which `Action`, with defaults and
//! overrides from the `[keys]` table of `config.toml`.

use std::collections::BTreeMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde::Deserialize;

/// What the user can ask for with a key. Mouse wheel and paste reach
/// `update` as messages of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Send,
    Newline,
    Cancel,
    Interrupt,
    Quit,
    ScrollUp,
    ScrollDown,
    PageUp,
    PageDown,
    Top,
    Bottom,
    HistoryPrev,
    HistoryNext,
    Regenerate,
    EditSystem,
    CopyLast,
    Help,
    TogglePanels,
    Sessions,
    Continue,
    ToggleThinking,
}

impl Action {
    pub const ALL: [Action; 21] = [
        Action::Send,
        Action::Newline,
        Action::Cancel,
        Action::Interrupt,
        Action::Quit,
        Action::ScrollUp,
        Action::ScrollDown,
        Action::PageUp,
        Action::PageDown,
        Action::Top,
        Action::Bottom,
        Action::HistoryPrev,
        Action::HistoryNext,
        Action::Regenerate,
        Action::Continue,
        Action::EditSystem,
        Action::CopyLast,
        Action::Help,
        Action::TogglePanels,
        Action::ToggleThinking,
        Action::Sessions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Newline => "newline",
            Action::Cancel => "cancel",
            Action::Interrupt => "interrupt",
            Action::Quit => "quit",
            Action::ScrollUp => "scroll_up",
            Action::ScrollDown => "scroll_down",
            Action::PageUp => "page_up",
            Action::PageDown => "page_down",
            Action::Top => "top",
            Action::Bottom => "bottom",
            Action::HistoryPrev => "history_prev",
            Action::HistoryNext => "history_next",
            Action::Regenerate => "regenerate",
            Action::EditSystem => "edit_system",
            Action::CopyLast => "copy_last",
            Action::Help => "help",
            Action::TogglePanels => "toggle_panels",
            Action::Sessions => "sessions",
            Action::Continue => "continue",
            Action::ToggleThinking => "toggle_thinking",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Action::Send => "send the message; save the system prompt",
            Action::Newline => "new line in the input",
            Action::Cancel => "stop the answer; close a dialog",
            Action::Interrupt => "stop the answer; when idle, quit after asking",
            Action::Quit => "quit",
            Action::ScrollUp => "scroll the conversation up a line",
            Action::ScrollDown => "scroll the conversation down a line",
            Action::PageUp => "scroll the conversation up a page",
            Action::PageDown => "scroll the conversation down a page",
            Action::Top => "go to the start (Home: when the input is empty)",
            Action::Bottom => "go to the end and follow the stream",
            Action::HistoryPrev => "previous message sent (on an empty input)",
            Action::HistoryNext => "next message sent",
            Action::Regenerate => "answer the last message again",
            Action::EditSystem => "edit the system prompt",
            Action::CopyLast => "copy the last answer (OSC 52, works over SSH)",
            Action::Help => "this help (?: when the input is empty)",
            Action::TogglePanels => "side panels: full or a one-line summary",
            Action::Sessions => "open another session (type to filter)",
            Action::Continue => "continue an interrupted or stopped answer",
            Action::ToggleThinking => "show or fold a reasoning model's thinking",
        }
    }

    fn defaults(self) -> &'static [&'static str] {
        match self {
            Action::Send => &["enter"],
            // Most terminals send Shift-Enter as plain Enter; Alt-Enter and
            // Ctrl-J get through everywhere.
            Action::Newline => &["alt-enter", "shift-enter", "ctrl-j"],
            Action::Cancel => &["esc"],
            Action::Interrupt => &["ctrl-c"],
            Action::Quit => &["ctrl-q"],
            Action::ScrollUp => &["shift-up"],
            Action::ScrollDown => &["shift-down"],
            Action::PageUp => &["pageup"],
            Action::PageDown => &["pagedown"],
            Action::Top => &["ctrl-home", "home"],
            Action::Bottom => &["ctrl-end", "end"],
            Action::HistoryPrev => &["up"],
            Action::HistoryNext => &["down"],
            Action::Regenerate => &["ctrl-r"],
            Action::EditSystem => &["ctrl-t"],
            Action::CopyLast => &["ctrl-o"],
            Action::Help => &["f1", "?"],
            Action::TogglePanels => &["ctrl-g"],
            Action::Sessions => &["ctrl-s"],
            Action::Continue => &["alt-c"],
            Action::ToggleThinking => &["alt-t"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyCombo {
    code: KeyCode,
    mods: KeyModifiers,
}

impl KeyCombo {
    /// Parse "ctrl-c", "alt-enter", "pagedown", "f1", "?" and the like.
    pub fn parse(spec: &str) -> Result<KeyCombo, String> {
        let lower = spec.trim().to_ascii_lowercase();
        let mut mods = KeyModifiers::NONE;
        let mut rest = lower.as_str();
        loop {
            let (m, tail) = match rest.split_once('-') {
                Some((m, tail)) if !tail.is_empty() => (m, tail),
                _ => break,
            };
            mods |= match m {
                "ctrl" | "c" => KeyModifiers::CONTROL,
                "alt" | "meta" | "m" => KeyModifiers::ALT,
                "shift" | "s" => KeyModifiers::SHIFT,
                _ => return Err(format!("unknown modifier '{m}' in '{spec}'")),
            };
            rest = tail;
        }
        let code = match rest {
            "enter" | "return" => KeyCode::Enter,
            "esc" | "escape" => KeyCode::Esc,
            "tab" => KeyCode::Tab,
            "backspace" => KeyCode::Backspace,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "left" => KeyCode::Left,
            "right" => KeyCode::Right,
            "home" => KeyCode::Home,
            "end" => KeyCode::End,
            "pageup" | "pgup" => KeyCode::PageUp,
            "pagedown" | "pgdn" => KeyCode::PageDown,
            "space" => KeyCode::Char(' '),
            f if f.len() > 1 && f.starts_with('f') => match f[1..].parse::<u8>() {
                Ok(n @ 1..=12) => KeyCode::F(n),
                _ => return Err(format!("unknown key '{spec}'")),
            },
            // A single character keeps its case as written ("?", "Q").
            _ if rest.chars().count() == 1 => {
                let original = spec.trim();
                KeyCode::Char(original.chars().last().unwrap_or(' '))
            }
            _ => return Err(format!("unknown key '{spec}'")),
        };
        Ok(KeyCombo { code, mods }.normalized())
    }

    pub fn from_event(key: &KeyEvent) -> KeyCombo {
        KeyCombo {
            code: key.code,
            mods: key.modifiers,
        }
        .normalized()
    }

    /// Shift is part of a typed character ("?" is Shift-/), so it is not
    /// matched separately; ctrl letters match whatever the case.
    fn normalized(mut self) -> KeyCombo {
        if let KeyCode::Char(c) = self.code {
            self.mods.remove(KeyModifiers::SHIFT);
            if self.mods.contains(KeyModifiers::CONTROL) {
                self.code = KeyCode::Char(c.to_ascii_lowercase());
            }
        }
        self.mods &= KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT;
        self
    }

    pub fn label(&self) -> String {
        let mut s = String::new();
        for (m, name) in [
            (KeyModifiers::CONTROL, "Ctrl-"),
            (KeyModifiers::ALT, "Alt-"),
            (KeyModifiers::SHIFT, "Shift-"),
        ] {
            if self.mods.contains(m) {
                s.push_str(name);
            }
        }
        match self.code {
            KeyCode::Char(c) if self.mods.is_empty() => s.push(c),
            KeyCode::Char(c) => s.push(c.to_ascii_uppercase()),
            KeyCode::F(n) => s.push_str(&format!("F{n}")),
            KeyCode::PageUp => s.push_str("PgUp"),
            KeyCode::PageDown => s.push_str("PgDn"),
            other => s.push_str(&format!("{other:?}")),
        }
        s
    }
}

/// A binding in `config.toml`: one key or several.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum KeySpec {
    One(String),
    Many(Vec<String>),
}

/// Bindings in the order they were made, so the first key of an action is
/// the one hints show.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyMap {
    bindings: Vec<(KeyCombo, Action)>,
}

impl Default for KeyMap {
    fn default() -> Self {
        let mut map = KeyMap {
            bindings: Vec::new(),
        };
        for action in Action::ALL {
            for spec in action.defaults() {
                map.bind(
                    KeyCombo::parse(spec).expect("default bindings parse"),
                    action,
                );
            }
        }
        map
    }
}

impl KeyMap {
    /// Defaults, with the actions named in `overrides` rebound: an action
    /// that is overridden loses its default keys.
    pub fn with_overrides(overrides: &BTreeMap<String, KeySpec>) -> Result<KeyMap, String> {
        let mut map = KeyMap::default();
        for (name, spec) in overrides {
            let action = Action::ALL
                .into_iter()
                .find(|a| a.name() == name)
                .ok_or_else(|| format!("keys.{name}: unknown action"))?;
            let specs = match spec {
                KeySpec::One(s) => vec![s.clone()],
                KeySpec::Many(v) => v.clone(),
            };
            map.bindings.retain(|(_, a)| *a != action);
            for s in specs {
                let combo = KeyCombo::parse(&s).map_err(|e| format!("keys.{name}: {e}"))?;
                map.bind(combo, action);
            }
        }
        Ok(map)
    }

    /// A key belongs to one action: binding it again moves it.
    fn bind(&mut self, combo: KeyCombo, action: Action) {
        self.bindings.retain(|(c, _)| *c != combo);
        self.bindings.push((combo, action));
    }

    pub fn action(&self, key: &KeyEvent) -> Option<Action> {
        let combo = KeyCombo::from_event(key);
        self.bindings
            .iter()
            .find(|(c, _)| *c == combo)
            .map(|(_, a)| *a)
    }

    /// The keys bound to `action`, as the help overlay shows them.
    pub fn keys_for(&self, action: Action) -> Vec<String> {
        self.bindings
            .iter()
            .filter(|(_, a)| *a == action)
            .map(|(k, _)| k.label())
            .collect()
    }

    /// The first key bound to `action`, for hints in the status bar.
    pub fn hint(&self, action: Action) -> String {
        self.keys_for(action).into_iter().next().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode, mods: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, mods)
    }

    #[test]
    fn defaults() {
        let map = KeyMap::default();
        assert_eq!(
            map.action(&key(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Action::Send)
        );
        assert_eq!(
            map.action(&key(KeyCode::Enter, KeyModifiers::ALT)),
            Some(Action::Newline)
        );
        assert_eq!(
            map.action(&key(KeyCode::Char('C'), KeyModifiers::CONTROL)),
            Some(Action::Interrupt)
        );
        // Terminals report "?" with or without Shift.
        assert_eq!(
            map.action(&key(KeyCode::Char('?'), KeyModifiers::SHIFT)),
            Some(Action::Help)
        );
        assert_eq!(
            map.action(&key(KeyCode::Char('x'), KeyModifiers::NONE)),
            None
        );
    }

    #[test]
    fn overrides_replace_an_actions_keys() {
        let mut o = BTreeMap::new();
        o.insert(
            "quit".to_string(),
            KeySpec::Many(vec!["ctrl-x".into(), "f10".into()]),
        );
        let map = KeyMap::with_overrides(&o).unwrap();
        assert_eq!(
            map.action(&key(KeyCode::Char('x'), KeyModifiers::CONTROL)),
            Some(Action::Quit)
        );
        assert_eq!(
            map.action(&key(KeyCode::Char('q'), KeyModifiers::CONTROL)),
            None
        );
        assert_eq!(map.keys_for(Action::Quit), ["Ctrl-X", "F10"]);
    }

    #[test]
    fn bad_bindings_name_the_key() {
        let mut o = BTreeMap::new();
        o.insert("send".to_string(), KeySpec::One("ctlr-x".into()));
        assert_eq!(
            KeyMap::with_overrides(&o).unwrap_err(),
            "keys.send: unknown modifier 'ctlr' in 'ctlr-x'"
        );
        let mut o = BTreeMap::new();
        o.insert("launch".to_string(), KeySpec::One("f2".into()));
        assert_eq!(
            KeyMap::with_overrides(&o).unwrap_err(),
            "keys.launch: unknown action"
        );
    }
}
