//! Snapshots of the whole screen and of each panel (TestBackend + insta),
//! and sizes down to 1x1.

use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;

use super::*;
use crate::app::{update, Msg, Pasted};
use crate::engine::{EngineEvent, FinishReason, GenStats};
use crate::layout::{MIN_HEIGHT, MIN_WIDTH};
use crate::models;
use crate::telemetry::{
    MemorySnapshot, Pressure, ProcessStats, Psi, Sample, SwapRate, Temperature, Throttle,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn sample() -> Sample {
    Sample {
        seq: 7,
        memory: Some(MemorySnapshot {
            total: 32 * GIB,
            available: 20 * GIB,
            swap_total: 8 * GIB,
            swap_free: 8 * GIB - 512 * MIB,
        }),
        gpu_wired_limit: None,
        energy_j: Some(5400.0),
        memory_bandwidth: Some(100e9),
        gpu: None,
        power_w: Some(24.0),
        swap_rate: Some(SwapRate {
            in_bytes_per_s: 0.0,
            out_bytes_per_s: 0.0,
        }),
        pressure: Some(Pressure::from_psi(Psi {
            some_avg10: 0.5,
            full_avg10: Some(0.0),
        })),
        process: Some(ProcessStats {
            rss: 600 * MIB,
            cpu_percent: Some(95.0),
        }),
        temperatures: vec![
            Temperature {
                label: "coretemp Package id 0".into(),
                celsius: 71.0,
                critical: Some(100.0),
            },
            Temperature {
                label: "nvme Composite".into(),
                celsius: 38.9,
                critical: Some(84.9),
            },
        ],
        throttle: Throttle {
            freq_ratio: Some(0.8),
            cap_ratio: Some(1.0),
            new_events: Some(0),
            thermal_level: None,
        },
    }
}

fn stats(tokens: usize, decode: f64, context: usize) -> GenStats {
    GenStats {
        ttft_ms: 480.0,
        prompt_tokens: 31,
        reused_tokens: 0,
        completion_tokens: tokens,
        prefill_tok_s: Some(68.4),
        decode_tok_s: Some(decode),
        total_ms: 3000.0,
        context_tokens: context,
        cached_tokens: 0,
        ..GenStats::default()
    }
}

fn base(width: u16, height: u16) -> State {
    let preset = models::preset(models::DEFAULT_PRESET).expect("default preset");
    let mut s = State::for_preset(preset, 8192);
    update(&mut s, Msg::Resize(width, height));
    update(&mut s, Msg::Telemetry(sample()));
    s
}

fn send(s: &mut State, text: &str) {
    update(s, Msg::Paste(Pasted::new(text.into())));
    update(
        s,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
}

fn finish(s: &mut State, reply: &str, st: GenStats) {
    update(
        s,
        Msg::Engine(
            EngineEvent::TurnFinished {
                turn: 1,
                reply: reply.into(),
                finish: FinishReason::Stop,
                stats: st,
            },
            Instant::now(),
        ),
    );
}

const ANSWER: &str = "## Firing schedule\n\nA bisque firing has **three** stages:\n\n1. Drying below 100 °C\n2. *Burn-out* of organics\n3. Sintering\n\n```sh\nkiln-ctl ramp --to 1000 --rate 100\n```\n\nUse `cone 04` for most clays.";

fn conversation(width: u16, height: u16) -> State {
    let mut s = base(width, height);
    send(&mut s, "How do I fire bisque ware?");
    finish(&mut s, ANSWER, stats(61, 27.3, 112));
    for d in [25.1, 26.8, 28.0] {
        s.decode_history.push_front(d);
    }
    s
}

fn draw(s: &State, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
    t.draw(|f| render(f, s, &Theme::default())).unwrap();
    t
}

fn panel(s: &State, height: u16, f: fn(&mut Frame, Rect, &State, &Theme)) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(40, height)).unwrap();
    t.draw(|frame| f(frame, frame.area(), s, &Theme::default()))
        .unwrap();
    t
}

