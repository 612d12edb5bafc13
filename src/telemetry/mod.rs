//! What the operating system says about memory, swap, pressure, heat and
//! clocks, sampled by a background task and published on a `watch` channel.
//!
//! Every figure is an `Option` (or an empty list for sensors): a source this
//! machine lacks is reported as missing, never as zero.

pub mod alarms;
pub mod apple;
#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(target_os = "macos")]
mod macos;
pub mod remote;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::procinfo;

/// macOS makes swap files as it needs them: a swap total of 0 there means
/// none is in use yet, not that the machine has none.
pub const SWAP_ON_DEMAND: bool = cfg!(target_os = "macos");

/// How a swap total reads: the words for 0 depend on the platform.
pub fn no_swap_words(on_demand: bool) -> &'static str {
    match on_demand {
        true => "swap 0 (grows on demand)",
        false => "no swap",
    }
}

pub use crate::budget::MemorySnapshot;

impl MemorySnapshot {
    pub fn read() -> Option<MemorySnapshot> {
        let mut sys = sysinfo::System::new().ok()?;
        MemorySnapshot::refresh(&mut sys)
    }

    fn refresh(sys: &mut sysinfo::System) -> Option<MemorySnapshot> {
        sys.refresh_memory();
        if sys.total_memory() == 0 {
            return None;
        }
        let mut snap = MemorySnapshot {
            total: sys.total_memory(),
            available: sys.available_memory(),
            swap_total: sys.total_swap(),
            swap_free: sys.free_swap(),
        };
        if let Some(cg) = sys.cgroup_limits() {
            snap.total = snap.total.min(cg.total_memory);
            snap.available = snap.available.min(cg.free_memory);
            snap.swap_free = snap.swap_free.min(cg.free_swap);
        }
        #[cfg(target_os = "macos")]
        {
            // sysinfo counts inactive app memory as available; Activity
            // Monitor's "used" does not.
            if let Some(vm) = macos::vm_counters() {
                snap.available = vm.available_bytes(snap.total, page_size());
            }
            // llama.cpp runs on Metal on every Mac: weights and KV cache
            // live in GPU-wired memory, which macOS caps below physical
            // memory.
            if let Some(limit) = gpu_wired_limit() {
                snap.available = snap.available.min(limit);
            }
        }
        Some(snap)
    }

    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    pub fn swap_used(&self) -> u64 {
        self.swap_total.saturating_sub(self.swap_free)
    }
}

/// Pages moved between memory and swap, in bytes per second.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct SwapRate {
    pub in_bytes_per_s: f64,
    pub out_bytes_per_s: f64,
}

