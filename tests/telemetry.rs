//! The telemetry readers on fixture trees of real `/proc` and `/sys` file
//! formats, and the sampler on this machine.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::telemetry::linux::{self, SwapCounters};
use kiln::telemetry::{PressureLevel, Sampler};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/telemetry")
        .join(name)
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn laptop_readings() {
    let root = fixture("laptop");
    assert_eq!(
        linux::swap_counters(&root),
        Some(SwapCounters {
            pages_in: 1200,
            pages_out: 3400
        })
    );
    let psi = linux::memory_pressure(&root).unwrap();
    assert_eq!((psi.some_avg10, psi.full_avg10), (12.5, Some(1.0)));

    let temps = linux::temperatures(&root);
    let labels: Vec<_> = temps.iter().map(|t| t.label.as_str()).collect();
    // acpitz is both an hwmon chip and a thermal zone: reported once.
    assert_eq!(
        labels,
        [
            "acpitz temp1",
            "coretemp Package id 0",
            "coretemp Core 0",
            "coretemp Core 8",
            "nvme Composite",
            "x86_pkg_temp"
        ]
    );
    assert_eq!(temps[1].celsius, 71.0);
    assert_eq!(temps[1].critical, Some(100.0));
    assert_eq!(temps[4].celsius, 38.85);
    assert_eq!(temps[0].critical, None);
    // The zone's critical trip point, not its passive one.
    assert_eq!(temps[5].critical, Some(105.0));

    let clocks = linux::clocks(&root);
    assert_eq!(clocks.freq_ratio, Some(0.375));
    assert_eq!(clocks.cap_ratio, Some(0.75));
    assert_eq!(clocks.throttle_events, Some(25));
}

#[test]
fn a_machine_without_sensors_reports_them_missing_not_zero() {
    let root = fixture("bare");
    assert_eq!(
        linux::swap_counters(&root),
        Some(SwapCounters {
            pages_in: 0,
            pages_out: 0
        })
    );
    assert!(linux::temperatures(&root).is_empty());
    let clocks = linux::clocks(&root);
    assert_eq!(clocks, linux::Clocks::default());

    let mut sampler = Sampler::with_root(&root);
    let s = sampler.sample();
    assert!(s.temperatures.is_empty());
    assert_eq!(s.throttle.freq_ratio, None);
    assert_eq!(s.throttle.new_events, None);
    assert_eq!(s.throttle.throttled(), None);
    assert_eq!(s.pressure.unwrap().level, PressureLevel::Normal);
}

#[test]
fn nothing_at_all_is_missing_everywhere() {
    let empty = tempfile::tempdir().unwrap();
    let mut sampler = Sampler::with_root(empty.path());
    let s = sampler.sample();
    assert_eq!(s.swap_rate, None);
    assert_eq!(s.pressure, None);
    assert!(s.temperatures.is_empty());
    assert_eq!(s.throttle.throttled(), None);
    // Memory and the process come from the real OS, not the root.
    assert!(s.memory.is_some() && s.process.is_some());
}

#[test]
fn malformed_files_are_skipped_one_by_one() {
    let root = fixture("broken");
    // pswpout is cut off mid-name: no counters rather than half of them.
    assert_eq!(linux::swap_counters(&root), None);
    assert_eq!(linux::memory_pressure(&root), None);
    let temps = linux::temperatures(&root);
    // Only the one readable, plausible sensor of the garbled chip survives;
    // the unnamed chips fall back to a generic name.
    let got: Vec<_> = temps
        .iter()
        .map(|t| (t.label.as_str(), t.celsius, t.critical))
        .collect();
    assert_eq!(
        got,
        [("k10temp Tctl", 52.125, None), ("thermal zone", 48.0, None)]
    );
    let clocks = linux::clocks(&root);
    assert_eq!(clocks.freq_ratio, None);
    assert_eq!(clocks.cap_ratio, None);
    assert_eq!(clocks.throttle_events, None);
}