#[test]
fn screen_160x48() {
    let s = conversation(160, 48);
    insta::assert_snapshot!(draw(&s, 160, 48).backend());
}

#[test]
fn screen_80x24_collapses_the_panels_to_a_summary() {
    let s = conversation(80, 24);
    insta::assert_snapshot!(draw(&s, 80, 24).backend());
}

#[test]
fn screen_while_streaming_with_the_help_open() {
    let mut s = conversation(100, 30);
    send(&mut s, "And glaze firing?");
    let t0 = Instant::now();
    for (i, w) in ["Glaze ", "firing ", "goes ", "hotter"].iter().enumerate() {
        update(
            &mut s,
            Msg::Engine(
                EngineEvent::Token {
                    turn: 2,
                    text: w.to_string(),
                },
                t0 + Duration::from_millis(40 * i as u64),
            ),
        );
    }
    insta::assert_snapshot!("streaming", draw(&s, 100, 30).backend());
    update(
        &mut s,
        Msg::Key(KeyEvent::new(KeyCode::F(1), KeyModifiers::NONE)),
    );
    insta::assert_snapshot!("help", draw(&s, 100, 30).backend());
}

#[test]
fn thinking_streams_faint_then_folds_and_alt_t_shows_it() {
    let mut s = base(100, 30);
    s.model.notes = vec!["YaRN ×4, auto".into(), "thinking on".into()];
    send(&mut s, "2+2?");
    let t0 = Instant::now();
    let pieces = [
        "<th",
        "ink>\nThe user asks",
        " a sum.\nTwo",
        " plus two.\n",
        "Check: four.\nSure.\n</th",
    ];
    for (i, p) in pieces.iter().enumerate() {
        update(
            &mut s,
            Msg::Engine(
                EngineEvent::Token {
                    turn: 1,
                    text: p.to_string(),
                },
                t0 + Duration::from_millis(40 * i as u64),
            ),
        );
    }
    let live = format!("{}", draw(&s, 100, 30).backend());
    assert!(live.contains("▾ thinking… 11 words"), "{live}");
    // The last lines stream; the first has scrolled out of the fold.
    assert!(
        live.contains("Sure.") && !live.contains("The user asks"),
        "{live}"
    );
    assert!(!live.contains("</th") && !live.contains("<th"), "{live}");
    assert!(live.contains("YaRN ×4, auto · thinking on"), "{live}");
    let reply = format!("{}ink>\n\nFour.", pieces.concat());
    finish(&mut s, &reply, stats(20, 30.0, 60));
    insta::assert_snapshot!("thinking_folded", draw(&s, 100, 30).backend());
    let alt_t = KeyEvent::new(KeyCode::Char('t'), KeyModifiers::ALT);
    update(&mut s, Msg::Key(alt_t));
    let shown = format!("{}", draw(&s, 100, 30).backend());
    assert!(
        shown.contains("The user asks a sum.") && shown.contains("Four."),
        "{shown}"
    );
    // The thinking is dimmed: the theme's dim colour, in italics.
    let t = draw(&s, 100, 30);
    let buf = t.backend().buffer();
    let row = (0..30)
        .find(|&y| {
            (0..100)
                .map(|x| buf[(x, y)].symbol())
                .collect::<String>()
                .contains("The user asks")
        })
        .unwrap();
    let x = (0..100).find(|&x| buf[(x, row)].symbol() == "T").unwrap();
    assert_eq!(
        buf[(x, row)].fg,
        Theme::default().color(crate::theme::Slot::Dim)
    );
    assert!(buf[(x, row)]
        .modifier
        .contains(ratatui::style::Modifier::ITALIC));
    update(&mut s, Msg::Key(alt_t));
    let folded = format!("{}", draw(&s, 100, 30).backend());
    assert!(
        !folded.contains("The user asks") && folded.contains("▸ thought · 11 words"),
        "{folded}"
    );
}

