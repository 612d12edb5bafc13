//! macOS sources, through libc's bindings of the system calls.
//!
//! This code cannot be built or tested on kiln's Linux CI machines, so it is
//! kept to the smallest calls that give each figure; anything that fails
//! reports "not available".

use std::ffi::CString;

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

/// Cumulative swap-ins and swap-outs in pages, and the page size.
pub fn swap_pages() -> Option<(u64, u64)> {
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
    let stats = unsafe { stats.assume_init() };
    Some((stats.swapins, stats.swapouts))
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

/// The GPU wired-memory limit set with `sysctl iogpu.wired_limit_mb`; 0
/// (unset) means the system default, which only Metal itself reports.
pub fn gpu_wired_limit() -> Option<u64> {
    sysctl_int("iogpu.wired_limit_mb")
        .filter(|&mb| mb > 0)
        .map(|mb| mb as u64 * 1024 * 1024)
}

extern "C" {
    fn notify_register_check(name: *const libc::c_char, token: *mut libc::c_int) -> u32;
    fn notify_get_state(token: libc::c_int, state: *mut u64) -> u32;
}

/// Thermal pressure: 0 nominal, 1 moderate, 2 heavy, 3 trapping, 4 sleeping.
/// No root needed, unlike `powermetrics`.
pub fn thermal_level() -> Option<u8> {
    let name = CString::new("com.apple.system.thermalpressurelevel").ok()?;
    let mut token = 0;
    let mut state = 0u64;
    // SAFETY: both calls write only to the out-pointers given, which are valid.
    unsafe {
        if notify_register_check(name.as_ptr(), &mut token) != 0 {
            return None;
        }
        if notify_get_state(token, &mut state) != 0 {
            return None;
        }
    }
    u8::try_from(state).ok().filter(|&l| l <= 4)
}
