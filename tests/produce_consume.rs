//! 100,000 messages over 4 queues through the CLI, consumed back: every
//! message exactly once, in order within each queue; the group continues
//! where it stopped.

mod common;
use common::*;
use std::collections::BTreeMap;

const MESSAGES: usize = 100_000;
const QUEUES: usize = 4;

#[test]
fn hundred_thousand_messages_round_trip_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    let (code, _, err) = b.cli(&["topic", "create", "events", "--queues", "4"], "");
    assert_eq!(code, 0, "{err}");
    let input: String = (0..MESSAGES).map(|i| format!("m-{i}\n")).collect();
    let (code, _, err) = b.cli(&["produce", "events"], &input);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("produced {MESSAGES} messages")),
        "{err}"
    );

    // The describe output shows every queue's end offset.
    let (code, out, _) = b.cli(&["topic", "describe", "events"], "");
    assert_eq!(code, 0);
    assert!(out.contains(&format!("{}", MESSAGES / QUEUES)), "{out}");

    // Consume in two runs of one group: the second continues where the first stopped.
    let first = 30_000;
    let (code, out1, err) = b.cli(
        &[
            "consume",
            "events",
            "--group",
            "g",
            "--count",
            &first.to_string(),
            "--format",
            "json",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let (code, out2, err) = b.cli(
        &[
            "consume",
            "events",
            "--group",
            "g",
            "--format",
            "json",
            "--timeout-ms",
            "2000",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out1
        .lines()
        .chain(out2.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out1.lines().count(), first);
    assert_eq!(rows.len(), MESSAGES, "every message exactly once");

    let mut per_queue: BTreeMap<u64, Vec<(i64, usize)>> = BTreeMap::new();
    let mut seen = vec![false; MESSAGES];
    for r in &rows {
        let v = r["value"].as_str().unwrap();
        let i: usize = v.strip_prefix("m-").unwrap().parse().unwrap();
        assert!(!seen[i], "message {i} twice");
        seen[i] = true;
        per_queue
            .entry(r["queue"].as_u64().unwrap())
            .or_default()
            .push((r["offset"].as_i64().unwrap(), i));
    }
    assert!(seen.iter().all(|s| *s));
    assert_eq!(per_queue.len(), QUEUES, "round robin uses every queue");
    for (q, mut msgs) in per_queue {
        msgs.sort();
        // Offsets are dense from 0 and stdin order is kept within the queue.
        for (n, (offset, _)) in msgs.iter().enumerate() {
            assert_eq!(*offset, n as i64, "queue {q}");
        }
        assert!(
            msgs.windows(2).all(|w| w[0].1 < w[1].1),
            "queue {q} out of order"
        );
    }

    // Nothing is left for the group.
    let (code, out3, _) = b.cli(
        &["consume", "events", "--group", "g", "--timeout-ms", "500"],
        "",
    );
    assert_eq!(code, 0);
    assert_eq!(out3.lines().count(), 0);
}