#[test]
fn memory_panel() {
    let s = conversation(160, 48);
    let v = memory::view(&s).unwrap();
    // The preset's weights (tensors plus the f32 embedding table), the KV
    // cache kalosm allocates for 112 tokens (128 × 138,240 bytes), the rest of
    // the 600 MiB RSS, and the 12 GiB used less kiln's share.
    let shape = s.shape.as_ref().unwrap();
    assert_eq!(v.weights, shape.weight_bytes());
    assert_eq!(v.kv, 128 * shape.kv_per_token_engine());
    assert_eq!(v.weights + v.kv + v.process, 600 * MIB);
    assert_eq!(v.other, 12 * GIB - 600 * MIB);
    assert_eq!(v.context_left, 8192 - 112);
    insta::assert_snapshot!(panel(&s, memory::HEIGHT, memory::render).backend());
}

#[test]
fn memory_panel_warns_when_memory_ends_before_the_context() {
    let mut s = conversation(160, 48);
    let mut tight = sample();
    tight.memory.as_mut().unwrap().available = 64 * MIB;
    update(&mut s, Msg::Telemetry(tight));
    let v = memory::view(&s).unwrap();
    assert!(v.memory_left.unwrap() < v.context_left);
    let t = panel(&s, memory::HEIGHT, memory::render);
    insta::assert_snapshot!(t.backend());
}

#[test]
fn swap_panel_normal_and_swapping() {
    let mut s = conversation(160, 48);
    insta::assert_snapshot!(
        "swap_normal",
        panel(&s, swap::HEIGHT, swap::render).backend()
    );
    send(&mut s, "next");
    let mut swapping = sample();
    swapping.swap_rate = Some(SwapRate {
        in_bytes_per_s: 48.0 * MIB as f64,
        out_bytes_per_s: 12.0 * MIB as f64,
    });
    for _ in 0..3 {
        update(&mut s, Msg::Telemetry(swapping.clone()));
    }
    assert!(swap::alarming(&s));
    let t = panel(&s, swap::HEIGHT, swap::render);
    // The warning is in the style too, not only in the words.
    let title_cell = &t.backend().buffer()[(3, 0)];
    assert_eq!(
        title_cell.fg,
        Theme::default().color(crate::theme::Slot::Accent)
    );
    let border = &t.backend().buffer()[(0, 0)];
    assert_eq!(
        border.fg,
        Theme::default().color(crate::theme::Slot::Warning)
    );
    insta::assert_snapshot!("swap_swapping", t.backend());
}

#[test]
fn swap_panel_without_swap_or_sources() {
    let mut s = base(160, 48);
    let mut bare = sample();
    bare.memory.as_mut().unwrap().swap_total = 0;
    bare.swap_rate = None;
    bare.pressure = None;
    update(&mut s, Msg::Telemetry(bare));
    insta::assert_snapshot!(panel(&s, swap::HEIGHT, swap::render).backend());
}

#[test]
fn speed_panel_idle_and_live() {
    let mut s = conversation(160, 48);
    insta::assert_snapshot!(
        "speed_idle",
        panel(&s, speed::HEIGHT, speed::render).backend()
    );
    send(&mut s, "more");
    let t0 = Instant::now();
    for i in 0..11 {
        update(
            &mut s,
            Msg::Engine(
                EngineEvent::Token {
                    turn: 2,
                    text: "x ".into(),
                },
                t0 + Duration::from_millis(50 * i),
            ),
        );
    }
    // Ten tokens after the first in half a second.
    assert_eq!(s.generation.as_ref().unwrap().live_tok_s, Some(20.0));
    insta::assert_snapshot!(
        "speed_live",
        panel(&s, speed::HEIGHT, speed::render).backend()
    );
}

