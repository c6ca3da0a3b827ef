//! Push delivery end to end: `coremq consume --push` processes against a
//! real broker. An unacknowledged message comes back after its ack timeout
//! with its attempt raised, to another process of the group; messages
//! rejected on every delivery land in `<group>-dlq` after `--max-attempts`
//! (and only those), with headers naming their origin; and messages out at
//! a `kill -9` of the broker come back after the restart with their attempt
//! counts kept.
//!
//! Every wait is bounded and every broker is killed when its handle drops.

mod common;
use common::*;
use coremq::protocol::Flush;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long any one condition may take to hold.
const WAIT: Duration = Duration::from_secs(30);

/// (value, offset, attempt) of each printed message, in print order.
fn deliveries(stdout: &str) -> Vec<(String, i64, u64)> {
    json_lines(stdout)
        .iter()
        .map(|v| {
            (
                v["value"].as_str().expect("value").to_string(),
                v["offset"].as_i64().expect("offset"),
                v["attempt"].as_u64().expect("attempt"),
            )
        })
        .collect()
}

fn push_consume(b: &Broker, topic: &str, group: &str, extra: &[&str]) -> Vec<(String, i64, u64)> {
    let mut args = vec![
        "consume", topic, "--group", group, "--push", "--format", "json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = b.cli(&args, "");
    assert_eq!(code, 0, "consume {extra:?} failed: {err}");
    deliveries(&out)
}

#[test]
fn unacked_message_comes_back_after_the_ack_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("jobs", 1, Flush::Sync);
    let (code, _, err) = b.cli(&["produce", "jobs"], "job-1\n");
    assert_eq!(code, 0, "{err}");

    // Printed, never acknowledged.
    let first = push_consume(
        &b,
        "jobs",
        "workers",
        &["--no-ack", "--count", "1", "--ack-timeout-ms", "500"],
    );
    assert_eq!(first, vec![("job-1".to_string(), 0, 1)]);

    // Another process of the group gets it again once the 500 ms pass (the
    // deadline was set by the first delivery; this one allows 30 s, so a
    // slow machine cannot expire it again before it is acknowledged).
    let second = push_consume(
        &b,
        "jobs",
        "workers",
        &[
            "--count",
            "1",
            "--ack-timeout-ms",
            "30000",
            "--timeout-ms",
            "15000",
        ],
    );
    assert_eq!(second, vec![("job-1".to_string(), 0, 2)]);

    // It was acknowledged: nothing is left for the group.
    let third = push_consume(
        &b,
        "jobs",
        "workers",
        &["--ack-timeout-ms", "30000", "--timeout-ms", "1500"],
    );
    assert!(third.is_empty(), "{third:?}");
    assert!(
        eventually(WAIT, || group_progress(&b.addr, "workers", 0)
            == Some((1, 0))),
        "committed offset and lag: {:?}",
        group_progress(&b.addr, "workers", 0)
    );
    let (code, out, err) = b.cli(&["group", "describe", "workers"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("workers"), "{out}");
}

#[test]
fn messages_rejected_every_time_are_dead_lettered_and_only_those() {
    const MESSAGES: usize = 10;
    const MAX_ATTEMPTS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("orders", 1, Flush::Sync);
    let input: String = (0..MESSAGES).map(|i| format!("o{i}\n")).collect();
    let (code, _, err) = b.cli(&["produce", "orders"], &input);
    assert_eq!(code, 0, "{err}");

    let printed = push_consume(
        &b,
        "orders",
        "billing",
        &[
            "--nack-every",
            "2",
            "--max-attempts",
            &MAX_ATTEMPTS.to_string(),
            "--timeout-ms",
            "3000",
        ],
    );
    // The k-th printed message (1-based) was rejected iff k is even.
    let mut history: BTreeMap<String, (i64, Vec<(u64, bool)>)> = BTreeMap::new();
    for (k, (value, offset, attempt)) in printed.iter().enumerate() {
        let nacked = (k + 1) % 2 == 0;
        let h = history
            .entry(value.clone())
            .or_insert_with(|| (*offset, Vec::new()));
        assert_eq!(h.0, *offset, "a message keeps its offset");
        h.1.push((*attempt, nacked));
    }
    assert_eq!(history.len(), MESSAGES, "every message was delivered");
    let mut expect_dead = BTreeMap::new();
    for (value, (offset, tries)) in &history {
        let attempts: Vec<u64> = tries.iter().map(|t| t.0).collect();
        assert_eq!(
            attempts,
            (1..=tries.len() as u64).collect::<Vec<_>>(),
            "{value}: attempts count up"
        );
        let all_nacked = tries.iter().all(|t| t.1);
        if all_nacked {
            assert_eq!(tries.len() as u64, MAX_ATTEMPTS, "{value}: {tries:?}");
            expect_dead.insert(value.clone(), *offset);
        } else {
            // Delivered until acknowledged, then never again.
            assert!(!tries.last().unwrap().1, "{value}: {tries:?}");
        }
    }
    assert!(
        !expect_dead.is_empty(),
        "some message was rejected every time"
    );

    // The dead-letter topic is a normal topic: listed, and readable by pull.
    let (code, out, err) = b.cli(&["topic", "list"], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("billing-dlq ")),
        "topic list:\n{out}"
    );
    let dead = consume_all(&b.addr, "billing-dlq", "inspect", expect_dead.len() + 1);
    let got: BTreeMap<String, i64> = dead
        .iter()
        .map(|r| {
            let header = |name: &str| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.as_ref())
                    .map(|v| String::from_utf8(v.to_vec()).unwrap())
                    .unwrap_or_else(|| panic!("{name} missing on {r:?}"))
            };
            assert_eq!(header("coremq-dlq-topic"), "orders");
            assert_eq!(header("coremq-dlq-queue"), "0");
            assert_eq!(header("coremq-dlq-attempts"), MAX_ATTEMPTS.to_string());
            (value(r), header("coremq-dlq-offset").parse().unwrap())
        })
        .collect();
    assert_eq!(dead.len(), got.len(), "each dead message once");
    assert_eq!(got, expect_dead);

    // The group is done with the topic: everything settled.
    assert!(
        eventually(WAIT, || group_progress(&b.addr, "billing", 0)
            == Some((MESSAGES as i64, 0))),
        "{:?}",
        group_progress(&b.addr, "billing", 0)
    );
}

