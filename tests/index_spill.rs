//! A queue's older index chunks live in the shard's spill files, not in
//! memory; consumers far behind the tail read them back. Through the wire:
//! every message of a queue with many more one-message batches than the
//! index keeps in memory reads back in order, from the start and from the
//! middle, before and after a restart (which rebuilds and re-spills the
//! index from the log).

mod common;
use common::*;
use coremq::client::{Consumer, ConsumerConfig, Message, Producer, ProducerConfig, StartFrom};
use coremq::protocol::Flush;
use std::path::Path;
use std::time::{Duration, Instant};

/// One batch each: 128 index entries make a chunk, and a queue keeps two
/// chunks in memory, so most of these are read from the spill.
const MESSAGES: usize = 1000;

fn spill_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("shard-0/index-spill"))
        .map(|files| {
            files
                .map(|f| f.unwrap().metadata().unwrap().len())
                .sum::<u64>()
        })
        .unwrap_or(0)
}

fn values(addr: &str, group: &str) -> Vec<String> {
    consume_all(addr, "t", group, MESSAGES)
        .iter()
        .map(value)
        .collect()
}

/// The values read by a group that starts at `offset`.
fn values_from(addr: &str, group: &str, offset: i64) -> Vec<String> {
    let admin = coremq::client::Admin::connect(addr).unwrap();
    admin.commit_offset(group, "t", 0, offset).unwrap();
    let cfg = ConsumerConfig {
        // A committed offset wins over `from`.
        from: StartFrom::Earliest,
        max_wait_ms: 200,
        ..ConsumerConfig::new(group)
    };
    let mut c = Consumer::connect(addr, "t", cfg).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < MESSAGES - offset as usize && Instant::now() < deadline {
        out.extend(
            c.poll(Duration::from_millis(500))
                .unwrap()
                .iter()
                .map(value),
        );
    }
    out
}

#[test]
fn far_behind_readers_read_spilled_index_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i:04}")).collect();
    {
        let b = Broker::start(dir.path(), &["--shards", "1"]);
        b.create_topic("t", 1, Flush::Async);
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
        for v in &want {
            p.send(Message::new(v.clone())).unwrap();
            p.flush().unwrap();
        }
        p.close().unwrap();
        // 12 bytes per spilled entry; all but the newest two chunks spilled.
        assert!(spill_bytes(dir.path()) >= 12 * (MESSAGES as u64 - 256));
        assert_eq!(values(&b.addr, "from-start"), want);
        assert_eq!(values_from(&b.addr, "mid", 300), want[300..]);
        assert_eq!(b.terminate(), Some(0));
    }
    let b = Broker::start(dir.path(), &["--shards", "1"]);
    assert!(spill_bytes(dir.path()) >= 12 * (MESSAGES as u64 - 256));
    assert_eq!(values(&b.addr, "after-restart"), want);
    assert_eq!(values_from(&b.addr, "mid-after", 517), want[517..]);
}