#[test]
fn speed_panel_shows_energy_per_token_from_the_samples_in_the_turn() {
    let mut s = base(160, 48);
    send(&mut s, "hi");
    for watts in [20.0, 28.0] {
        let mut during = sample();
        during.power_w = Some(watts);
        update(&mut s, Msg::Telemetry(during));
    }
    // 24 W over the turn's 3 s, for 61 tokens.
    finish(&mut s, "hello", stats(61, 27.3, 100));
    let e = s.last_energy.unwrap();
    assert!((e.watts - 24.0).abs() < 1e-9);
    assert!((e.joules_per_token - 24.0 * 3.0 / 61.0).abs() < 1e-9);
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("energy 1.18 J/tok · 24 W"), "{screen}");
    // Decode against the bound: the preset's weights and 100 tokens of KV
    // at 27.3 tok/s, over the sample's 100 GB/s.
    let shape = s.shape.as_ref().unwrap();
    let share =
        (shape.active_weight_bytes() + 100 * shape.kv_per_token_engine()) as f64 * 27.3 / 100e9;
    let line = format!("bandwidth {:.0}% of 100 GB/s", share * 100.0);
    assert!(screen.contains(&line), "{line}: {screen}");
    // A machine that reports no power shows n/a, never 0.
    let mut bare = base(160, 48);
    let mut unpowered = sample();
    unpowered.power_w = None;
    update(&mut bare, Msg::Telemetry(unpowered.clone()));
    send(&mut bare, "hi");
    update(&mut bare, Msg::Telemetry(unpowered));
    finish(&mut bare, "hello", stats(61, 27.3, 100));
    assert_eq!(bare.last_energy, None);
    let screen = format!("{}", panel(&bare, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("energy n/a"), "{screen}");
}

#[test]
fn speed_panel_shows_a_prompt_cache_hit() {
    let mut s = base(160, 48);
    send(&mut s, "hi");
    let mut st = stats(12, 30.0, 1050);
    st.cached_tokens = 1030;
    finish(&mut s, "hello", st);
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(
        screen.contains("TTFT 0.48 s · cache hit 1,030 tok"),
        "{screen}"
    );
}

/// Drafting's kept share and tokens per decode, over the last turns that
/// drafted, fit the panel's decode line, and say when drafting rested.
#[test]
fn speed_panel_shows_drafting_over_the_last_turns() {
    let mut s = base(160, 48);
    send(&mut s, "hi");
    let mut st = stats(100, 30.0, 1050);
    (st.drafted, st.accepted_drafts) = (80, 60);
    finish(&mut s, "hello", st.clone());
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(
        screen.contains("decode 30.0 tok/s · draft 75% ×2.5"),
        "{screen}"
    );
    // A second turn that drafted: both count (70 of 120 kept; 200 tokens
    // in 130 decodes).
    send(&mut s, "more");
    (st.drafted, st.accepted_drafts) = (40, 10);
    finish(&mut s, "hello", st.clone());
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("draft 58% ×1.5"), "{screen}");
    // A turn with nothing drafted (a tool call, nothing to look up) keeps
    // the figures of the turns before it.
    send(&mut s, "quiet");
    (st.drafted, st.accepted_drafts) = (0, 0);
    finish(&mut s, "hello", st.clone());
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("draft 58% ×1.5"), "{screen}");
    send(&mut s, "again");
    (st.drafted, st.accepted_drafts, st.drafting_rested) = (80, 60, 1);
    finish(&mut s, "hello", st.clone());
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("draft 65% rests"), "{screen}");
    // A turn that drafted nothing because drafting still rests says so.
    send(&mut s, "later");
    (st.drafted, st.accepted_drafts, st.drafting_rested) = (0, 0, 0);
    st.drafting_resting = true;
    finish(&mut s, "hello", st);
    let screen = format!("{}", panel(&s, speed::HEIGHT, speed::render).backend());
    assert!(screen.contains("draft 65% rests"), "{screen}");
    // With no turn that drafted at all, it still says drafting rests.
    let mut fresh = base(160, 48);
    send(&mut fresh, "hi");
    let mut st = stats(100, 30.0, 1050);
    st.drafting_resting = true;
    finish(&mut fresh, "hello", st);
    let screen = format!("{}", panel(&fresh, speed::HEIGHT, speed::render).backend());
    assert!(
        screen.contains("decode 30.0 tok/s · draft rests"),
        "{screen}"
    );
}

