//! macOS sources: thin calls into the system (libc's bindings) and macmon,
//! whose readings `apple.rs` turns into figures.
//!
//! This code cannot be built or tested on kiln's Linux machines (the macOS
//! CI workflow builds it), so it is kept to the smallest calls that give
//! each figure; anything that fails reports "not available".

use std::ffi::CString;
use std::sync::mpsc;

use super::apple::{SocReading, VmCounters};
use super::PressureLevel;

fn sysctl_int(name: &str) -> Option<i64> {
    let name = CString::new(name).ok()?;
    let mut value: i64 = 0;
    let mut len = std::mem::size_of::<i64>();
    // SAFETY: the buffer is an i64 and `len` says how large it is; the kernel
    // writes at most `len` bytes and updates `len` with what it wrote.
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&mut value as *mut i64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    match (rc, len) {
        (0, 4) => Some(value as i32 as i64),
        (0, 8) => Some(value),
        _ => None,
    }
}

/// The virtual-memory counters, in pages.
pub fn vm_counters() -> Option<VmCounters> {
    let mut stats = std::mem::MaybeUninit::<libc::vm_statistics64>::zeroed();
    let mut count = libc::HOST_VM_INFO64_COUNT;
    // SAFETY: `stats` is as large as HOST_VM_INFO64_COUNT integers, which is
    // what `count` tells the kernel it may write.
    #[allow(deprecated)]
    let rc = unsafe {
        libc::host_statistics64(
            libc::mach_host_self(),
            libc::HOST_VM_INFO64,
            stats.as_mut_ptr().cast(),
            &mut count,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: host_statistics64 succeeded, so it filled the struct.
    let s = unsafe { stats.assume_init() };
    Some(VmCounters {
        free: s.free_count.into(),
        active: s.active_count.into(),
        inactive: s.inactive_count.into(),
        wire: s.wire_count.into(),
        speculative: s.speculative_count.into(),
        compressor: s.compressor_page_count.into(),
        purgeable: s.purgeable_count.into(),
        external: s.external_page_count.into(),
        swapins: s.swapins,
        swapouts: s.swapouts,
    })
}

/// `kern.memorystatus_vm_pressure_level`: 1 normal, 2 warn, 4 critical.
pub fn pressure_level() -> Option<PressureLevel> {
    match sysctl_int("kern.memorystatus_vm_pressure_level")? {
        1 => Some(PressureLevel::Normal),
        2 => Some(PressureLevel::Warn),
        4 => Some(PressureLevel::Critical),
        _ => None,
    }
}

/// `iogpu.wired_limit_mb` (`debug.iogpu.wired_limit` on macOS 13), in MiB;
/// 0 when the user has not set it.
pub fn wired_limit_sysctl_mb() -> Option<i64> {
    sysctl_int("iogpu.wired_limit_mb").or_else(|| sysctl_int("debug.iogpu.wired_limit"))
}

extern "C" {
    fn notify_register_check(name: *const libc::c_char, token: *mut libc::c_int) -> u32;
    fn notify_get_state(token: libc::c_int, state: *mut u64) -> u32;
}

/// The thermal-pressure notification, registered once: registering on
/// every sample would leak a registration a second in kiln and in notifyd
/// for as long as a daemon runs.
pub struct ThermalPressure {
    token: Option<libc::c_int>,
}

impl ThermalPressure {
    pub fn register() -> ThermalPressure {
        let token = CString::new("com.apple.system.thermalpressurelevel")
            .ok()
            .and_then(|name| {
                let mut token = 0;
                // SAFETY: the name is a valid C string and the call writes
                // only the token.
                let rc = unsafe { notify_register_check(name.as_ptr(), &mut token) };
                (rc == 0).then_some(token)
            });
        ThermalPressure { token }
    }

    /// 0 nominal, 1 moderate, 2 heavy, 3 trapping, 4 sleeping. No root
    /// needed, unlike `powermetrics`.
    pub fn level(&self) -> Option<u8> {
        let mut state = 0u64;
        // SAFETY: the token came from notify_register_check; the call writes
        // only the state.
        let rc = unsafe { notify_get_state(self.token?, &mut state) };
        (rc == 0).then_some(())?;
        u8::try_from(state).ok().filter(|&l| l <= 4)
    }
}

/// Starts macmon on a thread of its own (its reads block for the interval)
/// and returns its readings, or `None` when the SoC's sources cannot be
/// opened (a VM, an Intel Mac).
pub fn soc_readings(interval_ms: u32) -> Option<mpsc::Receiver<SocReading>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("kiln-macmon".into())
        .spawn(move || {
            // macmon's sampler holds CoreFoundation objects: it lives and
            // dies on this thread.
            let mut sampler = match macmon::Sampler::new() {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!("macmon: {e}");
                    let _ = ready_tx.send(false);
                    return;
                }
            };
            let _ = ready_tx.send(true);
            while let Ok(m) = sampler.get_metrics(interval_ms) {
                let reading = SocReading {
                    cpu_celsius: m.temp.cpu_temp_avg,
                    gpu_celsius: m.temp.gpu_temp_avg,
                    cpu_w: m.cpu_power,
                    gpu_w: m.gpu_power,
                    ane_w: m.ane_power,
                    dram_w: m.ram_power,
                    system_w: Some(m.sys_power),
                    gpu_mhz: m.gpu_freq_mhz,
                    gpu_active: m.gpu_active_ratio,
                };
                if tx.send(reading).is_err() {
                    break;
                }
            }
        })
        .ok()?;
    ready_rx.recv().ok().filter(|ok| *ok).map(|_| rx)
}
