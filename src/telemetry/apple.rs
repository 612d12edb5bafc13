//! Apple Silicon figures from raw readings: the arithmetic behind the thin
//! macOS shims (`macos.rs`), compiled on every platform so that it is tested
//! here with real values.

use super::Temperature;

/// `host_statistics64(HOST_VM_INFO64)` counters, in pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    pub free: u64,
    pub active: u64,
    pub inactive: u64,
    pub wire: u64,
    pub speculative: u64,
    pub compressor: u64,
    pub purgeable: u64,
    pub external: u64,
    pub swapins: u64,
    pub swapouts: u64,
}

impl VmCounters {
    /// Memory in use as Activity Monitor and macmon count it: app, wired
    /// and compressed memory, not the file cache (`external`) or what the
    /// system may discard (`purgeable`).
    pub fn used_bytes(&self, page: u64) -> u64 {
        (self.active + self.inactive + self.wire + self.speculative + self.compressor)
            .saturating_sub(self.purgeable + self.external)
            * page
    }

    /// What a new allocation can have without pushing others out: total
    /// less used. sysinfo's Apple figure counts inactive app memory as
    /// available, which overstates it.
    pub fn available_bytes(&self, total: u64, page: u64) -> u64 {
        total.saturating_sub(self.used_bytes(page))
    }
}

/// How a sensor in IOKit's HID list (what sysinfo reports on Apple Silicon)
/// counts toward the thermal panel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SensorKind {
    Cpu,
    Gpu,
    /// Calibration, battery, storage and other sensors that say nothing
    /// about whether the chip is hot (`PMU tcal` reads a constant ~52 °C).
    Ignored,
}

fn sensor_kind(name: &str) -> SensorKind {
    let cpu = [
        "pACC MTR Temp Sensor",
        "eACC MTR Temp Sensor",
        "PMU tdie",
        "PMU2 tdie",
    ];
    if cpu.iter().any(|p| name.starts_with(p)) {
        SensorKind::Cpu
    } else if name.starts_with("GPU MTR Temp Sensor") {
        SensorKind::Gpu
    } else {
        SensorKind::Ignored
    }
}

/// The thermal panel's lines from HID sensor readings: one CPU and one GPU
/// average (as macmon computes them), not dozens of raw sensors. Readings
/// of 0 °C or above 150 °C are ones sysinfo could not decode.
pub fn sensor_averages(readings: &[(String, f32)]) -> Vec<Temperature> {
    let mean = |kind| {
        let v: Vec<f32> = readings
            .iter()
            .filter(|(name, t)| sensor_kind(name) == kind && *t > 0.0 && *t < 150.0)
            .map(|(_, t)| *t)
            .collect();
        (!v.is_empty()).then(|| (v.iter().sum::<f32>() / v.len() as f32, v.len()))
    };
    averages(mean(SensorKind::Cpu), mean(SensorKind::Gpu))
}

/// The panel's CPU and GPU lines, with how many sensors each averages.
pub fn averages(cpu: Option<(f32, usize)>, gpu: Option<(f32, usize)>) -> Vec<Temperature> {
    [("CPU", cpu), ("GPU", gpu)]
        .into_iter()
        .filter_map(|(what, reading)| {
            let (celsius, n) = reading?;
            let label = match n {
                0 => format!("{what} average"),
                1 => what.to_string(),
                n => format!("{what} average of {n}"),
            };
            // Apple publishes no critical point; the chip throttles itself
            // and the thermal-pressure level says when.
            Some(Temperature {
                label,
                celsius,
                critical: None,
            })
        })
        .collect()
}

/// The GPU memory Metal lets one process wire: the `iogpu.wired_limit_mb`
/// sysctl when the user has set it (0 is unset), else Metal's own figure,
/// `recommendedMaxWorkingSetSize`, which llama.cpp reports as its Metal
/// device's total memory.
pub fn gpu_wired_limit(sysctl_mb: Option<i64>, metal_total: Option<u64>) -> Option<u64> {
    match sysctl_mb {
        Some(mb) if mb > 0 => Some(mb as u64 * 1024 * 1024),
        _ => metal_total.filter(|&b| b > 0),
    }
}

/// One reading of the SoC's power and GPU from IOReport (through macmon),
/// over the interval it was sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SocReading {
    pub cpu_celsius: Option<f32>,
    pub gpu_celsius: Option<f32>,
    /// Watts: CPU, GPU, ANE and DRAM; `system` is the whole machine
    /// (`PSTR`), where the SMC has it.
    pub cpu_w: f32,
    pub gpu_w: f32,
    pub ane_w: f32,
    pub dram_w: f32,
    pub system_w: Option<f32>,
    pub gpu_mhz: u32,
    /// The GPU's busy share, 0 to 1.
    pub gpu_active: f32,
}

/// The GPU's clock and load, for the thermal panel.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuLoad {
    pub mhz: u32,
    /// Busy share, 0 to 1.
    pub busy: f32,
    pub watts: f32,
}

impl SocReading {
    /// The GPU's figures, where IOReport gave any (an idle GPU reads 0 MHz).
    pub fn gpu(&self) -> Option<GpuLoad> {
        (self.gpu_mhz > 0 || self.gpu_active > 0.0).then_some(GpuLoad {
            mhz: self.gpu_mhz,
            busy: self.gpu_active.clamp(0.0, 1.0),
            watts: self.gpu_w,
        })
    }

