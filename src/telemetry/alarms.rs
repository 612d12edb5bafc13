//! Alarms derived from telemetry: a swap storm while kiln generates, and
//! thermal throttling that shows up in decode speed.
//!
//! Pure state machines fed with samples and turn statistics, so the UI, the
//! agent governor and tests all see the same decisions.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Sample;
use crate::engine::GenStats;

/// Swap-in at or above this rate counts as swapping (256 pages of 4 KiB).
const SWAP_IN_BYTES_PER_S: f64 = 1024.0 * 1024.0;
/// Consecutive swapping samples, while generating, that make a storm.
const STORM_AFTER: u32 = 3;
/// Consecutive quiet samples that end a storm.
const STORM_CLEARS_AFTER: u32 = 5;
/// How many samples heat or a clock cap counts as recent.
const HEAT_MEMORY: u32 = 30;
/// Decode slower than this share of the best seen at similar context is a drop.
const DECODE_DROP: f64 = 0.8;
/// Decode speed from fewer tokens than this is too noisy to compare.
const MIN_DECODE_TOKENS: usize = 16;

pub use crate::chat::AlarmKind;

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "alarm", rename_all = "snake_case")]
pub enum AlarmEvent {
    Raised { kind: AlarmKind, message: String },
    Cleared { kind: AlarmKind },
}

#[derive(Clone, Debug, Default)]
pub struct AlarmDetector {
    swapping_samples: u32,
    quiet_samples: u32,
    storm: bool,
    /// Samples left during which recent heat or a clock cap still counts.
    heat_left: u32,
    heat_reason: String,
    /// Best decode tok/s seen per context bucket (log2 of context tokens).
    best_decode: BTreeMap<u32, f64>,
    throttling: bool,
}

impl AlarmDetector {
    pub fn active(&self, kind: AlarmKind) -> bool {
        match kind {
            AlarmKind::SwapStorm => self.storm,
            AlarmKind::ThermalThrottling => self.throttling,
        }
    }

    pub fn on_sample(&mut self, sample: &Sample, generating: bool) -> Option<AlarmEvent> {
        if let Some(reason) = heat_reason(sample) {
            self.heat_left = HEAT_MEMORY;
            self.heat_reason = reason;
        } else {
            self.heat_left = self.heat_left.saturating_sub(1);
        }

        let swap_in = sample.swap_rate.map_or(0.0, |r| r.in_bytes_per_s);
        if generating && swap_in >= SWAP_IN_BYTES_PER_S {
            self.swapping_samples += 1;
            self.quiet_samples = 0;
        } else {
            self.swapping_samples = 0;
            self.quiet_samples += 1;
        }
        if !self.storm && self.swapping_samples >= STORM_AFTER {
            self.storm = true;
            return Some(AlarmEvent::Raised {
                kind: AlarmKind::SwapStorm,
                message: format!(
                    "swap storm: swapping in {:.1} MiB/s for {} samples while generating",
                    swap_in / (1024.0 * 1024.0),
                    self.swapping_samples
                ),
            });
        }
        if self.storm && self.quiet_samples >= STORM_CLEARS_AFTER {
            self.storm = false;
            return Some(AlarmEvent::Cleared {
                kind: AlarmKind::SwapStorm,
            });
        }
        None
    }

    pub fn on_turn(&mut self, stats: &GenStats) -> Option<AlarmEvent> {
        let decode = stats.decode_tok_s?;
        if stats.completion_tokens < MIN_DECODE_TOKENS {
            return None;
        }
        let bucket = (stats.context_tokens.max(1) as u64)
            .next_power_of_two()
            .ilog2();
        let best = self.best_decode.get(&bucket).copied();
        let entry = self.best_decode.entry(bucket).or_insert(decode);
        *entry = entry.max(decode);

        let slow = best.is_some_and(|b| decode < DECODE_DROP * b);
        let hot = self.heat_left > 0;
        if !self.throttling && slow && hot {
            self.throttling = true;
            return Some(AlarmEvent::Raised {
                kind: AlarmKind::ThermalThrottling,
                message: format!(
                    "thermal throttling: decode {decode:.1} tok/s, down from {:.1} at similar context; {}",
                    best.unwrap_or_default(),
                    self.heat_reason
                ),
            });
        }
        if self.throttling && !(slow && hot) {
            self.throttling = false;
            return Some(AlarmEvent::Cleared {
                kind: AlarmKind::ThermalThrottling,
            });
        }
        None
    }
}

