//! Machines to plan for before buying one (`kiln fit --machine`): the Apple
//! Silicon configurations kiln's users choose between, with the figures
//! that decide what a model does on them.
//!
//! Memory and bandwidth are Apple's published specifications (each
//! preset's `source`). Two figures are estimates, and are printed as such:
//! - The GPU's default wired limit. Metal lets the GPU wire about 2/3 of
//!   memory on machines of 36 GB or less and about 3/4 above (the
//!   `recommendedMaxWorkingSetSize` llama.cpp's Metal backend prints, e.g.
//!   49,152 MB on 64 GB machines); `sudo sysctl iogpu.wired_limit_mb=N`
//!   raises it until the next boot.
//! - Decode speed. Decoding reads every active weight and the KV cache once
//!   per token, so bandwidth ÷ those bytes bounds it. Measured llama.cpp
//!   decode on Apple Silicon reaches 44–58% of peak bandwidth for a dense
//!   27B model (IQ4_NL, Q4_1, Q3_K_M on an M1 Max; llama.cpp issue
//!   #27525); the expected range is the bound times that share.

use crate::budget::{gib, ModelShape};

/// The measured share of peak bandwidth llama.cpp's decode reaches on
/// Apple Silicon, lowest and highest (see the module's note).
pub const DECODE_EFFICIENCY: (f64, f64) = (0.44, 0.58);
pub const EFFICIENCY_SOURCE: &str =
    "llama.cpp issue #27525: 44-58% of peak bandwidth, dense 27B, M1 Max";

#[derive(Debug)]
pub struct Machine {
    pub name: &'static str,
    pub description: &'static str,
    /// Unified memory in GiB (Apple's "GB" of memory are GiB).
    pub memory_gib: u64,
    /// Peak memory bandwidth in GB/s (10^9 bytes).
    pub bandwidth_gbs: f64,
    pub source: &'static str,
}

const MAC_MINI: &str = "Apple, Mac mini (2024) technical specifications: M4 Pro, 273GB/s";
const STUDIO_M4: &str =
    "Apple, Mac Studio (2025) technical specifications: M4 Max 16-core CPU/40-core GPU, 546GB/s";
const STUDIO_M3: &str = "Apple, Mac Studio (2025) technical specifications: M3 Ultra, 819GB/s";
const MBP_M5: &str =
    "Apple, MacBook Pro (M5 Pro/M5 Max, March 2026) technical specifications: M5 Max 40-core GPU, 614GB/s";

pub static MACHINES: &[Machine] = &[
    Machine {
        name: "mac-mini-m4-pro-48",
        description: "Mac mini, M4 Pro, 48 GB",
        memory_gib: 48,
        bandwidth_gbs: 273.0,
        source: MAC_MINI,
    },
    Machine {
        name: "mac-mini-m4-pro-64",
        description: "Mac mini, M4 Pro, 64 GB",
        memory_gib: 64,
        bandwidth_gbs: 273.0,
        source: MAC_MINI,
    },
    Machine {
        name: "mac-studio-m4-max-64",
        description: "Mac Studio, M4 Max (40-core GPU), 64 GB",
        memory_gib: 64,
        bandwidth_gbs: 546.0,
        source: STUDIO_M4,
    },
    Machine {
        name: "mac-studio-m4-max-128",
        description: "Mac Studio, M4 Max (40-core GPU), 128 GB",
        memory_gib: 128,
        bandwidth_gbs: 546.0,
        source: STUDIO_M4,
    },
    Machine {
        name: "mac-studio-m3-ultra-96",
        description: "Mac Studio, M3 Ultra, 96 GB",
        memory_gib: 96,
        bandwidth_gbs: 819.0,
        source: STUDIO_M3,
    },
    Machine {
        name: "mac-studio-m3-ultra-256",
        description: "Mac Studio, M3 Ultra, 256 GB",
        memory_gib: 256,
        bandwidth_gbs: 819.0,
        source: STUDIO_M3,
    },
    Machine {
        name: "macbook-pro-m5-max-64",
        description: "MacBook Pro, M5 Max (40-core GPU), 64 GB",
        memory_gib: 64,
        bandwidth_gbs: 614.0,
        source: MBP_M5,
    },
    Machine {
        name: "macbook-pro-m5-max-128",
        description: "MacBook Pro, M5 Max (40-core GPU), 128 GB",
        memory_gib: 128,
        bandwidth_gbs: 614.0,
        source: MBP_M5,
    },
];

pub fn machine(name: &str) -> Option<&'static Machine> {
    MACHINES.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

impl Machine {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_gib << 30
    }

    /// The GPU's default wired limit: an estimate (see the module's note).
    pub fn default_wired_limit(&self) -> u64 {
        default_wired_limit(self.memory_bytes())
    }
}

/// About 2/3 of memory up to 36 GiB, 3/4 above.
pub fn default_wired_limit(memory: u64) -> u64 {
    if memory <= 36 << 30 {
        memory / 3 * 2
    } else {
        memory / 4 * 3
    }
}

/// Decode speed on `bandwidth_gbs` at `context` tokens: the bound, and the
/// expected range.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct DecodeEstimate {
    /// Bytes read per token: active weights plus the KV cache.
    pub bytes_per_token: u64,
    pub bound: f64,
    pub expected: (f64, f64),
}

