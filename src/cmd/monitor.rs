//! `kiln monitor`: the telemetry the side panels show, one line per sample,
//! for headless machines and for checking which sensors a machine has.

use std::io::Write;
use std::time::Duration;

use crate::budget::gib;
use crate::cli::MonitorArgs;
use crate::error::{KilnError, Result};
use crate::telemetry::{self, Sample};

pub async fn run(args: MonitorArgs) -> Result<i32> {
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(KilnError::BadArgument(
            "monitor needs --interval above 0 seconds".into(),
        ));
    }
    let mut rx = telemetry::spawn(Duration::from_secs_f64(args.interval));
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0;
    loop {
        rx.changed()
            .await
            .map_err(|_| KilnError::Engine("the telemetry sampler stopped".into()))?;
        let sample = rx.borrow_and_update().clone();
        let line = if args.json {
            serde_json::to_string(&sample).expect("samples serialize")
        } else {
            describe(&sample)
        };
        if writeln!(stdout, "{line}").is_err() {
            return Ok(0);
        }
        printed += 1;
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(0);
        }
    }
}

/// One line, with "n/a" for every source this machine does not have.
pub fn describe(s: &Sample) -> String {
    let na = || "n/a".to_string();
    let mem = s.memory.map_or_else(na, |m| {
        let swap = if m.swap_total == 0 {
            crate::telemetry::no_swap_words(crate::telemetry::SWAP_ON_DEMAND).to_string()
        } else {
            format!("swap {} of {}", gib(m.swap_used()), gib(m.swap_total))
        };
        format!("mem {} of {} · {swap}", gib(m.used()), gib(m.total))
    });
    let rates = s.swap_rate.map_or_else(
        || "swap in/out n/a".to_string(),
        |r| {
            format!(
                "swap in {:.1} out {:.1} MiB/s",
                r.in_bytes_per_s / 1048576.0,
                r.out_bytes_per_s / 1048576.0
            )
        },
    );
    let pressure = s.pressure.map_or_else(
        || "pressure n/a".to_string(),
        |p| match p.psi {
            Some(psi) => format!("pressure {:?} (some {:.1} %)", p.level, psi.some_avg10),
            None => format!("pressure {:?}", p.level),
        },
    );
    let process = s.process.map_or_else(
        || "kiln n/a".to_string(),
        |p| {
            let cpu = p.cpu_percent.map_or_else(na, |c| format!("{c:.1} %"));
            format!("kiln RSS {:.0} MiB CPU {cpu}", p.rss as f64 / 1048576.0)
        },
    );
    let temp = match s.hottest() {
        Some(t) => format!("hottest {} {:.0} °C", t.label, t.celsius),
        None => "no sensors".to_string(),
    };
    let throttle = match s.throttle.throttled() {
        Some(true) => "THROTTLED",
        Some(false) => "not throttled",
        None => "throttling n/a",
    };
    let power = s
        .power_w
        .map_or_else(|| "power n/a".to_string(), |w| format!("power {w:.1} W"));
    format!("{mem} · {rates} · {pressure} · {process} · {temp} · {throttle} · {power}")
}

#[cfg(test)]
mod tests {
    use super::describe;
    use crate::telemetry::Sample;

    #[test]
    fn missing_sources_read_as_not_available() {
        let line = describe(&Sample::default());
        assert_eq!(
            line,
            "n/a · swap in/out n/a · pressure n/a · kiln n/a · no sensors · throttling n/a · power n/a"
        );
    }

    #[test]
    fn a_mac_at_swap_zero_is_not_a_machine_without_swap() {
        assert_eq!(
            crate::telemetry::no_swap_words(true),
            "swap 0 (grows on demand)"
        );
        assert_eq!(crate::telemetry::no_swap_words(false), "no swap");
    }
}
