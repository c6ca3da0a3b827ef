//! The client library talks to each queue's shard over its own port.

mod common;

use coremq::client::{Consumer, ConsumerConfig, Message, Producer, ProducerConfig, StartFrom};
use coremq::protocol::Flush;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Broker;

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn producer_and_consumer_use_the_shard_ports() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    assert_eq!(b.shard_addrs.len(), 2);
    let shard_ports: HashSet<u16> = b.shard_addrs.iter().map(|a| port(a)).collect();
    b.create_topic("t", 4, Flush::Async);

    let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
    for i in 0..2000 {
        p.send(Message::new(format!("m-{i}"))).unwrap();
    }
    let summary = p.flush().unwrap();
    assert_eq!(summary.acked_messages, 2000);
    let used: HashSet<u16> = p.shard_ports_in_use().into_iter().collect();
    assert_eq!(used, shard_ports, "the producer talks to both shard ports");
    p.close().unwrap();

    let cfg = ConsumerConfig {
        from: StartFrom::Earliest,
        max_wait_ms: 200,
        ..ConsumerConfig::new("g")
    };
    let mut c = Consumer::connect(&b.addr, "t", cfg).unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2000 && Instant::now() < deadline {
        for r in c.poll(Duration::from_millis(500)).unwrap() {
            seen.insert(common::value(&r));
        }
    }
    assert_eq!(seen.len(), 2000);
    assert!((0..2000).all(|i| seen.contains(&format!("m-{i}"))));
    let used: HashSet<u16> = c.shard_ports_in_use().into_iter().collect();
    assert_eq!(used, shard_ports, "the consumer talks to both shard ports");
}

#[test]
fn shard_aware_off_uses_only_the_shared_address() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    b.create_topic("t", 4, Flush::Async);
    let cfg = ProducerConfig {
        shard_aware: false,
        ..ProducerConfig::default()
    };
    let p = Producer::connect(&b.addr, "t", cfg).unwrap();
    for i in 0..200 {
        p.send(Message::new(format!("m-{i}"))).unwrap();
    }
    assert_eq!(p.flush().unwrap().acked_messages, 200);
    assert!(p.shard_ports_in_use().is_empty());
    let got = common::consume_all(&b.addr, "t", "g", 200);
    assert_eq!(got.len(), 200);
}

#[test]
fn push_consumer_receives_and_acks_over_the_shard_ports() {
    use coremq::client::{PushConfig, PushConsumer};
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    let shard_ports: HashSet<u16> = b.shard_addrs.iter().map(|a| port(a)).collect();
    b.create_topic("t", 4, Flush::Async);
    let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
    for i in 0..200 {
        p.send(Message::new(format!("m-{i}"))).unwrap();
    }
    assert_eq!(p.close().unwrap().acked_messages, 200);

    let cfg = PushConfig {
        max_wait_ms: 200,
        ..PushConfig::new("pg")
    };
    let mut c = PushConsumer::connect(&b.addr, "t", cfg).unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 200 && Instant::now() < deadline {
        let got = c.poll(Duration::from_millis(500)).unwrap();
        let positions: Vec<(u32, i64)> = got.iter().map(|r| r.position()).collect();
        assert_eq!(c.ack(&positions).unwrap() as usize, positions.len());
        for r in got {
            seen.insert(r.value.unwrap());
        }
    }
    assert_eq!(seen.len(), 200);
    let used: HashSet<u16> = c.shard_ports_in_use().into_iter().collect();
    assert_eq!(
        used, shard_ports,
        "the push consumer talks to both shard ports"
    );
    // Everything was acked: nothing comes again.
    assert!(c.poll(Duration::from_millis(500)).unwrap().is_empty());
}