pub fn decode_estimate(shape: &ModelShape, context: u64, bandwidth_gbs: f64) -> DecodeEstimate {
    let bytes = shape.active_weight_bytes() + shape.own_kv_bytes(context);
    let bound = bandwidth_gbs * 1e9 / bytes.max(1) as f64;
    DecodeEstimate {
        bytes_per_token: bytes,
        bound,
        expected: (bound * DECODE_EFFICIENCY.0, bound * DECODE_EFFICIENCY.1),
    }
}

/// What a draft model buys where decoding is bound by memory bandwidth
/// (a Mac, a GPU): a step drafts `k` tokens, each costing the draft
/// model's read of its weights, then verifies them in one pass of the
/// model, which reads its weights once for all of them. With each drafted
/// token kept with probability `accepted`, a step yields
/// (1 - a^(k+1)) / (1 - a) tokens. The speed-up is that over the step's
/// time in model decodes. On a compute-bound machine (a few CPU cores) the
/// verify costs nearly what decoding the drafted tokens one by one does,
/// so this does not hold there, and kiln measures instead.
pub fn draft_speedup(model_bytes: u64, draft_bytes: u64, k: usize, accepted: f64) -> f64 {
    let a = accepted.clamp(0.0, 0.999_999);
    let yielded = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
    let cost = 1.0 + k as f64 * draft_bytes as f64 / model_bytes.max(1) as f64;
    yielded / cost
}

/// The acceptance rate from which drafting `k` tokens a step pays.
pub fn draft_break_even(model_bytes: u64, draft_bytes: u64, k: usize) -> Option<f64> {
    (0..=1000)
        .map(|i| i as f64 / 1000.0)
        .find(|&a| draft_speedup(model_bytes, draft_bytes, k, a) > 1.0)
}

/// `kiln fit`'s words for an estimate.
pub fn describe(e: &DecodeEstimate, bandwidth_gbs: f64) -> String {
    format!(
        "at most {:.1} tok/s ({bandwidth_gbs:.0} GB/s ÷ {} a token); expect {:.1}-{:.1} tok/s (estimate: {EFFICIENCY_SOURCE})",
        e.bound,
        gib(e.bytes_per_token),
        e.expected.0,
        e.expected.1
    )
}

/// Apple's published unified-memory bandwidth for a chip, in GB/s, by the
/// name macOS gives it ("Apple M4 Max") and its GPU cores, where the same
/// chip ships with two memory systems (Apple's technical specifications).
pub fn published_bandwidth_gbs(chip: &str, gpu_cores: u8) -> Option<f64> {
    let name = chip.trim().strip_prefix("Apple ")?;
    let figure = match name {
        "M1" => 68.25,
        "M1 Pro" => 200.0,
        "M1 Max" => 400.0,
        "M1 Ultra" => 800.0,
        "M2" => 100.0,
        "M2 Pro" => 200.0,
        "M2 Max" => 400.0,
        "M2 Ultra" => 800.0,
        "M3" => 100.0,
        "M3 Pro" => 150.0,
        "M3 Max" if gpu_cores <= 30 => 300.0,
        "M3 Max" => 400.0,
        "M3 Ultra" => 819.0,
        "M4" => 120.0,
        "M4 Pro" => 273.0,
        "M4 Max" if gpu_cores <= 32 => 410.0,
        "M4 Max" => 546.0,
        "M5" => 153.0,
        _ => return None,
    };
    Some(figure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_pays_where_the_model_is_much_bigger_and_its_tokens_are_kept() {
        // Qwen2.5-32B Q4_K_M (19.9 GB) with the 0.5B (0.4 GB), 8 a step.
        let (model, draft) = (19_900_000_000, 400_000_000);
        let s = draft_speedup(model, draft, 8, 0.8);
        // 4.33 tokens a step for 1.16 model decodes.
        assert!((s - 3.73).abs() < 0.02, "{s}");
        assert!(draft_speedup(model, draft, 8, 0.0) < 1.0);
        // The model as its own draft never pays.
        assert!(draft_break_even(model, model, 8).is_none());
        let even = draft_break_even(model, draft, 8).unwrap();
        assert!(even > 0.1 && even < 0.2, "{even}");
    }

    #[test]
    fn published_bandwidth_by_chip_and_gpu() {
        assert_eq!(published_bandwidth_gbs("Apple M4 Pro", 20), Some(273.0));
        assert_eq!(published_bandwidth_gbs("Apple M4 Max", 32), Some(410.0));
        assert_eq!(published_bandwidth_gbs("Apple M4 Max", 40), Some(546.0));
        assert_eq!(published_bandwidth_gbs("Apple M3 Max", 30), Some(300.0));
        assert_eq!(published_bandwidth_gbs("Apple M9", 10), None);
        assert_eq!(published_bandwidth_gbs("Intel Xeon", 0), None);
    }

    #[test]
    fn wired_limits_follow_the_metal_rule() {
        assert_eq!(default_wired_limit(64 << 30), 48 << 30);
        assert_eq!(default_wired_limit(32 << 30), (32u64 << 30) / 3 * 2);
        assert_eq!(
            machine("mac-mini-m4-pro-48").unwrap().default_wired_limit(),
            36 << 30
        );
    }

    #[test]
    fn every_machine_has_a_source_and_a_unique_name() {
        let mut names: Vec<_> = MACHINES.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), MACHINES.len());
        assert!(MACHINES.iter().all(|m| m.source.starts_with("Apple")));
    }
}
