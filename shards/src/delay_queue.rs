//! Delayed messages waiting for their due time on one shard.
//!
//! A delayed batch is written to the commit log at once (durable like any
//! other, as a DELAYED entry of its target queue) but kept out of the
//! queue's index. Its position waits on the shard's time wheel; when due,
//! the shard re-appends the batch to the queue as a FROM_DELAY entry that
//! names the DELAYED one, which is what makes the delivery durable: at
//! start-up every DELAYED entry without a FROM_DELAY naming it goes back
//! on the wheel, so a restart loses no timer (RocketMQ's SCHEDULE_TOPIC
//! idea, with the log itself as the schedule).
//!
//! Memory per pending message: one `DelayedRef` (32 bytes) in a hash map
//! plus its timer on the shard's wheel (a position and a due tick) — no
//! per-tick cost.

use crate::QueueKey;
use std::collections::HashMap;

/// A pending delayed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayedRef {
    pub key: QueueKey,
    pub batch_pos: u64,
    pub batch_len: u32,
    pub priority: u8,
    pub deliver_at_ms: i64,
}

#[derive(Default)]
pub struct DelayQueue {
    /// DELAYED entry position → what to deliver.
    pending: HashMap<u64, DelayedRef>,
}

impl DelayQueue {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records the DELAYED entry at `entry_pos`; false if it was known already.
    pub fn add(&mut self, entry_pos: u64, r: DelayedRef) -> bool {
        self.pending.insert(entry_pos, r).is_none()
    }

    /// Takes the entry whose timer fired; `None` if it was delivered already.
    pub fn take(&mut self, entry_pos: u64) -> Option<DelayedRef> {
        self.pending.remove(&entry_pos)
    }

    /// Every pending entry (to arm timers after recovery).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &DelayedRef)> {
        self.pending.iter().map(|(p, r)| (*p, r))
    }

    /// The oldest log position a pending batch still needs (retention must keep it).
    pub fn oldest_pos(&self) -> Option<u64> {
        self.pending.keys().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(at: i64) -> DelayedRef {
        DelayedRef {
            key: QueueKey {
                topic_id: 1,
                queue: 0,
            },
            batch_pos: 0,
            batch_len: 10,
            priority: 0,
            deliver_at_ms: at,
        }
    }

    #[test]
    fn pending_entries_are_taken_once() {
        let mut q = DelayQueue::default();
        assert!(q.add(100, r(2_000)));
        assert!(q.add(200, r(1_500)));
        assert!(!q.add(200, r(1_500)));
        assert_eq!(q.oldest_pos(), Some(100));
        assert_eq!(q.take(200).map(|r| r.deliver_at_ms), Some(1_500));
        assert_eq!(q.take(200), None);
        assert_eq!(q.len(), 1);
        assert_eq!(std::mem::size_of::<DelayedRef>(), 32);
    }
}
