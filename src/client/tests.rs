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

/// A producer on topic "t" of `b`.
fn producer(b: &FakeBroker, config: ProducerConfig) -> Producer {
    Producer::connect(&b.addr, "t", config).unwrap()
}

/// Sends `n` messages "{prefix}0", "{prefix}1", ...
fn send_numbered(p: &Producer, prefix: &str, n: usize) {
    for i in 0..n {
        p.send(Message::new(format!("{prefix}{i}"))).unwrap();
    }
}

fn consumer_cfg(group: &str) -> ConsumerConfig {
    ConsumerConfig {
        max_wait_ms: 50,
        ..ConsumerConfig::new(group)
    }
}

/// A consumer of topic "t" of `b`.
fn consumer(b: &FakeBroker, config: ConsumerConfig) -> Consumer {
    Consumer::connect(&b.addr, "t", config).unwrap()
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
    let p = producer(&b, fast());
    assert_eq!(p.queues(), 3);
    send_numbered(&p, "m", 1000);
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

    let mut c = consumer(&b, consumer_cfg("g"));
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
fn unknown_shard_ports_fall_back_to_the_shared_address() {
    // The fake broker reports shard_port 0 for every queue: shard-aware
    // clients (the default) must send everything to the shared address.
    let b = FakeBroker::start("t", 2);
    let p = producer(&b, fast());
    assert!(fast().shard_aware);
    send_numbered(&p, "m", 100);
    assert_eq!(p.flush().unwrap().acked_messages, 100);
    assert!(p.shard_ports_in_use().is_empty());
    let mut c = consumer(&b, consumer_cfg("g"));
    assert_eq!(drain(&mut c, 100).len(), 100);
    assert!(c.shard_ports_in_use().is_empty());
}

#[test]
fn linger_sends_without_flush() {
    let b = FakeBroker::start("t", 1);
    let p = producer(
        &b,
        ProducerConfig {
            linger: Duration::from_millis(20),
            ..fast()
        },
    );
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
    let p = producer(&b, fast());
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
    let p = producer(
        &b,
        ProducerConfig {
            batch_messages_max: 10,
            ..fast()
        },
    );
    // The broker stores the next two batches but hangs up before acking.
    b.state().drop_after_store = 2;
    send_numbered(&p, "m", 100);
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
    let p = producer(
        &b,
        ProducerConfig {
            request_timeout: Duration::from_millis(200),
            batch_messages_max: 5,
            ..fast()
        },
    );
    b.state().swallow_after_store = 1;
    send_numbered(&p, "m", 20);
    let s = p.flush().unwrap();
    assert_eq!(s.acked_messages, 20);
    assert!(s.duplicates >= 5, "{s:?}");
    let offsets: Vec<i64> = b.values(0).iter().map(|v| v.0).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
}

#[test]
fn non_retriable_error_fails_flush_and_producer_recovers() {
    let b = FakeBroker::start("t", 2);
    let p = producer(&b, fast());
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
    let p = producer(&b, fast());
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
    let p = producer(&b, fast());
    send_numbered(&p, "", 10);
    p.flush().unwrap();

    let mut c = consumer(&b, consumer_cfg("g"));
    let got = drain(&mut c, 10);
    assert_eq!(got.len(), 10);
    // Pretend only the first four were processed.
    c.seek(0, 4).unwrap();
    c.commit().unwrap();
    assert_eq!(b.state().committed("g", 0), Some(4));

    let mut c2 = consumer(&b, consumer_cfg("g"));
    assert_eq!(c2.positions(), vec![(0, 4)]);
    let rest = drain(&mut c2, 6);
    assert_eq!(rest.first().map(|r| r.offset), Some(4));
    assert_eq!(rest.len(), 6);

    // Another group starting at the end sees nothing old.
    let c3 = consumer(
        &b,
        ConsumerConfig {
            from: StartFrom::Latest,
            ..consumer_cfg("other")
        },
    );
    assert_eq!(c3.positions(), vec![(0, 10)]);
}

#[test]
fn position_behind_log_start_is_reset() {
    let b = FakeBroker::start("t", 1);
    let p = producer(&b, fast());
    send_numbered(&p, "", 10);
    p.flush().unwrap();
    let mut c = consumer(&b, consumer_cfg("g"));
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
    let p = producer(&b, fast());
    send_numbered(&p, "", 30);
    p.flush().unwrap();
    let mut c = consumer(
        &b,
        ConsumerConfig {
            queues: Some(vec![2]),
            ..consumer_cfg("g")
        },
    );
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

fn group_cfg(group: &str, session_ms: u64) -> GroupConfig {
    GroupConfig {
        consumer: consumer_cfg(group),
        session_timeout: Duration::from_millis(session_ms),
        ..GroupConfig::new(group)
    }
}

/// Polls `m` until `done` holds (or fails after a generous while); returns
/// the records polled meanwhile.
fn poll_until(
    m: &mut GroupConsumer,
    mut done: impl FnMut(&GroupConsumer) -> bool,
) -> Vec<ConsumedRecord> {
    let stop = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while !done(m) {
        assert!(Instant::now() < stop, "condition never held: {m:?}");
        out.extend(m.poll(Duration::from_millis(50)).unwrap());
    }
    out
}

fn produce_n(addr: &str, n: usize) {
    let p = Producer::connect(addr, "t", fast()).unwrap();
    send_numbered(&p, "m", n);
    p.flush().unwrap();
}

#[test]
fn assign_adds_and_drops_queues() {
    let b = FakeBroker::start("t", 3);
    produce_n(&b.addr, 30);
    let mut c = consumer(
        &b,
        ConsumerConfig {
            queues: Some(vec![0]),
            ..consumer_cfg("g")
        },
    );
    assert_eq!(drain(&mut c, 10).len(), 10);
    c.commit().unwrap();
    // A fetch of queue 0 is in flight now; dropping the queue ignores its reply.
    c.poll(Duration::from_millis(1)).unwrap();
    c.assign(vec![2, 1, 2]).unwrap();
    assert_eq!(c.queues(), vec![1, 2]);
    assert_eq!(c.positions(), vec![(1, 0), (2, 0)]);
    let got = drain(&mut c, 20);
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|r| r.queue != 0));
    // Queue 0 comes back at the group's committed offset: nothing new there.
    c.assign(vec![0]).unwrap();
    assert_eq!(c.positions(), vec![(0, 10)]);
    assert!(c.poll(Duration::from_millis(100)).unwrap().is_empty());
    // A queue the topic does not have is refused and nothing changes.
    assert!(matches!(c.assign(vec![0, 5]), Err(ClientError::Config(_))));
    assert_eq!(c.queues(), vec![0]);
    // After the topic grows, its new queue can be assigned.
    Admin::connect(&b.addr)
        .unwrap()
        .alter_topic("t", 6)
        .unwrap();
    c.assign(vec![5]).unwrap();
    assert_eq!(c.positions(), vec![(5, 0)]);
    c.assign(Vec::new()).unwrap();
    assert!(c.poll(Duration::from_millis(50)).unwrap().is_empty());
    c.commit().unwrap();
}

