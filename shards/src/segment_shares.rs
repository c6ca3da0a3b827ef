//! What one queue holds in each commit-log segment: the bytes and the
//! newest timestamp that retention decides by.
//!
//! The commit log is shared by all of a shard's queues, so a segment can be
//! deleted only once every queue with data in it is past its retention.
//! Each queue keeps its own shares, in segment order, beside its index: the
//! append that already has the queue's state at hand adds to the last one.
//! (A per-segment map of queues, as before, cost a hash lookup per append
//! into a map of 10,000 queues.)

use std::collections::VecDeque;

/// A queue's data in one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Base of the segment.
    pub base: u64,
    /// Bytes of the queue's batches in it.
    pub bytes: u64,
    /// Newest `max_timestamp` of those batches, in ms.
    pub max_timestamp: i64,
}

/// A queue's shares, oldest segment first.
#[derive(Debug, Default)]
pub struct SegmentShares(VecDeque<Share>);

impl SegmentShares {
    /// Counts a batch of `bytes` appended to the segment at `base`, which
    /// is never older than the segment of the batch counted before it.
    pub fn add(&mut self, base: u64, bytes: u64, max_timestamp: i64) {
        match self.0.back_mut() {
            Some(last) if last.base == base => {
                last.bytes += bytes;
                last.max_timestamp = last.max_timestamp.max(max_timestamp);
            }
            _ => {
                debug_assert!(self.0.back().is_none_or(|last| last.base < base));
                self.0.push_back(Share {
                    base,
                    bytes,
                    max_timestamp,
                });
            }
        }
    }

    /// The queue's share of the oldest stored segment, at `base`; `None`
    /// when it has nothing there.
    pub fn oldest(&self, base: u64) -> Option<&Share> {
        self.0.front().filter(|s| s.base == base)
    }

    /// Forgets the shares of segments before `start` (deleted).
    pub fn forget_before(&mut self, start: u64) {
        while self.0.front().is_some_and(|s| s.base < start) {
            self.0.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_add_up_per_segment_and_deleted_segments_are_forgotten() {
        let mut s = SegmentShares::default();
        s.add(0, 100, 5);
        s.add(0, 50, 3);
        s.add(4096, 10, 9);
        assert_eq!(
            s.oldest(0),
            Some(&Share {
                base: 0,
                bytes: 150,
                max_timestamp: 5
            })
        );
        // Nothing in a segment it never appended to.
        assert_eq!(s.oldest(2048), None);
        s.forget_before(4096);
        assert_eq!(s.oldest(0), None);
        assert_eq!(s.oldest(4096).map(|s| s.bytes), Some(10));
        s.forget_before(1 << 20);
        assert_eq!(s.oldest(4096), None);
    }
}
