//! Latency histograms, per-thread tallies and the run report.
//!
//! Every producer and consumer thread records into its own [`Tally`] (an
//! HdrHistogram of microseconds plus counters) behind its own mutex, so
//! threads never contend with each other; the main thread merges them for
//! the progress line and the final [`Report`]. Histograms cover 1 µs to
//! one hour at three significant digits; anything larger is clamped to the
//! top (and would show as a max of an hour).

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::{Mutex, MutexGuard};

use crate::backlog::BacklogReport;
use crate::workload::Workload;

/// Largest latency a histogram tells apart, in microseconds (one hour).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits every histogram keeps.
pub const LATENCY_SIGFIGS: u8 = 3;
/// Bytes in the "MB" of MB/s (OpenMessaging Benchmark's convention: MiB).
pub const BYTES_PER_MB: f64 = 1024.0 * 1024.0;
/// Nanoseconds per microsecond.
const NANOS_PER_MICRO: u64 = 1_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIGS)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Records one latency in microseconds (clamped to [`LATENCY_US_MAX`]).
    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.min(LATENCY_US_MAX));
    }

    /// Records the time from `from_ns` to `to_ns` (0 if `to` is earlier).
    pub fn record_between_ns(&mut self, from_ns: u64, to_ns: u64) {
        self.record_us(to_ns.saturating_sub(from_ns) / NANOS_PER_MICRO);
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail; clamp if it ever did.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// The samples recorded since `earlier`, a copy of this histogram
    /// taken before: what one progress interval saw.
    pub fn since(&self, earlier: &Latency) -> Latency {
        let mut recent = self.clone();
        // `earlier` holds a subset of these samples, so this cannot fail;
        // if it ever did, the whole run's histogram is the honest answer.
        if recent.hist.subtract(&earlier.hist).is_err() {
            return self.clone();
        }
        recent
    }

    /// The largest sample, 0 when empty.
    pub fn max(&self) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.max()
        }
    }

    /// The value at quantile `q` (0..=1), 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let empty = self.hist.is_empty();
        LatencySummary {
            p50: self.quantile(0.50),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            p9999: self.quantile(0.9999),
            max: self.max(),
            mean: if empty { 0.0 } else { self.hist.mean() },
            count: self.hist.len(),
        }
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
    pub mean: f64,
    /// Samples recorded.
    pub count: u64,
}

/// What one thread has seen: messages, payload bytes, errors, latencies.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Messages completed (acked by the broker, or received by a consumer).
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Messages that failed (error replies, send failures, bad payloads).
    pub errors: u64,
    /// Bytes of the acked batches as stored (compressed, headers
    /// included): coremq producers only.
    pub stored_bytes: u64,
    pub latency: Latency,
}

impl Tally {
    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.stored_bytes += other.stored_bytes;
        self.latency.merge(&other.latency);
    }
}

/// Locks a mutex; counters stay meaningful even if a thread panicked holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tally that load threads update and the main thread reads, with the
/// first error seen (the one worth printing).
#[derive(Debug, Default)]
pub struct SharedTally {
    tally: Mutex<Tally>,
    first_error: Mutex<Option<String>>,
}

impl SharedTally {
    /// The tally, locked for an update.
    pub fn lock(&self) -> MutexGuard<'_, Tally> {
        lock(&self.tally)
    }

    /// (messages, payload bytes) so far, cheaply.
    pub fn counts(&self) -> (u64, u64) {
        let t = lock(&self.tally);
        (t.messages, t.bytes)
    }

    /// A copy of the tally (histogram included).
    pub fn snapshot(&self) -> Tally {
        lock(&self.tally).clone()
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }

    /// Counts `messages` as failed and keeps `e` if it is the first error.
    pub fn fail(&self, messages: u64, e: impl std::fmt::Display) {
        lock(&self.tally).errors += messages;
        self.note_error(e);
    }

    /// Keeps `e` if it is the first error (without counting a failure).
    pub fn note_error(&self, e: impl std::fmt::Display) {
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// Merges tallies (e.g. one per producer thread) into one.
pub fn merge_all<'a>(tallies: impl IntoIterator<Item = &'a Tally>) -> Tally {
    let mut total = Tally::default();
    for t in tallies {
        total.merge(t);
    }
    total
}

