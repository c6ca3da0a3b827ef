//! Batches a request carries by reference: the client writes a large batch
//! to the socket from the caller's own buffer (one `writev` with the
//! frame's small fields around it) instead of copying it into the frame
//! first. On the wire nothing changes.

use bytes::{BufMut, Bytes, BytesMut};
use std::io::IoSlice;

/// Batches at least this long are sent from where they are; shorter ones
/// are copied into the frame, where an iovec of their own would cost about
/// what copying them does. (At 16 KiB the ~15 KiB batches of 10,000-topic
/// producers were all copied: 2% of the load tool's CPU.)
pub const SPLICE_MIN_BYTES: usize = 4 << 10;

/// The batches left out of an encoded frame, each with the position in the
/// frame's bytes where it belongs.
#[derive(Debug)]
pub struct Splices {
    min_bytes: usize,
    at: Vec<(usize, Bytes)>,
}

impl Splices {
    /// Splices every batch of at least `SPLICE_MIN_BYTES`.
    pub fn new() -> Self {
        Splices {
            min_bytes: SPLICE_MIN_BYTES,
            at: Vec::new(),
        }
    }

    /// Splices nothing: every batch is copied into the frame.
    pub fn none() -> Self {
        Splices {
            min_bytes: usize::MAX,
            at: Vec::new(),
        }
    }

    /// Whether a batch of `len` bytes is left out of the frame.
    fn leaves_out(&self, len: usize) -> bool {
        len >= self.min_bytes
    }

    /// Bytes of a `len`-byte batch that `put` copies into the frame.
    pub fn copied_bytes(&self, len: usize) -> usize {
        if self.leaves_out(len) {
            0
        } else {
            len
        }
    }

    /// Puts `batch` at the end of `out`, or notes it to go there.
    pub(crate) fn put(&mut self, out: &mut BytesMut, batch: &Bytes) {
        if self.leaves_out(batch.len()) {
            self.at.push((out.len(), batch.clone()));
        } else {
            out.put_slice(batch);
        }
    }

    /// Bytes left out of the frame.
    pub fn bytes(&self) -> usize {
        self.at.iter().map(|(_, b)| b.len()).sum()
    }

    /// The whole frame, in order: `frame` cut at each splice point with
    /// the batch that belongs there in between.
    pub fn io_slices<'a>(&'a self, frame: &'a [u8]) -> Vec<IoSlice<'a>> {
        let mut slices = Vec::with_capacity(2 * self.at.len() + 1);
        let mut from = 0;
        for (at, batch) in &self.at {
            if *at > from {
                slices.push(IoSlice::new(&frame[from..*at]));
            }
            slices.push(IoSlice::new(batch));
            from = *at;
        }
        if frame.len() > from {
            slices.push(IoSlice::new(&frame[from..]));
        }
        slices
    }
}

impl Default for Splices {
    fn default() -> Self {
        Splices::new()
    }
}

/// Writes every slice, however the writer splits the work (`writev` takes
/// at most `IOV_MAX` of them, and a socket may take part of one).
pub fn write_all_slices(
    w: &mut impl std::io::Write,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ProduceEntry, Request};
    use std::io::Write;

    /// A writer that takes at most `step` bytes and two slices per call.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let mut n = 0;
            for b in bufs.iter().take(2) {
                let take = b.len().min(self.step - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn produce_many(batch_lens: &[usize]) -> Request {
        Request::ProduceMany(
            batch_lens
                .iter()
                .enumerate()
                .map(|(i, &len)| ProduceEntry {
                    topic: format!("topic-{i}").into(),
                    queue: i as u32,
                    options: Default::default(),
                    batch: Bytes::from(vec![i as u8 + 1; len]).into(),
                })
                .collect(),
        )
    }

    /// Spliced or copied, the bytes written are the bytes encoded, and the
    /// head is exactly the request's size hint.
    #[test]
    fn spliced_frames_write_the_same_bytes() {
        let lens = [10, SPLICE_MIN_BYTES, 1000, 3 * SPLICE_MIN_BYTES, 5];
        for req in [
            produce_many(&lens),
            produce_many(&[SPLICE_MIN_BYTES + 1]),
            produce_many(&[]),
            Request::Produce {
                topic: "t".into(),
                queue: 1,
                batch: Bytes::from(vec![7u8; SPLICE_MIN_BYTES]),
            },
            Request::ListTopics,
        ] {
            let mut copied = BytesMut::new();
            req.encode_body(&mut copied);

            let mut head = BytesMut::new();
            let mut splices = Splices::new();
            req.encode_body_splicing(&mut head, &mut splices);
            assert_eq!(head.len() + splices.bytes(), copied.len());
            if let Request::ProduceMany(_) = req {
                assert_eq!(head.len(), req.body_bytes_hint(&Splices::new()));
            }
            for step in [1, 7, 4096, usize::MAX / 2] {
                let mut w = Trickle {
                    got: Vec::new(),
                    step,
                };
                write_all_slices(&mut w, &mut splices.io_slices(&head)).unwrap();
                assert_eq!(w.got, copied, "{req:?} in steps of {step}");
            }
        }
        let mut head = BytesMut::new();
        let mut splices = Splices::new();
        produce_many(&lens).encode_body_splicing(&mut head, &mut splices);
        assert_eq!(splices.bytes(), 4 * SPLICE_MIN_BYTES, "two batches spliced");
    }
}
