//! Growing a live topic: while a producer (client library) sends without
//! pause and a group member reads, `coremq topic alter t --queues 4` grows a
//! 2-queue topic. The producer starts writing to queues 2 and 3 without a
//! restart, the member is assigned them on its next heartbeat, and every
//! message produced is consumed (none lost).
//!
//! Every wait is bounded (tens of seconds).

mod common;
use common::*;
use coremq::client::{GroupConfig, GroupConsumer, Message, Producer, ProducerConfig};
use coremq::protocol::Flush;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long any one phase may take.
const WAIT: Duration = Duration::from_secs(30);
/// Session timeout of the member (a heartbeat every second).
const SESSION: Duration = Duration::from_secs(3);

#[test]
fn producer_and_group_member_follow_a_growing_topic() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("t", 2, Flush::Async);

    // A producer sending continuously, on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).expect("producer");
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let deadline = Instant::now() + 3 * WAIT;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                p.send(Message::new(format!("p-{sent}"))).expect("send");
                sent += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            let summary = p.close().expect("every message acknowledged");
            assert_eq!(summary.acked_messages, sent);
            sent
        })
    };

    let mut member = GroupConsumer::connect(
        &b.addr,
        "t",
        GroupConfig {
            session_timeout: SESSION,
            ..GroupConfig::new("g")
        },
    )
    .expect("join the group");
    assert_eq!(member.assignment(), &[0, 1]);

    // value -> queue it was read from
    let mut got: BTreeMap<String, u32> = BTreeMap::new();
    let poll = |m: &mut GroupConsumer, got: &mut BTreeMap<String, u32>| {
        for r in m.poll(Duration::from_millis(100)).expect("poll") {
            let v = value(&r);
            if let Some(q) = got.insert(v.clone(), r.queue) {
                assert_eq!(q, r.queue, "{v} read from two queues");
            }
        }
        m.commit().expect("commit");
    };

    // Some traffic on the two original queues first.
    let deadline = Instant::now() + WAIT;
    while got.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "only {} messages read",
            got.len()
        );
        poll(&mut member, &mut got);
    }
    assert!(got.values().all(|q| *q < 2));

    let (code, out, err) = b.cli(&["topic", "alter", "t", "--queues", "4"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("queues:         4"), "{out}");
    // Shrinking (or not growing) is refused.
    let (code, _, err) = b.cli(&["topic", "alter", "t", "--queues", "3"], "");
    assert_eq!(code, 1);
    assert!(err.contains("INVALID_REQUEST"), "{err}");

    // The member is assigned the new queues and reads what the producer
    // writes to them.
    let deadline = Instant::now() + WAIT;
    let on = |got: &BTreeMap<String, u32>, q: u32| got.values().filter(|v| **v == q).count();
    loop {
        poll(&mut member, &mut got);
        if member.assignment() == [0, 1, 2, 3] && on(&got, 2) >= 50 && on(&got, 3) >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "assignment {:?}, read from queues 2 and 3: {} and {}",
            member.assignment(),
            on(&got, 2),
            on(&got, 3)
        );
    }
    let grown = member
        .take_assignment_changes()
        .into_iter()
        .find(|c| c.queues == [0, 1, 2, 3])
        .expect("an assignment change to four queues");
    assert_eq!(grown.added, vec![2, 3]);
    assert_eq!(grown.topic_queues, 4);
    assert!(grown.generation > 1);

    // Stop producing; every message sent is read.
    stop.store(true, Ordering::Relaxed);
    let sent = producer.join().expect("producer thread");
    let deadline = Instant::now() + WAIT;
    while (got.len() as u64) < sent {
        assert!(
            Instant::now() < deadline,
            "read {} of {sent} messages",
            got.len()
        );
        poll(&mut member, &mut got);
    }
    let expected: BTreeSet<String> = (0..sent).map(|i| format!("p-{i}")).collect();
    let read: BTreeSet<String> = got.keys().cloned().collect();
    assert_eq!(read, expected, "every message produced, none lost");
    let per_queue = got.values().fold([0u64; 4], |mut n, q| {
        n[*q as usize] += 1;
        n
    });
    eprintln!("{sent} messages; per queue {per_queue:?}");
    assert!(per_queue.iter().all(|n| *n > 0), "{per_queue:?}");

    member.close().expect("commit and leave");
    let d = b.admin().describe_group("g").expect("describe");
    assert!(d.members.is_empty(), "{d:?}");
    assert_eq!(d.offsets.len(), 4, "{d:?}");
    assert!(d.offsets.iter().all(|o| o.lag == 0), "{d:?}");
}