#[test]
fn thermal_panel_states() {
    let mut s = base(160, 48);
    insta::assert_snapshot!("thermal_sensors", panel(&s, 6, thermal::render).backend());
    let mut none = sample();
    none.temperatures.clear();
    none.throttle = Throttle::default();
    update(&mut s, Msg::Telemetry(none));
    let t = panel(&s, 5, thermal::render);
    insta::assert_snapshot!("thermal_no_sensors", t.backend());
    let mut hot = sample();
    hot.temperatures[0].celsius = 97.0;
    hot.throttle.cap_ratio = Some(0.6);
    update(&mut s, Msg::Telemetry(hot));
    insta::assert_snapshot!("thermal_throttled", panel(&s, 6, thermal::render).backend());
    // A Mac: the CPU and GPU averages and the GPU's clock and load.
    let mut mac = sample();
    mac.temperatures = crate::telemetry::apple::averages(Some((61.0, 0)), Some((54.5, 0)));
    mac.gpu = Some(crate::telemetry::apple::GpuLoad {
        mhz: 1398,
        busy: 0.87,
        watts: 18.2,
    });
    update(&mut s, Msg::Telemetry(mac));
    let screen = format!("{}", panel(&s, 6, thermal::render).backend());
    assert!(
        screen.contains("CPU average") && screen.contains("61 °C"),
        "{screen}"
    );
    assert!(screen.contains("GPU 1398 MHz · 87% · 18.2 W"), "{screen}");
}

#[test]
fn every_size_down_to_1x1_renders_without_panicking() {
    let mut s = conversation(160, 48);
    send(&mut s, &"long line ".repeat(200));
    for w in [0u16, 1, 2, 5, 19, 20, 21, 40, 99, 100, 101, 250] {
        for h in [0u16, 1, 2, 5, 6, 7, 12, 24, 80] {
            update(&mut s, Msg::Resize(w, h));
            update(&mut s, Msg::Wheel(-3));
            if w == 0 || h == 0 {
                continue;
            }
            let t = draw(&s, w, h);
            if w < MIN_WIDTH || h < MIN_HEIGHT {
                let first: String = t.backend().buffer().content()[..w as usize]
                    .iter()
                    .map(|c| c.symbol())
                    .collect();
                assert!("kiln: terminal too small".starts_with(first.trim_end()));
            }
        }
    }
}

#[test]
fn no_color_keeps_the_screen_readable() {
    let s = conversation(160, 48);
    let (theme, _) = Theme::load("dark", None, true);
    let mut t = Terminal::new(TestBackend::new(160, 48)).unwrap();
    t.draw(|f| render(f, &s, &theme)).unwrap();
    let buf = t.backend().buffer();
    assert!(buf
        .content()
        .iter()
        .all(|c| c.fg == ratatui::style::Color::Reset && c.bg == ratatui::style::Color::Reset));
    // Same text as in colour.
    assert_eq!(
        format!("{}", t.backend()),
        format!("{}", draw(&s, 160, 48).backend())
    );
}

/// The FakeEngine through the real engine task, its events into `update`.
#[tokio::test]
async fn a_fake_engine_conversation_reaches_the_screen() {
    let fake = crate::engine::fake::FakeEngine::new(["Kilns fire **clay** into ceramic."]);
    let handle = crate::engine::spawn(fake);
    let mut s = base(120, 30);
    send(&mut s, "What does a kiln do?");
    let mut turn = handle.chat("What does a kiln do?");
    while let Some(ev) = turn.next().await {
        let done = matches!(ev, EngineEvent::TurnFinished { .. });
        update(&mut s, Msg::Engine(ev, Instant::now()));
        if done {
            break;
        }
    }
    let screen = format!("{}", draw(&s, 120, 30).backend());
    assert!(screen.contains("Kilns fire clay into ceramic."), "{screen}");
    assert!(screen.contains("5 tok ·"), "{screen}");
}