#[test]
fn admin_group_round_trips() {
    let b = FakeBroker::start("t", 2);
    let a = Admin::connect(&b.addr).unwrap();
    let join = crate::protocol::JoinGroup {
        group: "g".into(),
        topic: "t".into(),
        member_id: "m1".into(),
        strategy: Strategy::Averagely,
        broadcast: false,
        session_timeout_ms: 10_000,
    };
    let first = a.join_group(join.clone()).unwrap();
    assert_eq!(
        (
            first.member_id.as_str(),
            first.generation,
            first.queues.clone()
        ),
        ("m1", 1, vec![0, 1])
    );
    assert_eq!(first.offsets_group, "g");
    let hb = a.heartbeat("g", "m1").unwrap();
    assert_eq!(hb, first);
    // The topic grows: the next heartbeat is a new generation.
    let grown = a.alter_topic("t", 3).unwrap();
    assert_eq!(grown.queues.len(), 3);
    let hb = a.heartbeat("g", "m1").unwrap();
    assert_eq!((hb.generation, hb.queues), (2, vec![0, 1, 2]));
    let d = a.describe_group("g").unwrap();
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.members[0].queues, vec![0, 1, 2]);
    assert_eq!(a.list_groups().unwrap(), vec!["g".to_string()]);
    let mut other = join;
    other.member_id = "m2".into();
    other.strategy = Strategy::AveragelyByCircle;
    assert_eq!(
        a.join_group(other).unwrap_err().broker_code(),
        Some(ErrorCode::InconsistentGroup)
    );
    a.leave_group("g", "m1").unwrap();
    assert_eq!(
        a.heartbeat("g", "m1").unwrap_err().broker_code(),
        Some(ErrorCode::UnknownMember)
    );
    assert_eq!(
        a.describe_group("g").unwrap_err().broker_code(),
        Some(ErrorCode::UnknownMember)
    );
}

