//! ProduceMany and FetchMany against a real two-shard broker: per-entry
//! results (one bad entry fails alone), fetching many queues back, the
//! long poll waking when one of many queues gets data, and refusals.

mod common;

use bytes::Bytes;
use coremq::client::consumer::records_from_fetch;
use coremq::client::{ClientError, Compression, Connection, Timeouts};
use coremq::protocol::messages::ProduceOptions;
use coremq::protocol::{
    ErrorCode, FetchEntry, FetchMany, FetchPart, Flush, ProduceEntry, Request,
    FETCH_MANY_QUEUES_MAX,
};
use coremq_shards::batch::BatchBuilder;
use std::time::Duration;

use common::Broker;

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(0, None, Some(value.as_bytes()), &[]);
    b.build()
}

fn entry(topic: &str, queue: u32, batch: Bytes) -> ProduceEntry {
    ProduceEntry {
        topic: topic.into(),
        queue,
        options: ProduceOptions::default(),
        batch: batch.into(),
    }
}

fn want(topic: &str, offset: i64) -> FetchEntry {
    FetchEntry {
        topic: topic.into(),
        queue: 0,
        offset,
        max_bytes: 1 << 20,
    }
}

fn values(part: &FetchPart) -> Vec<String> {
    let f = part.result.as_ref().expect("data, not an error");
    records_from_fetch(0, 0, &f.batches)
        .unwrap()
        .records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect()
}

fn code(r: &Result<impl std::fmt::Debug, coremq::protocol::ErrorReply>) -> Option<ErrorCode> {
    r.as_ref().err().map(|e| e.code)
}

#[test]
fn produce_many_fails_a_bad_entry_alone_and_fetch_many_reads_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    // Consecutive topic ids: a and b live on different shards.
    for t in ["a", "b", "c"] {
        b.create_topic(t, 1, Flush::Async);
    }
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    let mut corrupt = batch("x").to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let results = conn
        .produce_many(vec![
            entry("a", 0, batch("a0")),
            entry("b", 0, batch("b0")),
            entry("nope", 0, batch("n0")),
            entry("c", 5, batch("c5")),
            entry("c", 0, Bytes::from(corrupt)),
            entry("c", 0, batch("c0")),
            entry("a", 0, batch("a1")),
        ])
        .unwrap();
    assert_eq!(results.len(), 7);
    let offsets: Vec<Option<i64>> = results
        .iter()
        .map(|r| r.as_ref().ok().map(|a| a.base_offset))
        .collect();
    assert_eq!(
        offsets,
        [Some(0), Some(0), None, None, None, Some(0), Some(1)]
    );
    assert_eq!(code(&results[2]), Some(ErrorCode::UnknownTopic));
    assert_eq!(code(&results[3]), Some(ErrorCode::UnknownQueue));
    assert_eq!(code(&results[4]), Some(ErrorCode::CorruptBatch));

    // On a shard's own port, entries of the other shard are forwarded.
    for addr in &b.shard_addrs {
        let direct = Connection::connect(addr, Timeouts::default()).unwrap();
        let r = direct
            .produce_many(vec![
                entry("b", 0, batch("more")),
                entry("c", 0, batch("more")),
            ])
            .unwrap();
        assert!(r.iter().all(Result::is_ok), "{r:?}");
    }

    let req = FetchMany {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        entries: vec![want("a", 0), want("b", 0), want("c", 0), want("b", 99)],
    };
    let parts = conn.fetch_many(&req).unwrap();
    assert_eq!(
        parts.iter().map(|p| p.index).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(values(&parts[0]), ["a0", "a1"]);
    assert_eq!(values(&parts[1]), ["b0", "more", "more"]);
    assert_eq!(values(&parts[2]), ["c0", "more", "more"]);
    let oor = parts[3].result.as_ref().unwrap_err();
    assert_eq!(oor.code, ErrorCode::OffsetOutOfRange);
    assert_eq!(oor.offsets, Some((0, 3)));

    // The same through each shard's own port.
    for addr in &b.shard_addrs {
        let direct = Connection::connect(addr, Timeouts::default()).unwrap();
        let parts = direct.fetch_many(&req).unwrap();
        assert_eq!(values(&parts[0]), ["a0", "a1"]);
        assert_eq!(values(&parts[1]), ["b0", "more", "more"]);
    }
}

#[test]
fn fetch_many_wakes_when_one_of_many_queues_gets_data() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    let topics: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    for t in &topics {
        b.create_topic(t, 1, Flush::Async);
    }
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    // A queue on each shard in turn wakes a poll parked on all six, which
    // spans both shards: the gatherer hurries the other shard's share.
    let mut next = vec![0i64; topics.len()];
    for hot in [1usize, 4, 2] {
        let req = FetchMany {
            max_wait_ms: 20_000,
            min_bytes: 0,
            max_bytes: 1 << 20,
            entries: topics.iter().zip(&next).map(|(t, &o)| want(t, o)).collect(),
        };
        let parked = conn.send(&Request::FetchMany(req)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let r = conn
            .produce_many(vec![entry(&topics[hot], 0, batch(&format!("wake-{hot}")))])
            .unwrap();
        assert!(r[0].is_ok());
        let parts =
            coremq::client::many::fetch_parts(parked.wait(Duration::from_secs(60)).unwrap())
                .unwrap();
        assert_eq!(parts.len(), 1, "{parts:?}");
        assert_eq!(parts[0].index as usize, hot);
        let got = values(&parts[0]);
        assert_eq!(got, [format!("wake-{hot}")]);
        next[hot] += 1;
    }
    // Nothing new anywhere: the poll ends empty after its wait.
    let idle = FetchMany {
        max_wait_ms: 50,
        min_bytes: 0,
        max_bytes: 1 << 20,
        entries: vec![want("t0", 0), want("t3", 0)],
    };
    assert!(conn.fetch_many(&idle).unwrap().is_empty());
}

