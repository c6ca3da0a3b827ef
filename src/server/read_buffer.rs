//! A connection's read buffer, which zeroes its memory at most once.
//!
//! `AsyncRead` reads into initialized memory, so room for a read has to be
//! zeroed first. Growing the buffer with `resize` zeroed all the room again
//! on every read, and a 64 KiB frame arriving in three reads was zeroed
//! three times over: 5% of the broker's CPU at 1.5 GB/s. This buffer
//! remembers how much memory past its data an earlier read or zeroing left
//! initialized, and zeroes only beyond that.

use bytes::BytesMut;
use futures::io::{AsyncRead, AsyncReadExt};
use std::ops::Deref;

#[derive(Default)]
pub struct ReadBuffer {
    buf: BytesMut,
    /// Bytes past `buf.len()` (within its capacity) known initialized.
    init: usize,
}

impl ReadBuffer {
    pub fn with_capacity(bytes: usize) -> Self {
        ReadBuffer {
            buf: BytesMut::with_capacity(bytes),
            init: 0,
        }
    }

    /// Makes the buffer `b`, whose spare memory is not known initialized.
    pub fn set(&mut self, b: BytesMut) {
        self.buf = b;
        self.init = 0;
    }

    /// All the data, leaving the buffer empty and without memory.
    pub fn take(&mut self) -> BytesMut {
        self.init = 0;
        std::mem::take(&mut self.buf)
    }

    /// The first `at` bytes of data; the rest keeps its memory.
    pub fn split_to(&mut self, at: usize) -> BytesMut {
        self.buf.split_to(at)
    }

    /// Room for `additional` more bytes (see `BytesMut::reserve`).
    pub fn reserve(&mut self, additional: usize) {
        let before = (self.buf.as_ptr(), self.buf.capacity());
        self.buf.reserve(additional);
        if (self.buf.as_ptr(), self.buf.capacity()) != before {
            // Moved or grown: the spare memory is new.
            self.init = 0;
        }
    }

    /// Reads at most `want` bytes onto the end of the data; `Ok(0)` at EOF.
    pub async fn read_from(
        &mut self,
        reader: &mut (impl AsyncRead + Unpin),
        want: usize,
    ) -> std::io::Result<usize> {
        self.reserve(want);
        let start = self.buf.len();
        let spare = self.buf.spare_capacity_mut();
        if self.init < want {
            spare[self.init..want].fill(std::mem::MaybeUninit::new(0));
            self.init = want;
        }
        // SAFETY: the first `init` (>= `want`) bytes past the data are
        // initialized, by the zeroing above or earlier, and the memory has
        // not moved since (`reserve`, `set` and `take` reset `init`).
        unsafe { self.buf.set_len(start + want) };
        let result = reader.read(&mut self.buf[start..]).await;
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        self.init -= n;
        result
    }
}

impl Deref for ReadBuffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    /// A reader that hands out its bytes `step` at a time.
    struct Trickle {
        data: Vec<u8>,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn partial_reads_fill_the_buffer_in_order() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = Trickle {
            data: data.clone(),
            step: 3_000,
        };
        let mut b = ReadBuffer::with_capacity(16);
        while b.len() < data.len() {
            let want = data.len() - b.len();
            assert!(block_on(b.read_from(&mut r, want)).unwrap() > 0);
        }
        assert_eq!(&b[..], &data[..]);
        assert_eq!(block_on(b.read_from(&mut r, 100)).unwrap(), 0);
        assert_eq!(b.len(), data.len());
        let front = b.split_to(4_000);
        assert_eq!(&front[..], &data[..4_000]);
        assert_eq!(&b[..], &data[4_000..]);
        let rest = b.take();
        assert_eq!(rest.len(), 6_000);
        assert!(b.is_empty());
    }

    #[test]
    fn room_already_initialized_is_not_zeroed_again() {
        let mut r = Trickle {
            data: vec![7u8; 100],
            step: 10,
        };
        let mut b = ReadBuffer::with_capacity(1_000);
        assert_eq!(block_on(b.read_from(&mut r, 1_000)).unwrap(), 10);
        // 990 bytes past the data were zeroed by the first read and are
        // still initialized: the next read of up to 990 zeroes nothing.
        assert_eq!(b.init, 990);
        assert_eq!(block_on(b.read_from(&mut r, 990)).unwrap(), 10);
        assert_eq!(b.init, 980);
        b.set(BytesMut::with_capacity(10));
        assert_eq!(b.init, 0);
    }
}