#[test]
fn group_members_split_queues_and_take_over_on_leave() {
    let b = FakeBroker::start("t", 4);
    produce_n(&b.addr, 40);
    let mut m1 = GroupConsumer::connect(&b.addr, "t", group_cfg("g", 600)).unwrap();
    assert_eq!(m1.assignment(), &[0, 1, 2, 3]);
    let first = m1.take_assignment_changes();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (
            first[0].added.clone(),
            first[0].members,
            first[0].topic_queues
        ),
        (vec![0, 1, 2, 3], 1, 4)
    );
    // m1 reads (and commits) a little before m2 joins.
    let mut got = m1.poll(Duration::from_secs(5)).unwrap();
    assert!(!got.is_empty());
    m1.commit().unwrap();

    let mut m2 = GroupConsumer::connect(&b.addr, "t", group_cfg("g", 600)).unwrap();
    assert_eq!(m2.assignment(), &[2, 3]);
    // m1 learns of the rebalance on a heartbeat; it commits what it is losing.
    let generation = m2.generation();
    got.extend(poll_until(&mut m1, |m| m.generation() == generation));
    assert_eq!(m1.assignment(), &[0, 1]);
    assert_eq!(m1.members(), 2);
    let change = m1.take_assignment_changes().pop().unwrap();
    assert_eq!(change.revoked, vec![2, 3]);
    assert!(change.added.is_empty());

    // Together they read everything at least once; each only its own queues now.
    let mut seen: BTreeSet<Bytes> = got.iter().map(|r| r.value.clone().unwrap()).collect();
    // (m2 started its queues at the commit m1 had made before the
    // rebalance, so it may read again what m1 read of them since.)
    let stop = Instant::now() + Duration::from_secs(10);
    let mut quiet_rounds = 0;
    while quiet_rounds < 3 && Instant::now() < stop {
        quiet_rounds += 1;
        for (m, mine) in [(&mut m1, [0, 1]), (&mut m2, [2, 3])] {
            for r in m.poll(Duration::from_millis(50)).unwrap() {
                assert!(mine.contains(&r.queue), "{r:?}");
                seen.insert(r.value.unwrap());
                quiet_rounds = 0;
            }
            m.commit().unwrap();
        }
    }
    assert_eq!(seen.len(), 40);

    // m2 leaves: m1 takes its queues back from m2's commits (nothing left).
    m2.close().unwrap();
    poll_until(&mut m1, |m| m.assignment().len() == 4);
    assert_eq!(m1.members(), 1);
    let late = m1.poll(Duration::from_millis(200)).unwrap();
    assert!(late.is_empty(), "{late:?} {:?}", m1.positions());
    m1.close().unwrap();
    assert_eq!(
        Admin::connect(&b.addr).unwrap().list_groups().unwrap(),
        vec!["g".to_string()],
        "offsets stay after the last member leaves"
    );
}

#[test]
fn forgotten_member_rejoins() {
    let b = FakeBroker::start("t", 2);
    let mut m = GroupConsumer::connect(
        &b.addr,
        "t",
        GroupConfig {
            member_id: Some("fixed".into()),
            ..group_cfg("g", 300)
        },
    )
    .unwrap();
    m.take_assignment_changes();
    b.forget_members();
    // The next heartbeat is UNKNOWN_MEMBER: the member joins again, same id.
    m.heartbeat().unwrap();
    assert_eq!(m.member_id(), "fixed");
    assert_eq!(m.assignment(), &[0, 1]);
    let d = Admin::connect(&b.addr)
        .unwrap()
        .describe_group("g")
        .unwrap();
    assert_eq!(d.members[0].member_id, "fixed");
    m.close().unwrap();
}

