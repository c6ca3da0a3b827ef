//! Workload definitions: OpenMessaging Benchmark field names, plus a few
//! coremq-only knobs, resolved against command-line overrides.
//!
//! A workload file is YAML (or JSON, by a `.json` extension) with OMB's
//! fields — `topics`, `partitionsPerTopic`, `messageSize`,
//! `producersPerTopic`, `producerRate` (the aggregate rate of all producers,
//! messages/s; 0 = as fast as possible), `subscriptionsPerTopic`,
//! `consumerPerSubscription`, `testDurationMinutes` — and optionally
//! `flush`, `durationSeconds`, `lingerMs`, `batchBytes`, `compression`
//! (the producers' batch codec), `payload` (`text` or `random`, see
//! `payload.rs`) and `producerWindow` (closed loop: unacknowledged batches
//! per producer). OMB's `consumerBacklogSizeGB` is honoured (see
//! `backlog.rs`). OMB fields this
//! tool has no use for (`name`, `payloadFile`, `keyDistributor`, ...) are
//! accepted and reported, so OMB's own files load unchanged. Precedence is
//! flag > file > default; for the duration, `--duration-s` >
//! `durationSeconds` > `testDurationMinutes` > default.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use coremq_shards::batch::Compression;
use serde::{Deserialize, Serialize};

use crate::error::PerfError;
use crate::payload::PayloadKind;
use crate::producer::CLOSED_LOOP_WINDOW_DEFAULT;

/// Bytes at the start of every payload that carry its intended send time
/// (nanoseconds since the UNIX epoch, big-endian); the smallest message.
pub const TIMESTAMP_BYTES: usize = 8;
/// Default number of topics.
pub const TOPICS_DEFAULT: u32 = 1;
/// Default queues (partitions) per topic.
pub const QUEUES_DEFAULT: u32 = 2;
/// Default payload size, in bytes.
pub const MESSAGE_BYTES_DEFAULT: usize = 1024;
/// Default producers per topic.
pub const PRODUCERS_DEFAULT: u32 = 1;
/// Default aggregate rate of all producers, in messages per second.
pub const RATE_DEFAULT: f64 = 10_000.0;
/// Default subscriptions (consumer groups) per topic.
pub const SUBSCRIPTIONS_DEFAULT: u32 = 1;
/// Default consumers per subscription.
pub const CONSUMERS_DEFAULT: u32 = 1;
/// Default length of the measured phase, in seconds.
pub const DURATION_S_DEFAULT: f64 = 60.0;
/// Default producer batch size (uncompressed, header included), in bytes.
pub const BATCH_BYTES_DEFAULT: usize = 64 << 10;
/// Default time a producer batch waits for more messages, in milliseconds.
pub const LINGER_MS_DEFAULT: f64 = 1.0;
/// Longest run accepted, in seconds (a typo guard: one day).
pub const DURATION_S_MAX: f64 = 86_400.0;
/// Most producer or consumer threads a run may start (a peer driver runs
/// one per producer and a task per consumer; coremq spreads producers over
/// `--producer-threads`).
pub const THREADS_MAX: u32 = 1024;
/// Most producers (topics x producers per topic), and consumers, a run may have.
pub const PRODUCERS_MAX: u64 = 1_000_000;
/// Most queues (topics x queues per topic) a run may create.
pub const QUEUES_MAX: u64 = 1_000_000;
/// Bytes in the "GB" of `consumerBacklogSizeGB` (OMB multiplies by 1024^3).
pub const GIB: u64 = 1 << 30;
/// Longest linger accepted, in milliseconds.
pub const LINGER_MS_MAX: f64 = 10_000.0;

/// Flush policy of the topics a run creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Ack after `fdatasync`.
    Sync,
    /// Ack once the batch is in the shard's write buffer.
    Async,
}

impl From<FlushMode> for coremq::protocol::Flush {
    fn from(f: FlushMode) -> Self {
        match f {
            FlushMode::Sync => coremq::protocol::Flush::Sync,
            FlushMode::Async => coremq::protocol::Flush::Async,
        }
    }
}

