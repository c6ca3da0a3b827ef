//! Retention removes old segments; consumers are told where the log now
//! starts and continue from there.

mod common;
use common::*;
use coremq::client::{Consumer, ConsumerConfig, Message, Producer, ProducerConfig, StartFrom};
use coremq::protocol::{Flush, TopicSpec};
use std::time::Duration;

fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|s| std::fs::read_dir(s.unwrap().path().join("log")).ok())
        .flat_map(|d| d.filter(|f| f.as_ref().unwrap().path().extension() == Some("log".as_ref())))
        .count()
}

#[test]
fn size_retention_deletes_segments_and_moves_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(
        dir.path(),
        &["--shards", "1", "--retention-check-ms", "100"],
    );
    b.admin()
        .create_topic(TopicSpec {
            name: "logs".into(),
            queues: 1,
            flush: Flush::Async,
            segment_bytes: 8192,
            retention_ms: 0,
            retention_bytes: 16384,
        })
        .unwrap();
    // A consumer commits offset 0 before the data it points at is deleted.
    b.admin().commit_offset("slow", "logs", 0, 0).unwrap();

    let p = Producer::connect(&b.addr, "logs", ProducerConfig::default()).unwrap();
    for i in 0..400 {
        p.send(Message::new(format!("{i:04}-{}", "x".repeat(200))))
            .unwrap();
        if i % 10 == 9 {
            p.flush().unwrap();
        }
    }
    p.flush().unwrap();
    // 400 messages of ~250 bytes fill about 12 segments of 8 KiB.
    let first_segment = dir
        .path()
        .join("shard-0/log")
        .join(format!("{:020}.log", 0));

    let admin = b.admin();
    assert!(
        eventually(Duration::from_secs(20), || admin
            .describe_topic("logs")
            .unwrap()
            .queues[0]
            .start_offset
            > 0),
        "retention never ran"
    );
    // About 16 KiB per queue is kept: a few 8 KiB segments plus the active one.
    assert!(
        eventually(Duration::from_secs(20), || !first_segment.exists()
            && segments(dir.path()) <= 5),
        "old segments are still there: {}",
        segments(dir.path())
    );
    let start = admin.describe_topic("logs").unwrap().queues[0].start_offset;

    // The slow group's committed offset is gone: it is moved to the new start.
    let mut cfg = ConsumerConfig::new("slow");
    cfg.from = StartFrom::Earliest;
    cfg.max_wait_ms = 100;
    let mut c = Consumer::connect(&b.addr, "logs", cfg).unwrap();
    // Read to the end. Retention may still be finishing its pass, so the
    // start can move once more while we read: the consumer is told again.
    let mut got: Vec<_> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got
        .last()
        .is_none_or(|r: &coremq::client::ConsumedRecord| r.offset < 399)
        && std::time::Instant::now() < deadline
    {
        got.extend(c.poll(Duration::from_millis(500)).unwrap());
    }
    assert_eq!(got.last().map(|r| r.offset), Some(399), "read to the end");
    // What was read is the tail of the log from some start at or after the
    // one observed: dense, no gaps, no duplicates.
    let first = got[0].offset;
    assert_eq!(got.len() as i64, 400 - first);
    assert!(
        c.resets() >= 1,
        "the consumer was not told the log start moved"
    );
    assert!(got[0].offset >= start);
    assert_eq!(got.last().unwrap().offset, 399);
    // Offsets are dense from the new start.
    for w in got.windows(2) {
        assert_eq!(w[1].offset, w[0].offset + 1);
    }
}