#[test]
fn broadcast_members_each_read_everything_with_their_own_offsets() {
    let b = FakeBroker::start("t", 2);
    produce_n(&b.addr, 20);
    let cfg = |id: &str| GroupConfig {
        broadcast: true,
        member_id: Some(id.into()),
        ..group_cfg("g", 600)
    };
    let mut x = GroupConsumer::connect(&b.addr, "t", cfg("x")).unwrap();
    let mut y = GroupConsumer::connect(&b.addr, "t", cfg("y")).unwrap();
    assert_eq!(x.offsets_group(), "g/x");
    for m in [&mut x, &mut y] {
        let mut n = 0;
        let stop = Instant::now() + Duration::from_secs(10);
        while n < 20 && Instant::now() < stop {
            n += m.poll(Duration::from_millis(100)).unwrap().len();
        }
        assert_eq!(n, 20);
        assert_eq!(m.assignment(), &[0, 1]);
        m.commit().unwrap();
    }
    assert_eq!(b.state().committed("g/x", 0), Some(10));
    assert_eq!(b.state().committed("g/y", 1), Some(10));
    assert_eq!(b.state().committed("g", 0), None);
    x.close().unwrap();
    y.close().unwrap();
}

#[test]
fn producer_follows_a_growing_topic() {
    let b = FakeBroker::start("t", 2);
    let p = producer(
        &b,
        ProducerConfig {
            topic_refresh: Duration::from_millis(20),
            ..fast()
        },
    );
    Admin::connect(&b.addr)
        .unwrap()
        .alter_topic("t", 4)
        .unwrap();
    let stop = Instant::now() + Duration::from_secs(10);
    while p.queues() < 4 {
        assert!(
            Instant::now() < stop,
            "the producer never saw the new queues"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    send_numbered(&p, "", 40);
    // Keyed messages hash over the new count.
    for _ in 0..3 {
        p.send(Message::new("k").with_key("user-7")).unwrap();
    }
    p.flush().unwrap();
    let key_q = producer::key_queue(b"user-7", 4);
    for q in 0..4 {
        let extra = if q == key_q { 3 } else { 0 };
        assert_eq!(b.values(q).len(), 10 + extra, "queue {q}");
    }
}

#[test]
fn explicit_queue_past_the_known_count_refreshes_first() {
    let b = FakeBroker::start("t", 1);
    let p = producer(
        &b,
        ProducerConfig {
            topic_refresh: Duration::ZERO,
            ..fast()
        },
    );
    Admin::connect(&b.addr)
        .unwrap()
        .alter_topic("t", 3)
        .unwrap();
    p.send(Message::new("late").with_queue(2)).unwrap();
    p.flush().unwrap();
    assert_eq!(p.queues(), 3);
    assert_eq!(b.values(2).len(), 1);
    assert!(matches!(
        p.send(Message::new("x").with_queue(3)),
        Err(ClientError::Config(_))
    ));
}

#[test]
fn headers_reach_the_consumer_and_name_the_message() {
    let b = FakeBroker::start("t", 1);
    let p = producer(&b, fast());
    for _ in 0..2 {
        // The same message stored twice (e.g. resent by an application).
        p.send(
            Message::new("v")
                .with_header(dedup::ID_HEADER, "order-1")
                .with_header("trace", "t1"),
        )
        .unwrap();
    }
    p.send(Message::new("plain")).unwrap();
    p.flush().unwrap();
    let mut c = consumer(&b, consumer_cfg("g"));
    let got = drain(&mut c, 3);
    assert_eq!(
        got[0].headers,
        vec![
            ("id".to_string(), Some(Bytes::from_static(b"order-1"))),
            ("trace".to_string(), Some(Bytes::from_static(b"t1"))),
        ]
    );
    let mut d = Deduplicator::default();
    let fresh: Vec<bool> = got.iter().map(|r| d.first_time_record("t", r)).collect();
    assert_eq!(fresh, vec![true, false, true]);
    // Redelivery of the same offsets (a rebalance, a restart) is skipped too.
    c.seek(0, 0).unwrap();
    let again = drain(&mut c, 3);
    assert!(again.iter().all(|r| !d.first_time_record("t", r)));
}

// ---- Produce options (priority, delay) and push delivery ----

fn push_cfg(group: &str) -> PushConfig {
    PushConfig {
        max_wait_ms: 50,
        request_timeout: Duration::from_secs(5),
        ..PushConfig::new(group)
    }
}

/// Polls until `n` records came or `limit` passes.
fn drain_push(c: &mut PushConsumer, n: usize, limit: Duration) -> Vec<PushedRecord> {
    let mut out = Vec::new();
    let stop = Instant::now() + limit;
    while out.len() < n && Instant::now() < stop {
        out.extend(c.poll(Duration::from_millis(100)).unwrap());
    }
    out
}

fn text(r: &PushedRecord) -> String {
    String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()
}

#[test]
fn options_never_mix_in_a_batch_and_defaults_stay_plain_produce() {
    let b = FakeBroker::start("t", 1);
    let p = producer(&b, fast());
    p.send(Message::new("plain-1")).unwrap();
    p.send(Message::new("high-1").with_priority(3)).unwrap();
    p.send(Message::new("plain-2")).unwrap();
    p.send(Message::new("high-2").with_priority(3)).unwrap();
    p.send(Message::new("late").with_delay(Duration::from_millis(300)))
        .unwrap();
    let s = p.flush().unwrap();
    assert_eq!(s.acked_messages, 5);
    let mut opts = b.state().produce_options.clone();
    opts.sort_by_key(|(_, o)| o.map(|o| (o.priority, o.delay_ms)));
    assert_eq!(
        opts,
        vec![
            (0, None),
            (
                0,
                Some(producer::ProduceOptions {
                    priority: 0,
                    delay_ms: 300
                })
            ),
            (
                0,
                Some(producer::ProduceOptions {
                    priority: 3,
                    delay_ms: 0
                })
            ),
        ]
    );
    // Each batch holds only its own messages, in send order.
    let stored: Vec<String> = b
        .values(0)
        .into_iter()
        .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
        .collect();
    let mut sorted = stored.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["high-1", "high-2", "plain-1", "plain-2"]);
    let pos = |v: &str| stored.iter().position(|s| s == v).unwrap();
    assert_eq!(pos("plain-2"), pos("plain-1") + 1);
    assert_eq!(pos("high-2"), pos("high-1") + 1);
    // The delayed one is held until due, then stored.
    assert_eq!(b.state().delayed(0), 1);
    std::thread::sleep(Duration::from_millis(400));
    let mut c = consumer(&b, consumer_cfg("g"));
    let got = drain(&mut c, 5);
    assert_eq!(got.len(), 5);
    assert_eq!(got[4].value.as_deref(), Some(&b"late"[..]));
}

#[test]
fn out_of_range_options_are_refused_before_sending() {
    let b = FakeBroker::start("t", 1);
    let p = producer(&b, fast());
    let e = p.send(Message::new("x").with_priority(4)).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::InvalidMessage(MessageError::Priority {
                priority: 4,
                max: 3
            })
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "invalid message: priority must be 0..=3 (0 the lowest), not 4"
    );
    let far = Duration::from_millis(producer::DELAY_MS_MAX as u64 + 1);
    let e = p.send(Message::new("x").with_delay(far)).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::InvalidMessage(MessageError::DelayTooLong { .. })
        ),
        "{e:?}"
    );
    let e = p
        .send(Message::new("x").with_due_at(std::time::SystemTime::now() + far * 2))
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidMessage(_)), "{e:?}");
    // A due time in the past is "at once": a plain produce.
    p.send(Message::new("now").with_due_at(std::time::SystemTime::now() - Duration::from_secs(5)))
        .unwrap();
    assert_eq!(p.flush().unwrap().acked_messages, 1);
    assert_eq!(b.state().produce_options, vec![(0, None)]);
    assert_eq!(producer::delay_from_ms(0), Ok(None));
    assert!(producer::delay_from_ms(-1).is_err());
}

