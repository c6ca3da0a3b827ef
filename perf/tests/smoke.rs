//! Smoke test of `coremq-perf run` against a real broker.
//!
//! Starts the debug `coremq` broker (`<target dir>/debug/coremq`, built
//! with `cargo build -p coremq` if it is not there yet) in a temporary data
//! directory on free ports, runs 3-second open-loop workloads (plain, and
//! with zstd-compressed batches) with the perf binary Cargo built for this
//! test, and checks the JSON report: every message sent was acked and
//! consumed, and the latency percentiles are there, with the broker's RSS
//! and CPU and the tool's own CPU (the broker is passed as --broker-pid).
//! It asserts nothing about timing. The broker is stopped (SIGTERM, then
//! SIGKILL) by a guard, also when the test fails.

mod common;

use common::{wait_with_timeout, Run};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Longest wait for the broker to print its listening address.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the broker to exit after SIGTERM before it is killed.
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the broker prints before its address once it accepts connections.
const LISTENING_PREFIX: &str = "listening on ";
/// What follows the shared address on that line.
const LISTENING_SUFFIX: &str = " (every shard)";

/// `<target dir>/debug/coremq`, derived from where Cargo put the perf binary
/// (`<target dir>/<profile>/coremq-perf`); built first if missing.
fn broker_binary() -> PathBuf {
    let perf = Path::new(env!("CARGO_BIN_EXE_coremq-perf"));
    let target_dir = perf
        .parent()
        .and_then(Path::parent)
        .expect("the perf binary lives in <target dir>/<profile>/");
    let broker = target_dir
        .join("debug")
        .join(format!("coremq{}", std::env::consts::EXE_SUFFIX));
    if !broker.exists() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("perf/ is inside the workspace");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let status = Command::new(cargo)
            .args(["build", "-p", "coremq", "--bin", "coremq"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(workspace)
            .status()
            .expect("run cargo build -p coremq");
        assert!(status.success(), "cargo build -p coremq failed: {status}");
        assert!(broker.exists(), "{} still missing", broker.display());
    }
    broker
}

/// A running broker; stopped when dropped, even if the test panicked.
struct Broker {
    child: Child,
    addr: String,
    stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let bin = broker_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr_log = dir.path().join("broker.stderr");
        let stderr = File::create(&stderr_log).expect("broker stderr log");
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--shard-port-base", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads every line (so the pipe never fills) and reports the address.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix(LISTENING_PREFIX) {
                    if let Some(addr) = rest.strip_suffix(LISTENING_SUFFIX) {
                        let _ = tx.send(addr.to_string());
                    }
                }
            }
        });
        // Own the child before waiting, so a timeout still stops it.
        let mut broker = Broker {
            child,
            addr: String::new(),
            stderr_log,
            _dir: dir,
        };
        broker.addr = rx
            .recv_timeout(BROKER_START_TIMEOUT)
            .expect("the broker did not print its listening address");
        broker
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGTERM lets the broker flush and exit cleanly; SIGKILL if it won't.
        let termed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !termed || wait_with_timeout(&mut self.child, BROKER_STOP_TIMEOUT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(&self.stderr_log) {
                eprintln!("--- broker stderr ---\n{log}");
            }
        }
    }
}

/// Runs `coremq-perf run` against `broker` with `args` (3 s, or what the
/// args say) and checks that it passed (`common::run_passing`).
fn run_passing(broker: &Broker, args: &[&str]) -> Run {
    let mut all: Vec<String> = ["--broker", &broker.addr, "--duration-s", "3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(["--broker-pid".to_string(), broker.child.id().to_string()]);
    common::run_passing(&all)
}

#[test]
fn run_reports_every_message_acked_and_consumed() {
    let broker = Broker::start();
    let Run { report, text, .. } = run_passing(
        &broker,
        &["--rate", "2000", "--message-size", "256", "--queues", "2"],
    );
    for key in [
        "publish_msgs_per_s",
        "publish_mb_per_s",
        "consume_msgs_per_s",
        "broker_rss_mb_max",
        "broker_cpu_cores_avg",
        "broker_cpu_cores_max",
        "perf_cpu_cores_avg",
        "compression_ratio",
    ] {
        assert!(report[key].is_f64(), "{key} missing in {text}");
    }
    assert_eq!(report["workload"]["partitionsPerTopic"], 2, "{text}");
    assert_eq!(report["workload"]["messageSize"], 256, "{text}");
    assert_eq!(report["compression"], "none", "{text}");
}

/// Compressed batches go through the broker as they are and consumers
/// decode them (every payload's timestamp read back for the e2e latency).
#[test]
fn compressed_batches_are_consumed() {
    let broker = Broker::start();
    let run = run_passing(
        &broker,
        &[
            "--rate",
            "2000",
            "--compression",
            "zstd",
            "--payload",
            "text",
            "--linger-ms",
            "5",
        ],
    );
    let (report, text) = (&run.report, &run.text);
    assert_eq!(report["compression"], "zstd", "{text}");
    assert_eq!(report["workload"]["payload"], "text", "{text}");
    let stored = report["batch_bytes_sent"]
        .as_u64()
        .expect("batch_bytes_sent");
    assert!(stored > 0, "{text}");
    // Text compresses: the batches are smaller than their payloads.
    let ratio = report["compression_ratio"]
        .as_f64()
        .expect("compression_ratio");
    assert!(ratio > 1.0, "{text}");
    assert_eq!(
        report["e2e_latency_us"]["count"], report["consumed"],
        "every consumed message had its timestamp read\n{}",
        run.context
    );
    assert!(run.stdout.contains("compression zstd"), "{}", run.context);
}

/// A backlog run: consumers start once the backlog is there, catch up
/// while producers go on, and still consume everything.
#[test]
fn backlog_is_built_then_caught_up() {
    let broker = Broker::start();
    // 4 MiB of 1 KiB messages at 5,000 msg/s: about 0.8 s to build.
    let run = run_passing(&broker, &["--rate", "5000", "--backlog-gb", "0.00390625"]);
    let (report, text) = (&run.report, &run.text);
    let backlog = report["backlog_bytes"].as_u64().expect("backlog_bytes");
    assert!(backlog >= 4 << 20, "{text}");
    assert_eq!(report["backlog_bytes_target"], 4 << 20, "{text}");
    assert_eq!(report["catch_up_complete"], true, "{text}");
    for key in ["catch_up_s", "catch_up_mb_per_s", "backlog_build_s"] {
        assert!(report[key].is_f64(), "{key} missing in {text}");
    }
    assert_eq!(report["workload"]["consumerBacklogSizeGB"], 0.00390625);
    assert!(run.stdout.contains("backlog: "), "{}", run.context);
}

/// Many topics: producers share a few threads, one fetcher per shard reads
/// every queue, and every message still arrives.
#[test]
fn many_topics_share_threads() {
    let broker = Broker::start();
    let run = run_passing(
        &broker,
        &[
            "--topics",
            "300",
            "--queues",
            "1",
            "--rate",
            "3000",
            "--message-size",
            "128",
        ],
    );
    let (report, text) = (&run.report, &run.text);
    assert_eq!(report["workload"]["topics"], 300, "{text}");
    assert_eq!(
        report["topics"].as_array().map(Vec::len),
        Some(300),
        "{text}"
    );
}
