//! Helpers for the multi-process tests: start the real `coremq` binary on
//! free loopback ports in a temporary data directory, talk to it, kill it.
//! Every broker is killed when its handle drops, so a failing test never
//! leaves a process behind.
#![allow(dead_code)]

use coremq::client::{Admin, ConsumedRecord, Consumer, ConsumerConfig, StartFrom};
use coremq::protocol::{Flush, TopicSpec};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a broker may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_coremq")
}

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    pub shard_addrs: Vec<String>,
    pub data_dir: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Broker {
    /// Starts a broker on `data_dir` with free ports and `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Broker {
        // Pre-touching memory only makes a start slower here (tests/pretouch.rs tests it).
        let pretouch: &[&str] = if extra.contains(&"--pretouch-bytes") {
            &[]
        } else {
            &["--pretouch-bytes", "0"]
        };
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--shard-port-base", "0"])
            .args(pretouch)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start coremq serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                eprint!("[broker] {text}");
                sink.lock().unwrap().push_str(&text);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut shards = None;
        let mut addr = None;
        let mut shard_addrs = Vec::new();
        let mut broker = Broker {
            child: Some(child),
            addr: String::new(),
            shard_addrs: Vec::new(),
            data_dir: data_dir.to_path_buf(),
            stderr,
        };
        // "coremq V serving DIR with N shards", "listening on ADDR (every
        // shard)", then one "shard I on cpu C listening on ADDR" per shard.
        while shards.is_none_or(|n| shard_addrs.len() < n) || addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("broker did not start; stderr:\n{}", broker.stderr_text());
            };
            if let Some(n) = line.strip_suffix(" shards") {
                shards = n.rsplit(' ').next().and_then(|n| n.parse::<usize>().ok());
            } else if let Some(rest) = line.strip_prefix("listening on ") {
                addr = rest.split_whitespace().next().map(str::to_string);
            } else if line.starts_with("shard ") {
                shard_addrs.push(line.rsplit(' ').next().unwrap().to_string());
            }
        }
        broker.addr = addr.expect("listening line");
        broker.shard_addrs = shard_addrs;
        broker
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let mut c = self.child.take().unwrap();
        unsafe_kill(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("broker did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin(&self) -> Admin {
        Admin::connect(&self.addr).expect("connect admin")
    }

    pub fn create_topic(&self, name: &str, queues: u32, flush: Flush) {
        self.admin()
            .create_topic(TopicSpec {
                name: name.into(),
                queues,
                flush,
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: 0,
            })
            .expect("create topic");
    }

    /// Runs the CLI against this broker with `stdin`; returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        cli(&self.addr, args, stdin)
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn cli(broker: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .args(["--broker", broker])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coremq");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Reads every message of `topic` from the start with a fresh group, until
/// `expected` messages arrived or nothing came for a while.
pub fn consume_all(addr: &str, topic: &str, group: &str, expected: usize) -> Vec<ConsumedRecord> {
    let mut cfg = ConsumerConfig::new(group);
    cfg.from = StartFrom::Earliest;
    cfg.max_wait_ms = 200;
    let mut c = Consumer::connect(addr, topic, cfg).expect("connect consumer");
    let mut out = Vec::new();
    let mut idle_since = Instant::now();
    while out.len() < expected && idle_since.elapsed() < Duration::from_secs(5) {
        let got = c.poll(Duration::from_millis(500)).expect("poll");
        if !got.is_empty() {
            idle_since = Instant::now();
        }
        out.extend(got);
    }
    out
}

pub fn value(r: &ConsumedRecord) -> String {
    String::from_utf8(r.value.as_ref().unwrap().to_vec()).unwrap()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The JSON lines of `coremq consume --format json` output.
pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Sends one raw `ProduceWith` (Produce v2) of a one-record batch, bypassing
/// every client-side check, and returns the broker's answer.
pub fn raw_produce_with(
    addr: &str,
    topic: &str,
    queue: u32,
    priority: u8,
    delay_ms: i64,
) -> Result<coremq::protocol::Reply, coremq::client::ClientError> {
    use coremq::client::{Compression, Connection, Timeouts};
    let mut b = coremq_shards::batch::BatchBuilder::new(Compression::None);
    b.push(0, None, Some(b"raw"), &[]);
    let conn = Connection::connect(addr, Timeouts::default())?;
    conn.call(&coremq::protocol::Request::ProduceWith {
        topic: topic.to_string(),
        queue,
        options: coremq::protocol::messages::ProduceOptions { priority, delay_ms },
        batch: b.build(),
    })
}

/// The committed offset and lag of `group` on `queue`, as `group describe` shows them.
pub fn group_progress(addr: &str, group: &str, queue: u32) -> Option<(i64, i64)> {
    let admin = Admin::connect(addr).ok()?;
    let info = admin.describe_group(group).ok()?;
    info.offsets
        .iter()
        .find(|o| o.queue == queue && o.member_id.is_empty())
        .map(|o| (o.committed, o.lag))
}
