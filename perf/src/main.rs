//! `coremq-perf`: a load generator for coremq in the manner of the
//! OpenMessaging Benchmark.
//!
//! `coremq-perf run` reads an OMB-style workload (file and/or flags),
//! creates fresh topics, drives open-loop producers (latency measured from
//! each message's scheduled send time, so a slow broker cannot hide it) and
//! consumers, and reports throughput and HdrHistogram latency percentiles —
//! publish (send → ack) and end-to-end (send → consumer) — on stdout and,
//! with `--json`, as a JSON file. `--driver nats|rabbitmq` runs the same
//! workload against NATS JetStream or RabbitMQ streams (see `drivers/`).
//! Exit status: 0 if every message sent was acked and consumed without
//! errors, 1 if not (or if the run failed), 2 for a usage error.

mod backlog;
mod consumer;
mod cpu;
mod drivers;
mod error;
mod payload;
mod plot;
mod producer;
mod rss;
mod run;
mod schedule;
mod stats;
mod workload;

// Shards and client threads allocate many small, short-lived buffers (a
// batch's copy, a request's topic names); glibc's malloc spent 10-20% of
// their time in its free lists (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::drivers::Driver;
use crate::error::PerfError;
use crate::payload::PayloadKind;
use crate::run::{RunOptions, DRAIN_S_DEFAULT};
use crate::workload::{Codec, FlushMode, Overrides, Workload, WorkloadFile, THREADS_MAX};

/// Exit status of a run that completed but failed its checks, or broke.
const EXIT_FAILED: u8 = 1;
/// Exit status of a usage error (bad flag, workload file or value).
const EXIT_USAGE: u8 = 2;
/// Longest drain accepted, in seconds.
const DRAIN_S_MAX: f64 = 3_600.0;

