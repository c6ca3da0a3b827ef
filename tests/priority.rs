//! Priorities end to end against the real broker: a backlog of mixed
//! priorities on one queue, produced interleaved by separate `coremq
//! produce --priority` commands, is pushed to `coremq consume --push`
//! highest priority first, equal priorities in production (offset) order;
//! pull consumers still read it in offset order; priorities above 3 are
//! refused by the CLI and by the broker itself.

mod common;
use common::*;
use coremq::client::ClientError;
use coremq::protocol::{ErrorCode, Flush};

/// Production rounds; each round produces every priority once.
const ROUNDS: usize = 5;
/// Messages per produce command.
const PER_COMMAND: usize = 4;
/// Priorities 0 (lowest) to 3.
const PRIORITIES: [u8; 4] = [0, 1, 2, 3];

#[test]
fn push_delivers_higher_priorities_first_and_keeps_order_within_one() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("tasks", 1, Flush::Async);
    // Interleaved: round r produces PER_COMMAND messages at each priority in turn.
    let mut produced = Vec::new();
    for r in 0..ROUNDS {
        for p in PRIORITIES {
            let lines: Vec<String> = (0..PER_COMMAND).map(|k| format!("p{p}-r{r}-{k}")).collect();
            let stdin: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let (code, _, err) = b.cli(&["produce", "tasks", "--priority", &p.to_string()], &stdin);
            assert_eq!(code, 0, "{err}");
            produced.extend(lines);
        }
    }
    let total = produced.len();

    let count = total.to_string();
    let (code, out, err) = b.cli(
        &[
            "consume",
            "tasks",
            "--group",
            "g",
            "--push",
            "--format",
            "json",
            "--count",
            &count,
            "--timeout-ms",
            "10000",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), total, "{out}");
    let got: Vec<(u8, i64, String)> = rows
        .iter()
        .map(|v| {
            assert_eq!(v["attempt"], 1, "{v}");
            let value = v["value"].as_str().unwrap().to_string();
            let p = value[1..2].parse().unwrap();
            (p, v["offset"].as_i64().unwrap(), value)
        })
        .collect();
    // All 3 before any 2, all 2 before any 1, all 1 before any 0 ...
    let priorities: Vec<u8> = got.iter().map(|g| g.0).collect();
    let mut expect = priorities.clone();
    expect.sort_by(|a, b| b.cmp(a));
    assert_eq!(priorities, expect);
    // ... and within a priority, offset order = production order.
    for p in PRIORITIES {
        let offsets: Vec<i64> = got.iter().filter(|g| g.0 == p).map(|g| g.1).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "p{p}: {offsets:?}");
        let values: Vec<&String> = got.iter().filter(|g| g.0 == p).map(|g| &g.2).collect();
        let in_order: Vec<&String> = produced
            .iter()
            .filter(|v| v.starts_with(&format!("p{p}-")))
            .collect();
        assert_eq!(values, in_order);
    }
    // Offsets never changed: a pull consumer reads production order.
    let pulled: Vec<String> = consume_all(&b.addr, "tasks", "pull", total)
        .iter()
        .map(value)
        .collect();
    assert_eq!(pulled, produced);
}

#[test]
fn priorities_above_three_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("tasks", 1, Flush::Async);
    let (code, _, err) = b.cli(&["produce", "tasks", "--priority", "4"], "x\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--priority: priority must be 0..=3 (0 the lowest), not 4"),
        "{err}"
    );
    let (code, _, err) = b.cli(&["produce", "tasks", "--priority", "-1"], "x\n");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not -1"), "{err}");
    match raw_produce_with(&b.addr, "tasks", 0, 4, 0) {
        Err(ClientError::Broker(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{e}");
            assert!(e.message.contains("priority"), "{e}");
        }
        other => panic!("priority 4 was not refused: {other:?}"),
    }
    assert!(consume_all(&b.addr, "tasks", "g", 1).is_empty());
}
