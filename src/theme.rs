//! Colour themes: built-ins from `themes/*.toml`, user files that override
//! them, `NO_COLOR`, and warnings (never failures) for bad theme files.

use std::path::Path;
use std::str::FromStr;

use ratatui::style::{Color, Modifier, Style};

/// What a colour is for. Widgets ask for a slot, never for a colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Text,
    Dim,
    Accent,
    Border,
    BorderActive,
    User,
    Assistant,
    Notice,
    Error,
    Warning,
    Ok,
    Heading,
    CodeFg,
    CodeBg,
    StatusFg,
    StatusBg,
    BarWeights,
    BarKv,
    BarProcess,
    BarOther,
    BarFree,
    Sparkline,
}

impl Slot {
    pub const ALL: [Slot; 22] = [
        Slot::Text,
        Slot::Dim,
        Slot::Accent,
        Slot::Border,
        Slot::BorderActive,
        Slot::User,
        Slot::Assistant,
        Slot::Notice,
        Slot::Error,
        Slot::Warning,
        Slot::Ok,
        Slot::Heading,
        Slot::CodeFg,
        Slot::CodeBg,
        Slot::StatusFg,
        Slot::StatusBg,
        Slot::BarWeights,
        Slot::BarKv,
        Slot::BarProcess,
        Slot::BarOther,
        Slot::BarFree,
        Slot::Sparkline,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Slot::Text => "text",
            Slot::Dim => "dim",
            Slot::Accent => "accent",
            Slot::Border => "border",
            Slot::BorderActive => "border_active",
            Slot::User => "user",
            Slot::Assistant => "assistant",
            Slot::Notice => "notice",
            Slot::Error => "error",
            Slot::Warning => "warning",
            Slot::Ok => "ok",
            Slot::Heading => "heading",
            Slot::CodeFg => "code_fg",
            Slot::CodeBg => "code_bg",
            Slot::StatusFg => "status_fg",
            Slot::StatusBg => "status_bg",
            Slot::BarWeights => "bar_weights",
            Slot::BarKv => "bar_kv",
            Slot::BarProcess => "bar_process",
            Slot::BarOther => "bar_other",
            Slot::BarFree => "bar_free",
            Slot::Sparkline => "sparkline",
        }
    }
}

pub const BUILT_IN: [(&str, &str); 3] = [
    ("dark", include_str!("../themes/dark.toml")),
    ("light", include_str!("../themes/light.toml")),
    ("contrast", include_str!("../themes/contrast.toml")),
];
pub const DEFAULT_THEME: &str = "dark";

#[derive(Clone, Debug, PartialEq)]
pub struct Theme {
    pub name: String,
    colors: [Color; Slot::ALL.len()],
    /// `NO_COLOR`: styles keep their modifiers and lose their colours.
    pub monochrome: bool,
}

impl Default for Theme {
    fn default() -> Self {
        let (colors, warnings) = parse(BUILT_IN[0].1, None);
        debug_assert!(warnings.is_empty(), "{warnings:?}");
        Theme {
            name: DEFAULT_THEME.into(),
            colors: colors.map(|c| c.unwrap_or(Color::Reset)),
            monochrome: false,
        }
    }
}

impl Theme {
    pub fn color(&self, slot: Slot) -> Color {
        if self.monochrome {
            Color::Reset
        } else {
            self.colors[slot as usize]
        }
    }

    pub fn fg(&self, slot: Slot) -> Style {
        Style::default().fg(self.color(slot))
    }

    /// A warning: coloured when colour is on, reversed when it is not, so it
    /// stands out either way.
    pub fn alert(&self, slot: Slot) -> Style {
        let style = self.fg(slot).add_modifier(Modifier::BOLD);
        if self.monochrome {
            style.add_modifier(Modifier::REVERSED)
        } else {
            style
        }
    }

    pub fn status(&self) -> Style {
        let style = Style::default()
            .fg(self.color(Slot::StatusFg))
            .bg(self.color(Slot::StatusBg));
        if self.monochrome {
            style.add_modifier(Modifier::REVERSED)
        } else {
            style
        }
    }

    pub fn code(&self) -> Style {
        Style::default()
            .fg(self.color(Slot::CodeFg))
            .bg(self.color(Slot::CodeBg))
    }

    /// Load theme `name`: a user file `<user_dir>/<name>.toml` first, then a
    /// built-in. Problems come back as warnings; the theme is always usable.
    pub fn load(name: &str, user_dir: Option<&Path>, no_color: bool) -> (Theme, Vec<String>) {
        let mut warnings = Vec::new();
        let mut theme = Theme::default();
        // A name, never a path (it may come from a client of the daemon),
        // and a theme file is a small regular file (never a FIFO that
        // would hang the workstation).
        if !crate::store::is_id(name) {
            let shown = crate::visible::visible_line(name);
            let shown: String = shown.chars().take(64).collect();
            warnings.push(format!(
                "theme '{shown}': not a theme name (letters, digits, - and _); using {DEFAULT_THEME}"
            ));
            theme.monochrome = no_color;
            return (theme, warnings);
        }
        const MAX_THEME_BYTES: u64 = 64 << 10;
        let user_file = user_dir.map(|d| d.join(format!("{name}.toml")));
        let source = match user_file.as_deref().filter(|f| f.exists()) {
            Some(file)
                if !std::fs::metadata(file)
                    .is_ok_and(|m| m.is_file() && m.len() <= MAX_THEME_BYTES) =>
            {
                warnings.push(format!(
                    "{}: not a regular file of at most {MAX_THEME_BYTES} bytes; using {DEFAULT_THEME}",
                    file.display()
                ));
                None
            }
            Some(file) => match std::fs::read_to_string(file) {
                Ok(text) => Some((file.display().to_string(), text)),
                Err(e) => {
                    warnings.push(format!("{}: cannot read: {e}", file.display()));
                    None
                }
            },
            None => match BUILT_IN.iter().find(|(n, _)| *n == name) {
                Some((n, text)) => Some((format!("built-in theme {n}"), text.to_string())),
                None => {
                    let names: Vec<_> = BUILT_IN.iter().map(|(n, _)| *n).collect();
                    warnings.push(format!(
                        "theme '{name}': no such theme (built in: {}); using {DEFAULT_THEME}",
                        names.join(", ")
                    ));
                    None
                }
            },
        };
        if let Some((origin, text)) = source {
            let (colors, problems) = parse(&text, Some(&origin));
            for (slot, color) in Slot::ALL.iter().zip(colors) {
                if let Some(c) = color {
                    theme.colors[*slot as usize] = c;
                }
            }
            warnings.extend(problems);
            theme.name = name.to_string();
        }
        theme.monochrome = no_color;
        (theme, warnings)
    }
}

