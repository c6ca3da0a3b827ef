//! Samples CPU time: the broker's (by `--broker-pid`) and the load
//! generator's own.
//!
//! A background thread reads `utime + stime` (fields 14 and 15 of
//! `/proc/PID/stat`, in clock ticks, summed over every thread of the
//! process) of the broker and of this process (`/proc/self/stat`) once per
//! [`CPU_SAMPLE_INTERVAL`] and keeps every sample with its time. The report
//! turns them into cores: CPU-seconds per second of wall time, so 1.6 means
//! the process kept 1.6 CPUs busy on average. The average is taken over the
//! measured window (the samples inside it, so it is exact to a tick over the
//! span they cover); the max is the busiest interval between two
//! consecutive samples inside the window. On the 2-core benchmark machine
//! the load generator competes with the broker for the same cores, so both
//! are reported. A process that cannot be read (gone, not Linux) yields no
//! samples and no figures.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;

use crate::error::PerfError;
use crate::schedule::{Clock, NANOS_PER_SEC};
use crate::stats::lock;

/// Time between two samples.
pub const CPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Granularity at which the sampler notices it should stop.
const STOP_POLL: Duration = Duration::from_millis(20);
/// 1-based field numbers of `utime` and `stime` in `/proc/PID/stat`.
const STAT_UTIME_FIELD: usize = 14;
/// Fields before the ones that follow the command name: pid and `(comm)`.
const STAT_FIELDS_BEFORE_STATE: usize = 2;

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`. The
/// command name (field 2) is in parentheses and may hold spaces and
/// parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest
        .split_whitespace()
        .skip(STAT_UTIME_FIELD - 1 - STAT_FIELDS_BEFORE_STATE);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/PID/stat` times (`USER_HZ`).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0 // USER_HZ on every Linux architecture this runs on
    }
}

/// CPU ticks used so far by `pid` (`None`: this process).
pub fn read_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    parse_stat_ticks(&std::fs::read_to_string(path).ok()?)
}

/// One reading: when (ns since the epoch, the run's clock) and the ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_ns: u64,
    pub ticks: u64,
}

/// CPU use of one process over a window, in cores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuCores {
    /// CPU-seconds per second over the window.
    pub avg: f64,
    /// The busiest interval between two consecutive samples.
    pub max: f64,
}

/// Cores used between `from_ns` and `to_ns` by the samples inside that
/// window (`None` with fewer than two of them: the window was shorter than
/// a sample interval). `samples` are in time order.
pub fn cores_in_window(
    samples: &[Sample],
    ticks_per_s: f64,
    from_ns: u64,
    to_ns: u64,
) -> Option<CpuCores> {
    let inside: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.at_ns >= from_ns && s.at_ns <= to_ns)
        .collect();
    let cores = |a: &Sample, b: &Sample| {
        let secs = (b.at_ns.saturating_sub(a.at_ns)) as f64 / NANOS_PER_SEC;
        if secs <= 0.0 {
            return None;
        }
        Some(b.ticks.saturating_sub(a.ticks) as f64 / ticks_per_s / secs)
    };
    let (first, last) = (inside.first()?, inside.last()?);
    let avg = cores(first, last)?;
    let max = inside
        .windows(2)
        .filter_map(|w| cores(&w[0], &w[1]))
        .fold(avg, f64::max);
    Some(CpuCores { avg, max })
}

/// What the sampler collected.
#[derive(Debug, Default, Clone)]
pub struct CpuSamples {
    pub broker: Vec<Sample>,
    pub perf: Vec<Sample>,
    pub ticks_per_s: f64,
}

impl CpuSamples {
    /// (broker, this process) cores over the window.
    pub fn window(&self, from_ns: u64, to_ns: u64) -> (Option<CpuCores>, Option<CpuCores>) {
        (
            cores_in_window(&self.broker, self.ticks_per_s, from_ns, to_ns),
            cores_in_window(&self.perf, self.ticks_per_s, from_ns, to_ns),
        )
    }
}

/// A running sampler.
#[derive(Debug)]
pub struct CpuSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<CpuSamples>>,
    handle: JoinHandle<()>,
}

