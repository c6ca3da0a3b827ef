//! Samples a process's resident set size (the broker's, by `--broker-pid`).
//!
//! A background thread reads `VmRSS` from `/proc/PID/status` once per
//! [`RSS_SAMPLE_INTERVAL`] and keeps the largest value; stopping the sampler
//! returns it. A process that cannot be read (gone, another user's, not
//! Linux) simply yields no samples.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::PerfError;

/// Time between two samples.
pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Granularity at which the sampler notices it should stop.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Kibibytes per mebibyte.
const KIB_PER_MIB: f64 = 1024.0;

/// The `VmRSS` line of a `/proc/PID/status` text, in KiB.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// Reads the current RSS of `pid`, in KiB.
pub fn read_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss_kib(&text)
}

/// A running sampler.
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Option<u64>>,
}

impl RssSampler {
    /// Starts sampling `pid` now and every [`RSS_SAMPLE_INTERVAL`].
    pub fn start(pid: u32) -> Result<RssSampler, PerfError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("perf-rss".into())
            .spawn(move || {
                let mut max: Option<u64> = None;
                while !flag.load(Ordering::Relaxed) {
                    if let Some(kib) = read_rss_kib(pid) {
                        max = Some(max.map_or(kib, |m| m.max(kib)));
                    }
                    let mut waited = Duration::ZERO;
                    while waited < RSS_SAMPLE_INTERVAL && !flag.load(Ordering::Relaxed) {
                        thread::sleep(STOP_POLL);
                        waited += STOP_POLL;
                    }
                }
                max
            })
            .map_err(|e| PerfError::io("cannot start the RSS sampler thread", e))?;
        Ok(RssSampler { stop, handle })
    }

    /// Stops sampling; the largest RSS seen, in MiB (`None` if never read).
    pub fn finish(self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .ok()
            .flatten()
            .map(|kib| kib as f64 / KIB_PER_MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss() {
        let status = "Name:\tcoremq\nVmPeak:\t  999 kB\nVmRSS:\t   123456 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(123_456));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
        assert_eq!(parse_vmrss_kib("VmRSS: lots kB\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = RssSampler::start(std::process::id()).unwrap();
        let mb = s.finish().unwrap();
        assert!(mb > 0.0);
    }
}