/// `NO_COLOR` set to anything but the empty string (no-color.org).
pub fn no_color_requested() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

type Colors = [Option<Color>; Slot::ALL.len()];

/// The colours a theme file sets, and one warning per problem.
fn parse(text: &str, origin: Option<&str>) -> (Colors, Vec<String>) {
    let origin = origin.unwrap_or("theme");
    let mut colors: Colors = [None; Slot::ALL.len()];
    let mut warnings = Vec::new();
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let message = e.message().replace('\n', " ");
            warnings.push(format!(
                "{origin}: not valid TOML: {message}; using the default theme"
            ));
            return (colors, warnings);
        }
    };
    for key in table.keys() {
        if key != "colors" {
            warnings.push(format!(
                "{origin}: unknown key '{key}' (only [colors] is read)"
            ));
        }
    }
    let Some(entries) = table.get("colors") else {
        warnings.push(format!("{origin}: no [colors] table"));
        return (colors, warnings);
    };
    let Some(entries) = entries.as_table() else {
        warnings.push(format!("{origin}: 'colors' must be a table"));
        return (colors, warnings);
    };
    for (key, value) in entries {
        let Some(slot) = Slot::ALL.iter().find(|s| s.key() == key) else {
            warnings.push(format!("{origin}: unknown colour key 'colors.{key}'"));
            continue;
        };
        match value.as_str().map(Color::from_str) {
            Some(Ok(color)) => colors[*slot as usize] = Some(color),
            _ => warnings.push(format!(
                "{origin}: 'colors.{key}' = {value} is not a colour (use \"#rrggbb\", a name or 0-255)"
            )),
        }
    }
    (colors, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_themes_set_every_key_without_warnings() {
        for (name, text) in BUILT_IN {
            let (colors, warnings) = parse(text, Some(name));
            assert!(warnings.is_empty(), "{name}: {warnings:?}");
            for (slot, c) in Slot::ALL.iter().zip(colors) {
                assert!(c.is_some(), "{name} lacks {}", slot.key());
            }
        }
    }

    #[test]
    fn the_contrast_theme_uses_only_the_16_ansi_colours() {
        let (colors, _) = parse(BUILT_IN[2].1, None);
        for c in colors.into_iter().flatten() {
            assert!(
                !matches!(c, Color::Rgb(..) | Color::Indexed(_)),
                "{c:?} is not one of the 16 colours"
            );
        }
    }

    #[test]
    fn a_bad_user_theme_warns_by_file_and_key_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mine.toml"),
            "[colors]\ntext = \"#00ff00\"\nuser = \"not-a-colour\"\nsparkles = \"red\"\n",
        )
        .unwrap();
        let (theme, warnings) = Theme::load("mine", Some(dir.path()), false);
        assert_eq!(theme.color(Slot::Text), Color::Rgb(0, 255, 0));
        assert_eq!(theme.color(Slot::User), Theme::default().color(Slot::User));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings
            .iter()
            .any(|w| w.contains("mine.toml") && w.contains("'colors.user' = \"not-a-colour\"")));
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("mine.toml")
                    && w.contains("unknown colour key 'colors.sparkles'"))
        );

        std::fs::write(dir.path().join("broken.toml"), "[colors\ntext=").unwrap();
        let (theme, warnings) = Theme::load("broken", Some(dir.path()), false);
        assert_eq!(theme.colors, Theme::default().colors);
        assert!(
            warnings[0].contains("broken.toml: not valid TOML"),
            "{warnings:?}"
        );
    }

    #[test]
    fn user_files_override_built_ins_and_unknown_names_warn() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("light.toml"), "[colors]\ntext = \"red\"\n").unwrap();
        let (theme, warnings) = Theme::load("light", Some(dir.path()), false);
        assert!(warnings.is_empty());
        assert_eq!(theme.color(Slot::Text), Color::Red);
        let (theme, warnings) = Theme::load("neon", None, false);
        assert_eq!(theme, Theme::default());
        assert!(warnings[0].contains("'neon': no such theme"));
    }

    #[test]
    fn no_color_keeps_modifiers_only() {
        let (theme, _) = Theme::load("dark", None, true);
        assert_eq!(theme.fg(Slot::Error).fg, Some(Color::Reset));
        assert!(theme
            .alert(Slot::Warning)
            .add_modifier
            .contains(Modifier::REVERSED));
    }
}