impl CpuSampler {
    /// Starts sampling this process, and `broker_pid` if given, now and
    /// every [`CPU_SAMPLE_INTERVAL`].
    pub fn start(broker_pid: Option<u32>, clock: Clock) -> Result<CpuSampler, PerfError> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(CpuSamples {
            ticks_per_s: ticks_per_second(),
            ..CpuSamples::default()
        }));
        let (flag, out) = (Arc::clone(&stop), Arc::clone(&samples));
        let interval_ns = crate::run::to_ns(CPU_SAMPLE_INTERVAL);
        let handle = thread::Builder::new()
            .name("perf-cpu".into())
            .spawn(move || {
                let take = || {
                    let at_ns = clock.now_ns();
                    let broker = broker_pid.and_then(|pid| read_ticks(Some(pid)));
                    let perf = read_ticks(None);
                    let mut s = lock(&out);
                    if let Some(ticks) = broker {
                        s.broker.push(Sample { at_ns, ticks });
                    }
                    if let Some(ticks) = perf {
                        s.perf.push(Sample { at_ns, ticks });
                    }
                };
                // One sample now, one per interval on a fixed grid (so they
                // stay one interval apart), and one more at the stop.
                let mut next = clock.now_ns();
                take();
                loop {
                    next += interval_ns;
                    while clock.now_ns() < next && !flag.load(Ordering::Relaxed) {
                        let left = next.saturating_sub(clock.now_ns());
                        thread::sleep(Duration::from_nanos(left).min(STOP_POLL));
                    }
                    take();
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                }
            })
            .map_err(|e| PerfError::io("cannot start the CPU sampler thread", e))?;
        Ok(CpuSampler {
            stop,
            samples,
            handle,
        })
    }

    /// Stops sampling (after one last sample) and returns every sample.
    pub fn finish(self) -> CpuSamples {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        let s = lock(&self.samples);
        s.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn parses_utime_and_stime() {
        // Field 14 (utime) = 250, field 15 (stime) = 50.
        let stat = "4242 (coremq) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 \
                    12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        // A command name with spaces and parentheses does not shift the fields.
        let odd = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_ticks(odd), Some(33));
        assert_eq!(parse_stat_ticks("7 (x) R 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn cores_over_the_window() {
        let t0 = 1_000 * SEC;
        // 100 ticks/s: 150 ticks in the first second (1.5 cores), 50 in the
        // second (0.5), 100 in the third (1.0).
        let samples = [
            Sample {
                at_ns: t0 - SEC,
                ticks: 0,
            },
            Sample {
                at_ns: t0,
                ticks: 1_000,
            },
            Sample {
                at_ns: t0 + SEC,
                ticks: 1_150,
            },
            Sample {
                at_ns: t0 + 2 * SEC,
                ticks: 1_200,
            },
            Sample {
                at_ns: t0 + 3 * SEC,
                ticks: 1_300,
            },
            Sample {
                at_ns: t0 + 4 * SEC,
                ticks: 9_999,
            },
        ];
        // The samples before and after the window (t0 .. t0+3 s) do not count.
        let c = cores_in_window(&samples, 100.0, t0, t0 + 3 * SEC).unwrap();
        assert!((c.avg - 1.0).abs() < 1e-9, "{c:?}");
        assert!((c.max - 1.5).abs() < 1e-9, "{c:?}");
        // Fewer than two samples inside: no figure.
        assert_eq!(cores_in_window(&samples, 100.0, t0, t0 + SEC / 2), None);
        assert_eq!(cores_in_window(&[], 100.0, 0, u64::MAX), None);
        // Ticks that go backwards (another process with the pid) count as 0.
        let reused = [
            Sample {
                at_ns: 0,
                ticks: 50,
            },
            Sample {
                at_ns: SEC,
                ticks: 10,
            },
        ];
        assert_eq!(
            cores_in_window(&reused, 100.0, 0, SEC),
            Some(CpuCores { avg: 0.0, max: 0.0 })
        );
    }

    #[test]
    fn reads_this_process() {
        assert!(read_ticks(None).is_some());
        assert!(read_ticks(Some(std::process::id())).is_some());
        assert!(ticks_per_second() > 0.0);
        let clock = Clock::new().unwrap();
        let s = CpuSampler::start(Some(std::process::id()), clock).unwrap();
        let samples = s.finish();
        // One sample at the start and one at the stop, of both processes.
        assert_eq!(samples.perf.len(), 2);
        assert_eq!(samples.broker.len(), 2);
    }
}
