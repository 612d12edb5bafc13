//! `kiln bench --sampler`: the CPU cost of one telemetry sample.

use serde::Serialize;

use crate::error::{KilnError, Result};
use crate::procinfo::cpu_time;
use crate::telemetry::Sampler;

#[derive(Debug, Serialize)]
pub struct SamplerCost {
    pub samples: usize,
    pub cpu_us_per_sample: f64,
    pub wall_us_per_sample: f64,
    /// Share of one core the sampler takes at one sample per second.
    pub percent_of_core_at_1hz: f64,
}

/// CPU time of the telemetry sampler: 100 samples per run, back to back,
/// after one warm-up sample (the first refresh reads more than later ones).
pub fn run(runs: usize, json: bool) -> Result<i32> {
    let samples = runs * 100;
    let mut sampler = Sampler::new();
    std::hint::black_box(sampler.sample());
    let unavailable = || KilnError::Engine("this system does not report CPU time".into());
    let cpu0 = cpu_time().ok_or_else(unavailable)?;
    let wall0 = std::time::Instant::now();
    for _ in 0..samples {
        std::hint::black_box(sampler.sample());
    }
    let wall = wall0.elapsed();
    let cpu = cpu_time().ok_or_else(unavailable)?.saturating_sub(cpu0);
    let cpu_us = cpu.as_secs_f64() * 1e6 / samples as f64;
    let cost = SamplerCost {
        samples,
        cpu_us_per_sample: cpu_us,
        wall_us_per_sample: wall.as_secs_f64() * 1e6 / samples as f64,
        percent_of_core_at_1hz: cpu_us / 1e6 * 100.0,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&cost).expect("serializes")
        );
    } else {
        println!(
            "kiln bench --sampler · {} samples · CPU {:.0} µs/sample · wall {:.0} µs/sample · {:.3} % of one core at 1 Hz",
            cost.samples, cost.cpu_us_per_sample, cost.wall_us_per_sample, cost.percent_of_core_at_1hz
        );
    }
    Ok(0)
}
