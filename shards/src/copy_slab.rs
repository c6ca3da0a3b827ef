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
//!
//! For the same reason a filled slab comes free before the ones filled
//! after it, so the shard keeps a handle on each and takes the oldest
//! again once nothing else holds it: its pages are mapped already, where
//! a new slab's were faulted in and zeroed by the kernel (4% of the
//! broker's CPU with 10,000 topics). One slab is looked at per new slab
//! needed, so free slabs wait at most until traffic needs them; after a
//! burst (all topics deleted, say) up to a tail cache's worth stays
//! allocated until then. Handles are kept for at most `SLABS_TRACKED_MAX`
//! slabs.

use bytes::BytesMut;
use std::collections::VecDeque;

/// Size of one slab, in bytes.
pub const SLAB_BYTES: usize = 256 << 10;

/// Filled slabs the shard keeps a handle on, waiting for them to come
/// free: more than a full tail cache holds (64 MiB by default), so the
/// oldest is normally the next to be released.
pub const SLABS_TRACKED_MAX: usize = 1024;

#[derive(Default)]
pub struct CopySlab {
    /// The unused rest of the current slab.
    free: BytesMut,
    /// The (empty) rest of each filled slab, oldest first.
    filled: VecDeque<BytesMut>,
    started: bool,
}

impl CopySlab {
    /// `bytes` copied into a buffer of their own length. Copies at most
    /// `SLAB_BYTES` long share a slab; longer ones get their own buffer.
    pub fn copy(&mut self, bytes: &[u8]) -> BytesMut {
        if bytes.len() > SLAB_BYTES {
            return BytesMut::from(bytes);
        }
        if self.free.capacity() < bytes.len() {
            self.next_slab();
        }
        self.free.extend_from_slice(bytes);
        self.free.split()
    }

    /// Retires the current slab and starts the oldest free one, or a new one.
    fn next_slab(&mut self) {
        // Reclaiming succeeds only when no copy in that slab is held anywhere.
        let reused = self.filled.pop_front().and_then(|mut oldest| {
            if oldest.try_reclaim(SLAB_BYTES) {
                return Some(oldest);
            }
            // Still held (a push delivery waiting for its ack, a reply being
            // sent): it goes to the back, so it cannot keep the slabs
            // behind it, free or not, from being looked at.
            self.filled.push_back(oldest);
            None
        });
        let filled = std::mem::replace(
            &mut self.free,
            reused.unwrap_or_else(|| BytesMut::with_capacity(SLAB_BYTES)),
        );
        // The first time, `free` was no slab: nothing to wait for.
        if self.started {
            self.filled.push_back(filled);
        }
        self.started = true;
        if self.filled.len() > SLABS_TRACKED_MAX {
            self.filled.pop_front();
        }
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
    fn a_slab_is_taken_again_once_its_copies_are_gone() {
        let mut slab = CopySlab::default();
        let first = slab.copy(&[1u8; 100]);
        let first_ptr = first.as_ptr();
        // Fill the rest of the first slab, then start a second.
        let rest = slab.copy(&vec![2u8; SLAB_BYTES - 100]);
        let second = slab.copy(&[3u8; 10]);
        assert_ne!(second.as_ptr(), first_ptr);
        // While a copy of the first slab lives, a third slab is new.
        drop(rest);
        let fill = slab.copy(&vec![4u8; SLAB_BYTES - 10]);
        let third = slab.copy(&[5u8; 10]);
        assert_ne!(third.as_ptr(), first_ptr);
        assert_eq!(&first[..], &[1u8; 100]);
        // Once the first slab's copies are all gone it is taken again, and
        // what was in it is overwritten, not what the live copies hold.
        drop(first);
        let fill2 = slab.copy(&vec![6u8; SLAB_BYTES - 10]);
        let again = slab.copy(&[7u8; 10]);
        assert_eq!(again.as_ptr(), first_ptr);
        assert_eq!(&again[..], &[7u8; 10]);
        assert_eq!((&second[..], &third[..]), (&[3u8; 10][..], &[5u8; 10][..]));
        assert!(fill.iter().all(|&b| b == 4) && fill2.iter().all(|&b| b == 6));
    }

    #[test]
    fn a_held_slab_does_not_keep_later_free_ones_from_reuse() {
        let mut slab = CopySlab::default();
        let pinned = slab.copy(&vec![1u8; SLAB_BYTES]); // slab 1, held
        let second = slab.copy(&vec![2u8; SLAB_BYTES]); // slab 2
        let second_ptr = second.as_ptr();
        drop(second);
        // One filled slab is looked at per slab needed: slab 1 twice (held,
        // to the back each time; slabs 3 and 4 are new), then slab 2 (free).
        let third = slab.copy(&vec![3u8; SLAB_BYTES]);
        let fourth = slab.copy(&vec![4u8; SLAB_BYTES]);
        let fifth = slab.copy(&vec![5u8; SLAB_BYTES]);
        assert_ne!(third.as_ptr(), second_ptr);
        assert_ne!(fourth.as_ptr(), second_ptr);
        assert_eq!(fifth.as_ptr(), second_ptr);
        assert!(pinned.iter().all(|&b| b == 1));
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
