//! Producer, consumer and admin against the in-memory fake broker: the
//! threads, timers, retries and offsets working together.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fake_broker::FakeBroker;
use super::*;
use crate::protocol::{ErrorCode, Flush, TopicSpec};

fn fast() -> ProducerConfig {
    ProducerConfig {
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        ..ProducerConfig::default()
    }
}

fn consumer_cfg(group: &str) -> ConsumerConfig {
    ConsumerConfig {
        max_wait_ms: 50,
        ..ConsumerConfig::new(group)
    }
}

/// Polls until `n` records came or nothing arrives for a while.
fn drain(c: &mut Consumer, n: usize) -> Vec<ConsumedRecord> {
    let mut out = Vec::new();
    let stop = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < stop {
        out.extend(c.poll(Duration::from_millis(200)).unwrap());
    }
    out
}

#[test]
fn produce_then_consume_everything_in_order() {
    let b = FakeBroker::start("t", 3);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    assert_eq!(p.queues(), 3);
    for i in 0..1000 {
        p.send(Message::new(format!("m{i}"))).unwrap();
    }
    let s = p.flush().unwrap();
    assert_eq!(
        s,
        ProduceSummary {
            acked_messages: 1000,
            duplicates: 0
        }
    );
    // Round robin: every queue got a third.
    for q in 0..3 {
        let n = b.values(q).len();
        assert!((333..=334).contains(&n), "queue {q} has {n}");
    }

    let mut c = Consumer::connect(&b.addr, "t", consumer_cfg("g")).unwrap();
    let got = drain(&mut c, 1000);
    assert_eq!(got.len(), 1000);
    let values: BTreeSet<Bytes> = got.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(values.len(), 1000);
    for q in 0..3u32 {
        let offs: Vec<i64> = got
            .iter()
            .filter(|r| r.queue == q)
            .map(|r| r.offset)
            .collect();
        let expect: Vec<i64> = (0..offs.len() as i64).collect();
        assert_eq!(offs, expect, "queue {q}");
    }
    let mut pos = c.positions();
    pos.sort();
    assert_eq!(
        pos.iter().map(|p| p.1).sum::<i64>(),
        1000,
        "positions {pos:?}"
    );
}

#[test]
fn linger_sends_without_flush() {
    let b = FakeBroker::start("t", 1);
    let p = Producer::connect(
        &b.addr,
        "t",
        ProducerConfig {
            linger: Duration::from_millis(20),
            ..fast()
        },
    )
    .unwrap();
    p.send(Message::new("lonely")).unwrap();
    let stop = Instant::now() + Duration::from_secs(5);
    while b.values(0).is_empty() {
        assert!(Instant::now() < stop, "linger never sent the batch");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.values(0)[0].1, "lonely");
}

#[test]
fn key_keeps_messages_on_one_queue() {
    let b = FakeBroker::start("t", 4);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    for i in 0..20 {
        p.send(Message::new(format!("{i}")).with_key("user-1"))
            .unwrap();
    }
    p.flush().unwrap();
    let q = producer::key_queue(b"user-1", 4);
    assert_eq!(b.values(q).len(), 20);
}

#[test]
fn lost_ack_is_retried_and_deduplicated() {
    let b = FakeBroker::start("t", 2);
    let p = Producer::connect(
        &b.addr,
        "t",
        ProducerConfig {
            batch_messages_max: 10,
            ..fast()
        },
    )
    .unwrap();
    // The broker stores the next two batches but hangs up before acking.
    b.state().drop_after_store = 2;
    for i in 0..100 {
        p.send(Message::new(format!("m{i}"))).unwrap();
    }
    let s = p.flush().unwrap();
    assert_eq!(s.acked_messages, 100);
    assert!(s.duplicates >= 10, "{s:?}");
    // Stored exactly once, in order per queue.
    let mut all = Vec::new();
    for q in 0..2 {
        let vals = b.values(q);
        let offs: Vec<i64> = vals.iter().map(|v| v.0).collect();
        assert_eq!(offs, (0..vals.len() as i64).collect::<Vec<_>>());
        all.extend(vals.into_iter().map(|v| v.1));
    }
    assert_eq!(all.len(), 100);
    let unique: BTreeSet<_> = all.into_iter().collect();
    assert_eq!(unique.len(), 100);
}

#[test]
fn unanswered_batch_times_out_and_is_resent_on_a_new_connection() {
    let b = FakeBroker::start("t", 1);
    let p = Producer::connect(
        &b.addr,
        "t",
        ProducerConfig {
            request_timeout: Duration::from_millis(200),
            batch_messages_max: 5,
            ..fast()
        },
    )
    .unwrap();
    b.state().swallow_after_store = 1;
    for i in 0..20 {
        p.send(Message::new(format!("m{i}"))).unwrap();
    }
    let s = p.flush().unwrap();
    assert_eq!(s.acked_messages, 20);
    assert!(s.duplicates >= 5, "{s:?}");
    let offsets: Vec<i64> = b.values(0).iter().map(|v| v.0).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
}

#[test]
fn non_retriable_error_fails_flush_and_producer_recovers() {
    let b = FakeBroker::start("t", 2);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    b.state().reject_queue = Some(1);
    p.send(Message::new("ok").with_queue(0)).unwrap();
    p.send(Message::new("bad").with_queue(1)).unwrap();
    let err = p.flush().unwrap_err();
    assert_eq!(err.broker_code(), Some(ErrorCode::MessageTooLarge));
    assert_eq!(b.values(0).len(), 1);
    // The queue starts over under a fresh producer id and works again.
    b.state().reject_queue = None;
    p.send(Message::new("good").with_queue(1)).unwrap();
    assert_eq!(p.flush().unwrap().acked_messages, 1);
    assert_eq!(b.values(1).len(), 1);
}

