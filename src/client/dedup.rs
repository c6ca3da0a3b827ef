//! Consumer-side idempotence: [`Deduplicator`] remembers the ids of
//! messages already processed, in a bounded window, so a redelivered
//! message can be skipped.
//!
//! Delivery is at least once: after a crash, a rebalance or a lost commit,
//! a consumer reads again what it (or the queue's previous owner) read after
//! the last committed offset. A message's identity is the `id` header
//! ([`ID_HEADER`]) when the producer set one — it survives a producer retry
//! that stored the message twice — else its position (topic, queue,
//! offset), which catches redelivery of the same stored record.
//!
//! The window is bounded by count (`max_ids`) and, optionally, by age
//! (`max_age`): ids are forgotten oldest-first-seen first, so a duplicate
//! is only caught while its first sighting is still in the window. Size the
//! window to cover the redelivery span (for a group consumer: what is read
//! in one heartbeat interval plus one poll, per queue taken over; for a push
//! consumer: what is handed out within one ack timeout, since a message
//! comes back once that passes). The window is in memory: a restarted
//! process starts empty.
//!
//! With push delivery ([`crate::client::PushConsumer`]) a redelivered
//! message keeps its position, so even without an `id` header the position
//! catches it; [`Deduplicator::first_time_pushed`] takes a [`PushedRecord`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::consumer::ConsumedRecord;
use super::push_consumer::PushedRecord;

/// The record header that names a message for deduplication.
pub const ID_HEADER: &str = "id";
/// Default number of ids a [`Deduplicator`] remembers.
pub const DEDUP_IDS_MAX_DEFAULT: usize = 100_000;

/// What identifies a message for deduplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageId {
    /// The producer's `id` header.
    Header(Bytes),
    /// Where the record is stored.
    Position {
        topic: String,
        queue: u32,
        offset: i64,
    },
}

impl MessageId {
    /// The `id` header of `record` if it has one (the first, if repeated),
    /// else its position in `topic`.
    pub fn of(topic: &str, record: &ConsumedRecord) -> MessageId {
        Self::from_parts(topic, record.queue, record.offset, &record.headers)
    }

    /// [`MessageId::of`] for a message handed out by push delivery.
    pub fn of_pushed(topic: &str, record: &PushedRecord) -> MessageId {
        Self::from_parts(topic, record.queue, record.offset, &record.headers)
    }

    fn from_parts(
        topic: &str,
        queue: u32,
        offset: i64,
        headers: &[(String, Option<Bytes>)],
    ) -> MessageId {
        let header = headers
            .iter()
            .find(|(k, v)| k == ID_HEADER && v.is_some())
            .and_then(|(_, v)| v.clone());
        match header {
            Some(id) => MessageId::Header(id),
            None => MessageId::Position {
                topic: topic.to_string(),
                queue,
                offset,
            },
        }
    }
}

/// Remembers processed message ids in a window bounded by count and age.
#[derive(Debug, Clone)]
pub struct Deduplicator {
    max_ids: usize,
    max_age: Option<Duration>,
    /// When each remembered id was first seen.
    seen: HashMap<MessageId, Instant>,
    /// The same ids, oldest first (the eviction order).
    order: VecDeque<(MessageId, Instant)>,
}

impl Default for Deduplicator {
    fn default() -> Self {
        Deduplicator::new(DEDUP_IDS_MAX_DEFAULT, None)
    }
}