#[test]
fn in_flight_messages_survive_a_broker_crash() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("jobs", 1, Flush::Sync);
    let (code, _, err) = b.cli(&["produce", "jobs"], "survivor\n");
    assert_eq!(code, 0, "{err}");
    let first = push_consume(
        &b,
        "jobs",
        "workers",
        &["--no-ack", "--count", "1", "--ack-timeout-ms", "600000"],
    );
    assert_eq!(first, vec![("survivor".to_string(), 0, 1)]);
    // The broker saves delivery state every 100 ms; give it a few saves.
    std::thread::sleep(Duration::from_millis(500));
    b.kill9();

    let b = Broker::start(dir.path(), &[]);
    // Out at the crash, with a 10-minute ack timeout: it comes back at once
    // (not stuck until the timeout), as a redelivery (not lost, not new).
    let again = push_consume(
        &b,
        "jobs",
        "workers",
        &["--count", "1", "--timeout-ms", "15000"],
    );
    assert_eq!(again.len(), 1, "{again:?}");
    let (value, offset, attempt) = &again[0];
    assert_eq!((value.as_str(), *offset), ("survivor", 0));
    assert!(*attempt >= 2, "attempt {attempt}");
    // Acknowledged: the group is done.
    let rest = push_consume(&b, "jobs", "workers", &["--timeout-ms", "1500"]);
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        eventually(WAIT, || group_progress(&b.addr, "workers", 0)
            == Some((1, 0))),
        "{:?}",
        group_progress(&b.addr, "workers", 0)
    );
}