#[test]
fn retried_batches_keep_their_options() {
    let b = FakeBroker::start("t", 1);
    let p = producer(&b, fast());
    // The broker stores the first batch but hangs up before acking.
    b.state().drop_after_store = 1;
    p.send(Message::new("a").with_priority(2)).unwrap();
    let s = p.flush().unwrap();
    assert_eq!((s.acked_messages, s.duplicates), (1, 1));
    let opts = b.state().produce_options.clone();
    assert_eq!(opts.len(), 2);
    assert!(opts.iter().all(|(_, o)| o.is_some_and(|o| o.priority == 2)));
    assert_eq!(b.values(0).len(), 1, "stored once");
}

#[test]
fn push_acks_redelivers_after_timeout_and_dead_letters() {
    let b = FakeBroker::start("t", 2);
    let p = producer(&b, fast());
    send_numbered(&p, "m", 4);
    p.flush().unwrap();

    // Long enough that a loaded machine acks before it expires (the
    // timed-out message below waits for it; the drain allows 5 s).
    let cfg = PushConfig {
        ack_timeout: Duration::from_millis(1500),
        max_attempts: 2,
        ..push_cfg("g")
    };
    let mut c = PushConsumer::connect(&b.addr, "t", cfg).unwrap();
    assert_eq!(c.queues(), vec![0, 1]);
    let got = drain_push(&mut c, 4, Duration::from_secs(5));
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|r| r.attempt == 1));
    // Ack m0 and m1's positions; nack one; leave one to time out.
    let (acked, rest): (Vec<_>, Vec<_>) = got.iter().partition(|r| text(r).as_str() < "m2");
    assert_eq!(
        c.ack(&acked.iter().map(|r| r.position()).collect::<Vec<_>>())
            .unwrap(),
        2
    );
    assert_eq!(c.nack(&[rest[0].position()]).unwrap(), 1);
    // The nacked one comes back at once, the other after its timeout: attempt 2 both.
    let again = drain_push(&mut c, 2, Duration::from_secs(5));
    let mut seen: Vec<(String, u32)> = again.iter().map(|r| (text(r), r.attempt)).collect();
    seen.sort();
    assert_eq!(seen, vec![("m2".into(), 2), ("m3".into(), 2)]);
    // A second ack of a settled message settles nothing.
    assert_eq!(c.ack(&[acked[0].position()]).unwrap(), 0);
    // Both fail once more: that was their last attempt.
    let positions: Vec<_> = again.iter().map(|r| r.position()).collect();
    assert_eq!(c.nack(&positions).unwrap(), 2);
    let dead = b.state().dead_letters.clone();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.group == "g" && d.attempts == 2));
    // Nothing is left; every queue's progress is committed.
    assert!(drain_push(&mut c, 1, Duration::from_millis(300)).is_empty());
    assert_eq!(b.state().committed("g", 0), Some(2));
    assert_eq!(b.state().committed("g", 1), Some(2));
    c.close().unwrap();
}

