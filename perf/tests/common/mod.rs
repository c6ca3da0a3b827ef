//! What the perf crate's integration tests share: waiting for a child with
//! a deadline, and running `coremq-perf run` to a checked, passing report.

use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Longest a `coremq-perf run` of a few seconds may take, setup included.
pub const PERF_RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a wait checks whether a child has exited.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// Waits for `child` to exit, killing it after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(EXIT_POLL);
    }
}

/// A finished run: its JSON report (parsed and as text) and its output.
#[allow(dead_code)] // each test binary uses its own part
pub struct Run {
    pub report: serde_json::Value,
    pub text: String,
    pub stdout: String,
    pub context: String,
}

/// Runs `coremq-perf run ARGS --json FILE` and checks that it passed:
/// exit 0, sent == acked == consumed > 0, no errors, every percentile key
/// there, "result: PASS" in the summary.
pub fn run_passing(args: &[String]) -> Run {
    let out = tempfile::tempdir().expect("temp dir");
    let json = out.path().join("report.json");
    let stdout_log = out.path().join("perf.stdout");
    let stderr_log = out.path().join("perf.stderr");
    let mut perf = Command::new(env!("CARGO_BIN_EXE_coremq-perf"))
        .arg("run")
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_log).expect("perf stdout log"))
        .stderr(File::create(&stderr_log).expect("perf stderr log"))
        .spawn()
        .expect("start coremq-perf");
    let status = wait_with_timeout(&mut perf, PERF_RUN_TIMEOUT);
    let stdout = std::fs::read_to_string(&stdout_log).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let status = status.unwrap_or_else(|| panic!("coremq-perf did not finish\n{context}"));
    assert!(status.success(), "coremq-perf failed: {status}\n{context}");

    let text =
        std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("no JSON report: {e}\n{context}"));
    let report: serde_json::Value = serde_json::from_str(&text).expect("report is JSON");
    let count = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing or not a count in {text}"))
    };
    let (sent, acked, consumed) = (count("sent"), count("acked"), count("consumed"));
    assert!(sent > 0, "{text}");
    assert_eq!(sent, acked, "{text}");
    assert_eq!(acked, consumed, "{text}");
    assert_eq!(count("errors"), 0, "{text}");
    for hist in ["publish_latency_us", "e2e_latency_us"] {
        for p in ["p50", "p99", "p999", "p9999", "max"] {
            assert!(report[hist][p].is_u64(), "{hist}.{p} missing in {text}");
        }
    }
    assert!(stdout.contains("result: PASS"), "{context}");
    Run {
        report,
        text,
        stdout,
        context,
    }
}
