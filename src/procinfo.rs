//! Facts about this process that benchmarks report.

fn rusage() -> Option<libc::rusage> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: on success getrusage wrote the struct.
    (rc == 0).then(|| unsafe { usage.assume_init() })
}

/// Peak resident set size of this process, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let max = rusage()?.ru_maxrss as u64;
    // Linux reports kilobytes, macOS bytes.
    Some(if cfg!(target_os = "macos") {
        max
    } else {
        max * 1024
    })
}

/// User plus system CPU time this process has used so far.
pub fn cpu_time() -> Option<std::time::Duration> {
    let u = rusage()?;
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Some(std::time::Duration::from_micros(
        micros(u.ru_utime) + micros(u.ru_stime),
    ))
}

/// Resident set size of this process now, in bytes.
pub fn current_rss_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    sys.process(pid).map(|p| p.memory())
}

/// File descriptors this process has open (`/proc/self/fd` on Linux,
/// `/dev/fd` on macOS).
pub fn open_fds() -> Option<usize> {
    let dir = std::fs::read_dir("/proc/self/fd").or_else(|_| std::fs::read_dir("/dev/fd"));
    // The listing's own descriptor is not counted.
    dir.ok().map(|d| d.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {

    #[test]
    fn peak_rss_is_plausible() {
        let rss = super::peak_rss_bytes().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
    }

    #[test]
    fn current_rss_is_at_most_the_peak() {
        let now = super::current_rss_bytes().unwrap();
        assert!(now > 0 && now <= super::peak_rss_bytes().unwrap() + (1 << 20));
    }
}