#[test]
fn session_picker() {
    let mut s = conversation(100, 30);
    let items = ["Firing bisque ware", "Glaze crawling", "Kiln wiring"]
        .iter()
        .enumerate()
        .map(|(i, t)| crate::app::PickerItem {
            dir: format!("/s/{i}").into(),
            title: t.to_string(),
            updated: format!("2026-11-2{i} 06:30 UTC"),
            messages: 2 * (i + 1),
            text: String::new(),
        })
        .collect();
    update(&mut s, Msg::Sessions(items));
    update(
        &mut s,
        Msg::Key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE)),
    );
    insta::assert_snapshot!(draw(&s, 100, 30).backend());
}

/// A write's approval shows the diff of what it would change, added and
/// removed lines in their colours, and the transcript shows what an
/// earlier write changed.
#[test]
fn an_approval_shows_the_diff_of_a_write() {
    use crate::agent::tools::ToolCall;
    use crate::agent::{Progress, Question};
    use crate::app::AgentMsg;
    let mut s = base(100, 30);
    send(&mut s, "/agent rename the setting");
    let diff = "--- a/kiln.toml\n+++ b/kiln.toml\n@@ -1,3 +1,3 @@\n [firing]\n-cone = \"06\"\n+cone = \"04\"\n ramp = 100\n";
    update(
        &mut s,
        Msg::Agent(AgentMsg::Progress(Progress::Result {
            step: 1,
            ok: true,
            output: "wrote 40 bytes to notes.md".into(),
            diff: Some("--- /dev/null\n+++ b/notes.md\n@@ -0,0 +1 @@\n+# Notes\n".into()),
        })),
    );
    let call = ToolCall::WriteFile {
        path: "kiln.toml".into(),
        content: None,
        find: Some("cone = \"06\"".into()),
        replace: Some("cone = \"04\"".into()),
    };
    update(
        &mut s,
        Msg::Agent(AgentMsg::Approval(Question {
            call,
            diff: Some(diff.into()),
            sandbox: None,
        })),
    );
    let t = draw(&s, 100, 30);
    insta::assert_snapshot!(t.backend());
    let theme = Theme::default();
    let buffer = t.backend().buffer();
    // The colour of the first cell of `text` where it is drawn.
    let fg_at = |text: &str| {
        let n = text.chars().count() as u16;
        (0..buffer.area.height)
            .find_map(|y| {
                (0..buffer.area.width.saturating_sub(n)).find_map(|x| {
                    let here: String = (x..x + n).map(|x| buffer[(x, y)].symbol()).collect();
                    (here == text).then(|| buffer[(x, y)].fg)
                })
            })
            .unwrap_or_else(|| panic!("{text} is not on screen"))
    };
    assert_eq!(fg_at("+cone"), theme.color(crate::theme::Slot::Ok));
    assert_eq!(fg_at("-cone"), theme.color(crate::theme::Slot::Error));
}

