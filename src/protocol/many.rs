//! Multi-queue produce and fetch (ProduceMany, FetchMany): many (topic,
//! queue) entries in one request, so a client with thousands of small
//! queues pays one request, one reply and one syscall for all of them
//! instead of one per queue (Kafka carries many partitions per request for
//! the same reason). docs/protocol.md §5 has the layouts.
//!
//! Entries succeed or fail on their own: the reply carries a result per
//! entry, and one bad entry never fails the others. Batches are never
//! copied either way: going in, pieces of the request frame (owned pieces
//! when the frame's buffer is the request's alone, see `own_batches`);
//! coming out, stored batches written to the socket after the reply's
//! table.

use super::error_code::ErrorCode;
use super::messages::{put_string, DecodeError, ErrorReply, Reader, TOPIC_NAME_BYTES_MAX};
use super::splice::Splices;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use coremq_shards::batch_buf::BatchBuf;
use coremq_shards::shard::{ProduceOptions, IN_PLACE_MIN_BYTES};
use std::ops::Range;

/// Most entries one ProduceMany carries.
pub const PRODUCE_MANY_ENTRIES_MAX: usize = 1024;
/// Most queues one FetchMany lists.
pub const FETCH_MANY_QUEUES_MAX: usize = 1024;

/// One batch of a ProduceMany: as a Produce v2.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceEntry {
    /// A piece of the request frame when decoded (see `FetchEntry::topic`).
    pub topic: ByteString,
    pub queue: u32,
    pub options: ProduceOptions,
    /// One Kafka RecordBatch v2.
    pub batch: BatchBuf,
}

/// A stored batch's acknowledgement (as a Produce reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceAck {
    /// -1 for a delayed batch.
    pub base_offset: i64,
    pub duplicate: bool,
}

/// The result of one ProduceMany entry.
pub type ProduceResult = Result<ProduceAck, ErrorReply>;

/// One queue a FetchMany reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchEntry {
    /// A view of the request frame when decoded: a poll names up to 1,024
    /// queues, and an allocation per name was 2.5% of the broker's CPU.
    pub topic: ByteString,
    pub queue: u32,
    pub offset: i64,
    /// This queue's share (the first batch of the reply is always whole).
    pub max_bytes: u32,
}

/// A long poll over many queues: answers once any of them has data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchMany {
    pub max_wait_ms: u32,
    /// Batch bytes to gather before answering (Kafka's `fetch.min.bytes`):
    /// the reply waits for this much, or `max_wait_ms`. 0 or 1 = any data.
    pub min_bytes: u32,
    /// Batch bytes of the whole reply (the first batch is always whole).
    pub max_bytes: u32,
    pub entries: Vec<FetchEntry>,
}

/// What one queue of a FetchMany returned.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedQueue {
    pub log_start: i64,
    pub next_offset: i64,
    /// Whole stored batches, back to back.
    pub batches: Vec<Bytes>,
}

/// A queue of a FetchMany with something to say: data or an error. Queues
/// with neither are left out of the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPart {
    /// Position of the queue in the request's entries.
    pub index: u32,
    pub result: Result<FetchedQueue, ErrorReply>,
}

impl FetchPart {
    pub fn batch_bytes(&self) -> usize {
        match &self.result {
            Ok(f) => f.batches.iter().map(Bytes::len).sum(),
            Err(_) => 0,
        }
    }
}

/// Reads an entry count and refuses one over `max` before reading entries.
fn count(r: &mut Reader, what: &'static str, max: usize) -> Result<usize, DecodeError> {
    let n = r.u32(what)? as usize;
    if n > max {
        return Err(DecodeError::TooManyEntries {
            what,
            count: n,
            max,
        });
    }
    Ok(n)
}

/// Bytes `encode_produce_many` writes for one entry.
pub(crate) fn produce_entry_bytes(e: &ProduceEntry) -> usize {
    // Topic length and name, queue, priority, delay, batch length and batch.
    2 + e.topic.len() + 4 + 1 + 8 + 4 + e.batch.len()
}

pub(crate) fn encode_produce_many(
    entries: &[ProduceEntry],
    out: &mut BytesMut,
    splices: &mut Splices,
) {
    out.put_u32(entries.len() as u32);
    for e in entries {
        put_string(out, &e.topic);
        out.put_u32(e.queue);
        out.put_u8(e.options.priority);
        out.put_i64(e.options.delay_ms);
        out.put_u32(e.batch.len() as u32);
        match &e.batch {
            BatchBuf::Shared(b) => splices.put(out, b),
            BatchBuf::Owned(m) => out.put_slice(m),
        }
    }
}

