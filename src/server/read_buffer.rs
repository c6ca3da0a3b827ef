//! A connection's read buffer, which zeroes as little memory as it can.
//!
//! `AsyncRead` reads into initialized memory, so room for a read through
//! it has to be zeroed first. Growing the buffer with `resize` zeroed all
//! the room again on every read, and a 64 KiB frame arriving in three reads
//! was zeroed three times over: 5% of the broker's CPU at 1.5 GB/s. So a
//! read first asks the kernel directly (`recv` with `MSG_DONTWAIT`) to
//! write into the spare memory as it is: nothing to zero, and each 1 MiB
//! ProduceMany frame gets a new buffer (its batches stay in the tail cache).
//! Only when nothing has arrived yet does it wait through the stream, with
//! at most `WAIT_READ_BYTES` of room zeroed; the buffer remembers how much
//! memory past its data is initialized, and zeroes only beyond that.

use bytes::BytesMut;
use futures::io::{AsyncRead, AsyncReadExt};
use std::ops::Deref;
use std::os::fd::RawFd;

/// Room a read that has to wait for data zeroes and reads into, at most.
/// The reads after it, while data keeps coming, go straight to the kernel.
pub const WAIT_READ_BYTES: usize = 4 << 10;

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
    /// `fd` is `reader`'s socket: what has already arrived is received
    /// from it directly; `reader` waits when nothing has.
    pub async fn read_from(
        &mut self,
        reader: &mut (impl AsyncRead + Unpin),
        fd: RawFd,
        want: usize,
    ) -> std::io::Result<usize> {
        self.reserve(want);
        let start = self.buf.len();
        let spare = self.buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most `want` bytes into the spare
        // memory, which `reserve` made at least that long; it never reads it.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialized the `n` bytes it received.
            unsafe { self.buf.set_len(start + n) };
            self.init = self.init.saturating_sub(n);
            return Ok(n);
        }
        let err = std::io::Error::last_os_error();
        if !matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) {
            return Err(err);
        }
        self.read_zeroed(reader, want.min(WAIT_READ_BYTES)).await
    }

    /// Reads at most `want` bytes through `reader` into zeroed room.
    async fn read_zeroed(
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
            assert!(block_on(b.read_zeroed(&mut r, want)).unwrap() > 0);
        }
        assert_eq!(&b[..], &data[..]);
        assert_eq!(block_on(b.read_zeroed(&mut r, 100)).unwrap(), 0);
        assert_eq!(b.len(), data.len());
        let front = b.split_to(4_000);
        assert_eq!(&front[..], &data[..4_000]);
        assert_eq!(&b[..], &data[4_000..]);
        let rest = b.take();
        assert_eq!(rest.len(), 6_000);
        assert!(b.is_empty());
    }

    /// A connected socket pair: (ours, the peer's).
    fn socket_pair() -> (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ) {
        std::os::unix::net::UnixStream::pair().unwrap()
    }

    #[test]
    fn what_has_arrived_is_received_without_zeroing() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (ours, mut peer) = socket_pair();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        peer.write_all(&data).unwrap();
        let mut stream = futures::io::AllowStdIo::new(ours.try_clone().unwrap());
        let mut b = ReadBuffer::with_capacity(16);
        while b.len() < data.len() {
            let want = data.len() - b.len();
            assert!(block_on(b.read_from(&mut stream, ours.as_raw_fd(), want)).unwrap() > 0);
        }
        assert_eq!(&b[..], &data[..]);
        // Nothing was zeroed: the kernel wrote every byte.
        assert_eq!(b.init, 0);
        // Nothing there yet: the read waits through the stream, in a room of
        // at most WAIT_READ_BYTES zeroed bytes, then goes direct again.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            peer.write_all(&[9u8; 3 * WAIT_READ_BYTES]).unwrap();
            peer
        });
        let n = block_on(b.read_from(&mut stream, ours.as_raw_fd(), 1 << 20)).unwrap();
        assert!((1..=WAIT_READ_BYTES).contains(&n), "{n}");
        let peer = writer.join().unwrap();
        while b.len() < data.len() + 3 * WAIT_READ_BYTES {
            assert!(block_on(b.read_from(&mut stream, ours.as_raw_fd(), 1 << 20)).unwrap() > 0);
        }
        assert!(b[data.len()..].iter().all(|&x| x == 9));
        // The peer closing is the end of the stream.
        drop(peer);
        assert_eq!(
            block_on(b.read_from(&mut stream, ours.as_raw_fd(), 100)).unwrap(),
            0
        );
    }

    #[test]
    fn room_already_initialized_is_not_zeroed_again() {
        let mut r = Trickle {
            data: vec![7u8; 100],
            step: 10,
        };
        let mut b = ReadBuffer::with_capacity(1_000);
        assert_eq!(block_on(b.read_zeroed(&mut r, 1_000)).unwrap(), 10);
        // 990 bytes past the data were zeroed by the first read and are
        // still initialized: the next read of up to 990 zeroes nothing.
        assert_eq!(b.init, 990);
        assert_eq!(block_on(b.read_zeroed(&mut r, 990)).unwrap(), 10);
        assert_eq!(b.init, 980);
        b.set(BytesMut::with_capacity(10));
        assert_eq!(b.init, 0);
    }
}
