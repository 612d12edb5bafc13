//! `kiln bench --render`: time to draw the workstation with a 1,000-message
//! conversation at 160x48, following the end, scrolled to the middle, and
//! while an answer streams.

use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use serde::Serialize;

use crate::app::{update, Msg, Pasted, State};
use crate::engine::{EngineEvent, FinishReason, GenStats};
use crate::error::{KilnError, Result};
use crate::models;
use crate::telemetry::Sampler;
use crate::theme::Theme;
use crate::ui;

const WIDTH: u16 = 160;
const HEIGHT: u16 = 48;
const MESSAGES: usize = 1000;

#[derive(Debug, Serialize)]
pub struct RenderFigures {
    pub case: &'static str,
    pub frames: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

const ANSWER: &str = "Here is how it works:\n\n1. **Drying**: water leaves below 100 °C.\n2. *Burn-out*: organics burn between 300 and 800 °C.\n3. Sintering fuses the body.\n\n```python\nfor t in range(20, 1000, 100):\n    print(f\"ramp to {t} C\")\n```\n\nKeep the `damper` open early on, then close it. A slow cool avoids dunting, the cracking that quartz inversion causes near 573 °C.";

fn conversation() -> State {
    let preset = models::preset(models::DEFAULT_PRESET).expect("default preset");
    let mut s = State::for_preset(preset, 8192);
    update(&mut s, Msg::Resize(WIDTH, HEIGHT));
    update(&mut s, Msg::Telemetry(Sampler::new().sample()));
    let enter = KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE);
    for i in 0..MESSAGES / 2 {
        update(
            &mut s,
            Msg::Paste(Pasted::new(format!(
                "Question {i}: how should I fire a piece this size?"
            ))),
        );
        update(&mut s, Msg::Key(enter));
        update(
            &mut s,
            Msg::Engine(
                EngineEvent::TurnFinished {
                    turn: i as u64 + 1,
                    reply: ANSWER.into(),
                    finish: FinishReason::Stop,
                    stats: GenStats {
                        completion_tokens: 90,
                        decode_tok_s: Some(27.0),
                        ..GenStats::default()
                    },
                },
                Instant::now(),
            ),
        );
    }
    s
}

fn time_frames(
    case: &'static str,
    frames: usize,
    mut state: impl FnMut(usize) -> State,
) -> Result<RenderFigures> {
    let theme = Theme::default();
    let mut terminal = Terminal::new(TestBackend::new(WIDTH, HEIGHT))
        .map_err(|e| KilnError::io("test terminal", e))?;
    let mut times: Vec<Duration> = Vec::with_capacity(frames);
    for i in 0..frames {
        let s = state(i);
        let start = Instant::now();
        terminal
            .draw(|f| ui::render(f, &s, &theme))
            .map_err(|e| KilnError::io("test terminal", e))?;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(RenderFigures {
        case,
        frames,
        median_ms: ms(times[frames / 2]),
        p99_ms: ms(times[(frames * 99 / 100).min(frames - 1)]),
        max_ms: ms(times[frames - 1]),
    })
}

pub fn run(runs: usize, json: bool) -> Result<i32> {
    let frames = runs * 100;
    let base = conversation();
    let follow = time_frames("following the end", frames, |_| base.clone())?;
    let middle = time_frames("scrolled to the middle", frames, |_| {
        let mut s = base.clone();
        update(
            &mut s,
            Msg::Key(KeyEvent::new(KeyCode::Home, KeyModifiers::CONTROL)),
        );
        for _ in 0..(MESSAGES * 8 / (HEIGHT as usize)) {
            update(
                &mut s,
                Msg::Key(KeyEvent::new(KeyCode::PageDown, KeyModifiers::NONE)),
            );
        }
        s
    })?;
    let mut streaming = base.clone();
    update(
        &mut streaming,
        Msg::Paste(Pasted::new("one more question".into())),
    );
    update(
        &mut streaming,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    let t0 = Instant::now();
    let stream = time_frames("streaming an answer", frames, |i| {
        update(
            &mut streaming,
            Msg::Engine(
                EngineEvent::Token {
                    turn: 1,
                    text: ANSWER
                        .split_inclusive(' ')
                        .nth(i % 60)
                        .unwrap_or("x ")
                        .into(),
                },
                t0 + Duration::from_millis(i as u64 * 30),
            ),
        );
        streaming.clone()
    })?;
    let mut pasted = base.clone();
    let line = "The quick brown fox jumps over the lazy dog. ".repeat(20) + "\n";
    update(
        &mut pasted,
        Msg::Paste(Pasted::new(
            line.repeat(crate::app::MAX_PASTE_BYTES / line.len()),
        )),
    );
    update(
        &mut pasted,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    let huge = time_frames("a 1 MiB message in view", frames.min(30), |_| {
        pasted.clone()
    })?;
    let all = [follow, middle, stream, huge];
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("serializes")
        );
    } else {
        println!(
            "kiln bench --render · {MESSAGES} messages · {WIDTH}x{HEIGHT} · {frames} frames per case"
        );
        println!(
            "{:<26}{:>12}{:>12}{:>12}",
            "case", "median ms", "p99 ms", "max ms"
        );
        for f in &all {
            println!(
                "{:<26}{:>12.3}{:>12.3}{:>12.3}",
                f.case, f.median_ms, f.p99_ms, f.max_ms
            );
        }
    }
    Ok(0)
}