/// Linux pressure stall information: the share of the last 10 s in which
/// some (or all) tasks waited for memory.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Psi {
    pub some_avg10: f32,
    pub full_avg10: Option<f32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PressureLevel {
    Normal,
    Warn,
    Critical,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Pressure {
    pub level: PressureLevel,
    pub psi: Option<Psi>,
}

impl Pressure {
    /// Levels from PSI, in the spirit of macOS's warn/critical: stalls for a
    /// tenth of the time are felt; stalls of every task, or of some tasks
    /// for 40 % of the time, mean the machine is thrashing.
    pub fn from_psi(psi: Psi) -> Pressure {
        let full = psi.full_avg10.unwrap_or(0.0);
        let level = if full >= 10.0 || psi.some_avg10 >= 40.0 {
            PressureLevel::Critical
        } else if psi.some_avg10 >= 10.0 {
            PressureLevel::Warn
        } else {
            PressureLevel::Normal
        };
        Pressure {
            level,
            psi: Some(psi),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessStats {
    pub rss: u64,
    /// CPU time used since the previous sample, in percent of one core.
    pub cpu_percent: Option<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Temperature {
    pub label: String,
    pub celsius: f32,
    pub critical: Option<f32>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Throttle {
    /// Mean current / maximum CPU clock. Low values on an idle machine are
    /// power saving, not throttling.
    pub freq_ratio: Option<f32>,
    /// Lowest allowed maximum / hardware maximum CPU clock.
    pub cap_ratio: Option<f32>,
    /// Thermal-throttle events since the previous sample.
    pub new_events: Option<u64>,
    /// macOS thermal pressure, 0 (nominal) to 4.
    pub thermal_level: Option<u8>,
}

impl Throttle {
    /// Whether the hardware is being held back for heat (or by a clock cap);
    /// `None` when the machine exposes none of the signals.
    pub fn throttled(&self) -> Option<bool> {
        let signals = [
            self.new_events.map(|n| n > 0),
            self.cap_ratio.map(|r| r < 0.95),
            self.thermal_level.map(|l| l >= 2),
        ];
        signals.into_iter().flatten().reduce(|a, b| a || b)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// 0 for the first sample, then counting up.
    pub seq: u64,
    pub memory: Option<MemorySnapshot>,
    /// The GPU wired-memory limit on a Mac: `iogpu.wired_limit_mb` when
    /// set, else Metal's recommended working set.
    pub gpu_wired_limit: Option<u64>,
    /// Joules the machine used since the sampler started (RAPL packages
    /// on Linux, the SoC or the whole machine on Apple Silicon).
    pub energy_j: Option<f64>,
    /// Watts since the previous sample.
    pub power_w: Option<f64>,
    /// The machine's memory bandwidth in bytes/s (`crate::bandwidth`),
    /// where it has been measured or published.
    pub memory_bandwidth: Option<f64>,
    /// The GPU's clock, load and power (Apple Silicon).
    pub gpu: Option<apple::GpuLoad>,
    pub swap_rate: Option<SwapRate>,
    pub pressure: Option<Pressure>,
    pub process: Option<ProcessStats>,
    /// Empty when the machine exposes no temperature sensors.
    pub temperatures: Vec<Temperature>,
    pub throttle: Throttle,
}

impl Sample {
    pub fn hottest(&self) -> Option<&Temperature> {
        self.temperatures
            .iter()
            .max_by(|a, b| a.celsius.total_cmp(&b.celsius))
    }

    /// A sensor within 10 °C of its critical point, or above 90 °C when it
    /// has none.
    pub fn running_hot(&self) -> bool {
        self.temperatures
            .iter()
            .any(|t| t.celsius >= t.critical.map_or(90.0, |c| c - 10.0))
    }
}

/// Counters whose rates need two readings.
struct Counters {
    at: Instant,
    swap_pages: Option<(u64, u64)>,
    throttle_events: Option<u64>,
    cpu_time: Option<Duration>,
    #[cfg(target_os = "linux")]
    energy: Vec<EnergyCounter>,
}

/// One energy counter (a RAPL package's, on Linux): microjoules since
/// some point, wrapping at `range_uj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnergyCounter {
    pub energy_uj: u64,
    pub range_uj: u64,
}

/// Microjoules between two readings of the same RAPL counters, each of
/// which wraps at its range; `None` when the set of counters changed.
pub fn energy_delta_uj(before: &[EnergyCounter], after: &[EnergyCounter]) -> Option<u64> {
    if before.len() != after.len() || before.is_empty() {
        return None;
    }
    before
        .iter()
        .zip(after)
        .map(|(a, b)| match b.energy_uj >= a.energy_uj {
            true => Some(b.energy_uj - a.energy_uj),
            false if b.range_uj > a.energy_uj => Some(b.range_uj - a.energy_uj + b.energy_uj),
            false => None,
        })
        .sum()
}

/// Reads one `Sample` at a time; keeps what rates and deltas need between
/// samples.
pub struct Sampler {
    #[cfg(target_os = "linux")]
    root: std::path::PathBuf,
    system: Option<sysinfo::System>,
    pid: Option<sysinfo::Pid>,
    #[cfg(not(target_os = "linux"))]
    components: Option<sysinfo::Components>,
    #[cfg(target_os = "macos")]
    thermal: macos::ThermalPressure,
    /// macmon's readings, from its own thread.
    #[cfg(target_os = "macos")]
    soc: Option<std::sync::mpsc::Receiver<apple::SocReading>>,
    #[cfg(target_os = "macos")]
    soc_last: Option<apple::SocReading>,
    page_size: u64,
    prev: Counters,
    seq: u64,
    /// Joules counted so far, once a source has given a first reading.
    energy_j: Option<f64>,
    memory_bandwidth: Option<f64>,
    /// Where the bandwidth figure arrives from, until it has.
    bandwidth: Option<std::sync::mpsc::Receiver<f64>>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        #[cfg(target_os = "linux")]
        return Sampler::with_root("/");
        #[cfg(not(target_os = "linux"))]
        return Sampler::build();
    }

    /// A sampler that reads `/proc` and `/sys` under `root` (tests point it
    /// at fixture trees); memory and the process come from the real OS.
    #[cfg(target_os = "linux")]
    pub fn with_root(root: impl Into<std::path::PathBuf>) -> Sampler {
        let root = root.into();
        let energy = linux::package_energy(&root);
        let prev = Counters {
            at: Instant::now(),
            swap_pages: linux::swap_counters(&root).map(|c| (c.pages_in, c.pages_out)),
            throttle_events: linux::clocks(&root).throttle_events,
            cpu_time: procinfo::cpu_time(),
            energy,
        };
        Sampler {
            root,
            system: sysinfo::System::new().ok(),
            pid: sysinfo::get_current_pid().ok(),
            page_size: page_size(),
            energy_j: (!prev.energy.is_empty()).then_some(0.0),
            memory_bandwidth: None,
            bandwidth: None,
            prev,
            seq: 0,
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn build() -> Sampler {
        let prev = Counters {
            at: Instant::now(),
            swap_pages: platform_swap_pages(),
            throttle_events: None,
            cpu_time: procinfo::cpu_time(),
        };
        Sampler {
            system: sysinfo::System::new().ok(),
            pid: sysinfo::get_current_pid().ok(),
            components: sysinfo::Components::new_with_refreshed_list().ok(),
            #[cfg(target_os = "macos")]
            thermal: macos::ThermalPressure::register(),
            #[cfg(target_os = "macos")]
            soc: macos::soc_readings(1000),
            #[cfg(target_os = "macos")]
            soc_last: None,
            page_size: page_size(),
            energy_j: None,
            memory_bandwidth: None,
            bandwidth: None,
            prev,
            seq: 0,
        }
    }

    pub fn sample(&mut self) -> Sample {
        let now = Instant::now();
        let dt = now.duration_since(self.prev.at).as_secs_f64();
        let memory = self.system.as_mut().and_then(MemorySnapshot::refresh);
        let rss = match (self.system.as_mut(), self.pid) {
            (Some(sys), Some(pid)) => {
                sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
                sys.process(pid).map(|p| p.memory())
            }
            _ => None,
        };
        let cpu_time = procinfo::cpu_time();
        let cpu_percent = match (self.prev.cpu_time, cpu_time) {
            (Some(a), Some(b)) if dt > 0.0 => {
                Some((b.saturating_sub(a).as_secs_f64() / dt * 100.0) as f32)
            }
            _ => None,
        };

        let swap_pages = self.swap_pages();
        let swap_rate = match (self.prev.swap_pages, swap_pages) {
            // A counter that went backwards (wrapped, or a new fixture) has
            // no meaningful rate this time.
            (Some((i0, o0)), Some((i1, o1))) if dt > 0.0 && i1 >= i0 && o1 >= o0 => {
                Some(SwapRate {
                    in_bytes_per_s: (i1 - i0) as f64 * self.page_size as f64 / dt,
                    out_bytes_per_s: (o1 - o0) as f64 * self.page_size as f64 / dt,
                })
            }
            _ => None,
        };
        #[cfg(target_os = "macos")]
        if let Some(rx) = &self.soc {
            // The newest reading; macmon sends one a second.
            while let Ok(r) = rx.try_recv() {
                self.soc_last = Some(r);
            }
        }
        if let Some(figure) = self.bandwidth.as_ref().and_then(|rx| rx.try_recv().ok()) {
            self.memory_bandwidth = Some(figure);
            self.bandwidth = None;
        }
        let (energy, power_w) = self.energy(dt);
        let (mut throttle, throttle_events) = self.throttle();
        throttle.new_events = match (self.prev.throttle_events, throttle_events) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };

        let sample = Sample {
            seq: self.seq,
            memory,
            gpu_wired_limit: gpu_wired_limit(),
            energy_j: self.energy_j,
            power_w,
            memory_bandwidth: self.memory_bandwidth,
            gpu: self.gpu(),
            swap_rate,
            pressure: self.pressure(),
            process: rss.map(|rss| ProcessStats { rss, cpu_percent }),
            temperatures: self.temperatures(),
            throttle,
        };
        self.seq += 1;
        self.prev = Counters {
            at: now,
            swap_pages,
            throttle_events,
            cpu_time,
            #[cfg(target_os = "linux")]
            energy,
        };
        #[cfg(not(target_os = "linux"))]
        let _ = energy;
        sample
    }

    fn gpu(&self) -> Option<apple::GpuLoad> {
        #[cfg(target_os = "macos")]
        return self.soc_last.and_then(|r| r.gpu());
        #[cfg(not(target_os = "macos"))]
        return None;
    }

    /// Count the energy since the previous sample (`dt` seconds ago):
    /// returns the counters to keep and the watts over the interval.
    #[cfg(target_os = "linux")]
    fn energy(&mut self, dt: f64) -> (Vec<EnergyCounter>, Option<f64>) {
        let now = linux::package_energy(&self.root);
        let joules = energy_delta_uj(&self.prev.energy, &now).map(|uj| uj as f64 / 1e6);
        if let (Some(total), Some(j)) = (self.energy_j.as_mut(), joules) {
            *total += j;
        }
        (now, joules.filter(|_| dt > 0.0).map(|j| j / dt))
    }

    #[cfg(not(target_os = "linux"))]
    fn energy(&mut self, dt: f64) -> ((), Option<f64>) {
        #[cfg(target_os = "macos")]
        let watts = self.soc_last.map(|r| r.watts());
        #[cfg(not(target_os = "macos"))]
        let watts: Option<f64> = None;
        if let Some(w) = watts {
            *self.energy_j.get_or_insert(0.0) += w * dt;
        }
        ((), watts)
    }

    #[cfg(target_os = "linux")]
    fn swap_pages(&self) -> Option<(u64, u64)> {
        linux::swap_counters(&self.root).map(|c| (c.pages_in, c.pages_out))
    }

    #[cfg(not(target_os = "linux"))]
    fn swap_pages(&self) -> Option<(u64, u64)> {
        platform_swap_pages()
    }

    #[cfg(target_os = "linux")]
    fn pressure(&self) -> Option<Pressure> {
        linux::memory_pressure(&self.root).map(Pressure::from_psi)
    }

    #[cfg(not(target_os = "linux"))]
    fn pressure(&self) -> Option<Pressure> {
        #[cfg(target_os = "macos")]
        return macos::pressure_level().map(|level| Pressure { level, psi: None });
        #[cfg(not(target_os = "macos"))]
        return None;
    }

    #[cfg(target_os = "linux")]
    fn temperatures(&mut self) -> Vec<Temperature> {
        linux::temperatures(&self.root)
    }

    #[cfg(not(target_os = "linux"))]
    fn temperatures(&mut self) -> Vec<Temperature> {
        #[cfg(target_os = "macos")]
        if let Some(r) = self.soc_last {
            let t = apple::averages(r.cpu_celsius.map(|c| (c, 0)), r.gpu_celsius.map(|c| (c, 0)));
            if !t.is_empty() {
                return t;
            }
        }
        let Some(components) = self.components.as_mut() else {
            return Vec::new();
        };
        components.refresh(true);
        let readings: Vec<(String, f32)> = components
            .iter()
            .filter_map(|c| Some((c.label().to_string(), c.temperature()?)))
            .collect();
        #[cfg(target_os = "macos")]
        return apple::sensor_averages(&readings);
        #[cfg(not(target_os = "macos"))]
        return readings
            .into_iter()
            .filter(|(_, t)| *t > 0.0 && *t < 150.0)
            .map(|(label, celsius)| Temperature {
                label,
                celsius,
                critical: None,
            })
            .collect();
    }

    /// The throttle state, and the raw event counter for the next delta.
    #[cfg(target_os = "linux")]
    fn throttle(&self) -> (Throttle, Option<u64>) {
        let c = linux::clocks(&self.root);
        let t = Throttle {
            freq_ratio: c.freq_ratio,
            cap_ratio: c.cap_ratio,
            new_events: None,
            thermal_level: None,
        };
        (t, c.throttle_events)
    }

    #[cfg(not(target_os = "linux"))]
    fn throttle(&self) -> (Throttle, Option<u64>) {
        #[cfg(target_os = "macos")]
        let thermal_level = self.thermal.level();
        #[cfg(not(target_os = "macos"))]
        let thermal_level = None;
        (
            Throttle {
                thermal_level,
                ..Throttle::default()
            },
            None,
        )
    }
}

#[cfg(not(target_os = "linux"))]
fn platform_swap_pages() -> Option<(u64, u64)> {
    #[cfg(target_os = "macos")]
    return macos::vm_counters().map(|c| (c.swapins, c.swapouts));
    #[cfg(not(target_os = "macos"))]
    return None;
}

/// The GPU wired-memory limit where the engine runs on a GPU that shares
/// memory with the CPU (Metal on a Mac); `None` elsewhere.
pub fn gpu_wired_limit() -> Option<u64> {
    #[cfg(target_os = "macos")]
    return apple::gpu_wired_limit(macos::wired_limit_sysctl_mb(), metal_working_set());
    #[cfg(not(target_os = "macos"))]
    return None;
}

/// Metal's `recommendedMaxWorkingSetSize`, as llama.cpp's Metal device
/// reports it (its total memory), read once.
#[cfg(target_os = "macos")]
fn metal_working_set() -> Option<u64> {
    static FIGURE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *FIGURE.get_or_init(|| {
        llama_cpp_2::list_llama_ggml_backend_devices()
            .iter()
            .find(|d| d.backend.eq_ignore_ascii_case("metal"))
            .map(|d| d.memory_total as u64)
    })
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Starts the sampler as a background task that publishes a `Sample` every
/// `period` until every receiver is dropped.
pub fn spawn(period: Duration) -> watch::Receiver<Sample> {
    spawn_sampler(period, None)
}

/// `spawn`, reporting the machine's memory bandwidth too once it is known:
/// published, cached in `cache_dir`, or probed there on a thread of its
/// own so that start-up does not wait for it.
pub fn spawn_with_bandwidth(
    period: Duration,
    cache_dir: std::path::PathBuf,
) -> watch::Receiver<Sample> {
    let (tx, rx) = std::sync::mpsc::channel();
    let probe = std::thread::Builder::new()
        .name("kiln-bandwidth".into())
        .spawn(move || {
            let _ = tx.send(crate::bandwidth::figure(&cache_dir));
        });
    if let Err(e) = probe {
        tracing::warn!("memory bandwidth: cannot start the probe: {e}");
    }
    spawn_sampler(period, Some(rx))
}

fn spawn_sampler(
    period: Duration,
    bandwidth: Option<std::sync::mpsc::Receiver<f64>>,
) -> watch::Receiver<Sample> {
    let mut sampler = Sampler::new();
    sampler.bandwidth = bandwidth;
    let (tx, rx) = watch::channel(sampler.sample());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        loop {
            tick.tick().await;
            if tx.send(sampler.sample()).is_err() {
                break;
            }
        }
    });
    rx
}
