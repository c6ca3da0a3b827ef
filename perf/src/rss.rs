//! Samples a process's resident set size (the broker's, by `--broker-pid`).
//!
//! A background thread reads `VmRSS` and `RssAnon` from `/proc/PID/status`
//! once per [`RSS_SAMPLE_INTERVAL`] and keeps the largest of each; stopping
//! the sampler returns them. `VmRSS` counts the pages of memory-mapped log
//! segments that have been touched, which the kernel can drop at will;
//! `RssAnon` is the heap and stacks alone. A process that cannot be read
//! (gone, another user's, not Linux) simply yields no samples.

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

/// The value of a `/proc/PID/status` line such as `VmRSS:`, in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let mut values = line[field.len()..].split_whitespace();
    let value = values.next()?.parse().ok()?;
    match values.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// Current (VmRSS, RssAnon) of `pid`, in KiB.
pub fn read_rss_kib(pid: u32) -> Option<(u64, Option<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = parse_status_kib(&text, "VmRSS:")?;
    Some((rss, parse_status_kib(&text, "RssAnon:")))
}

/// Largest resident sizes seen, in MiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RssMax {
    /// `VmRSS`: everything resident, mapped log files included.
    pub rss_mb: f64,
    /// `RssAnon`: heap and stacks only (`None` on kernels without the field).
    pub anon_mb: Option<f64>,
}

/// A running sampler.
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Option<(u64, Option<u64>)>>,
}

impl RssSampler {
    /// Starts sampling `pid` now and every [`RSS_SAMPLE_INTERVAL`].
    pub fn start(pid: u32) -> Result<RssSampler, PerfError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("perf-rss".into())
            .spawn(move || {
                let mut max: Option<(u64, Option<u64>)> = None;
                // Sample at start, every interval, and once more at the stop.
                loop {
                    if let Some((rss, anon)) = read_rss_kib(pid) {
                        max = Some(match max {
                            None => (rss, anon),
                            Some((r, a)) => (r.max(rss), a.max(anon)),
                        });
                    }
                    if flag.load(Ordering::Relaxed) {
                        break;
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

    /// Stops sampling; the largest sizes seen (`None` if never read).
    pub fn finish(self) -> Option<RssMax> {
        self.stop.store(true, Ordering::Relaxed);
        let (rss, anon) = self.handle.join().ok().flatten()?;
        Some(RssMax {
            rss_mb: rss as f64 / KIB_PER_MIB,
            anon_mb: anon.map(|kib| kib as f64 / KIB_PER_MIB),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let status = "Name:\tcoremq\nVmPeak:\t  999 kB\nVmRSS:\t   123456 kB\n\
                      RssAnon:\t    2048 kB\nRssFile:\t  121408 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(123_456));
        assert_eq!(parse_status_kib(status, "RssAnon:"), Some(2_048));
        assert_eq!(parse_status_kib("Name: x\n", "VmRSS:"), None);
        assert_eq!(parse_status_kib("VmRSS: lots kB\n", "VmRSS:"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = RssSampler::start(std::process::id()).unwrap();
        let max = s.finish().unwrap();
        assert!(max.rss_mb > 0.0);
        assert!(max.anon_mb.is_some_and(|a| a > 0.0 && a <= max.rss_mb));
    }
}