pub(crate) fn decode_produce_many(r: &mut Reader) -> Result<Vec<ProduceEntry>, DecodeError> {
    let n = count(r, "produce entries", PRODUCE_MANY_ENTRIES_MAX)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let topic = r.byte_string("topic", TOPIC_NAME_BYTES_MAX)?;
        let queue = r.u32("queue")?;
        let priority = r.u8("priority")?;
        let delay_ms = r.i64("delay_ms")?;
        let len = r.u32("batch length")? as usize;
        let batch = r.bytes(len, "batch")?;
        entries.push(ProduceEntry {
            topic,
            queue,
            options: ProduceOptions { priority, delay_ms },
            batch: batch.into(),
        });
    }
    Ok(entries)
}

/// Gives each entry's batch a piece of `body`'s memory of its own
/// (`BatchBuf::Owned`, cut with `split_to`: no copy) when nothing else
/// holds `body`: the connection read the frame into a buffer of its own.
/// The shard then stores the batches where they are instead of copying
/// each (see `coremq_shards::batch_buf`); topic names become read-only
/// pieces of the same memory. Otherwise (a frame that shares a read buffer
/// with the next) names and batches stay views of it, except that with
/// more than one entry a batch the shard would store in place
/// (`IN_PLACE_MIN_BYTES`) gets a copy of its own: the last one would keep
/// the whole shared buffer alive in the tail cache.
pub(crate) fn own_batches(body: Bytes, entries: &mut [ProduceEntry]) {
    let base = body.as_ptr() as usize;
    let mut end = 0;
    // Where a view is in `body`; an empty one may point anywhere.
    let mut place = |b: &[u8]| {
        let start = if b.is_empty() {
            end
        } else {
            b.as_ptr() as usize - base
        };
        end = start + b.len();
        start..end
    };
    // Each entry's name and batch, in frame order; taking the views leaves
    // `body` the only holder if it was the frame's.
    let spans: Vec<(Range<usize>, Range<usize>)> = entries
        .iter_mut()
        .map(|e| {
            let topic = std::mem::take(&mut e.topic);
            let batch = std::mem::take(&mut e.batch);
            (place(topic.as_bytes()), place(&batch))
        })
        .collect();
    match body.try_into_mut() {
        Ok(mut rest) => {
            let mut at = 0;
            let mut cut = |r: Range<usize>| {
                let _ = rest.split_to(r.start - at);
                at = r.end;
                rest.split_to(r.len())
            };
            for (e, (topic, batch)) in entries.iter_mut().zip(spans) {
                e.topic = checked_name(cut(topic).freeze());
                e.batch = BatchBuf::Owned(cut(batch));
            }
        }
        Err(body) => {
            let several = entries.len() > 1;
            for (e, (topic, batch)) in entries.iter_mut().zip(spans) {
                e.topic = checked_name(body.slice(topic));
                e.batch = if several && batch.len() >= IN_PLACE_MIN_BYTES {
                    BatchBuf::Owned(BytesMut::from(&body[batch]))
                } else {
                    BatchBuf::Shared(body.slice(batch))
                };
            }
        }
    }
}

/// A name `Reader::byte_string` already checked, back from its bytes.
fn checked_name(b: Bytes) -> ByteString {
    // SAFETY: the same bytes were valid UTF-8 when decoded.
    unsafe { ByteString::from_bytes_unchecked(b) }
}

pub(crate) fn encode_fetch_many(req: &FetchMany, out: &mut BytesMut) {
    out.put_u32(req.max_wait_ms);
    out.put_u32(req.min_bytes);
    out.put_u32(req.max_bytes);
    out.put_u32(req.entries.len() as u32);
    for e in &req.entries {
        put_string(out, &e.topic);
        out.put_u32(e.queue);
        out.put_i64(e.offset);
        out.put_u32(e.max_bytes);
    }
}

pub(crate) fn decode_fetch_many(r: &mut Reader) -> Result<FetchMany, DecodeError> {
    let max_wait_ms = r.u32("max_wait_ms")?;
    let min_bytes = r.u32("min_bytes")?;
    let max_bytes = r.u32("max_bytes")?;
    let n = count(r, "fetch entries", FETCH_MANY_QUEUES_MAX)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(FetchEntry {
            topic: r.byte_string("topic", TOPIC_NAME_BYTES_MAX)?,
            queue: r.u32("queue")?,
            offset: r.i64("offset")?,
            max_bytes: r.u32("max_bytes")?,
        });
    }
    Ok(FetchMany {
        max_wait_ms,
        min_bytes,
        max_bytes,
        entries,
    })
}