fn heat_reason(sample: &Sample) -> Option<String> {
    let t = &sample.throttle;
    if t.new_events.is_some_and(|n| n > 0) {
        return Some("the CPU reported thermal-throttle events".into());
    }
    if let Some(level) = t.thermal_level.filter(|&l| l >= 2) {
        return Some(format!("thermal pressure level {level} of 4"));
    }
    if let Some(cap) = t.cap_ratio.filter(|&r| r < 0.95) {
        return Some(format!("CPU clocks capped at {:.0} %", cap * 100.0));
    }
    if sample.running_hot() {
        let hottest = sample.hottest()?;
        return Some(format!("{} at {:.0} °C", hottest.label, hottest.celsius));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{SwapRate, Temperature, Throttle};

    fn swapping(mib_s: f64) -> Sample {
        Sample {
            swap_rate: Some(SwapRate {
                in_bytes_per_s: mib_s * 1024.0 * 1024.0,
                out_bytes_per_s: 0.0,
            }),
            ..Sample::default()
        }
    }

    fn turn(context: usize, decode: f64) -> GenStats {
        GenStats {
            ttft_ms: 100.0,
            prompt_tokens: 10,
            reused_tokens: 0,
            completion_tokens: 64,
            prefill_tok_s: Some(100.0),
            decode_tok_s: Some(decode),
            total_ms: 1000.0,
            context_tokens: context,
            cached_tokens: 0,
            ..GenStats::default()
        }
    }

    #[test]
    fn swap_storm_needs_sustained_swap_in_while_generating() {
        let mut d = AlarmDetector::default();
        for _ in 0..10 {
            assert_eq!(d.on_sample(&swapping(50.0), false), None);
        }
        assert_eq!(d.on_sample(&swapping(50.0), true), None);
        assert_eq!(d.on_sample(&swapping(50.0), true), None);
        let raised = d.on_sample(&swapping(50.0), true).unwrap();
        assert!(matches!(
            raised,
            AlarmEvent::Raised { kind: AlarmKind::SwapStorm, ref message } if message.contains("50.0 MiB/s")
        ));
        assert!(d.active(AlarmKind::SwapStorm));
        // Raised once, not every sample.
        assert_eq!(d.on_sample(&swapping(50.0), true), None);
        for _ in 0..4 {
            assert_eq!(d.on_sample(&swapping(0.0), true), None);
        }
        assert_eq!(
            d.on_sample(&swapping(0.0), true),
            Some(AlarmEvent::Cleared {
                kind: AlarmKind::SwapStorm
            })
        );
    }

    #[test]
    fn a_missing_swap_rate_is_not_a_storm() {
        let mut d = AlarmDetector::default();
        for _ in 0..10 {
            assert_eq!(d.on_sample(&Sample::default(), true), None);
        }
    }

    #[test]
    fn slower_decode_alone_is_not_throttling() {
        let mut d = AlarmDetector::default();
        d.on_sample(&Sample::default(), true);
        assert_eq!(d.on_turn(&turn(1000, 30.0)), None);
        assert_eq!(d.on_turn(&turn(1000, 10.0)), None);
    }

    #[test]
    fn slower_decode_while_clocks_are_capped_is_throttling() {
        let mut d = AlarmDetector::default();
        assert_eq!(d.on_turn(&turn(1000, 30.0)), None);
        let capped = Sample {
            throttle: Throttle {
                cap_ratio: Some(0.6),
                ..Throttle::default()
            },
            ..Sample::default()
        };
        d.on_sample(&capped, true);
        // A turn at a very different context is not compared.
        assert_eq!(d.on_turn(&turn(8000, 10.0)), None);
        let Some(AlarmEvent::Raised { kind, message }) = d.on_turn(&turn(900, 20.0)) else {
            panic!("no alarm");
        };
        assert_eq!(kind, AlarmKind::ThermalThrottling);
        assert!(message.contains("60 %"), "{message}");
        // Back to full speed clears it.
        assert_eq!(
            d.on_turn(&turn(1000, 29.0)),
            Some(AlarmEvent::Cleared {
                kind: AlarmKind::ThermalThrottling
            })
        );
    }

    #[test]
    fn heat_is_remembered_for_a_while_then_forgotten() {
        let mut d = AlarmDetector::default();
        d.on_turn(&turn(500, 30.0));
        let hot = Sample {
            temperatures: vec![Temperature {
                label: "coretemp Package id 0".into(),
                celsius: 97.0,
                critical: Some(100.0),
            }],
            ..Sample::default()
        };
        d.on_sample(&hot, true);
        for _ in 0..HEAT_MEMORY {
            d.on_sample(&Sample::default(), true);
        }
        assert_eq!(d.on_turn(&turn(500, 10.0)), None);
        d.on_sample(&hot, true);
        assert!(matches!(
            d.on_turn(&turn(500, 10.0)),
            Some(AlarmEvent::Raised { ref message, .. }) if message.contains("97 °C")
        ));
    }
}