impl std::fmt::Display for FlushMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlushMode::Sync => "sync",
            FlushMode::Async => "async",
        })
    }
}

/// The codec producers compress their batches with (Kafka's
/// `compression.type`); the broker stores batches as they come and
/// consumers decompress them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    /// The batch attribute's codec.
    pub fn compression(self) -> Compression {
        match self {
            Codec::None => Compression::None,
            Codec::Gzip => Compression::Gzip,
            Codec::Snappy => Compression::Snappy,
            Codec::Lz4 => Compression::Lz4,
            Codec::Zstd => Compression::Zstd,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.compression().name())
    }
}

/// A workload file as written: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadFile {
    pub name: Option<String>,
    pub topics: Option<u32>,
    pub partitions_per_topic: Option<u32>,
    pub message_size: Option<usize>,
    pub producers_per_topic: Option<u32>,
    pub producer_rate: Option<f64>,
    pub subscriptions_per_topic: Option<u32>,
    pub consumer_per_subscription: Option<u32>,
    pub test_duration_minutes: Option<f64>,
    pub flush: Option<FlushMode>,
    pub duration_seconds: Option<f64>,
    pub linger_ms: Option<f64>,
    pub batch_bytes: Option<usize>,
    pub compression: Option<Codec>,
    pub payload: Option<PayloadKind>,
    pub producer_window: Option<usize>,
    /// OMB: consumers start once this many GiB of payload wait for them.
    #[serde(rename = "consumerBacklogSizeGB")]
    pub consumer_backlog_size_gb: Option<f64>,
    /// OMB fields this tool ignores (kept so they can be reported).
    #[serde(flatten)]
    pub ignored: BTreeMap<String, serde_json::Value>,
}