pub(crate) fn encode_produce_results(results: &[ProduceResult], out: &mut BytesMut) {
    out.put_u32(results.len() as u32);
    for r in results {
        match r {
            Ok(a) => {
                out.put_u16(ErrorCode::None as u16);
                out.put_i64(a.base_offset);
                out.put_u8(a.duplicate as u8);
                put_string(out, "");
            }
            Err(e) => {
                out.put_u16(e.code as u16);
                out.put_i64(-1);
                out.put_u8(0);
                put_string(out, &e.message);
            }
        }
    }
}

pub(crate) fn decode_produce_results(r: &mut Reader) -> Result<Vec<ProduceResult>, DecodeError> {
    // Each result is at least 13 bytes: no count can make us allocate more
    // than the body justifies.
    let n = count(r, "produce results", PRODUCE_MANY_ENTRIES_MAX)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let code = r.u16("error code")?;
        let base_offset = r.i64("base_offset")?;
        let duplicate = r.u8("duplicate")? != 0;
        let message = r.string("message", usize::from(u16::MAX))?;
        out.push(if code == ErrorCode::None as u16 {
            Ok(ProduceAck {
                base_offset,
                duplicate,
            })
        } else {
            Err(ErrorReply::new(ErrorCode::from_u16(code), message))
        });
    }
    Ok(out)
}

/// Writes the reply's table; returns the batches to send after it, in table order.
pub(crate) fn encode_fetch_parts(parts: &[FetchPart], out: &mut BytesMut) -> Vec<Bytes> {
    out.put_u32(parts.len() as u32);
    let mut batches = Vec::new();
    for p in parts {
        out.put_u32(p.index);
        match &p.result {
            Ok(f) => {
                out.put_u16(ErrorCode::None as u16);
                out.put_i64(f.log_start);
                out.put_i64(f.next_offset);
                out.put_u32(p.batch_bytes() as u32);
                put_string(out, "");
                batches.extend(f.batches.iter().cloned());
            }
            Err(e) => {
                let (start, next) = e.offsets.unwrap_or((-1, -1));
                out.put_u16(e.code as u16);
                out.put_i64(start);
                out.put_i64(next);
                out.put_u32(0);
                put_string(out, &e.message);
            }
        }
    }
    batches
}

pub(crate) fn decode_fetch_parts(r: &mut Reader) -> Result<Vec<FetchPart>, DecodeError> {
    let n = count(r, "fetch parts", FETCH_MANY_QUEUES_MAX)?;
    let mut table = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.u32("index")?;
        let code = r.u16("error code")?;
        let log_start = r.i64("log_start")?;
        let next_offset = r.i64("next_offset")?;
        let len = r.u32("batch bytes")? as usize;
        let message = r.string("message", usize::from(u16::MAX))?;
        table.push((index, code, log_start, next_offset, len, message));
    }
    let mut parts = Vec::with_capacity(n);
    for (index, code, log_start, next_offset, len, message) in table {
        let result = if code == ErrorCode::None as u16 {
            Ok(FetchedQueue {
                log_start,
                next_offset,
                batches: vec![r.bytes(len, "batches")?],
            })
        } else {
            let mut e = ErrorReply::new(ErrorCode::from_u16(code), message);
            if e.code == ErrorCode::OffsetOutOfRange {
                e.offsets = Some((log_start, next_offset));
            }
            Err(e)
        };
        parts.push(FetchPart { index, result });
    }
    Ok(parts)
}

