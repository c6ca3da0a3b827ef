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
//! plus an 8-byte position in a wheel slot — no per-tick cost.

use crate::time_wheel::TimeWheel;
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

pub struct DelayQueue {
    wheel: TimeWheel<u64>,
    /// DELAYED entry position → what to deliver.
    pending: HashMap<u64, DelayedRef>,
}

impl DelayQueue {
    pub fn new(tick_ms: u64, now_ms: u64) -> Self {
        DelayQueue {
            wheel: TimeWheel::new(tick_ms, now_ms),
            pending: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Schedules the DELAYED entry at `entry_pos`.
    pub fn add(&mut self, entry_pos: u64, r: DelayedRef) {
        if self.pending.insert(entry_pos, r).is_none() {
            self.wheel.insert(r.deliver_at_ms.max(0) as u64, entry_pos);
        }
    }

    /// Forgets an entry already delivered (seen at recovery).
    pub fn remove(&mut self, entry_pos: u64) {
        // The wheel keeps the position; `due` skips it when it fires.
        self.pending.remove(&entry_pos);
    }

    /// Pending batches due at `now_ms`, in no particular order.
    pub fn due(&mut self, now_ms: u64) -> Vec<(u64, DelayedRef)> {
        self.wheel
            .advance(now_ms)
            .into_iter()
            .filter_map(|pos| self.pending.remove(&pos).map(|r| (pos, r)))
            .collect()
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
    fn due_in_time_order_and_removed_ones_never_fire() {
        let mut q = DelayQueue::new(10, 1_000);
        q.add(100, r(2_000));
        q.add(200, r(1_500));
        q.add(300, r(1_500));
        q.remove(300);
        assert_eq!(q.oldest_pos(), Some(100));
        assert!(q.due(1_499).is_empty());
        let due: Vec<u64> = q.due(1_500).into_iter().map(|(p, _)| p).collect();
        assert_eq!(due, vec![200]);
        assert_eq!(q.due(2_000).len(), 1);
        assert!(q.is_empty());
        assert_eq!(std::mem::size_of::<DelayedRef>(), 32);
    }
}
