//! Push delivery with acknowledgements for one consumer group on one queue
//! (seed 003's push/ack/redeliver loop).
//!
//! The broker hands out messages, remembers each one in flight with its
//! attempt count and deadline, and takes acknowledgements in any order. A
//! message not acknowledged by its deadline (or rejected) is delivered again,
//! to whichever member asks next; after `max_attempts` deliveries it is
//! dead-lettered instead. Within the queue, pending messages of a higher
//! priority are handed out before lower ones; equal priorities keep offset
//! order. Offsets do not change: priority only reorders delivery.
//!
//! `ack_level` is the group's progress: every offset below it is done
//! (acknowledged or dead-lettered). It is what the broker commits as the
//! group's offset, so pull consumers of the same group and `group describe`
//! see it. Everything here is shard-local; `snapshot`/`restore` carry it
//! across restarts (messages in flight at a crash come back for redelivery).

use crate::consume_queue::ConsumeQueue;
use crate::segment::PRIORITY_MAX;
use std::collections::{BTreeMap, BTreeSet};

/// Priority levels.
pub const LANES: usize = PRIORITY_MAX as usize + 1;
/// Messages one member may hold in flight per queue, per group.
pub const IN_FLIGHT_PER_QUEUE_MAX: usize = 100_000;

/// How a group wants its messages delivered (sent with every receive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryConfig {
    pub ack_timeout_ms: i64,
    pub max_attempts: u32,
}

/// A message handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handout {
    pub offset: i64,
    /// 1 for the first delivery.
    pub attempt: u32,
    pub deadline_ms: i64,
}

/// What a rejection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nacked {
    /// The offset was not out (already settled, or never handed out).
    NotOut,
    /// It goes out again with the next receive.
    Retry,
    /// It used up its attempts.
    Dead(Dead),
}

/// A message that used up its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dead {
    pub offset: i64,
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    attempts: u32,
    deadline_ms: i64,
}

/// One group's delivery state on one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Per priority: every message of that priority below this offset was handed out at least once.
    lane_next: [i64; LANES],
    in_flight: BTreeMap<i64, InFlight>,
    /// Timed out or rejected, waiting to go out again: offset → attempts so far.
    retry: BTreeMap<i64, u32>,
    /// Done offsets at or above `ack_level`.
    done_above: BTreeSet<i64>,
    ack_level: i64,
}

impl Subscription {
    /// A subscription starting at `start` (the group's committed offset or the queue start).
    pub fn new(start: i64) -> Self {
        Subscription {
            lane_next: [start; LANES],
            in_flight: BTreeMap::new(),
            retry: BTreeMap::new(),
            done_above: BTreeSet::new(),
            ack_level: start,
        }
    }