/// Messages per second and MB per second over `seconds`.
pub fn rates(messages: u64, bytes: u64, seconds: f64) -> (f64, f64) {
    if seconds <= 0.0 {
        return (0.0, 0.0);
    }
    (
        messages as f64 / seconds,
        bytes as f64 / BYTES_PER_MB / seconds,
    )
}

/// The outcome of a run, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Acked messages per second over the measured window.
    pub publish_msgs_per_s: f64,
    pub publish_mb_per_s: f64,
    /// Consumed messages per second over the measured window.
    pub consume_msgs_per_s: f64,
    pub consume_mb_per_s: f64,
    /// Intended send time to ack.
    pub publish_latency_us: LatencySummary,
    /// Intended send time to receipt by a consumer.
    pub e2e_latency_us: LatencySummary,
    /// Messages handed to the connection.
    pub sent: u64,
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// Messages consumers received (summed over subscriptions).
    pub consumed: u64,
    /// `acked` times subscriptions per topic: what `consumed` should reach.
    pub expected_consumed: u64,
    /// Failed messages, publish and consume together.
    pub errors: u64,
    pub publish_errors: u64,
    pub consume_errors: u64,
    /// Whether producers followed a schedule (false: rate 0, closed loop,
    /// latency counted from message creation and subject to coordinated omission).
    pub open_loop: bool,
    /// Length of the measured window, seconds.
    pub measured_seconds: f64,
    pub broker: String,
    pub topics: Vec<String>,
    pub workload: Workload,
    /// Largest VmRSS of `--broker-pid` seen, in MiB (mapped log pages included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_mb_max: Option<f64>,
    /// Largest RssAnon (heap and stacks) of `--broker-pid` seen, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_anon_mb_max: Option<f64>,
    /// A backlog run's figures (`backlog_bytes`, `catch_up_s`,
    /// `catch_up_mb_per_s`, ...), at the top level.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<BacklogReport>,
    /// The producers' batch codec (`none`, `gzip`, `snappy`, `lz4`, `zstd`).
    pub compression: String,
    /// Bytes of every acked batch as the broker stores it (compressed,
    /// batch and record headers included); coremq only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_bytes_sent: Option<u64>,
    /// Acked payload bytes ÷ `batch_bytes_sent` (just under 1 without
    /// compression: the headers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<f64>,
    /// CPU-seconds per second the broker (`--broker-pid`) used over the
    /// measured window: 1.6 = 1.6 cores busy on average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_cores_avg: Option<f64>,
    /// The broker's busiest 1-second sample inside the window, in cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_cores_max: Option<f64>,
    /// The same for coremq-perf itself (`/proc/self/stat`), which shares
    /// the machine's cores with the broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perf_cpu_cores_avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perf_cpu_cores_max: Option<f64>,
    /// CPUs this process may run on (what the cores above are out of).
    pub cpus: usize,
    /// The measured window (ns since the epoch, the run's clock): for the
    /// CPU figures, not written.
    #[serde(skip)]
    pub window_ns: (u64, u64),
    /// Whether every check held (sent == acked, no errors, consumers caught up).
    pub passed: bool,
    /// The checks that failed, in words.
    pub failures: Vec<String>,
}

impl Report {
    /// Payload bytes of the acked messages, from the message count.
    pub fn payload_bytes_acked(&self) -> u64 {
        self.acked * self.workload.message_size as u64
    }
}

/// Subscriptions behind that a failed run names (the rest are counted).
pub const FAILED_SUBSCRIPTIONS_LISTED: usize = 5;

/// Why a run failed its checks; empty if it passed.
pub fn check(
    sent: u64,
    acked: u64,
    errors: u64,
    per_subscription: &[(String, u64, u64)],
) -> Vec<String> {
    let mut failures = Vec::new();
    if sent != acked {
        failures.push(format!("sent {sent} but acked {acked}"));
    }
    if errors > 0 {
        failures.push(format!("{errors} messages failed"));
    }
    let behind: Vec<&(String, u64, u64)> = per_subscription
        .iter()
        .filter(|(_, consumed, wanted)| consumed < wanted)
        .collect();
    for (name, consumed, wanted) in behind.iter().take(FAILED_SUBSCRIPTIONS_LISTED) {
        failures.push(format!(
            "subscription {name} consumed {consumed} of {wanted} acked messages"
        ));
    }
    if behind.len() > FAILED_SUBSCRIPTIONS_LISTED {
        failures.push(format!(
            "{} more subscriptions behind",
            behind.len() - FAILED_SUBSCRIPTIONS_LISTED
        ));
    }
    failures
}