/// Escape sequences in every kind of text kiln shows (the user's and the
/// model's messages, a tool's output in a notice, an error, the title, the
/// approval question) reach no cell raw; ESC is drawn as ␛.
#[test]
fn control_characters_are_drawn_never_sent() {
    let hostile = "a\x1b]2;PWNED\x07b\x1b]52;c;eA==\x07c\x1b[2J\u{9b}31md\u{202e}e\r";
    let mut s = base(160, 48);
    send(&mut s, hostile);
    finish(
        &mut s,
        &format!("## {hostile}\n\n- {hostile}\n\n`{hostile}`\n\n```\n{hostile}\n```"),
        stats(5, 10.0, 50),
    );
    update(
        &mut s,
        Msg::Engine(
            EngineEvent::TurnFailed {
                turn: 2,
                error: hostile.into(),
            },
            Instant::now(),
        ),
    );
    s.notice = Some(hostile.into());
    s.title = Some(hostile.into());
    let t = draw(&s, 160, 48);
    let cells: String = t
        .backend()
        .buffer()
        .content()
        .iter()
        .map(|c| c.symbol())
        .collect();
    assert!(
        !cells.chars().any(|c| c.is_control() || c == '\u{202e}'),
        "{cells:?}"
    );
    assert!(cells.contains('␛'), "ESC is shown");
}

/// A native run's reasoning is drawn folded and faint like thinking, its
/// escape sequences made visible, and the status bar says how the run
/// calls tools; alt-t shows the reasoning whole.
#[test]
fn an_agents_reasoning_is_folded_and_the_status_bar_says_its_call_format() {
    use crate::agent::tools::ToolCall;
    use crate::agent::Progress;
    use crate::app::AgentMsg;
    use crate::engine::tool_format::ToolFormat;
    let mut s = base(100, 24);
    send(&mut s, "/agent read the notes");
    for p in [
        Progress::Calls {
            native: Some(ToolFormat::Hermes),
        },
        Progress::Thought {
            step: 1,
            text: "The notes are in notes.txt.\nI will read them \u{1b}[2Jfirst.".into(),
        },
        Progress::Call {
            step: 1,
            call: ToolCall::ReadFile {
                path: "notes.txt".into(),
            },
            tok_s: Some(30.0),
            context_tokens: 200,
        },
    ] {
        update(&mut s, Msg::Agent(AgentMsg::Progress(p)));
    }
    let folded = format!("{}", draw(&s, 100, 24).backend());
    insta::assert_snapshot!(folded);
    assert!(folded.contains("▸ thought · 10 words"), "{folded}");
    assert!(!folded.contains("I will read them"), "{folded}");
    assert!(folded.contains("calls native <tool_call>"), "{folded}");
    update(
        &mut s,
        Msg::Key(KeyEvent::new(KeyCode::Char('t'), KeyModifiers::ALT)),
    );
    let shown = format!("{}", draw(&s, 100, 24).backend());
    assert!(shown.contains("I will read them"), "{shown}");
    assert!(!shown.contains('\u{1b}'), "{shown}");
}

/// On an endpoint, a kiln node's figures show under its name; another
/// endpoint's panel says it has none, and shows none.
#[test]
fn node_panel_shows_a_kiln_nodes_figures_or_says_there_are_none() {
    use crate::telemetry::remote::{NodeReport, RemoteNode};
    let mut s = conversation(160, 48);
    s.remote = Some("remote:studio".into());
    let mut hot = sample();
    hot.swap_rate = Some(SwapRate {
        in_bytes_per_s: 3.0 * MIB as f64,
        out_bytes_per_s: 0.0,
    });
    let report = NodeReport {
        node: "studio\x1b[2J.local".into(),
        model: "qwen2.5-32b".into(),
        seats: (2, 8),
        sample: hot,
        served: Default::default(),
    };
    update(&mut s, Msg::Node(RemoteNode::Node(Box::new(report))));
    insta::assert_snapshot!("node_kiln", panel(&s, node::HEIGHT, node::render).backend());
    update(
        &mut s,
        Msg::Node(RemoteNode::Unavailable(
            "studio: not a kiln node: the endpoint's memory, swap and heat are not available"
                .into(),
        )),
    );
    insta::assert_snapshot!(
        "node_other",
        panel(&s, node::HEIGHT, node::render).backend()
    );
    let screen = format!("{:?}", draw(&s, 160, 48).backend());
    assert!(screen.contains("not a kiln node"), "{screen}");
}
