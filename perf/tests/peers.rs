//! Smoke tests of `coremq-perf run --driver nats|rabbitmq` against real
//! peer brokers.
//!
//! Each test starts its broker with the repository's own script
//! (`perf/peers/nats.sh`, `perf/peers/rabbitmq.sh`) in a fresh directory
//! `/tmp/peers-test-*` on free loopback ports, runs a 2-second open-loop
//! workload, and checks the JSON report: every message sent was acked and
//! consumed, and the latency percentiles are there. It asserts nothing
//! about timing. The broker is stopped by the script (also when the test
//! fails). When the broker is not installed the test prints that it is
//! SKIPPED and passes: installing it is the scripts' job (they do when
//! asked to start), not the test's.

mod common;

use common::{wait_with_timeout, Run};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a start or stop script may take (they bound themselves too).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// RabbitMQ's Erlang distribution listens on the stream port plus this
/// (perf/peers/rabbitmq.sh), so both must be free.
const RABBITMQ_DIST_PORT_OFFSET: u16 = 20_000;
/// Ports tried for RabbitMQ: low enough that the distribution port fits.
const RABBITMQ_PORTS: std::ops::Range<u16> = 21_000..45_000;
/// Where Debian installs nats-server (the scripts look there too).
const NATS_SERVER_SBIN: &str = "/usr/sbin/nats-server";
/// Where Debian installs RabbitMQ's own scripts.
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// Whether `program` is an executable file in a directory of PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port the OS says is free right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

/// A free port `p` whose `p + RABBITMQ_DIST_PORT_OFFSET` is free too.
fn free_rabbitmq_port() -> u16 {
    let span = u32::from(RABBITMQ_PORTS.end - RABBITMQ_PORTS.start);
    let start = RABBITMQ_PORTS.start + (std::process::id() % span) as u16;
    (start..RABBITMQ_PORTS.end)
        .chain(RABBITMQ_PORTS.start..start)
        .find(|&p| port_free(p) && port_free(p + RABBITMQ_DIST_PORT_OFFSET))
        .expect("no free port pair for RabbitMQ")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// Runs a peer script to completion; its stdout, or a panic with its output.
fn run_script(script: &Path, args: &[&str], log: &Path) -> String {
    let stderr = File::create(log).expect("script log");
    let out_path = log.with_extension("stdout");
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("script stdout"))
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let status = wait_with_timeout(&mut child, SCRIPT_TIMEOUT);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    match status {
        Some(s) if s.success() => stdout,
        other => panic!(
            "{} {args:?} failed ({other:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            script.display()
        ),
    }
}

/// A running peer broker; stopped (by its script) when dropped.
struct Peer {
    script: PathBuf,
    dir: tempfile::TempDir,
    pid: u32,
    addr: String,
}

impl Peer {
    fn start(script_name: &str, prefix: &str, port: u16) -> Peer {
        let script = script(script_name);
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .expect("temp dir");
        let data = dir.path().join("data");
        let log = dir.path().join("start.log");
        let port_text = port.to_string();
        let t0 = Instant::now();
        // Owned before waiting on anything else, so a failure still stops it.
        let mut peer = Peer {
            script,
            dir,
            pid: 0,
            addr: format!("127.0.0.1:{port}"),
        };
        let out = run_script(
            &peer.script,
            &[
                "start",
                data.to_str().expect("utf-8 path"),
                "--port",
                &port_text,
            ],
            &log,
        );
        peer.pid = out
            .trim()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("{script_name} start printed no PID: {out:?}"));
        eprintln!(
            "{script_name}: started pid {} on {} in {:.1} s",
            peer.pid,
            peer.addr,
            t0.elapsed().as_secs_f64()
        );
        peer
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("stop.log");
        let stopped = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_or(Stdio::null(), Stdio::from))
            .spawn()
            .ok()
            .and_then(|mut c| wait_with_timeout(&mut c, SCRIPT_TIMEOUT));
        if !stopped.is_some_and(|s| s.success()) {
            eprintln!(
                "warning: {} stop {} failed: {}",
                self.script.display(),
                data.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// Runs a 2-second smoke of `driver` against `peer` and checks the report.
fn smoke(driver: &str, peer: &Peer) {
    let t0 = Instant::now();
    let args: Vec<String> = [
        "--driver",
        driver,
        "--broker",
        &peer.addr,
        "--duration-s",
        "2",
        "--rate",
        "2000",
        "--message-size",
        "256",
        "--queues",
        "2",
        "--broker-pid",
        &peer.pid.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let Run {
        report,
        text,
        stdout,
        ..
    } = common::run_passing(&args);
    eprintln!(
        "{driver}: smoke run took {:.1} s\n{stdout}",
        t0.elapsed().as_secs_f64()
    );
    for key in [
        "publish_msgs_per_s",
        "publish_mb_per_s",
        "consume_msgs_per_s",
    ] {
        assert!(report[key].is_f64(), "{key} missing in {text}");
    }
    // --broker-pid works for a peer's process too.
    assert!(report["broker_rss_mb_max"].is_f64(), "{text}");
    assert_eq!(report["workload"]["partitionsPerTopic"], 2, "{text}");
}

#[test]
fn nats_jetstream_smoke() {
    if !on_path("nats-server") && !Path::new(NATS_SERVER_SBIN).is_file() {
        eprintln!(
            "SKIPPED nats_jetstream_smoke: nats-server is not installed \
             (apt-get install nats-server, or perf/peers/nats.sh start DIR installs it)"
        );
        return;
    }
    let peer = Peer::start("nats.sh", "peers-test-nats-", free_port());
    smoke("nats", &peer);
}

#[test]
fn rabbitmq_streams_smoke() {
    if !Path::new(RABBITMQ_BIN).is_file() {
        eprintln!(
            "SKIPPED rabbitmq_streams_smoke: rabbitmq-server is not installed (no {RABBITMQ_BIN}; \
             apt-get install rabbitmq-server, or perf/peers/rabbitmq.sh start DIR installs it)"
        );
        return;
    }
    let peer = Peer::start("rabbitmq.sh", "peers-test-rabbitmq-", free_rabbitmq_port());
    smoke("rabbitmq", &peer);
}
