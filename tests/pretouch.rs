//! `--pretouch-bytes`: the broker touches that much memory before it
//! listens and keeps it, and refuses an amount the machine cannot hold.

mod common;

use common::{bin, Broker};
use std::process::Command;
use std::time::{Duration, Instant};

/// Resident memory of process `pid`, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

const TOUCHED: u64 = 96 << 20;

#[test]
fn a_broker_keeps_the_memory_it_pre_touched() {
    let dir = tempfile::tempdir().unwrap();
    let touched = Broker::start(
        &dir.path().join("a"),
        &["--pretouch-bytes", &TOUCHED.to_string()],
    );
    // Logged before it listens; the log is read by another thread.
    let logged = Instant::now();
    while !touched.stderr_text().contains("memory pre-touched") {
        assert!(
            logged.elapsed() < Duration::from_secs(10),
            "{}",
            touched.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let with = rss_bytes(touched.pid());
    let plain = Broker::start(&dir.path().join("b"), &["--pretouch-bytes", "0"]);
    let without = rss_bytes(plain.pid());
    // The second shows the first's memory is the pre-touch, not the broker's own.
    assert!(without < TOUCHED, "an idle broker holds {without} bytes");
    assert!(with >= TOUCHED, "pre-touched {TOUCHED} but holds {with}");
}

#[test]
fn more_than_half_the_memory_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--pretouch-bytes", &(u64::MAX / 2).to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pretouch-bytes"), "{err}");
    assert!(
        err.contains("half of the memory this process may use"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing created");
}
