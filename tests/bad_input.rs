//! Garbage, oversized and malformed frames, unknown apis and topics, and a
//! client vanishing mid-frame: each gets an error or a closed connection;
//! the broker keeps serving, and a well-behaved client that runs next gets
//! all its data.

mod common;
use bytes::{BufMut, BytesMut};
use common::*;
use coremq::client::{ClientError, Producer, ProducerConfig};
use coremq::protocol::frame::{put_request_header, RequestHeader};
use coremq::protocol::messages::{decode_response, ApiKey};
use coremq::protocol::{ErrorCode, Flush, Request, Response};
use coremq_shards::batch::{BatchBuilder, Compression};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn connect(b: &Broker) -> TcpStream {
    let s = TcpStream::connect(&b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn frame(api: u16, version: u16, id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_request_header(
        &mut out,
        RequestHeader {
            api,
            api_version: version,
            request_id: id,
        },
        body.len(),
    );
    out.put_slice(body);
    out.to_vec()
}

/// Reads one reply frame: (request id, decoded response for `api`).
fn read_reply(s: &mut TcpStream, api: ApiKey) -> Option<(u32, Response)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut rest).ok()?;
    let id = u32::from_be_bytes(rest[0..4].try_into().unwrap());
    let code = u16::from_be_bytes(rest[4..6].try_into().unwrap());
    let resp = decode_response(api, code, bytes::Bytes::from(rest).slice(6..)).unwrap();
    Some((id, resp))
}

fn code_of(r: Response) -> ErrorCode {
    r.expect_err("an error reply").code
}

/// After an error that closes the connection, the next read sees EOF.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn produce_body(topic: &str, queue: u32, batch: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    Request::Produce {
        topic: topic.into(),
        queue,
        batch: bytes::Bytes::copy_from_slice(batch),
    }
    .encode_body(&mut out);
    out.to_vec()
}

fn one_batch(value_bytes: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(0, None, Some(&vec![b'v'; value_bytes]), &[]);
    b.build().to_vec()
}

#[test]
fn bad_input_is_refused_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(
        dir.path(),
        &[
            "--max-message-bytes",
            "65536",
            "--max-frame-bytes",
            "1048576",
        ],
    );
    b.create_topic("good", 2, Flush::Sync);

    // Pure garbage: its "length" is far over the limit; refused, closed.
    let mut s = connect(&b);
    s.write_all(&[0xff; 64]).unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::FrameTooLarge);
    assert!(closed(&mut s));

    // A frame shorter than its header: malformed, closed.
    let mut s = connect(&b);
    s.write_all(&[0, 0, 0, 3, 1, 2, 3]).unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::Malformed);
    assert!(closed(&mut s));

    // Unknown api and unsupported version: error replies, connection kept.
    let mut s = connect(&b);
    s.write_all(&frame(999, 1, 7, b"")).unwrap();
    let (id, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!((id, code_of(r)), (7, ErrorCode::UnknownApi));
    s.write_all(&frame(ApiKey::ListTopics as u16, 42, 8, b""))
        .unwrap();
    let (id, r) = read_reply(&mut s, ApiKey::ListTopics).unwrap();
    assert_eq!((id, code_of(r)), (8, ErrorCode::UnsupportedVersion));

    // Unknown topic and queue.
    let batch = one_batch(10);
    s.write_all(&frame(1, 1, 9, &produce_body("nope", 0, &batch)))
        .unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::UnknownTopic);
    s.write_all(&frame(1, 1, 10, &produce_body("good", 7, &batch)))
        .unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::UnknownQueue);

    // A batch over the message limit, and one with a broken CRC.
    s.write_all(&frame(
        1,
        1,
        11,
        &produce_body("good", 0, &one_batch(100_000)),
    ))
    .unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::MessageTooLarge);
    let mut corrupt = one_batch(10);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    s.write_all(&frame(1, 1, 12, &produce_body("good", 0, &corrupt)))
        .unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::CorruptBatch);
    // Bytes that are not a batch at all.
    s.write_all(&frame(1, 1, 13, &produce_body("good", 0, b"not a batch")))
        .unwrap();
    let (_, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
    assert_eq!(code_of(r), ErrorCode::CorruptBatch);

    // A malformed body (topic length past the end): error, then closed.
    s.write_all(&frame(ApiKey::Fetch as u16, 1, 14, &[0, 200, b'x']))
        .unwrap();
    let (id, r) = read_reply(&mut s, ApiKey::Fetch).unwrap();
    assert_eq!((id, code_of(r)), (14, ErrorCode::Malformed));
    assert!(closed(&mut s));

    // A client that announces a big frame and leaves halfway.
    let mut s = connect(&b);
    let f = frame(1, 1, 15, &produce_body("good", 0, &one_batch(30_000)));
    s.write_all(&f[..f.len() / 2]).unwrap();
    drop(s);

    // Invalid requests through the CLI get clear errors.
    let (code, _, err) = b.cli(&["topic", "create", "bad/name", "--queues", "1"], "");
    assert_eq!(code, 1);
    assert!(err.contains("invalid topic name"), "{err}");
    let (code, _, err) = b.cli(&["produce", "missing"], "x\n");
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");

    // Nothing stored changed, and a well-behaved client gets all its data.
    assert!(b.is_running());
    let p = Producer::connect(&b.addr, "good", ProducerConfig::default()).unwrap();
    for i in 0..1000 {
        p.send(coremq::client::Message::new(format!("ok-{i}")))
            .unwrap();
    }
    p.flush().unwrap();
    let mut got: Vec<String> = consume_all(&b.addr, "good", "g", 1000)
        .iter()
        .map(value)
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..1000).map(|i| format!("ok-{i}")).collect();
    want.sort();
    assert_eq!(got, want);
    let err = Producer::connect(&b.addr, "missing", ProducerConfig::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::Broker(ref e) if e.code == ErrorCode::UnknownTopic),
        "{err}"
    );
}

/// Frames that arrive in pieces, with pauses between them, and frames that
/// share one write: the broker assembles each exactly, whatever the split.
#[test]
fn frames_are_assembled_however_the_bytes_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("pieces", 1, Flush::Async);
    let mut s = connect(&b);
    s.set_nodelay(true).unwrap();
    let big = frame(1, 1, 1, &produce_body("pieces", 0, &one_batch(100 << 10)));
    let small = frame(1, 1, 2, &produce_body("pieces", 0, &one_batch(10)));
    // The large frame in uneven pieces; the small one glued to its tail.
    let mut bytes = big.clone();
    bytes.extend_from_slice(&small);
    for piece in [1, 3, 4, 500, 4096, 70_000].iter().scan(0, |at, n| {
        let from = *at;
        *at += n;
        Some(from..*at)
    }) {
        s.write_all(&bytes[piece]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    s.write_all(&bytes[1 + 3 + 4 + 500 + 4096 + 70_000..])
        .unwrap();
    for want in [1, 2] {
        let (id, r) = read_reply(&mut s, ApiKey::Produce).unwrap();
        assert_eq!(id, want);
        assert!(r.is_ok(), "{r:?}");
    }
    let got = consume_all(&b.addr, "pieces", "g", 2);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].value.as_deref(), Some(&vec![b'v'; 100 << 10][..]));
    assert_eq!(got[1].value.as_deref(), Some(&vec![b'v'; 10][..]));
}