    pub fn ack_level(&self) -> i64 {
        self.ack_level
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// An ack timeout fired for `offset` handed out as `attempt`: if that
    /// delivery is still unacknowledged, the message goes back to the retry set.
    pub fn expire(&mut self, offset: i64, attempt: u32) -> bool {
        match self.in_flight.get(&offset) {
            Some(f) if f.attempts == attempt => {
                self.in_flight.remove(&offset);
                self.retry.insert(offset, attempt);
                true
            }
            _ => false,
        }
    }

    /// Hands out up to `max` messages: retries first, then new messages by
    /// priority (highest first). Messages out of attempts are returned as
    /// dead instead (and count as done). `visible_end` bounds new messages.
    pub fn take(
        &mut self,
        queue: &ConsumeQueue,
        visible_pos: u64,
        max: usize,
        cfg: DeliveryConfig,
        now_ms: i64,
    ) -> (Vec<Handout>, Vec<Dead>) {
        let mut out = Vec::new();
        let mut dead = Vec::new();
        let room = IN_FLIGHT_PER_QUEUE_MAX.saturating_sub(self.in_flight.len());
        let max = max.min(room);
        // Messages below the queue's start were deleted by retention: settled.
        let start = queue.start_offset();
        self.skip_to(start);
        while out.len() < max {
            let Some((&offset, &attempts)) = self.retry.iter().next() else {
                break;
            };
            self.retry.remove(&offset);
            if attempts >= cfg.max_attempts {
                dead.push(Dead { offset, attempts });
                self.mark_done(offset);
                continue;
            }
            out.push(self.hand_out(offset, attempts + 1, cfg, now_ms));
        }
        for lane in (0..LANES).rev() {
            if out.len() >= max {
                break;
            }
            let from = self.lane_next[lane].max(start);
            for e in queue.entries_from(from) {
                if e.end_pos() > visible_pos || out.len() >= max {
                    break;
                }
                if usize::from(e.priority) != lane {
                    self.lane_next[lane] = e.next_offset();
                    continue;
                }
                let first = from.max(e.base_offset);
                let last = e.next_offset().min(first + (max - out.len()) as i64);
                for offset in first..last {
                    out.push(self.hand_out(offset, 1, cfg, now_ms));
                }
                self.lane_next[lane] = last;
                if last < e.next_offset() {
                    break;
                }
            }
        }
        (out, dead)
    }

    fn hand_out(&mut self, offset: i64, attempt: u32, cfg: DeliveryConfig, now_ms: i64) -> Handout {
        let deadline_ms = now_ms + cfg.ack_timeout_ms;
        self.in_flight.insert(
            offset,
            InFlight {
                attempts: attempt,
                deadline_ms,
            },
        );
        Handout {
            offset,
            attempt,
            deadline_ms,
        }
    }

    /// Acknowledges `offset`; false if it was not in flight (late or unknown ack).
    pub fn ack(&mut self, offset: i64) -> bool {
        let known =
            self.in_flight.remove(&offset).is_some() || self.retry.remove(&offset).is_some();
        if known {
            self.mark_done(offset);
        }
        known
    }

    /// Rejects `offset`: it goes out again at once, or dies if out of attempts.
    pub fn nack(&mut self, offset: i64, cfg: DeliveryConfig) -> Nacked {
        let Some(f) = self.in_flight.remove(&offset) else {
            return Nacked::NotOut;
        };
        if f.attempts >= cfg.max_attempts {
            self.mark_done(offset);
            return Nacked::Dead(Dead {
                offset,
                attempts: f.attempts,
            });
        }
        self.retry.insert(offset, f.attempts);
        Nacked::Retry
    }

    /// Everything below `start` is gone from the queue: count it settled,
    /// so the ack level (the group's committed offset) keeps moving.
    fn skip_to(&mut self, start: i64) {
        if self.ack_level >= start {
            return;
        }
        self.ack_level = start;
        self.retry = self.retry.split_off(&start);
        self.in_flight = self.in_flight.split_off(&start);
        self.done_above = self.done_above.split_off(&start);
        for l in &mut self.lane_next {
            *l = (*l).max(start);
        }
        while self.done_above.remove(&self.ack_level) {
            self.ack_level += 1;
        }
    }

    fn mark_done(&mut self, offset: i64) {
        if offset < self.ack_level {
            return;
        }
        self.done_above.insert(offset);
        while self.done_above.remove(&self.ack_level) {
            self.ack_level += 1;
        }
    }

    /// The state to persist: (ack level, lane positions, done offsets above
    /// the ack level, offsets out or waiting with their attempts).
    pub fn snapshot(&self) -> SubscriptionSnapshot {
        SubscriptionSnapshot {
            ack_level: self.ack_level,
            lane_next: self.lane_next,
            done_above: self.done_above.iter().copied().collect(),
            attempts: self
                .in_flight
                .iter()
                .map(|(o, f)| (*o, f.attempts))
                .chain(self.retry.iter().map(|(o, a)| (*o, *a)))
                .collect(),
        }
    }

    /// Rebuilds from a snapshot: whatever was in flight goes out again.
    pub fn restore(s: &SubscriptionSnapshot) -> Self {
        Subscription {
            lane_next: s.lane_next,
            in_flight: BTreeMap::new(),
            retry: s.attempts.iter().copied().collect(),
            done_above: s.done_above.iter().copied().collect(),
            ack_level: s.ack_level,
        }
    }
}

/// What survives a restart of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSnapshot {
    pub ack_level: i64,
    pub lane_next: [i64; LANES],
    pub done_above: Vec<i64>,
    pub attempts: Vec<(i64, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consume_queue::IndexEntry;

    fn queue(priorities: &[u8]) -> ConsumeQueue {
        let mut q = ConsumeQueue::new(0);
        for (i, p) in priorities.iter().enumerate() {
            q.push(IndexEntry {
                base_offset: i as i64,
                batch_pos: i as u64 * 100,
                batch_len: 100,
                record_count: 1,
                priority: *p,
            });
        }
        q
    }

    const CFG: DeliveryConfig = DeliveryConfig {
        ack_timeout_ms: 1000,
        max_attempts: 3,
    };

    fn offsets(h: &[Handout]) -> Vec<i64> {
        h.iter().map(|h| h.offset).collect()
    }

    #[test]
    fn higher_priorities_first_equal_priorities_in_order() {
        let q = queue(&[0, 3, 1, 3, 0, 2]);
        let mut s = Subscription::new(0);
        let (h, _) = s.take(&q, u64::MAX, 100, CFG, 0);
        assert_eq!(offsets(&h), vec![1, 3, 5, 2, 0, 4]);
        for o in [1, 3, 5, 2, 0] {
            assert!(s.ack(o));
        }
        assert_eq!(s.ack_level(), 4);
        assert!(s.ack(4));
        assert_eq!(s.ack_level(), 6);
        // A limit cuts the hand-out without losing anything.
        let mut s = Subscription::new(0);
        let (h, _) = s.take(&q, u64::MAX, 2, CFG, 0);
        assert_eq!(offsets(&h), vec![1, 3]);
        let (h, _) = s.take(&q, u64::MAX, 10, CFG, 0);
        assert_eq!(offsets(&h), vec![5, 2, 0, 4]);
    }

    #[test]
    fn unacked_messages_come_back_then_die() {
        let q = queue(&[0, 0]);
        let mut s = Subscription::new(0);
        let (h, _) = s.take(&q, u64::MAX, 10, CFG, 0);
        assert_eq!(h.len(), 2);
        assert!(s.ack(1));
        // Not yet expired: nothing to hand out; a stale timer changes nothing.
        assert!(s.take(&q, u64::MAX, 10, CFG, 999).0.is_empty());
        assert!(!s.expire(0, 7));
        // The timer of attempt 1 fires: offset 0 comes back as attempt 2, then 3.
        assert!(s.expire(0, 1));
        let (h, _) = s.take(&q, u64::MAX, 10, CFG, 1000);
        assert_eq!((h[0].offset, h[0].attempt), (0, 2));
        assert_eq!(s.nack(0, CFG), Nacked::Retry);
        assert_eq!(s.nack(0, CFG), Nacked::NotOut);
        let (h, _) = s.take(&q, u64::MAX, 10, CFG, 1000);
        assert_eq!(h[0].attempt, 3);
        // The third failure is the last: dead, and done.
        assert_eq!(
            s.nack(0, CFG),
            Nacked::Dead(Dead {
                offset: 0,
                attempts: 3
            })
        );
        assert_eq!(s.ack_level(), 2);
    }

    #[test]
    fn messages_deleted_by_retention_count_as_settled() {
        let mut q = queue(&[0, 0, 0, 0]);
        let mut s = Subscription::new(0);
        let (h, _) = s.take(&q, u64::MAX, 1, CFG, 0);
        assert_eq!(offsets(&h), vec![0]);
        // Retention deletes the first three batches before anything is acked.
        q.truncate_before(300);
        let (h, _) = s.take(&q, u64::MAX, 10, CFG, 0);
        assert_eq!(offsets(&h), vec![3]);
        assert_eq!(s.ack_level(), 3);
        assert!(s.ack(3));
        assert_eq!(s.ack_level(), 4);
    }

    #[test]
    fn snapshots_bring_in_flight_messages_back() {
        let q = queue(&[0, 0, 0]);
        let mut s = Subscription::new(0);
        s.take(&q, u64::MAX, 10, CFG, 0);
        s.ack(1);
        let r = Subscription::restore(&s.snapshot());
        assert_eq!(r.ack_level(), 0);
        let mut r = r;
        let (h, _) = r.take(&q, u64::MAX, 10, CFG, 0);
        assert_eq!(offsets(&h), vec![0, 2]);
        assert_eq!(h[0].attempt, 2);
    }
}