impl Reader {
    /// The next `len` bytes as a view of the body (no copy).
    pub(crate) fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.remaining() < len {
            return Err(DecodeError::Truncated(what));
        }
        Ok(self.buf.split_to(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{decode_response, encode_reply};
    use crate::protocol::{ApiKey, Reply, Request};

    fn body(req: &Request) -> Bytes {
        let mut out = BytesMut::new();
        req.encode_body(&mut out);
        out.freeze()
    }

    fn decode(req: &Request) -> Result<Request, DecodeError> {
        Request::decode_versioned(req.api() as u16, req.api_version(), body(req))
    }

    fn produce_many(n: usize) -> Request {
        Request::ProduceMany(
            (0..n)
                .map(|i| ProduceEntry {
                    topic: format!("t{i}").into(),
                    queue: i as u32,
                    options: ProduceOptions {
                        priority: (i % 4) as u8,
                        delay_ms: i as i64,
                    },
                    batch: Bytes::from(vec![i as u8; i + 1]).into(),
                })
                .collect(),
        )
    }

    fn fetch_many(n: usize) -> Request {
        Request::FetchMany(FetchMany {
            max_wait_ms: 500,
            min_bytes: 64 << 10,
            max_bytes: 1 << 20,
            entries: (0..n)
                .map(|i| FetchEntry {
                    topic: format!("t{i}").into(),
                    queue: 0,
                    offset: i as i64 * 10,
                    max_bytes: 4096,
                })
                .collect(),
        })
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            produce_many(0),
            produce_many(3),
            fetch_many(0),
            fetch_many(5),
        ] {
            assert_eq!(decode(&req).unwrap(), req);
        }
        let full = produce_many(PRODUCE_MANY_ENTRIES_MAX);
        assert_eq!(decode(&full).unwrap(), full);
        let full = fetch_many(FETCH_MANY_QUEUES_MAX);
        assert_eq!(decode(&full).unwrap(), full);
    }

    #[test]
    fn batches_are_views_of_the_frame() {
        let req = produce_many(2);
        let frame = body(&req);
        let Request::ProduceMany(entries) =
            Request::decode(ApiKey::ProduceMany as u16, frame.clone()).unwrap()
        else {
            panic!("not a ProduceMany");
        };
        let inside = frame.as_ptr_range();
        assert!(entries.iter().all(|e| inside.contains(&e.batch.as_ptr())));
        // The caller still holds the frame: the batches are shared views.
        assert!(entries.iter().all(|e| !e.batch.is_owned()));
    }

    #[test]
    fn large_batches_of_a_shared_frame_get_their_own_buffers() {
        let sized = |sizes: &[usize]| {
            Request::ProduceMany(
                sizes
                    .iter()
                    .map(|&n| ProduceEntry {
                        topic: "t".into(),
                        queue: 0,
                        options: Default::default(),
                        batch: Bytes::from(vec![7u8; n]).into(),
                    })
                    .collect(),
            )
        };
        let (small, large) = (IN_PLACE_MIN_BYTES - 1, IN_PLACE_MIN_BYTES);
        let req = sized(&[small, large]);
        let frame = body(&req);
        let inside = |b: &BatchBuf| frame.as_ptr_range().contains(&b.as_ptr());
        let Request::ProduceMany(entries) =
            Request::decode(ApiKey::ProduceMany as u16, frame.clone()).unwrap()
        else {
            panic!("not a ProduceMany");
        };
        assert_eq!(Request::ProduceMany(entries.clone()), req);
        // The small one the shard copies itself; the large one is copied here.
        assert!(inside(&entries[0].batch) && !entries[0].batch.is_owned());
        assert!(!inside(&entries[1].batch) && entries[1].batch.is_owned());
        // A frame with one batch is that batch's own buffer: no copy.
        let one = body(&sized(&[large]));
        let Request::ProduceMany(entries) =
            Request::decode(ApiKey::ProduceMany as u16, one.clone()).unwrap()
        else {
            panic!("not a ProduceMany");
        };
        assert!(one.as_ptr_range().contains(&entries[0].batch.as_ptr()));
        assert!(!entries[0].batch.is_owned());
    }

    #[test]
    fn a_frame_nothing_else_holds_is_cut_into_owned_batches() {
        let mut req = produce_many(4);
        if let Request::ProduceMany(entries) = &mut req {
            entries[2].batch = Bytes::new().into(); // empty: points nowhere
        }
        let frame = body(&req);
        let inside = frame.as_ptr_range();
        let Request::ProduceMany(mut entries) =
            Request::decode(ApiKey::ProduceMany as u16, frame).unwrap()
        else {
            panic!("not a ProduceMany");
        };
        assert_eq!(Request::ProduceMany(entries.clone()), req);
        // Each batch owns a piece of the frame's own memory (no copy), and
        // the names are pieces of it too ...
        assert!(entries.iter().all(|e| e.batch.is_owned()));
        assert!(entries
            .iter()
            .filter(|e| !e.batch.is_empty())
            .all(|e| inside.contains(&e.batch.as_ptr())));
        assert!(entries.iter().all(|e| inside.contains(&e.topic.as_ptr())));
        // ... and may patch it without touching its neighbours.
        let BatchBuf::Owned(first) = &mut entries[0].batch else {
            unreachable!()
        };
        first[0] = 0xEE;
        assert_eq!(&entries[1].batch[..], &[1, 1]);
        assert_eq!(&entries[3].batch[..], &[3, 3, 3, 3]);
    }

    #[test]
    fn too_many_entries_are_refused_before_reading_them() {
        let mut over = BytesMut::new();
        over.put_u32(PRODUCE_MANY_ENTRIES_MAX as u32 + 1);
        assert_eq!(
            Request::decode(ApiKey::ProduceMany as u16, over.freeze()),
            Err(DecodeError::TooManyEntries {
                what: "produce entries",
                count: PRODUCE_MANY_ENTRIES_MAX + 1,
                max: PRODUCE_MANY_ENTRIES_MAX
            })
        );
        let mut over = BytesMut::new();
        over.put_u32(500); // max_wait_ms
        over.put_u32(0); // min_bytes
        over.put_u32(1 << 20); // max_bytes
        over.put_u32(u32::MAX);
        assert!(matches!(
            Request::decode(ApiKey::FetchMany as u16, over.freeze()),
            Err(DecodeError::TooManyEntries { .. })
        ));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        // A batch length past the end of the body.
        let mut b = BytesMut::new();
        b.put_u32(1);
        put_string(&mut b, "t");
        b.put_u32(0);
        b.put_u8(0);
        b.put_i64(0);
        b.put_u32(1000);
        b.put_slice(b"short");
        assert_eq!(
            Request::decode(ApiKey::ProduceMany as u16, b.freeze()),
            Err(DecodeError::Truncated("batch"))
        );
        // Fewer entries than counted, and trailing bytes after them.
        let whole = body(&fetch_many(3));
        for cut in 0..whole.len() {
            assert!(Request::decode(ApiKey::FetchMany as u16, whole.slice(..cut)).is_err());
        }
        let mut trailing = BytesMut::from(&whole[..]);
        trailing.put_u8(0);
        assert_eq!(
            Request::decode(ApiKey::FetchMany as u16, trailing.freeze()),
            Err(DecodeError::Trailing(1))
        );
        let whole = body(&produce_many(3));
        for cut in 0..whole.len() {
            assert!(Request::decode(ApiKey::ProduceMany as u16, whole.slice(..cut)).is_err());
        }
        // A topic name that is not UTF-8 (names are views of the frame,
        // checked as they are cut).
        let mut bad = BytesMut::from(&body(&fetch_many(1))[..]);
        let at = 16 + 2; // max_wait, min_bytes, max_bytes, count; the name's length
        bad[at] = 0xFF;
        assert_eq!(
            Request::decode(ApiKey::FetchMany as u16, bad.freeze()),
            Err(DecodeError::BadUtf8("topic"))
        );
    }

    #[test]
    fn replies_round_trip() {
        let mut oor = ErrorReply::new(ErrorCode::OffsetOutOfRange, "too old");
        oor.offsets = Some((10, 20));
        let produce = Reply::ProduceMany(vec![
            Ok(ProduceAck {
                base_offset: 7,
                duplicate: false,
            }),
            Err(ErrorReply::new(ErrorCode::UnknownTopic, "no topic \"x\"")),
            Ok(ProduceAck {
                base_offset: -1,
                duplicate: true,
            }),
        ]);
        let fetch = Reply::FetchMany(vec![
            FetchPart {
                index: 0,
                result: Ok(FetchedQueue {
                    log_start: 0,
                    next_offset: 3,
                    batches: vec![Bytes::from_static(b"abc")],
                }),
            },
            FetchPart {
                index: 2,
                result: Err(oor),
            },
            FetchPart {
                index: 5,
                result: Ok(FetchedQueue {
                    log_start: 1,
                    next_offset: 9,
                    batches: vec![Bytes::from_static(b"defgh")],
                }),
            },
        ]);
        for (api, reply) in [(ApiKey::ProduceMany, produce), (ApiKey::FetchMany, fetch)] {
            let mut out = BytesMut::new();
            // Batches travel after the table, as the broker writes them.
            for b in encode_reply(&reply, &mut out) {
                out.put_slice(&b);
            }
            assert_eq!(decode_response(api, 0, out.freeze()).unwrap(), Ok(reply));
        }
    }

    #[test]
    fn a_reply_whose_batches_do_not_add_up_is_refused() {
        let mut out = BytesMut::new();
        out.put_u32(1);
        out.put_u32(0);
        out.put_u16(0);
        out.put_i64(0);
        out.put_i64(1);
        out.put_u32(10);
        put_string(&mut out, "");
        out.put_slice(b"four");
        assert!(decode_response(ApiKey::FetchMany, 0, out.freeze()).is_err());
    }
}
