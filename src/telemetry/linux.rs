//! Readers of Linux's `/proc` and `/sys` files.
//!
//! Every reader takes the filesystem root so tests run it on fixture trees.
//! A missing or malformed file gives `None` (or skips that one sensor):
//! "not available" must never turn into a zero on screen.

use std::fs;
use std::path::{Path, PathBuf};

use super::{EnergyCounter, Psi, Temperature};

/// Cumulative pages swapped in and out since boot (`/proc/vmstat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapCounters {
    pub pages_in: u64,
    pub pages_out: u64,
}

pub fn swap_counters(root: &Path) -> Option<SwapCounters> {
    let text = fs::read_to_string(root.join("proc/vmstat")).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<u64>().ok())?
        })
    };
    Some(SwapCounters {
        pages_in: field("pswpin")?,
        pages_out: field("pswpout")?,
    })
}

/// The CPU packages' RAPL energy counters
/// (`/sys/class/powercap/intel-rapl:N`, also on AMD), in a stable order. Sub-zones (core,
/// uncore, dram) are inside their package's figure and are left out; a
/// counter only root may read (kernels since 5.10) is not available.
pub fn package_energy(root: &Path) -> Vec<EnergyCounter> {
    let Ok(dir) = fs::read_dir(root.join("sys/class/powercap")) else {
        return Vec::new();
    };
    let mut zones: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("intel-rapl:"))
                .is_some_and(|rest| !rest.contains(':'))
        })
        .filter(|p| read_word(&p.join("name")).is_some_and(|n| n.starts_with("package")))
        .collect();
    zones.sort();
    zones.truncate(16);
    zones
        .iter()
        .filter_map(|z| {
            Some(EnergyCounter {
                energy_uj: u64::try_from(read_number(&z.join("energy_uj"))?).ok()?,
                range_uj: u64::try_from(read_number(&z.join("max_energy_range_uj"))?).ok()?,
            })
        })
        .collect()
}

/// Memory pressure stall information (`/proc/pressure/memory`).
pub fn memory_pressure(root: &Path) -> Option<Psi> {
    let text = fs::read_to_string(root.join("proc/pressure/memory")).ok()?;
    let avg10 = |kind: &str| -> Option<f32> {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        let value = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?;
        value
            .parse()
            .ok()
            .filter(|v: &f32| (0.0..=100.0).contains(v))
    };
    Some(Psi {
        some_avg10: avg10("some ")?,
        // Kernels before 5.13 had no "full" line for memory in some configs.
        full_avg10: avg10("full "),
    })
}

fn read_number(path: &Path) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_word(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let word = text.trim();
    (!word.is_empty()).then(|| word.to_string())
}

/// Entries of `dir` whose names start with `prefix`, sorted by the number
/// after it so `cpu10` comes after `cpu2`.
fn numbered_entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// A sensor value in millidegrees Celsius, or `None` when it is implausible.
/// Disconnected sensors read 0, -273 or huge values; none of those is a
/// temperature anyone should act on.
fn celsius(millidegrees: i64) -> Option<f32> {
    let c = millidegrees as f32 / 1000.0;
    (c != 0.0 && c > -40.0 && c < 150.0).then_some(c)
}

/// Temperatures from hwmon chips, then from thermal zones that no hwmon chip
/// already reports (many zones are mirrored as an hwmon chip of the same name).
pub fn temperatures(root: &Path) -> Vec<Temperature> {
    let mut temps = Vec::new();
    let mut chips = Vec::new();
    for chip in numbered_entries(&root.join("sys/class/hwmon"), "hwmon") {
        let name = read_word(&chip.join("name")).unwrap_or_else(|| "hwmon".into());
        chips.push(name.clone());
        let Ok(entries) = fs::read_dir(&chip) else {
            continue;
        };
        let mut inputs: Vec<(u32, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let n = file.strip_prefix("temp")?.strip_suffix("_input")?;
                Some((n.parse().ok()?, n.to_string()))
            })
            .collect();
        inputs.sort();
        for (_, n) in inputs {
            let Some(value) = read_number(&chip.join(format!("temp{n}_input"))).and_then(celsius)
            else {
                continue;
            };
            let label = read_word(&chip.join(format!("temp{n}_label")))
                .unwrap_or_else(|| format!("temp{n}"));
            temps.push(Temperature {
                label: format!("{name} {label}"),
                celsius: value,
                critical: read_number(&chip.join(format!("temp{n}_crit"))).and_then(celsius),
            });
        }
    }
    for zone in numbered_entries(&root.join("sys/class/thermal"), "thermal_zone") {
        let kind = read_word(&zone.join("type")).unwrap_or_else(|| "thermal zone".into());
        if chips.contains(&kind) {
            continue;
        }
        let Some(value) = read_number(&zone.join("temp")).and_then(celsius) else {
            continue;
        };
        temps.push(Temperature {
            label: kind,
            celsius: value,
            critical: critical_trip(&zone),
        });
    }
    temps
}

fn critical_trip(zone: &Path) -> Option<f32> {
    (0..32).find_map(|i| {
        let kind = read_word(&zone.join(format!("trip_point_{i}_type")))?;
        (kind == "critical")
            .then(|| read_number(&zone.join(format!("trip_point_{i}_temp"))))?
            .and_then(celsius)
    })
}

/// CPU clock state from cpufreq and the Intel thermal-throttle counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Clocks {
    /// Mean over CPUs of current / hardware maximum frequency.
    pub freq_ratio: Option<f32>,
    /// Lowest over CPUs of the allowed maximum / hardware maximum; a thermal
    /// driver lowers `scaling_max_freq` when it caps the clocks.
    pub cap_ratio: Option<f32>,
    /// Sum of core and package throttle events since boot.
    pub throttle_events: Option<u64>,
}

pub fn clocks(root: &Path) -> Clocks {
    let mut ratios = Vec::new();
    let mut caps = Vec::new();
    let mut events: Option<u64> = None;
    for cpu in numbered_entries(&root.join("sys/devices/system/cpu"), "cpu") {
        let freq = cpu.join("cpufreq");
        if let Some(max) = read_number(&freq.join("cpuinfo_max_freq")).filter(|&m| m > 0) {
            if let Some(cur) = read_number(&freq.join("scaling_cur_freq")).filter(|&c| c > 0) {
                ratios.push(cur as f32 / max as f32);
            }
            if let Some(cap) = read_number(&freq.join("scaling_max_freq")).filter(|&c| c > 0) {
                caps.push(cap as f32 / max as f32);
            }
        }
        for counter in ["core_throttle_count", "package_throttle_count"] {
            if let Some(n) = read_number(&cpu.join("thermal_throttle").join(counter)) {
                *events.get_or_insert(0) += n.max(0) as u64;
            }
        }
    }
    Clocks {
        freq_ratio: (!ratios.is_empty()).then(|| ratios.iter().sum::<f32>() / ratios.len() as f32),
        cap_ratio: caps.into_iter().reduce(f32::min),
        throttle_events: events,
    }
}
