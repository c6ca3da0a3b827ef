//! A consumer far behind the log's tail reads batches from the segment
//! files (sent with `sendfile`); one at the tail reads them from memory
//! (gathered `writev`). Through a client that reads slowly, so the broker's
//! socket fills again and again in the middle of a batch, every byte must
//! still arrive in place: each batch's CRC and every value are checked.

mod common;
use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use coremq::client::{Compression, Connection, Timeouts};
use coremq::protocol::frame::{self, RequestHeader};
use coremq::protocol::messages::{decode_response, ApiKey};
use coremq::protocol::{Flush, Reply, Request};
use coremq_shards::batch::{decode_records, split_batches, BatchBuilder};
use std::io::{Read, Write};
use std::time::Duration;

const BATCHES: usize = 256;
const RECORDS_PER_BATCH: usize = 16;
const VALUE_BYTES: usize = 4096;

fn value(batch: usize, record: usize) -> Vec<u8> {
    let seed = (batch * RECORDS_PER_BATCH + record) as u32;
    (0..VALUE_BYTES as u32)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i) % 253) as u8)
        .collect()
}

/// A Fetch request frame, as the client library would send it.
fn fetch_frame(topic: &str, offset: i64, max_bytes: u32) -> Vec<u8> {
    let mut body = BytesMut::new();
    Request::Fetch {
        topic: topic.to_string(),
        queue: 0,
        offset,
        max_bytes,
        max_wait_ms: 0,
    }
    .encode_body(&mut body);
    let mut out = BytesMut::new();
    let header = RequestHeader {
        api: ApiKey::Fetch as u16,
        api_version: frame::API_VERSION,
        request_id: 7,
    };
    frame::put_request_header(&mut out, header, body.len());
    out.put_slice(&body);
    out.to_vec()
}

/// Sends a fetch, waits before reading so the broker finds the socket
/// full, then reads the reply in small pieces.
fn slow_fetch(addr: &str, topic: &str, offset: i64) -> Bytes {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small receive buffer makes the broker's send stall early and often.
    sock.set_recv_buffer_size(16 << 10).unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&fetch_frame(topic, offset, 32 << 20))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    for piece in reply.chunks_mut(8 << 10) {
        stream.read_exact(piece).unwrap();
    }
    let (id, code, body) = frame::parse_response(Bytes::from(reply)).unwrap();
    assert_eq!((id, code), (7, 0));
    match decode_response(ApiKey::Fetch, code, body).unwrap() {
        Ok(Reply::Fetch { batches, .. }) => batches.concat().into(),
        other => panic!("not a fetch reply: {other:?}"),
    }
}

/// Produces the backlog, then reads it twice through a slow client (from
/// the start and from the middle), checking every batch and value.
fn backlog_reads_back_whole_through_a_full_socket(serve_flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = vec!["--max-frame-bytes", "67108864"];
    flags.extend_from_slice(serve_flags);
    let b = Broker::start(dir.path(), &flags);
    b.create_topic("backlog", 1, Flush::Async);
    let conn = Connection::connect(&b.addr, Timeouts::default()).unwrap();
    for i in 0..BATCHES {
        let mut builder = BatchBuilder::new(Compression::None);
        for r in 0..RECORDS_PER_BATCH {
            builder.push(0, None, Some(&value(i, r)), &[]);
        }
        let reply = conn.call(&Request::Produce {
            topic: "backlog".into(),
            queue: 0,
            batch: builder.build(),
        });
        assert!(reply.is_ok(), "{reply:?}");
    }

    for from_batch in [0, BATCHES / 2] {
        let offset = (from_batch * RECORDS_PER_BATCH) as i64;
        let data = slow_fetch(&b.addr, "backlog", offset);
        let batches: Vec<&[u8]> = split_batches(&data).map(|b| b.expect("whole")).collect();
        assert_eq!(batches.len(), BATCHES - from_batch);
        for (i, batch) in batches.iter().enumerate() {
            let (header, records) = decode_records(batch).expect("an intact batch");
            let n = from_batch + i;
            assert_eq!(header.base_offset, (n * RECORDS_PER_BATCH) as i64);
            assert_eq!(records.len(), RECORDS_PER_BATCH);
            for (r, rec) in records.iter().enumerate() {
                assert!(
                    rec.value.as_deref() == Some(&value(n, r)[..]),
                    "batch {n} record {r} differs"
                );
            }
        }
    }
}

/// A tail cache smaller than one batch: every batch comes from the segment
/// files, with `sendfile`.
#[test]
fn a_lagging_reader_gets_every_stored_byte_through_a_full_socket() {
    backlog_reads_back_whole_through_a_full_socket(&["--tail-cache-bytes", "4096"]);
}

/// A tail cache holding the whole backlog: the batches come from memory,
/// gathered into `writev` calls.
#[test]
fn a_reader_at_the_tail_gets_every_cached_byte_through_a_full_socket() {
    backlog_reads_back_whole_through_a_full_socket(&["--tail-cache-bytes", "67108864"]);
}
