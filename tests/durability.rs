//! Sync flush survives `kill -9`: every acknowledged message is there after
//! a restart, none twice, and new offsets continue after them. So does every
//! acknowledged topic change. Clean shutdown on SIGTERM exits 0.

mod common;
use common::*;
use coremq::client::{Message, Producer, ProducerConfig};
use coremq::protocol::Flush;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn acknowledged_sync_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("ledger", 2, Flush::Sync);

    // A producer writes flush by flush; a flush returning Ok means every
    // message up to it was acknowledged. Kill the broker while it writes.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, acked, stop) = (b.addr.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let cfg = ProducerConfig {
                retries: 0,
                request_timeout: Duration::from_secs(5),
                ..ProducerConfig::default()
            };
            let p = Producer::connect(&addr, "ledger", cfg).unwrap();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let round: Vec<String> = (0..50).map(|k| format!("tx-{}", i * 50 + k)).collect();
                for v in &round {
                    if p.send(Message::new(v.clone())).is_err() {
                        return;
                    }
                }
                if p.flush().is_err() {
                    return;
                }
                acked.lock().unwrap().extend(round);
                i += 1;
            }
        })
    };
    assert!(eventually(Duration::from_secs(60), || acked
        .lock()
        .unwrap()
        .len()
        >= 2_000));
    b.kill9();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acked: Vec<String> = acked.lock().unwrap().clone();

    let b = Broker::start(dir.path(), &[]);
    let got = consume_all(&b.addr, "ledger", "audit", acked.len());
    let values: Vec<String> = got.iter().map(value).collect();
    let unique: HashSet<&String> = values.iter().collect();
    assert_eq!(unique.len(), values.len(), "a message is stored twice");
    for v in &acked {
        assert!(unique.contains(v), "acknowledged {v} was lost");
    }
    // New offsets continue after the recovered ones.
    let info = b.admin().describe_topic("ledger").unwrap();
    let ends: Vec<i64> = info.queues.iter().map(|q| q.end_offset).collect();
    let p = Producer::connect(&b.addr, "ledger", ProducerConfig::default()).unwrap();
    p.send(Message::new("after-restart").with_queue(0)).unwrap();
    p.flush().unwrap();
    let again = consume_all(&b.addr, "ledger", "audit2", values.len() + 1);
    let after = again.iter().find(|r| value(r) == "after-restart").unwrap();
    assert_eq!(after.offset, ends[0]);
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("t", 1, Flush::Async);
    let input: String = (0..1000).map(|i| format!("{i}\n")).collect();
    let (code, _, err) = b.cli(&["produce", "t"], &input);
    assert_eq!(code, 0, "{err}");
    assert_eq!(b.terminate(), Some(0));
    // Async-flush data acknowledged before a clean stop is all there.
    let b = Broker::start(dir.path(), &[]);
    assert_eq!(consume_all(&b.addr, "t", "g", 1000).len(), 1000);
}

#[test]
fn acknowledged_topic_changes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    // Creates, deletes, a grow and a re-create, each acknowledged, all still
    // only in the metadata journal (the snapshot is compacted at start).
    let admin = b.admin();
    for i in 0..200 {
        b.create_topic(&format!("t{i:03}"), 1, Flush::Async);
    }
    for i in (0..200).step_by(2) {
        admin.delete_topic(&format!("t{i:03}")).unwrap();
    }
    admin.alter_topic("t001", 3).unwrap();
    b.create_topic("t000", 2, Flush::Sync);
    b.kill9();

    let b = Broker::start(dir.path(), &[]);
    let topics = b.admin().list_topics().unwrap();
    let names: Vec<&str> = topics.iter().map(|t| t.spec.name.as_str()).collect();
    let mut expected: Vec<String> = (1..200).step_by(2).map(|i| format!("t{i:03}")).collect();
    expected.insert(0, "t000".into());
    assert_eq!(names, expected);
    let recreated = &topics[0];
    assert_eq!(
        (recreated.id, recreated.queues.len()),
        (200, 2),
        "ids are not reused"
    );
    assert_eq!(topics[1].queues.len(), 3, "the grown topic kept its queues");
}