#[derive(Parser)]
#[command(name = "coremq-perf", version, about = "Load generator for coremq")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run one workload against a running broker and report throughput and latency.
    Run(RunArgs),
    /// Draw a latency-percentile chart (.svg or .png) from run reports.
    Plot(plot::PlotArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Workload file (YAML, or JSON if it ends in .json) with OpenMessaging
    /// Benchmark field names; flags override its fields
    #[arg(long, value_name = "FILE")]
    workload: Option<PathBuf>,
    /// Broker to drive: coremq, NATS JetStream or RabbitMQ streams
    #[arg(long, value_enum, default_value_t = Driver::Coremq)]
    driver: Driver,
    /// Broker address [default: 127.0.0.1:9700 for coremq, 127.0.0.1:4222 for nats, 127.0.0.1:5552 for rabbitmq]
    #[arg(long, value_name = "ADDR")]
    broker: Option<String>,
    /// Write the report as JSON to this file
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Length of the measured phase [default: 60, or the file's durationSeconds/testDurationMinutes]
    #[arg(long, value_name = "S")]
    duration_s: Option<f64>,
    /// Prefix of the topic names the run creates (and deletes)
    #[arg(long, value_name = "P", default_value = "perf")]
    topic_prefix: String,
    /// Flush policy of the topics [default: async]
    #[arg(long, value_enum)]
    flush: Option<FlushMode>,
    /// Payload bytes per message (at least 8: the send timestamp) [default: 1024]
    #[arg(long, value_name = "B")]
    message_size: Option<usize>,
    /// Aggregate rate of all producers, messages/s; 0 = as fast as possible (closed loop) [default: 10000]
    #[arg(long, value_name = "MSG_PER_S")]
    rate: Option<f64>,
    /// Producers per topic [default: 1]
    #[arg(long, value_name = "N")]
    producers: Option<u32>,
    /// Consumers per subscription [default: 1]
    #[arg(long, value_name = "N")]
    consumers: Option<u32>,
    /// Queues (partitions) per topic [default: 2]
    #[arg(long, value_name = "N")]
    queues: Option<u32>,
    /// Topics [default: 1]
    #[arg(long, value_name = "N")]
    topics: Option<u32>,
    /// Subscriptions (consumer groups) per topic; 0 = no consumers [default: 1]
    #[arg(long, value_name = "N")]
    subscriptions: Option<u32>,
    /// Seal a producer batch at this many bytes; below the message size every message is its own batch [default: 65536]
    #[arg(long, value_name = "B")]
    batch_bytes: Option<usize>,
    /// Longest time a batch waits for more messages; 0 = send every message at once [default: 1]
    #[arg(long, value_name = "MS")]
    linger_ms: Option<f64>,
    /// Codec of the producers' batches (coremq only; the broker stores them as they are, consumers decompress) [default: none]
    #[arg(long, value_enum, value_name = "CODEC")]
    compression: Option<Codec>,
    /// What follows each payload's timestamp: JSON order events that vary per message, or incompressible random bytes [default: text]
    #[arg(long, value_enum, value_name = "KIND")]
    payload: Option<PayloadKind>,
    /// Catch-up reads (OMB's consumerBacklogSizeGB): consumers start once this many GiB of payload wait for them, and the run measures how fast they catch up while producers go on (coremq only; needs a rate) [default: 0]
    #[arg(long, value_name = "G")]
    backlog_gb: Option<f64>,
    /// The broker's process: its VmRSS and CPU time are sampled every second and reported
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// Longest wait for consumers to catch up after the producers stop
    #[arg(long, value_name = "S", default_value_t = DRAIN_S_DEFAULT)]
    drain_s: f64,
    /// Closed loop (rate 0): unacknowledged batches per producer [default: the workload's producerWindow, else 16]
    #[arg(long, value_name = "BATCHES")]
    window: Option<usize>,
    /// Closed loop: unacknowledged bytes per producer thread, however many producers it carries [default: --window times batchBytes, one producer's window of full batches]
    #[arg(long, value_name = "BYTES")]
    window_bytes: Option<usize>,
    /// Send everything through the shared port instead of each queue's shard port
    #[arg(long)]
    no_shard_direct: bool,
    /// coremq: one Produce / Fetch per queue, never ProduceMany / FetchMany (for A/B runs)
    #[arg(long)]
    single_queue_requests: bool,
    /// coremq: batch bytes a FetchMany waits to gather before it answers (Kafka's fetch.min.bytes; it still answers after 500 ms). Higher: fewer, fuller polls of many queues, at the cost of latency
    #[arg(long, value_name = "BYTES", default_value_t = 1)]
    fetch_min_bytes: u32,
    /// coremq: retention of the run's topics, bytes per queue (0 = keep everything); lets a long max-rate run fit the disk (retention deletes whole log segments, so somewhat more is kept)
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    retention_bytes: u64,
    /// coremq: most producer threads; the producers (topics x producers per topic) are spread over them [default: one per producer, at most 2 per CPU]
    #[arg(long, value_name = "N")]
    producer_threads: Option<usize>,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            topics: self.topics,
            queues: self.queues,
            message_size: self.message_size,
            producers: self.producers,
            rate: self.rate,
            subscriptions: self.subscriptions,
            consumers: self.consumers,
            duration_s: self.duration_s,
            flush: self.flush,
            linger_ms: self.linger_ms,
            batch_bytes: self.batch_bytes,
            compression: self.compression,
            payload: self.payload,
            backlog_gb: self.backlog_gb,
            window: self.window,
        }
    }

    fn options(&self) -> Result<RunOptions, PerfError> {
        let file = match &self.workload {
            Some(path) => Some(WorkloadFile::load(path)?),
            None => None,
        };
        if let Some(f) = &file {
            if !f.ignored.is_empty() {
                let keys: Vec<&str> = f.ignored.keys().map(String::as_str).collect();
                eprintln!("note: ignoring workload fields {}", keys.join(", "));
            }
        }
        let workload = Workload::resolve(file.as_ref(), &self.overrides())?;
        drivers::check_supported(self.driver, &workload)?;
        if !(self.drain_s >= 0.0 && self.drain_s <= DRAIN_S_MAX) {
            return Err(PerfError::Invalid(format!(
                "--drain-s must be between 0 and {DRAIN_S_MAX}"
            )));
        }
        if self.window_bytes == Some(0) {
            return Err(PerfError::Invalid(
                "--window-bytes must be at least 1 (a single batch always goes)".into(),
            ));
        }
        if let Some(n) = self.producer_threads {
            if n == 0 || n > THREADS_MAX as usize {
                return Err(PerfError::Invalid(format!(
                    "--producer-threads must be 1 to {THREADS_MAX}"
                )));
            }
            if self.driver != Driver::Coremq {
                return Err(PerfError::Invalid(format!(
                    "--producer-threads is for --driver coremq (the {} driver runs a thread per producer)",
                    self.driver
                )));
            }
        }
        let window = workload.producer_window;
        Ok(RunOptions {
            driver: self.driver,
            broker: self
                .broker
                .clone()
                .unwrap_or_else(|| self.driver.default_broker().to_string()),
            workload,
            topic_prefix: self.topic_prefix.clone(),
            broker_pid: self.broker_pid,
            drain: Duration::from_secs_f64(self.drain_s),
            window,
            window_bytes: self.window_bytes,
            shard_direct: !self.no_shard_direct,
            single_queue_requests: self.single_queue_requests,
            fetch_min_bytes: self.fetch_min_bytes,
            retention_bytes: self.retention_bytes,
            producer_threads: self.producer_threads,
        })
    }
}

fn run(args: &RunArgs) -> Result<bool, PerfError> {
    let opts = args.options()?;
    let report = run::run(&opts)?;
    println!("driver: {} at {}", opts.driver, opts.broker);
    print!("{}", run::summary_text(&report));
    if let Some(path) = &args.json {
        run::write_json(&report, path)?;
    }
    Ok(report.passed)
}