#[test]
fn push_hands_out_higher_priorities_first() {
    let b = FakeBroker::start("t", 1);
    let p = producer(
        &b,
        ProducerConfig {
            linger: Duration::ZERO,
            ..fast()
        },
    );
    for i in 0..12u8 {
        p.send(Message::new(format!("{}-{i:02}", i % 4)).with_priority(i % 4))
            .unwrap();
    }
    p.flush().unwrap();
    let mut c = PushConsumer::connect(
        &b.addr,
        "t",
        PushConfig {
            max_messages: 5,
            ..push_cfg("g")
        },
    )
    .unwrap();
    let got = drain_push(&mut c, 12, Duration::from_secs(5));
    let values: Vec<String> = got.iter().map(text).collect();
    let mut expect = values.clone();
    // Priority descending, then send order (offsets) within a priority.
    expect.sort_by(|a, b| b[..1].cmp(&a[..1]).then(a.cmp(b)));
    assert_eq!(values, expect);
    assert_eq!(&values[0][..1], "3");
    c.ack(&got.iter().map(PushedRecord::position).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(b.state().committed("g", 0), Some(12));
}

#[test]
fn close_releases_what_was_never_returned() {
    let b = FakeBroker::start("t", 1);
    let mut c = PushConsumer::connect(&b.addr, "t", push_cfg("g")).unwrap();
    // A receive goes out and stays open: nothing to hand out yet.
    assert!(c.poll(Duration::from_millis(20)).unwrap().is_empty());
    let p = producer(&b, fast());
    p.send(Message::new("x")).unwrap();
    p.flush().unwrap();
    // The open receive hands "x" out; close nacks it instead of leaving it out.
    c.close().unwrap();
    let mut d = PushConsumer::connect(&b.addr, "t", push_cfg("g")).unwrap();
    let got = drain_push(&mut d, 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert!(got[0].attempt <= 2, "{:?}", got[0]);
    assert_eq!(d.ack(&[got[0].position()]).unwrap(), 1);
}

#[test]
fn push_consumer_refuses_bad_settings_and_queues() {
    let b = FakeBroker::start("t", 2);
    let e = PushConsumer::connect(
        &b.addr,
        "t",
        PushConfig {
            queues: Some(vec![5]),
            ..push_cfg("g")
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("queue 5 does not exist"), "{e}");
    let e = PushConsumer::connect(
        &b.addr,
        "t",
        PushConfig {
            max_attempts: 0,
            ..push_cfg("g")
        },
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::Config(_)), "{e:?}");
    let c = PushConsumer::connect(
        &b.addr,
        "t",
        PushConfig {
            queues: Some(vec![1, 1]),
            ..push_cfg("g")
        },
    )
    .unwrap();
    assert_eq!(c.queues(), vec![1]);
}