    /// The power kiln accounts energy with: the whole machine where the SMC
    /// reports it, else the SoC's parts added up.
    pub fn watts(&self) -> f64 {
        match self.system_w.filter(|w| *w > 0.0) {
            Some(w) => w as f64,
            None => (self.cpu_w + self.gpu_w + self.ane_w + self.dram_w) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters of the size `vm_stat` shows on a 32 GiB Mac (16 KiB pages)
    /// holding a large model, with a big file cache; the figures are
    /// illustrative, the formula is macmon's.
    #[test]
    fn used_memory_is_activity_monitors_figure() {
        let c = VmCounters {
            free: 20_132,
            active: 829_530,
            inactive: 801_345,
            wire: 155_410,
            speculative: 12_094,
            compressor: 40_512,
            purgeable: 6_230,
            external: 537_110,
            swapins: 1_211,
            swapouts: 4_080,
        };
        let page = 16 * 1024;
        let used = c.used_bytes(page);
        assert_eq!(
            used,
            (829_530 + 801_345 + 155_410 + 12_094 + 40_512 - 6_230 - 537_110) * page
        );
        assert!((used as f64 / 1e9 - 21.3).abs() < 0.1, "{used}");
        let total = 32 << 30;
        assert_eq!(c.available_bytes(total, page), total - used);
        // Counters that do not add up (a racing read) never underflow.
        let odd = VmCounters {
            purgeable: u64::MAX / 2,
            ..c
        };
        assert_eq!(odd.used_bytes(page), 0);
        assert_eq!(
            VmCounters {
                active: u64::MAX / page,
                ..VmCounters::default()
            }
            .available_bytes(total, page),
            0
        );
    }

    /// Sensor names as IOKit's HID list has them on M-series chips (the
    /// names macmon matches, and those sysinfo users report: calibration,
    /// battery, storage), with illustrative values and unreadable ones.
    #[test]
    fn the_hid_list_becomes_two_averages_without_calibration() {
        let names = [
            ("PMU tdie1", 48.2),
            ("PMU tdie2", 51.0),
            ("PMU tdie4", 49.5),
            ("PMU2 tdie1", 47.1),
            ("pACC MTR Temp Sensor2", 55.4),
            ("pACC MTR Temp Sensor3", 57.0),
            ("eACC MTR Temp Sensor0", 44.0),
            ("GPU MTR Temp Sensor1", 41.3),
            ("GPU MTR Temp Sensor4", 43.7),
            ("PMU tcal", 52.0),
            ("PMU2 tcal", 52.0),
            ("PMU tdev1", 33.8),
            ("PMU2 TR0Z", 38.0),
            ("gas gauge battery", 30.1),
            ("NAND CH0 temp", 35.0),
            ("PMU tdie8", 0.0),
            ("GPU MTR Temp Sensor7", -128.0),
        ];
        let readings: Vec<(String, f32)> = names.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        let t = sensor_averages(&readings);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].label, "CPU average of 7");
        let cpu = (48.2 + 51.0 + 49.5 + 47.1 + 55.4 + 57.0 + 44.0) / 7.0;
        assert!((t[0].celsius - cpu).abs() < 0.01);
        assert_eq!(t[1].label, "GPU average of 2");
        assert!((t[1].celsius - 42.5).abs() < 0.01);
        // The hottest line is a chip average, never calibration at 52 °C.
        let sample = super::super::Sample {
            temperatures: t,
            ..Default::default()
        };
        assert!(sample.hottest().unwrap().label.starts_with("CPU"));
        assert!(sensor_averages(&[("gas gauge battery".into(), 30.0)]).is_empty());
    }

    #[test]
    fn the_gpu_limit_is_the_sysctl_else_metals_figure() {
        let gib = 1u64 << 30;
        assert_eq!(
            gpu_wired_limit(Some(40_960), Some(36 * gib)),
            Some(40 * gib)
        );
        assert_eq!(gpu_wired_limit(Some(0), Some(36 * gib)), Some(36 * gib));
        assert_eq!(gpu_wired_limit(None, Some(36 * gib)), Some(36 * gib));
        assert_eq!(gpu_wired_limit(None, None), None);
        assert_eq!(gpu_wired_limit(Some(-1), Some(0)), None);
    }

    #[test]
    fn energy_uses_system_power_where_there_is_one() {
        let r = SocReading {
            cpu_w: 4.5,
            gpu_w: 18.0,
            ane_w: 0.0,
            dram_w: 2.5,
            ..SocReading::default()
        };
        assert!((r.watts() - 25.0).abs() < 1e-6);
        let with_system = SocReading {
            system_w: Some(41.0),
            ..r
        };
        assert!((with_system.watts() - 41.0).abs() < 1e-6);
        assert_eq!(r.gpu(), None);
        let busy = SocReading {
            gpu_mhz: 1398,
            gpu_active: 1.2,
            ..r
        };
        assert_eq!(
            busy.gpu(),
            Some(GpuLoad {
                mhz: 1398,
                busy: 1.0,
                watts: 18.0
            })
        );
    }
}