#[test]
fn swap_rates_and_throttle_events_are_deltas_between_samples() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("laptop"), dir.path());
    let mut sampler = Sampler::with_root(dir.path());
    let first = sampler.sample();
    let rate = first.swap_rate.unwrap();
    assert_eq!((rate.in_bytes_per_s, rate.out_bytes_per_s), (0.0, 0.0));
    assert_eq!(first.throttle.new_events, Some(0));
    assert_eq!(first.pressure.unwrap().level, PressureLevel::Warn);

    std::thread::sleep(Duration::from_millis(100));
    let vmstat = dir.path().join("proc/vmstat");
    let text = std::fs::read_to_string(&vmstat).unwrap();
    std::fs::write(
        &vmstat,
        text.replace("pswpin 1200", "pswpin 2200")
            .replace("pswpout 3400", "pswpout 3500"),
    )
    .unwrap();
    let counter = dir
        .path()
        .join("sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count");
    std::fs::write(&counter, "9\n").unwrap();

    let second = sampler.sample();
    let rate = second.swap_rate.unwrap();
    let page = 4096.0;
    // 1000 pages in and 100 out over at least 0.1 s.
    assert!(rate.in_bytes_per_s > 0.0 && rate.in_bytes_per_s <= 1000.0 * page / 0.1);
    assert!((rate.in_bytes_per_s / rate.out_bytes_per_s - 10.0).abs() < 1e-6);
    assert_eq!(second.throttle.new_events, Some(2));
    assert_eq!(second.throttle.throttled(), Some(true));
    assert_eq!(second.seq, 1);

    // A counter that went backwards gives no rate, not a negative one.
    std::fs::write(&vmstat, "pswpin 5\npswpout 5\n").unwrap();
    assert_eq!(sampler.sample().swap_rate, None);
}

#[test]
fn this_machine() {
    let mut sampler = Sampler::new();
    let _ = sampler.sample();
    // Burn a little CPU so the process figure has something to measure.
    let mut x = 0u64;
    for i in 0..20_000_000u64 {
        x = x.wrapping_mul(31).wrapping_add(i);
    }
    std::hint::black_box(x);
    let s = sampler.sample();
    let mem = s.memory.unwrap();
    assert!(mem.total > 0 && mem.available <= mem.total);
    let process = s.process.unwrap();
    assert!(process.rss > 1 << 20);
    let cpu = process.cpu_percent.unwrap();
    assert!(cpu > 0.0 && cpu <= 100.0 * 64.0, "{cpu}");
}

#[tokio::test]
async fn the_background_task_publishes_samples() {
    let mut rx = kiln::telemetry::spawn(Duration::from_millis(20));
    assert_eq!(rx.borrow().seq, 0);
    rx.changed().await.unwrap();
    rx.changed().await.unwrap();
    assert!(rx.borrow().seq >= 2);
}

/// RAPL through powercap: the package counter (not its core sub-zone, not
/// psys) counts joules between samples, across the counter's wrap; a
/// machine without powercap has no energy, not zero.
#[test]
fn energy_comes_from_the_package_counter_and_survives_its_wrap() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("laptop"), dir.path());
    let counters = linux::package_energy(dir.path());
    assert_eq!(counters.len(), 1, "{counters:?}");
    assert_eq!(counters[0].energy_uj, 73_004_321_000);
    let mut sampler = Sampler::with_root(dir.path());
    let first = sampler.sample();
    assert_eq!(first.energy_j, Some(0.0));

    let zone = dir.path().join("sys/class/powercap/intel-rapl:0");
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(zone.join("energy_uj"), "73016321000\n").unwrap();
    let second = sampler.sample();
    assert!((second.energy_j.unwrap() - 12.0).abs() < 1e-9);
    // 12 J in at least 0.1 s.
    let watts = second.power_w.unwrap();
    assert!(watts > 0.0 && watts <= 120.0, "{watts}");

    // The counter wraps at max_energy_range_uj: 3 J before the wrap, 2 after.
    std::fs::write(zone.join("energy_uj"), "262140328850\n").unwrap();
    sampler.sample();
    std::fs::write(zone.join("energy_uj"), "2000000\n").unwrap();
    let wrapped = sampler.sample();
    let total = 12.0 + (262_140_328_850.0 - 73_016_321_000.0) / 1e6 + 5.0;
    assert!(
        (wrapped.energy_j.unwrap() - total).abs() < 1e-6,
        "{wrapped:?}"
    );

    assert_eq!(Sampler::with_root(fixture("bare")).sample().energy_j, None);
    assert_eq!(linux::package_energy(&fixture("bare")), vec![]);
}

/// The bandwidth figure is probed off the sampler's path: the first sample
/// comes at once without it, a later one carries it, and it is cached.
#[tokio::test]
async fn the_bandwidth_figure_arrives_without_holding_up_the_samples() {
    let cache = tempfile::tempdir().unwrap();
    let mut rx =
        kiln::telemetry::spawn_with_bandwidth(Duration::from_millis(50), cache.path().into());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let figure = loop {
        if let Some(f) = rx.borrow().memory_bandwidth {
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "no bandwidth figure");
        rx.changed().await.unwrap();
    };
    assert!(figure > 1e8, "{figure}");
    assert_eq!(kiln::bandwidth::cached(cache.path()), Some(figure));
}