impl WorkloadFile {
    /// Parses YAML text (JSON is YAML too, but see [`WorkloadFile::load`]).
    pub fn from_yaml(text: &str, path: &Path) -> Result<WorkloadFile, PerfError> {
        serde_yaml::from_str(text).map_err(|source| PerfError::WorkloadYaml {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn from_json(text: &str, path: &Path) -> Result<WorkloadFile, PerfError> {
        serde_json::from_str(text).map_err(|source| PerfError::WorkloadJson {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a workload file: JSON if its name ends in `.json`, else YAML.
    pub fn load(path: &Path) -> Result<WorkloadFile, PerfError> {
        let text = std::fs::read_to_string(path).map_err(|source| PerfError::ReadWorkload {
            path: path.to_path_buf(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            Self::from_json(&text, path)
        } else {
            Self::from_yaml(&text, path)
        }
    }
}

/// Command-line values that override the file; `None` = not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub topics: Option<u32>,
    pub queues: Option<u32>,
    pub message_size: Option<usize>,
    pub producers: Option<u32>,
    pub rate: Option<f64>,
    pub subscriptions: Option<u32>,
    pub consumers: Option<u32>,
    pub duration_s: Option<f64>,
    pub flush: Option<FlushMode>,
    pub linger_ms: Option<f64>,
    pub batch_bytes: Option<usize>,
    pub compression: Option<Codec>,
    pub payload: Option<PayloadKind>,
    pub backlog_gb: Option<f64>,
    pub window: Option<usize>,
}

/// The parameters a run uses, after defaults and overrides. Serialised with
/// OMB's field names into the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub topics: u32,
    pub partitions_per_topic: u32,
    pub message_size: usize,
    pub producers_per_topic: u32,
    /// Aggregate target of all producers, messages/s; 0 = closed loop.
    pub producer_rate: f64,
    pub subscriptions_per_topic: u32,
    pub consumer_per_subscription: u32,
    pub duration_seconds: f64,
    pub flush: FlushMode,
    pub linger_ms: f64,
    /// Uncompressed bytes at which a producer batch is sealed.
    pub batch_bytes: usize,
    pub compression: Codec,
    pub payload: PayloadKind,
    /// Closed loop: unacknowledged batches per producer. A sync-flush
    /// producer needs more than an async one to cover the flush (Little's
    /// law: throughput = bytes in flight / latency).
    pub producer_window: usize,
    /// Backlog (GiB of payload, over all subscriptions) to build with the
    /// consumers paused before they start; 0 = consumers from the start.
    #[serde(rename = "consumerBacklogSizeGB")]
    pub consumer_backlog_size_gb: f64,
}

impl Workload {
    /// Applies `over` on top of `file` (if any) on top of the defaults, and
    /// checks the result.
    pub fn resolve(file: Option<&WorkloadFile>, over: &Overrides) -> Result<Workload, PerfError> {
        let empty = WorkloadFile::default();
        let f = file.unwrap_or(&empty);
        let duration_seconds = over
            .duration_s
            .or(f.duration_seconds)
            .or(f.test_duration_minutes.map(|m| m * 60.0))
            .unwrap_or(DURATION_S_DEFAULT);
        let w = Workload {
            name: f.name.clone().unwrap_or_else(|| "coremq-perf".to_string()),
            topics: over.topics.or(f.topics).unwrap_or(TOPICS_DEFAULT),
            partitions_per_topic: over
                .queues
                .or(f.partitions_per_topic)
                .unwrap_or(QUEUES_DEFAULT),
            message_size: over
                .message_size
                .or(f.message_size)
                .unwrap_or(MESSAGE_BYTES_DEFAULT),
            producers_per_topic: over
                .producers
                .or(f.producers_per_topic)
                .unwrap_or(PRODUCERS_DEFAULT),
            producer_rate: over.rate.or(f.producer_rate).unwrap_or(RATE_DEFAULT),
            subscriptions_per_topic: over
                .subscriptions
                .or(f.subscriptions_per_topic)
                .unwrap_or(SUBSCRIPTIONS_DEFAULT),
            consumer_per_subscription: over
                .consumers
                .or(f.consumer_per_subscription)
                .unwrap_or(CONSUMERS_DEFAULT),
            duration_seconds,
            flush: over.flush.or(f.flush).unwrap_or(FlushMode::Async),
            linger_ms: over.linger_ms.or(f.linger_ms).unwrap_or(LINGER_MS_DEFAULT),
            batch_bytes: over
                .batch_bytes
                .or(f.batch_bytes)
                .unwrap_or(BATCH_BYTES_DEFAULT),
            compression: over.compression.or(f.compression).unwrap_or_default(),
            payload: over.payload.or(f.payload).unwrap_or_default(),
            producer_window: over
                .window
                .or(f.producer_window)
                .unwrap_or(CLOSED_LOOP_WINDOW_DEFAULT),
            consumer_backlog_size_gb: over
                .backlog_gb
                .or(f.consumer_backlog_size_gb)
                .unwrap_or(0.0),
        };
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), PerfError> {
        let bad = |what: String| Err(PerfError::Invalid(what));
        if self.topics == 0 {
            return bad("topics must be at least 1".into());
        }
        if self.partitions_per_topic == 0 {
            return bad("partitionsPerTopic (--queues) must be at least 1".into());
        }
        if self.message_size < TIMESTAMP_BYTES {
            return bad(format!(
                "messageSize must be at least {TIMESTAMP_BYTES} bytes (the send timestamp)"
            ));
        }
        if self.producers_per_topic == 0 {
            return bad("producersPerTopic must be at least 1".into());
        }
        if !self.producer_rate.is_finite() || self.producer_rate < 0.0 {
            return bad("producerRate must be 0 (as fast as possible) or positive".into());
        }
        if self.subscriptions_per_topic > 0 && self.consumer_per_subscription == 0 {
            return bad("consumerPerSubscription must be at least 1".into());
        }
        if self.total_producers() > PRODUCERS_MAX
            || self.total_consumers() > PRODUCERS_MAX
            || u64::from(self.topics) * u64::from(self.partitions_per_topic) > QUEUES_MAX
        {
            return bad(format!(
                "at most {PRODUCERS_MAX} producers, {PRODUCERS_MAX} consumers and {QUEUES_MAX} queues"
            ));
        }
        if !(self.duration_seconds > 0.0 && self.duration_seconds <= DURATION_S_MAX) {
            return bad(format!(
                "the duration must be between 0 and {DURATION_S_MAX} seconds"
            ));
        }
        if !(self.linger_ms >= 0.0 && self.linger_ms <= LINGER_MS_MAX) {
            return bad(format!("lingerMs must be between 0 and {LINGER_MS_MAX}"));
        }
        if self.batch_bytes == 0 {
            return bad("batchBytes must be positive".into());
        }
        if self.producer_window == 0 {
            return bad("producerWindow (--window) must be at least 1".into());
        }
        let backlog = self.consumer_backlog_size_gb;
        if !(backlog.is_finite() && backlog >= 0.0) {
            return bad("consumerBacklogSizeGB (--backlog-gb) must be 0 or positive".into());
        }
        if backlog > 0.0 && !self.open_loop() {
            // As in OMB: the producers' rate must be known while the backlog builds.
            return bad(
                "consumerBacklogSizeGB (--backlog-gb) needs a producer rate (producerRate > 0)"
                    .into(),
            );
        }
        if backlog > 0.0 && self.subscriptions_per_topic == 0 {
            return bad("consumerBacklogSizeGB (--backlog-gb) needs subscriptions".into());
        }
        Ok(())
    }

    /// Whether producers follow a schedule (rate > 0) rather than send as
    /// fast as a pipelining window allows.
    pub fn open_loop(&self) -> bool {
        self.producer_rate > 0.0
    }

    pub fn total_producers(&self) -> u64 {
        u64::from(self.topics) * u64::from(self.producers_per_topic)
    }

    pub fn total_consumers(&self) -> u64 {
        u64::from(self.topics)
            * u64::from(self.subscriptions_per_topic)
            * u64::from(self.consumer_per_subscription)
    }

    /// Target rate of one producer, messages/s (0 = closed loop).
    pub fn rate_per_producer(&self) -> f64 {
        self.producer_rate / self.total_producers() as f64
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_seconds)
    }

    /// The backlog to build before consumers start, in payload bytes
    /// (GiB = 2^30 bytes, as OMB counts); 0 = none.
    pub fn backlog_bytes(&self) -> u64 {
        (self.consumer_backlog_size_gb * GIB as f64) as u64
    }

    pub fn linger(&self) -> Duration {
        Duration::from_secs_f64(self.linger_ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMB_YAML: &str = r#"
name: 1 topic / 16 partitions / 1kb
topics: 1
partitionsPerTopic: 16
keyDistributor: "NO_KEY"
messageSize: 1024
payloadFile: "payload/payload-1Kb.data"
subscriptionsPerTopic: 1
consumerPerSubscription: 16
producersPerTopic: 16
producerRate: 50000
consumerBacklogSizeGB: 0
testDurationMinutes: 15
"#;

    fn p() -> &'static Path {
        Path::new("w.yaml")
    }

    #[test]
    fn omb_file_loads_with_its_field_names() {
        let f = WorkloadFile::from_yaml(OMB_YAML, p()).unwrap();
        assert_eq!(f.partitions_per_topic, Some(16));
        assert_eq!(f.producer_rate, Some(50_000.0));
        assert_eq!(f.consumer_per_subscription, Some(16));
        assert_eq!(f.test_duration_minutes, Some(15.0));
        // OMB-only fields are kept aside, not refused.
        let ignored: Vec<_> = f.ignored.keys().cloned().collect();
        assert_eq!(ignored, ["keyDistributor", "payloadFile"]);
        assert_eq!(f.consumer_backlog_size_gb, Some(0.0));
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(w.name, "1 topic / 16 partitions / 1kb");
        assert_eq!(w.topics, 1);
        assert_eq!(w.partitions_per_topic, 16);
        assert_eq!(w.message_size, 1024);
        assert_eq!(w.producers_per_topic, 16);
        assert_eq!(w.subscriptions_per_topic, 1);
        assert_eq!(w.duration_seconds, 900.0);
        assert_eq!(w.flush, FlushMode::Async);
        assert!(w.open_loop());
        assert_eq!(w.rate_per_producer(), 50_000.0 / 16.0);
    }

    #[test]
    fn coremq_fields_and_json_files() {
        let json = r#"{"topics": 2, "partitionsPerTopic": 4, "flush": "sync",
            "durationSeconds": 20, "testDurationMinutes": 5, "lingerMs": 0.5,
            "batchBytes": 1000, "producerRate": 0, "compression": "zstd",
            "payload": "random", "producerWindow": 32}"#;
        let f = WorkloadFile::from_json(json, Path::new("w.json")).unwrap();
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(w.flush, FlushMode::Sync);
        // durationSeconds wins over testDurationMinutes.
        assert_eq!(w.duration_seconds, 20.0);
        assert_eq!(w.linger_ms, 0.5);
        assert_eq!(w.batch_bytes, 1000);
        assert_eq!(w.compression, Codec::Zstd);
        assert_eq!(w.compression.compression(), Compression::Zstd);
        assert_eq!(w.payload, PayloadKind::Random);
        assert_eq!(w.producer_window, 32);
        assert!(!w.open_loop());
        assert_eq!(w.total_producers(), 2);
    }

    #[test]
    fn flags_override_the_file() {
        let f = WorkloadFile::from_yaml(OMB_YAML, p()).unwrap();
        let over = Overrides {
            queues: Some(2),
            message_size: Some(256),
            producers: Some(2),
            rate: Some(2000.0),
            consumers: Some(1),
            duration_s: Some(3.0),
            flush: Some(FlushMode::Sync),
            linger_ms: Some(0.0),
            batch_bytes: Some(1),
            window: Some(3),
            ..Overrides::default()
        };
        let w = Workload::resolve(Some(&f), &over).unwrap();
        assert_eq!(w.producer_window, 3);
        assert_eq!(w.partitions_per_topic, 2);
        assert_eq!(w.message_size, 256);
        assert_eq!(w.producers_per_topic, 2);
        assert_eq!(w.producer_rate, 2000.0);
        assert_eq!(w.consumer_per_subscription, 1);
        assert_eq!(w.duration_seconds, 3.0);
        assert_eq!(w.flush, FlushMode::Sync);
        assert_eq!(w.linger_ms, 0.0);
        assert_eq!(w.batch_bytes, 1);
        // Untouched fields keep the file's values.
        assert_eq!(w.topics, 1);
        assert_eq!(w.subscriptions_per_topic, 1);
    }

    #[test]
    fn backlog_in_gib() {
        let f =
            WorkloadFile::from_yaml("consumerBacklogSizeGB: 2\nproducerRate: 1000\n", p()).unwrap();
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(w.backlog_bytes(), 2 << 30);
        let over = Overrides {
            backlog_gb: Some(0.25),
            ..Overrides::default()
        };
        let w = Workload::resolve(Some(&f), &over).unwrap();
        assert_eq!(w.backlog_bytes(), 256 << 20);
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["consumerBacklogSizeGB"], 0.25);
    }

    #[test]
    fn defaults_without_a_file() {
        let w = Workload::resolve(None, &Overrides::default()).unwrap();
        assert_eq!(w.partitions_per_topic, QUEUES_DEFAULT);
        assert_eq!(w.message_size, MESSAGE_BYTES_DEFAULT);
        assert_eq!(w.producer_rate, RATE_DEFAULT);
        assert_eq!(w.duration_seconds, DURATION_S_DEFAULT);
        assert_eq!(w.batch_bytes, BATCH_BYTES_DEFAULT);
        assert_eq!(w.compression, Codec::None);
        assert_eq!(w.payload, PayloadKind::Text);
        // A flag beats the file.
        let f = WorkloadFile::from_yaml("compression: gzip\npayload: random\n", p()).unwrap();
        let over = Overrides {
            compression: Some(Codec::Lz4),
            ..Overrides::default()
        };
        let w = Workload::resolve(Some(&f), &over).unwrap();
        assert_eq!(
            (w.compression, w.payload),
            (Codec::Lz4, PayloadKind::Random)
        );
        assert_eq!(w.compression.to_string(), "lz4");
        assert!(WorkloadFile::from_yaml("compression: brotli", p()).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        for over in [
            Overrides {
                message_size: Some(TIMESTAMP_BYTES - 1),
                ..Overrides::default()
            },
            Overrides {
                queues: Some(0),
                ..Overrides::default()
            },
            Overrides {
                rate: Some(-1.0),
                ..Overrides::default()
            },
            Overrides {
                duration_s: Some(0.0),
                ..Overrides::default()
            },
            Overrides {
                batch_bytes: Some(0),
                ..Overrides::default()
            },
            Overrides {
                backlog_gb: Some(-1.0),
                ..Overrides::default()
            },
            // A backlog needs a rate (as in OMB) and someone to consume it.
            Overrides {
                backlog_gb: Some(1.0),
                rate: Some(0.0),
                ..Overrides::default()
            },
            Overrides {
                backlog_gb: Some(1.0),
                subscriptions: Some(0),
                ..Overrides::default()
            },
        ] {
            let e = Workload::resolve(None, &over).unwrap_err();
            assert!(e.is_usage(), "{e}");
        }
        assert!(WorkloadFile::from_yaml("flush: sometimes", p()).is_err());
        assert!(WorkloadFile::from_yaml("topics: many", p()).is_err());
    }

    #[test]
    fn shipped_workloads_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        for (file, flush) in [
            ("1-topic-2-queues-1kb-async.yaml", FlushMode::Async),
            ("1-topic-2-queues-1kb-sync.yaml", FlushMode::Sync),
            ("1-topic-2-queues-1kb-zstd.yaml", FlushMode::Async),
            ("1-topic-2-queues-1kb-backlog.yaml", FlushMode::Async),
        ] {
            let f = WorkloadFile::load(&dir.join(file)).unwrap();
            let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
            assert_eq!((w.topics, w.partitions_per_topic), (1, 2), "{file}");
            assert_eq!(w.message_size, 1024, "{file}");
            assert_eq!(w.flush, flush, "{file}");
            assert!(f.ignored.is_empty(), "{file}: {:?}", f.ignored);
        }
        let f = WorkloadFile::load(&dir.join("1-topic-2-queues-1kb-zstd.yaml")).unwrap();
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!((w.compression, w.payload), (Codec::Zstd, PayloadKind::Text));
        for (file, flush) in [
            ("single-message-20k-async.yaml", FlushMode::Async),
            ("single-message-20k-sync.yaml", FlushMode::Sync),
        ] {
            let f = WorkloadFile::load(&dir.join(file)).unwrap();
            assert!(f.ignored.is_empty(), "{file}: {:?}", f.ignored);
            let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
            assert_eq!(w.flush, flush, "{file}");
            assert_eq!(w.total_producers(), 1, "{file}");
            assert_eq!((w.producer_rate, w.linger_ms), (20_000.0, 0.0), "{file}");
            // Every message its own batch.
            assert!(w.batch_bytes < w.message_size, "{file}");
        }
        let f = WorkloadFile::load(&dir.join("10k-topics-1kb-async.yaml")).unwrap();
        assert!(f.ignored.is_empty(), "{:?}", f.ignored);
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!((w.topics, w.partitions_per_topic), (10_000, 1));
        assert_eq!(w.total_producers(), 10_000);
        let f = WorkloadFile::load(&dir.join("1-topic-2-queues-1kb-backlog.yaml")).unwrap();
        let w = Workload::resolve(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(w.backlog_bytes(), GIB);
    }
}
