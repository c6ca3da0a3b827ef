//! Where a shard copies the small batches it stores.
//!
//! A batch cut from a larger buffer (a read buffer, a ProduceMany frame) is
//! copied before the tail cache keeps it, or it would pin that buffer (see
//! `shard::IN_PLACE_MIN_BYTES`). With 10,000 topics nearly every batch is
//! one 1 KiB message, and a `malloc` and `free` per batch was 15% of the
//! broker's CPU. Copies go one after another into a shared slab instead.
//! Batches are stored in log order and the tail cache drops them in log
//! order, so a slab's batches leave together and a slab is freed whole; at
//! most the slab being filled, and the unused end of each (less than one
//! batch), is memory the cache does not count.

use bytes::BytesMut;

/// Size of one slab, in bytes.
pub const SLAB_BYTES: usize = 256 << 10;

#[derive(Default)]
pub struct CopySlab {
    /// The unused rest of the current slab.
    free: BytesMut,
}

impl CopySlab {
    /// `bytes` copied into a buffer of their own length. Copies at most
    /// `SLAB_BYTES` long share a slab; longer ones get their own buffer.
    pub fn copy(&mut self, bytes: &[u8]) -> BytesMut {
        if bytes.len() > SLAB_BYTES {
            return BytesMut::from(bytes);
        }
        if self.free.capacity() < bytes.len() {
            self.free = BytesMut::with_capacity(SLAB_BYTES);
        }
        self.free.extend_from_slice(bytes);
        self.free.split()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_share_a_slab_until_it_is_full() {
        let mut slab = CopySlab::default();
        let a = slab.copy(&[1u8; 1000]);
        let b = slab.copy(&[2u8; 3000]);
        assert_eq!((&a[..], &b[..]), (&[1u8; 1000][..], &[2u8; 3000][..]));
        // Adjacent in one allocation.
        assert_eq!(a.as_ptr() as usize + 1000, b.as_ptr() as usize);
        let rest = SLAB_BYTES - 4000;
        let c = slab.copy(&vec![3u8; rest]);
        assert_eq!(b.as_ptr() as usize + 3000, c.as_ptr() as usize);
        // Full: the next copy starts a new slab.
        let d = slab.copy(&[4u8; 10]);
        assert_ne!(c.as_ptr() as usize + rest, d.as_ptr() as usize);
        assert_eq!(&d[..], &[4u8; 10]);
        // Patching one copy leaves its neighbours alone.
        let mut a = a;
        a[0] = 9;
        assert_eq!((a[0], b[0]), (9, 2));
    }

    #[test]
    fn a_copy_longer_than_a_slab_gets_its_own_buffer() {
        let mut slab = CopySlab::default();
        let small = slab.copy(&[1u8; 10]);
        let big = slab.copy(&vec![5u8; SLAB_BYTES + 1]);
        assert_eq!(big.len(), SLAB_BYTES + 1);
        let next = slab.copy(&[2u8; 10]);
        assert_eq!(small.as_ptr() as usize + 10, next.as_ptr() as usize);
    }
}