impl Deduplicator {
    /// Remembers at most `max_ids` ids (at least one), each for at most
    /// `max_age` when given.
    pub fn new(max_ids: usize, max_age: Option<Duration>) -> Deduplicator {
        let max_ids = max_ids.max(1);
        Deduplicator {
            max_ids,
            max_age,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` is new (and remembers it); false for an id still in
    /// the window: a duplicate to skip.
    pub fn first_time(&mut self, id: MessageId) -> bool {
        self.first_time_at(id, Instant::now())
    }

    /// [`Deduplicator::first_time`] for a consumed record of `topic`.
    pub fn first_time_record(&mut self, topic: &str, record: &ConsumedRecord) -> bool {
        self.first_time(MessageId::of(topic, record))
    }

    /// [`Deduplicator::first_time`] for a pushed message of `topic`.
    pub fn first_time_pushed(&mut self, topic: &str, record: &PushedRecord) -> bool {
        self.first_time(MessageId::of_pushed(topic, record))
    }

    /// [`Deduplicator::first_time`] at a given instant (`now` must not go back).
    pub fn first_time_at(&mut self, id: MessageId, now: Instant) -> bool {
        self.evict_expired(now);
        if self.seen.contains_key(&id) {
            return false;
        }
        while self.order.len() >= self.max_ids {
            self.pop_oldest();
        }
        self.seen.insert(id.clone(), now);
        self.order.push_back((id, now));
        true
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    fn evict_expired(&mut self, now: Instant) {
        let Some(age) = self.max_age else { return };
        while self
            .order
            .front()
            .is_some_and(|(_, t)| now.saturating_duration_since(*t) > age)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((id, _)) = self.order.pop_front() {
            self.seen.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: i64) -> MessageId {
        MessageId::Position {
            topic: "t".into(),
            queue: 0,
            offset,
        }
    }

    fn record(
        queue: u32,
        offset: i64,
        headers: &[(&str, Option<&'static [u8]>)],
    ) -> ConsumedRecord {
        ConsumedRecord {
            queue,
            offset,
            timestamp: 0,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(Bytes::from_static)))
                .collect(),
        }
    }

    #[test]
    fn redelivery_of_the_same_offset_is_skipped() {
        let mut d = Deduplicator::default();
        let r = record(2, 17, &[]);
        assert!(d.first_time_record("t", &r));
        assert!(!d.first_time_record("t", &r));
        // Same offset of another queue or topic is another message.
        assert!(d.first_time_record("t", &record(3, 17, &[])));
        assert!(d.first_time_record("u", &r));
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn the_id_header_wins_over_the_position() {
        let a = record(
            0,
            1,
            &[("trace", Some(b"x")), (ID_HEADER, Some(b"order-9"))],
        );
        let b = record(1, 5, &[(ID_HEADER, Some(b"order-9"))]);
        assert_eq!(
            MessageId::of("t", &a),
            MessageId::Header(Bytes::from_static(b"order-9"))
        );
        let mut d = Deduplicator::default();
        // Stored twice (a producer retry without idempotence): one message.
        assert!(d.first_time_record("t", &a));
        assert!(!d.first_time_record("t", &b));
        // A null id header does not name the message.
        let c = record(0, 2, &[(ID_HEADER, None)]);
        assert_eq!(MessageId::of("t", &c), pos(2));
    }

    #[test]
    fn a_redelivered_pushed_message_is_a_duplicate() {
        let first = PushedRecord {
            queue: 1,
            offset: 4,
            attempt: 1,
            timestamp: 0,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: Vec::new(),
        };
        let again = PushedRecord {
            attempt: 2,
            ..first.clone()
        };
        let mut d = Deduplicator::default();
        assert!(d.first_time_pushed("t", &first));
        assert!(!d.first_time_pushed("t", &again));
        // The same id header as a pulled record: one message.
        let named = PushedRecord {
            offset: 9,
            headers: vec![(ID_HEADER.into(), Some(Bytes::from_static(b"order-9")))],
            ..first
        };
        assert!(d.first_time_record("t", &record(0, 1, &[(ID_HEADER, Some(b"order-9"))])));
        assert!(!d.first_time_pushed("t", &named));
    }

    #[test]
    fn count_bound_evicts_oldest_first() {
        let mut d = Deduplicator::new(3, None);
        let t = Instant::now();
        for o in 0..3 {
            assert!(d.first_time_at(pos(o), t));
        }
        // A repeat does not refresh its place in the window.
        assert!(!d.first_time_at(pos(0), t));
        assert!(d.first_time_at(pos(3), t)); // evicts 0
        assert_eq!(d.len(), 3);
        assert!(!d.first_time_at(pos(1), t));
        assert!(!d.first_time_at(pos(3), t));
        assert!(d.first_time_at(pos(0), t)); // forgotten: new again; evicts 1
        assert!(d.first_time_at(pos(1), t)); // evicts 2
        assert!(!d.first_time_at(pos(3), t));
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn age_bound_forgets_old_ids() {
        let mut d = Deduplicator::new(100, Some(Duration::from_secs(10)));
        let t0 = Instant::now();
        assert!(d.first_time_at(pos(1), t0));
        assert!(d.first_time_at(pos(2), t0 + Duration::from_secs(6)));
        // Within the age: still a duplicate.
        assert!(!d.first_time_at(pos(1), t0 + Duration::from_secs(10)));
        // 1 is older than 10 s now, 2 is not.
        assert!(!d.first_time_at(pos(2), t0 + Duration::from_secs(11)));
        assert_eq!(d.len(), 1);
        assert!(d.first_time_at(pos(1), t0 + Duration::from_secs(11)));
        assert_eq!(d.len(), 2);
        d.clear();
        assert!(d.is_empty());
    }

    #[test]
    fn zero_capacity_still_remembers_the_last_id() {
        let mut d = Deduplicator::new(0, None);
        assert!(d.first_time(pos(1)));
        assert!(!d.first_time(pos(1)));
        assert!(d.first_time(pos(2)));
        assert!(d.first_time(pos(1)));
    }
}