/// Reports `e` and picks the exit status: 2 for a usage error, else 1.
fn failed(e: &dyn std::fmt::Display, usage: bool) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILED })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(EXIT_FAILED),
            Err(e) => failed(&e, e.is_usage()),
        },
        Command::Plot(args) => match plot::run(&args) {
            Ok(()) => {
                eprintln!("wrote {}", args.out.display());
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e, e.is_usage()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let mut all = vec!["coremq-perf", "run"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Run(a) => a,
            Command::Plot(_) => unreachable!("parsed a run command"),
        }
    }

    #[test]
    fn flags_reach_the_workload() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let file = dir.join("1-topic-2-queues-1kb-async.yaml");
        let a = parse(&[
            "--workload",
            file.to_str().unwrap(),
            "--flush",
            "sync",
            "--rate",
            "0",
            "--queues",
            "3",
            "--duration-s",
            "2.5",
            "--no-shard-direct",
            "--retention-bytes",
            "1048576",
            "--fetch-min-bytes",
            "65536",
        ]);
        let o = a.options().unwrap();
        assert_eq!(o.workload.flush, FlushMode::Sync);
        assert_eq!(o.workload.producer_rate, 0.0);
        assert_eq!(o.workload.partitions_per_topic, 3);
        assert_eq!(o.workload.duration_seconds, 2.5);
        // From the file.
        assert_eq!(o.workload.message_size, 1024);
        assert_eq!(o.workload.batch_bytes, 65536);
        assert_eq!(o.driver, Driver::Coremq);
        assert_eq!(o.broker, "127.0.0.1:9700");
        assert!(!o.shard_direct);
        assert_eq!(o.retention_bytes, 1 << 20);
        assert_eq!(o.fetch_min_bytes, 65536);
    }

    #[test]
    fn the_broker_address_follows_the_driver() {
        let o = parse(&["--driver", "nats"]).options().unwrap();
        assert_eq!(
            (o.driver, o.broker.as_str()),
            (Driver::Nats, "127.0.0.1:4222")
        );
        let o = parse(&["--driver", "rabbitmq"]).options().unwrap();
        assert_eq!(o.broker, "127.0.0.1:5552");
        let o = parse(&["--driver", "rabbitmq", "--broker", "127.0.0.1:15552"])
            .options()
            .unwrap();
        assert_eq!(o.broker, "127.0.0.1:15552");
        assert!(Cli::try_parse_from(["coremq-perf", "run", "--driver", "kafka"]).is_err());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert!(parse(&["--window", "0"]).options().unwrap_err().is_usage());
        assert!(parse(&["--window-bytes", "0"])
            .options()
            .unwrap_err()
            .is_usage());
        let o = parse(&["--window-bytes", "4096"]).options().unwrap();
        assert_eq!(o.window_bytes, Some(4096));
        assert!(parse(&["--drain-s=-1"]).options().unwrap_err().is_usage());
        assert!(parse(&["--workload", "/nonexistent.yaml"])
            .options()
            .unwrap_err()
            .is_usage());
        assert!(Cli::try_parse_from(["coremq-perf", "run", "--flush", "later"]).is_err());
        // Compression is coremq's alone.
        for driver in ["nats", "rabbitmq"] {
            let e = parse(&["--driver", driver, "--compression", "zstd"])
                .options()
                .unwrap_err();
            assert!(e.is_usage() && e.to_string().contains("compression"), "{e}");
            assert!(parse(&["--driver", driver, "--compression", "none"])
                .options()
                .is_ok());
        }
        for driver in ["nats", "rabbitmq"] {
            let e = parse(&["--driver", driver, "--backlog-gb", "1"])
                .options()
                .unwrap_err();
            assert!(e.is_usage() && e.to_string().contains("backlog"), "{e}");
        }
        assert!(parse(&["--producer-threads", "0"])
            .options()
            .unwrap_err()
            .is_usage());
        assert!(parse(&["--driver", "nats", "--producer-threads", "2"])
            .options()
            .unwrap_err()
            .is_usage());
        let o = parse(&[
            "--producer-threads",
            "3",
            "--topics",
            "10000",
            "--queues",
            "1",
        ])
        .options()
        .unwrap();
        assert_eq!(o.producer_threads, Some(3));
        assert_eq!(o.workload.topics, 10_000);
        // Peers run a thread per producer: ten thousand are too many.
        assert!(parse(&["--driver", "nats", "--topics", "10000"])
            .options()
            .unwrap_err()
            .is_usage());
        let o = parse(&["--backlog-gb", "0.5"]).options().unwrap();
        assert_eq!(o.workload.consumer_backlog_size_gb, 0.5);
        let o = parse(&["--compression", "snappy", "--payload", "random"])
            .options()
            .unwrap();
        assert_eq!(o.workload.compression, Codec::Snappy);
        assert_eq!(o.workload.payload, PayloadKind::Random);
    }
}