/// A report with made-up figures, for tests.
#[cfg(test)]
pub(crate) fn test_report() -> Report {
    let workload = Workload::resolve(None, &crate::workload::Overrides::default())
        .expect("the defaults are valid");
    Report {
        publish_msgs_per_s: 1.0,
        publish_mb_per_s: 2.0,
        consume_msgs_per_s: 3.0,
        consume_mb_per_s: 4.0,
        publish_latency_us: Latency::new().summary(),
        e2e_latency_us: Latency::new().summary(),
        sent: 5,
        acked: 5,
        consumed: 5,
        expected_consumed: 5,
        errors: 0,
        publish_errors: 0,
        consume_errors: 0,
        open_loop: true,
        measured_seconds: 1.0,
        broker: "127.0.0.1:9700".into(),
        topics: vec!["perf-1".into()],
        workload,
        broker_rss_mb_max: None,
        broker_rss_anon_mb_max: None,
        backlog: None,
        compression: "none".into(),
        batch_bytes_sent: None,
        compression_ratio: None,
        broker_cpu_cores_avg: None,
        broker_cpu_cores_max: None,
        perf_cpu_cores_avg: Some(0.5),
        perf_cpu_cores_max: Some(0.75),
        cpus: 2,
        window_ns: (0, 1),
        passed: true,
        failures: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_holds_only_what_came_after_its_start() {
        let mut run = Latency::new();
        for us in [10, 20, 30_000] {
            run.record_us(us);
        }
        let start = run.clone();
        for us in [100, 200, 300] {
            run.record_us(us);
        }
        let interval = run.since(&start);
        assert_eq!(interval.summary().count, 3);
        assert_eq!(interval.max(), 300);
        assert_eq!(interval.quantile(0.0), 100);
        assert!(run.max() >= 30_000, "the run keeps everything");
        assert_eq!(Latency::new().max(), 0);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::new();
        for v in 1..=10_000u64 {
            l.record_us(v);
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        // Three significant digits: within 0.1% of the exact value.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(s.p50, 5_000), "{s:?}");
        assert!(near(s.p99, 9_900), "{s:?}");
        assert!(near(s.p999, 9_990), "{s:?}");
        assert!(near(s.p9999, 9_999), "{s:?}");
        assert!(near(s.max, 10_000), "{s:?}");
        assert!(s.p50 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.p9999 && s.p9999 <= s.max);
    }

    #[test]
    fn empty_and_out_of_range_latencies() {
        let l = Latency::new();
        assert_eq!(l.summary().max, 0);
        assert_eq!(l.summary().p99, 0);
        let mut l = Latency::new();
        l.record_us(u64::MAX);
        l.record_between_ns(2_000, 1_000); // a clock that went backwards: 0
        l.record_between_ns(1_000, 1_501_000);
        let s = l.summary();
        assert_eq!(s.count, 3);
        assert!(s.max >= LATENCY_US_MAX && s.max <= LATENCY_US_MAX + LATENCY_US_MAX / 1000);
        assert_eq!(l.quantile(0.0), 0);
        assert!(l.quantile(0.5).abs_diff(1_500) <= 2);
    }

    #[test]
    fn merging_per_thread_tallies() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for v in 0..100 {
            a.latency.record_us(100 + v);
        }
        a.messages = 100;
        a.bytes = 100 * 1024;
        for _ in 0..100 {
            b.latency.record_us(5_000);
        }
        b.messages = 100;
        b.bytes = 100 * 1024;
        b.errors = 3;
        let total = merge_all([&a, &b]);
        assert_eq!(total.messages, 200);
        assert_eq!(total.bytes, 200 * 1024);
        assert_eq!(total.errors, 3);
        let s = total.latency.summary();
        assert_eq!(s.count, 200);
        // Half the samples are ~100-199 µs, half 5 ms: the median is in the
        // first group, p99 in the second, and the max is the slow thread's.
        assert!(s.p50 < 200, "{s:?}");
        assert!(s.p99.abs_diff(5_000) <= 5, "{s:?}");
        assert!(s.max.abs_diff(5_000) <= 5, "{s:?}");
        // Merging is the same as recording everything in one histogram.
        let mut one = Latency::new();
        for v in 0..100 {
            one.record_us(100 + v);
        }
        for _ in 0..100 {
            one.record_us(5_000);
        }
        assert_eq!(one.summary(), s);
    }

    #[test]
    fn rates_use_mib() {
        let (m, mb) = rates(2_000, 2 * 1024 * 1024, 2.0);
        assert_eq!(m, 1_000.0);
        assert_eq!(mb, 1.0);
        assert_eq!(rates(5, 5, 0.0), (0.0, 0.0));
    }

    #[test]
    fn checks_name_what_failed() {
        assert!(check(10, 10, 0, &[("s0".into(), 10, 10)]).is_empty());
        // Duplicates delivered (consumed > acked) do not fail the run.
        assert!(check(10, 10, 0, &[("s0".into(), 11, 10)]).is_empty());
        let f = check(10, 9, 1, &[("s0".into(), 5, 9)]);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("sent 10 but acked 9"));
        assert!(f[2].contains("consumed 5 of 9"));
        // Ten thousand topics behind do not make ten thousand lines.
        let many: Vec<(String, u64, u64)> = (0..10_000).map(|t| (format!("t{t}"), 0, 1)).collect();
        let f = check(1, 1, 0, &many);
        assert_eq!(f.len(), FAILED_SUBSCRIPTIONS_LISTED + 1, "{f:?}");
        assert_eq!(f.last().unwrap(), "9995 more subscriptions behind");
    }

    #[test]
    fn report_json_has_the_documented_keys() {
        let mut l = Latency::new();
        l.record_us(42);
        let report = Report {
            publish_latency_us: l.summary(),
            e2e_latency_us: l.summary(),
            ..test_report()
        };
        let v = serde_json::to_value(&report).unwrap();
        for key in [
            "publish_msgs_per_s",
            "publish_mb_per_s",
            "consume_msgs_per_s",
            "publish_latency_us",
            "e2e_latency_us",
            "sent",
            "acked",
            "consumed",
            "errors",
            "workload",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for hist in ["publish_latency_us", "e2e_latency_us"] {
            for p in ["p50", "p99", "p999", "p9999", "max"] {
                assert_eq!(v[hist][p], 42, "{hist}.{p}");
            }
        }
        assert_eq!(v["workload"]["partitionsPerTopic"], 2);
        assert_eq!(v["workload"]["flush"], "async");
        // Only present when a broker pid was given.
        assert!(v.get("broker_rss_mb_max").is_none());
        assert!(v.get("broker_rss_anon_mb_max").is_none());
        assert!(v.get("broker_cpu_cores_avg").is_none());
        assert!(v.get("window_ns").is_none());
        assert_eq!(v["compression"], "none");
        assert!(v.get("batch_bytes_sent").is_none());
        assert_eq!(v["perf_cpu_cores_avg"], 0.5);
        assert_eq!(v["perf_cpu_cores_max"], 0.75);
        assert_eq!(v["cpus"], 2);
        let with_broker = Report {
            broker_rss_mb_max: Some(12.5),
            broker_cpu_cores_avg: Some(1.6),
            broker_cpu_cores_max: Some(1.9),
            compression: "zstd".into(),
            batch_bytes_sent: Some(1000),
            compression_ratio: Some(3.5),
            ..report
        };
        let v = serde_json::to_value(&with_broker).unwrap();
        assert_eq!(v["broker_rss_mb_max"], 12.5);
        assert_eq!(v["broker_cpu_cores_avg"], 1.6);
        assert_eq!(v["broker_cpu_cores_max"], 1.9);
        assert_eq!(v["compression"], "zstd");
        assert_eq!(v["batch_bytes_sent"], 1000);
        assert_eq!(v["compression_ratio"], 3.5);
        assert!(v.get("backlog_bytes").is_none());
    }
}