#[test]
fn send_batch_is_a_raw_round_trip() {
    let b = FakeBroker::start("t", 1);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    let mut bb = coremq_shards::batch::BatchBuilder::new(Compression::None).producer(5, 0, 0);
    bb.push(1, None, Some(b"x"), &[]);
    let batch = bb.build();
    let r1 = p.send_batch(0, batch.clone()).unwrap();
    let r2 = p.send_batch(0, batch).unwrap();
    assert_eq!(
        r1,
        crate::protocol::Reply::Produce {
            base_offset: 0,
            duplicate: false
        }
    );
    assert_eq!(
        r2,
        crate::protocol::Reply::Produce {
            base_offset: 0,
            duplicate: true
        }
    );
}

#[test]
fn unknown_topic_is_a_broker_error() {
    let b = FakeBroker::start("t", 1);
    let e = Producer::connect(&b.addr, "nope", fast()).unwrap_err();
    assert_eq!(e.broker_code(), Some(ErrorCode::UnknownTopic));
    let e = Consumer::connect(&b.addr, "nope", consumer_cfg("g")).unwrap_err();
    assert_eq!(e.broker_code(), Some(ErrorCode::UnknownTopic));
}

#[test]
fn commit_then_resume_where_the_group_stopped() {
    let b = FakeBroker::start("t", 1);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    for i in 0..10 {
        p.send(Message::new(format!("{i}"))).unwrap();
    }
    p.flush().unwrap();

    let mut c = Consumer::connect(&b.addr, "t", consumer_cfg("g")).unwrap();
    let got = drain(&mut c, 10);
    assert_eq!(got.len(), 10);
    // Pretend only the first four were processed.
    c.seek(0, 4).unwrap();
    c.commit().unwrap();
    assert_eq!(b.state().committed("g", 0), Some(4));

    let mut c2 = Consumer::connect(&b.addr, "t", consumer_cfg("g")).unwrap();
    assert_eq!(c2.positions(), vec![(0, 4)]);
    let rest = drain(&mut c2, 6);
    assert_eq!(rest.first().map(|r| r.offset), Some(4));
    assert_eq!(rest.len(), 6);

    // Another group starting at the end sees nothing old.
    let c3 = Consumer::connect(
        &b.addr,
        "t",
        ConsumerConfig {
            from: StartFrom::Latest,
            ..consumer_cfg("other")
        },
    )
    .unwrap();
    assert_eq!(c3.positions(), vec![(0, 10)]);
}

#[test]
fn position_behind_log_start_is_reset() {
    let b = FakeBroker::start("t", 1);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    for i in 0..10 {
        p.send(Message::new(format!("{i}"))).unwrap();
    }
    p.flush().unwrap();
    let mut c = Consumer::connect(&b.addr, "t", consumer_cfg("g")).unwrap();
    c.seek(0, 2).unwrap();
    b.set_log_start(0, 5);
    let got = drain(&mut c, 5);
    assert_eq!(c.resets(), 1);
    assert_eq!(got.first().map(|r| r.offset), Some(5));
    assert_eq!(got.len(), 5);

    // Past the end: back to the end.
    c.seek(0, 50).unwrap();
    assert!(c.poll(Duration::from_millis(100)).unwrap().is_empty());
    assert_eq!(c.resets(), 2);
    assert_eq!(c.positions(), vec![(0, 10)]);
}

#[test]
fn consumer_reads_only_its_queues() {
    let b = FakeBroker::start("t", 3);
    let p = Producer::connect(&b.addr, "t", fast()).unwrap();
    for i in 0..30 {
        p.send(Message::new(format!("{i}"))).unwrap();
    }
    p.flush().unwrap();
    let mut c = Consumer::connect(
        &b.addr,
        "t",
        ConsumerConfig {
            queues: Some(vec![2]),
            ..consumer_cfg("g")
        },
    )
    .unwrap();
    let got = drain(&mut c, 10);
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|r| r.queue == 2));
    let bad = Consumer::connect(
        &b.addr,
        "t",
        ConsumerConfig {
            queues: Some(vec![3]),
            ..consumer_cfg("g")
        },
    );
    assert!(matches!(bad, Err(ClientError::Config(_))));
}

#[test]
fn admin_round_trips() {
    let b = FakeBroker::start("t", 1);
    let a = Admin::connect(&b.addr).unwrap();
    let info = a
        .create_topic(TopicSpec {
            name: "orders".into(),
            queues: 4,
            flush: Flush::Sync,
            segment_bytes: 0,
            retention_ms: 0,
            retention_bytes: 0,
        })
        .unwrap();
    assert_eq!(info.queues.len(), 4);
    assert_eq!(a.describe_topic("orders").unwrap().spec.flush, Flush::Sync);
    assert_eq!(a.list_topics().unwrap().len(), 1);
    assert_eq!(a.fetch_offset("g", "orders", 0).unwrap(), None);
    a.commit_offset("g", "orders", 0, 7).unwrap();
    assert_eq!(a.fetch_offset("g", "orders", 0).unwrap(), Some(7));
    assert_eq!(a.metadata().unwrap().shards, 2);
    a.delete_topic("orders").unwrap();
    assert_eq!(
        a.describe_topic("orders").unwrap_err().broker_code(),
        Some(ErrorCode::UnknownTopic)
    );
}
