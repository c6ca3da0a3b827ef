//! The idempotent producer: the same batch sent twice is stored once, also
//! across a restart; a sequence gap is refused.

mod common;
use common::*;
use coremq::client::{ClientError, Producer, ProducerConfig};
use coremq::protocol::{ErrorCode, Flush, Reply};
use coremq_shards::batch::{BatchBuilder, Compression};

fn batch(producer_id: i64, seq: i32, values: &[&str]) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None).producer(producer_id, 0, seq);
    for v in values {
        b.push(1_000, None, Some(v.as_bytes()), &[]);
    }
    b.build()
}

fn produce(p: &Producer, batch: bytes::Bytes) -> Result<(i64, bool), ClientError> {
    match p.send_batch(0, batch)? {
        Reply::Produce {
            base_offset,
            duplicate,
        } => Ok((base_offset, duplicate)),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn a_retried_batch_is_stored_once_even_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("pay", 1, Flush::Sync);
    let p = Producer::connect(&b.addr, "pay", ProducerConfig::default()).unwrap();
    let first = batch(4242, 0, &["a", "b"]);
    assert_eq!(produce(&p, first.clone()).unwrap(), (0, false));
    assert_eq!(produce(&p, first.clone()).unwrap(), (0, true));
    assert_eq!(produce(&p, batch(4242, 2, &["c"])).unwrap(), (2, false));
    // A gap (sequence 5 when 3 is next) is refused.
    let gap = produce(&p, batch(4242, 5, &["x"])).unwrap_err();
    assert_eq!(
        gap.broker_code(),
        Some(ErrorCode::OutOfOrderSequence),
        "{gap}"
    );
    drop(p);
    b.kill9();

    let b = Broker::start(dir.path(), &[]);
    let p = Producer::connect(&b.addr, "pay", ProducerConfig::default()).unwrap();
    assert_eq!(produce(&p, first).unwrap(), (0, true));
    assert_eq!(produce(&p, batch(4242, 3, &["d"])).unwrap(), (3, false));
    let got: Vec<String> = consume_all(&b.addr, "pay", "g", 4)
        .iter()
        .map(value)
        .collect();
    assert_eq!(got, ["a", "b", "c", "d"]);
}