#[test]
fn fetch_many_gathers_min_bytes_before_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "1"]);
    b.create_topic("a", 1, Flush::Async);
    b.create_topic("b", 1, Flush::Async);
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    let (first, second) = (batch("first"), batch("second"));
    let both = (first.len() + second.len()) as u32;
    assert!(conn.produce_many(vec![entry("a", 0, first)]).unwrap()[0].is_ok());
    // "a" has data, but less than min_bytes: the poll waits for "b" too.
    let req = FetchMany {
        max_wait_ms: 20_000,
        min_bytes: both,
        max_bytes: 1 << 20,
        entries: vec![want("a", 0), want("b", 0)],
    };
    let parked = conn.send(&Request::FetchMany(req)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(conn.produce_many(vec![entry("b", 0, second)]).unwrap()[0].is_ok());
    let parts =
        coremq::client::many::fetch_parts(parked.wait(Duration::from_secs(60)).unwrap()).unwrap();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(values(&parts[0]), ["first"]);
    assert_eq!(values(&parts[1]), ["second"]);
    // A queue already in the reply that gets more is read again whole:
    // its part grows until the reply holds min_bytes.
    let (more, most) = (batch("more"), batch("most"));
    let grown = (batch("first").len() + more.len() + most.len()) as u32;
    let req = FetchMany {
        max_wait_ms: 20_000,
        min_bytes: grown,
        max_bytes: 1 << 20,
        entries: vec![want("a", 0)],
    };
    let parked = conn.send(&Request::FetchMany(req)).unwrap();
    for b in [more, most] {
        std::thread::sleep(Duration::from_millis(100));
        assert!(conn.produce_many(vec![entry("a", 0, b)]).unwrap()[0].is_ok());
    }
    let parts =
        coremq::client::many::fetch_parts(parked.wait(Duration::from_secs(60)).unwrap()).unwrap();
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert_eq!(values(&parts[0]), ["first", "more", "most"]);
    // More than there will ever be: after max_wait it answers with what there is.
    let req = FetchMany {
        max_wait_ms: 100,
        min_bytes: 1 << 20,
        max_bytes: 1 << 20,
        entries: vec![want("a", 0), want("b", 0)],
    };
    assert_eq!(conn.fetch_many(&req).unwrap().len(), 2);
}

#[test]
fn oversized_and_empty_lists_are_refused_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    b.create_topic("t", 1, Flush::Async);
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    fn broker_code<T>(r: Result<T, ClientError>) -> Option<ErrorCode> {
        match r {
            Err(ClientError::Broker(e)) => Some(e.code),
            _ => None,
        }
    }
    let too_many = FetchMany {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        entries: (0..=FETCH_MANY_QUEUES_MAX).map(|_| want("t", 0)).collect(),
    };
    assert_eq!(
        broker_code(conn.fetch_many(&too_many)),
        Some(ErrorCode::InvalidRequest)
    );
    let empty = FetchMany {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        entries: vec![],
    };
    assert_eq!(
        broker_code(conn.fetch_many(&empty)),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        broker_code(conn.produce_many(vec![])),
        Some(ErrorCode::InvalidRequest)
    );
    // Still open and serving.
    let r = conn.produce_many(vec![entry("t", 0, batch("ok"))]).unwrap();
    assert_eq!(r[0].as_ref().unwrap().base_offset, 0);
}

/// A topic altered, deleted or made again since the last request is seen
/// as it is now, on the shard that owns it and on the one that forwards.
#[test]
fn many_queue_requests_see_topics_as_they_are_now() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "2"]);
    b.create_topic("a", 1, Flush::Async);
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    let produce = |q: u32, v: &str| {
        conn.produce_many(vec![entry("a", q, batch(v))])
            .unwrap()
            .remove(0)
    };
    assert!(produce(0, "old").is_ok());
    let fetch_a0 = || {
        conn.fetch_many(&FetchMany {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 1 << 20,
            entries: vec![want("a", 0)],
        })
        .unwrap()
    };
    // The same list, polled before and after the topic is re-created: the
    // broker's resolution of a repeated list must not outlive the topic.
    assert_eq!(values(&fetch_a0()[0]), ["old"]);
    assert_eq!(values(&fetch_a0()[0]), ["old"]);
    assert_eq!(code(&produce(1, "x")), Some(ErrorCode::UnknownQueue));
    b.admin().alter_topic("a", 2).unwrap();
    assert!(produce(1, "q1").is_ok(), "the new queue is known at once");
    b.admin().delete_topic("a").unwrap();
    assert_eq!(code(&produce(0, "x")), Some(ErrorCode::UnknownTopic));
    b.create_topic("a", 1, Flush::Async);
    assert_eq!(produce(0, "new").unwrap().base_offset, 0);
    let parts = fetch_a0();
    assert_eq!(
        values(&parts[0]),
        vec!["new"],
        "the old topic's data is gone"
    );
}
