//! [`PushConsumer`]: push delivery with acknowledgements for a consumer
//! group on one topic.
//!
//! The loop. The broker keeps, per (group, queue), which messages are out,
//! how often each was delivered and when its acknowledgement is due. A
//! member asks for messages ([`PushConsumer::poll`]) and gets each with its
//! attempt number (1 for the first delivery); it settles them with
//! [`PushConsumer::ack`] (done) or [`PushConsumer::nack`] (failed: deliver
//! again at once). A message neither acked nor nacked within
//! [`PushConfig::ack_timeout`] goes out again to whichever member of the
//! group receives next — possibly another process — with its attempt number
//! raised. After [`PushConfig::max_attempts`] deliveries a message is not
//! delivered again but moved to the group's dead-letter topic `<group>-dlq`
//! (an ordinary topic with one queue, created on first use; each dead
//! message carries headers `coremq-dlq-topic`, `-queue`, `-offset`,
//! `-attempts` naming where it came from), where any consumer can read it.
//! Within a queue, retries go out first, then pending messages by priority
//! (highest first), equal priorities in offset order. Everything below the
//! group's lowest unsettled offset is committed as the group's offset, so
//! `coremq group describe` shows push progress like pull progress.
//!
//! Under the hood delivery is long-poll based: `poll` keeps one `Receive`
//! request in flight per queue, pipelined on one connection, each held open
//! by the broker for up to [`PushConfig::max_wait_ms`] until it has
//! something to hand out. The broker, not this client, drives redelivery
//! and counts attempts: the client keeps no delivery state, any member may
//! receive from any queue (there is no assignment and no rebalance), and a
//! member that dies simply stops acknowledging — its messages come back
//! after their ack timeout. The broker saves its delivery state every
//! 100 ms and at shutdown; after a crash, messages that were out come back
//! with their attempt counts kept.
//!
//! Guarantees: at least once. A message is handed out again whenever its
//! acknowledgement does not reach the broker in time (slow processing, a
//! crash between processing and ack, an ack lost with the connection, a
//! broker crash before its next save), so a consumer must tolerate
//! duplicates; with a [`crate::client::Deduplicator`]
//! ([`crate::client::Deduplicator::first_time_pushed`]) over the producer's
//! `id` header, processing is effectively once within the dedup window.
//! Messages handed out to this consumer but never returned by `poll` (a
//! receive still in flight at [`PushConsumer::close`]) are released with a
//! nack; like any delivery, that counts as an attempt.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coremq_shards::batch::{decode_records_shared, split_batches, BatchError};
use coremq_shards::push_delivery::{ACK_TIMEOUT_MS_MAX, MAX_ATTEMPTS_MAX};

use crate::protocol::messages::GROUP_NAME_BYTES_MAX;
use crate::protocol::{Ack, ApiKey, Receive, Reply, Request};

use super::admin::describe_topic;
use super::connection::{ClientError, Connection, REQUEST_TIMEOUT_DEFAULT};
use super::pipeline::{timeouts, Answer, Pipeline, Slot};
use super::shard_router::ShardRouter;

/// Default time a member has to acknowledge a message before it goes out again.
pub const ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default number of deliveries before a message is dead-lettered.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 16;
/// Default most messages one receive hands out, per queue.
pub const RECEIVE_MESSAGES_DEFAULT: u32 = 256;
/// Default time the broker holds a receive open waiting for messages.
pub const RECEIVE_WAIT_MS_DEFAULT: u32 = 500;
/// Pause before asking a queue again after a receive came back empty
/// early (a broker that does not hold receives open must not make us spin).
const EMPTY_RECEIVE_PAUSE: Duration = Duration::from_millis(10);

/// How a push consumer receives and settles messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    /// The consumer group: delivery state, attempts and dead letters are per group.
    pub group: String,
    /// A message not settled this long after it was handed out goes out again.
    pub ack_timeout: Duration,
    /// Deliveries of one message before it goes to `<group>-dlq` instead.
    pub max_attempts: u32,
    /// Most messages one receive hands out (per queue).
    pub max_messages: u32,
    /// How long the broker may hold a receive open waiting for messages.
    pub max_wait_ms: u32,
    /// Queues to receive from; all queues of the topic when `None`.
    pub queues: Option<Vec<u32>>,
    /// Time a reply may take beyond `max_wait_ms`.
    pub request_timeout: Duration,
    /// Receive from each queue over a connection to its shard's own port
    /// (from `DescribeTopic`), falling back to the shared address when the
    /// port is unknown or unreachable.
    pub shard_aware: bool,
}

impl PushConfig {
    pub fn new(group: impl Into<String>) -> PushConfig {
        PushConfig {
            group: group.into(),
            ..PushConfig::default()
        }
    }

    /// The ack timeout in whole milliseconds, as the wire carries it.
    fn ack_timeout_ms(&self) -> u32 {
        self.ack_timeout.as_millis().min(u128::from(u32::MAX)) as u32
    }

    fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: String| Err(ClientError::Config(format!("push consumer: {what}")));
        if self.group.is_empty() || self.group.len() > GROUP_NAME_BYTES_MAX {
            return bad(format!(
                "group name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
            ));
        }
        let ack_ms = self.ack_timeout.as_millis();
        if ack_ms == 0 || ack_ms > ACK_TIMEOUT_MS_MAX as u128 {
            return bad(format!(
                "ack timeout must be 1..={ACK_TIMEOUT_MS_MAX} ms, not {ack_ms}"
            ));
        }
        if !(1..=MAX_ATTEMPTS_MAX).contains(&self.max_attempts) {
            return bad(format!(
                "max attempts must be 1..={MAX_ATTEMPTS_MAX}, not {}",
                self.max_attempts
            ));
        }
        if self.max_messages == 0 {
            return bad("max messages must be positive".into());
        }
        if self.request_timeout.is_zero() {
            return bad("request timeout must be positive".into());
        }
        Ok(())
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            group: String::new(),
            ack_timeout: ACK_TIMEOUT_DEFAULT,
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            max_messages: RECEIVE_MESSAGES_DEFAULT,
            max_wait_ms: RECEIVE_WAIT_MS_DEFAULT,
            queues: None,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            shard_aware: true,
        }
    }
}

/// One handed-out message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedRecord {
    pub queue: u32,
    pub offset: i64,
    /// Which delivery this is: 1 for the first, higher for redeliveries.
    pub attempt: u32,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl PushedRecord {
    /// (queue, offset): what [`PushConsumer::ack`] and [`PushConsumer::nack`] take.
    pub fn position(&self) -> (u32, i64) {
        (self.queue, self.offset)
    }
}

/// What one `Delivery` reply yields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeliveryOutcome {
    /// The handed-out messages, in the order the broker listed them
    /// (retries, then by priority, then by offset).
    pub records: Vec<PushedRecord>,
    /// Handed-out offsets whose record was not in the batches (they come
    /// back after their ack timeout).
    pub missing: Vec<i64>,
}

/// Decodes a `Delivery` reply for `queue`: the batches are whole stored
/// batches, so only the listed offsets are yielded, each with its attempt,
/// in the listed order.
pub fn records_from_delivery(
    queue: u32,
    messages: &[(i64, u32)],
    batches: &[Bytes],
) -> Result<DeliveryOutcome, BatchError> {
    let wanted: HashMap<i64, u32> = messages.iter().copied().collect();
    let mut found = HashMap::with_capacity(messages.len());
    for chunk in batches {
        for batch in split_batches(chunk) {
            let (header, records) = decode_records_shared(&chunk.slice_ref(batch?))?;
            if header.is_control() {
                continue;
            }
            for r in records {
                if wanted.contains_key(&r.offset) {
                    found.insert(r.offset, r);
                }
            }
        }
    }
    let mut out = DeliveryOutcome::default();
    for &(offset, attempt) in messages {
        match found.remove(&offset) {
            Some(r) => out.records.push(PushedRecord {
                queue,
                offset,
                attempt,
                timestamp: r.timestamp,
                key: r.key,
                value: r.value,
                headers: r.headers,
            }),
            None => out.missing.push(offset),
        }
    }
    Ok(out)
}

/// Receives a topic's messages for a group by push delivery. Not `Sync`:
/// one thread polls (ack and nack are called from the same thread).
pub struct PushConsumer {
    topic: String,
    config: PushConfig,
    /// The connection and a slot per queue (no state of its own: the
    /// broker keeps it).
    pipeline: Pipeline<()>,
}

impl std::fmt::Debug for PushConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConsumer")
            .field("addr", &self.pipeline.addr())
            .field("topic", &self.topic)
            .field("group", &self.config.group)
            .field("queues", &self.queues())
            .finish()
    }
}

impl PushConsumer {
    /// Connects and looks the topic up (for its queues when `queues` is `None`).
    pub fn connect(
        addr: &str,
        topic: &str,
        config: PushConfig,
    ) -> Result<PushConsumer, ClientError> {
        config.validate()?;
        let conn = Connection::connect(addr, timeouts(config.request_timeout))?;
        let info = describe_topic(&conn, topic)?;
        let queues: Vec<u32> = match &config.queues {
            Some(qs) => {
                let mut qs = qs.clone();
                qs.sort_unstable();
                qs.dedup();
                if let Some(q) = qs.iter().find(|q| **q as usize >= info.queues.len()) {
                    return Err(ClientError::Config(format!(
                        "queue {q} does not exist (topic {topic} has {} queues)",
                        info.queues.len()
                    )));
                }
                qs
            }
            None => info.queues.iter().map(|q| q.queue).collect(),
        };
        let slots = queues.into_iter().map(|q| Slot::new(q, ())).collect();
        let mut router = ShardRouter::new(addr, conn.timeouts(), config.shard_aware);
        router.set_topic(&info);
        let pipeline = Pipeline::new(addr, conn, router, "receive", config.max_wait_ms, slots);
        Ok(PushConsumer {
            topic: topic.to_string(),
            config,
            pipeline,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.config.group
    }

    pub fn config(&self) -> &PushConfig {
        &self.config
    }

    /// The shard ports this consumer has a connection to (empty when every
    /// receive uses the shared address), ascending.
    pub fn shard_ports_in_use(&self) -> Vec<u16> {
        self.pipeline.shard_ports_in_use()
    }

    /// The queues received from, ascending.
    pub fn queues(&self) -> Vec<u32> {
        self.pipeline.slots.iter().map(|s| s.queue).collect()
    }

    /// Waits up to `timeout` for messages of any queue; returns what was
    /// handed out as soon as anything is (empty on timeout). Every record
    /// returned is out under this group until it is acked, nacked, or its
    /// ack timeout passes.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<PushedRecord>, ClientError> {
        let (topic, config) = (&self.topic, &self.config);
        let max_wait = self.pipeline.max_wait();
        self.pipeline.poll(
            timeout,
            |s| {
                Request::Receive(Receive {
                    group: config.group.clone(),
                    topic: topic.clone(),
                    queue: s.queue,
                    max_messages: config.max_messages,
                    max_wait_ms: config.max_wait_ms,
                    ack_timeout_ms: config.ack_timeout_ms(),
                    max_attempts: config.max_attempts,
                })
            },
            |s, answer, out| apply_delivery(topic, max_wait, s, answer, out),
        )
    }

    /// Acknowledges handed-out messages, given as (queue, offset): they are
    /// done and never delivered again. One request per queue, pipelined.
    /// Returns how many were still out (a message whose ack timeout passed
    /// and that another member took meanwhile still counts; one already
    /// settled does not).
    pub fn ack(&mut self, positions: &[(u32, i64)]) -> Result<u32, ClientError> {
        self.settle(positions, false)
    }

    /// Rejects handed-out messages: each goes out again at once (to any
    /// member), or to the dead-letter topic if that was its last attempt.
    /// Returns how many the broker took back.
    pub fn nack(&mut self, positions: &[(u32, i64)]) -> Result<u32, ClientError> {
        self.settle(positions, true)
    }

    /// Waits for receives still in flight (at most one long poll) and nacks
    /// whatever they hand out, so nothing sits out until its ack timeout;
    /// then closes the connection. Messages returned by `poll` and not
    /// settled stay out until their ack timeout.
    pub fn close(mut self) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.pipeline.reply_allowance();
        let topic = &self.topic;
        let max_wait = self.pipeline.max_wait();
        let unreturned = self.pipeline.drain(deadline, |s, answer, out| {
            apply_delivery(topic, max_wait, s, answer, out)
        });
        let positions: Vec<(u32, i64)> = unreturned.iter().map(PushedRecord::position).collect();
        let result = if positions.is_empty() {
            Ok(())
        } else {
            self.nack(&positions).map(|_| ())
        };
        self.pipeline.drop_connection();
        result
    }

    fn settle(&mut self, positions: &[(u32, i64)], nack: bool) -> Result<u32, ClientError> {
        let mut by_queue: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        for &(q, o) in positions {
            by_queue.entry(q).or_default().push(o);
        }
        if by_queue.is_empty() {
            return Ok(0);
        }
        self.pipeline.connection()?;
        let now = Instant::now();
        let mut pending = Vec::with_capacity(by_queue.len());
        for (queue, offsets) in by_queue {
            let req = Request::Ack(Ack {
                group: self.config.group.clone(),
                topic: self.topic.clone(),
                queue,
                offsets,
                nack,
                ack_timeout_ms: self.config.ack_timeout_ms(),
                max_attempts: self.config.max_attempts,
            });
            // Over the queue's shard connection, like its receives, so a
            // settle is ordered with the receives of its queue.
            let sent = match self.pipeline.shard_connection(queue, now) {
                Some(c) => match c.send(&req) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        tracing::debug!(queue, "ack not sent to the shard port: {e}");
                        c.close();
                        self.pipeline.connection()?.send(&req)
                    }
                },
                None => self.pipeline.connection()?.send(&req),
            };
            pending.push(sent?);
        }
        let mut settled = 0u32;
        let mut first_err = None;
        for p in pending {
            match p.wait(self.config.request_timeout) {
                Ok(Reply::Settled(n)) => settled += n,
                Ok(_) => {
                    first_err.get_or_insert(ClientError::UnexpectedReply(ApiKey::Ack));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(settled), Err)
    }
}

/// Applies one receive reply; returns the error to report, if any.
/// Whatever a reply hands out is returned, even from a receive no longer
/// current: those messages are out.
fn apply_delivery(
    topic: &str,
    max_wait: Duration,
    s: &mut Slot<()>,
    answer: Answer,
    out: &mut Vec<PushedRecord>,
) -> Option<ClientError> {
    match answer.result {
        Ok(Reply::Delivery { messages, batches }) => {
            match records_from_delivery(s.queue, &messages, &batches) {
                Ok(o) => {
                    if !o.missing.is_empty() {
                        tracing::warn!(
                            topic = %topic,
                            queue = s.queue,
                            offsets = ?o.missing,
                            "handed-out messages missing from the reply; they come back after the ack timeout"
                        );
                    }
                    let early = answer.sent_at.is_some_and(|t| t.elapsed() < max_wait);
                    if messages.is_empty() && early {
                        s.not_before = Some(Instant::now() + EMPTY_RECEIVE_PAUSE);
                    }
                    out.extend(o.records);
                    None
                }
                Err(e) => Some(ClientError::Batch(e)),
            }
        }
        Ok(_) => Some(ClientError::UnexpectedReply(ApiKey::Receive)),
        // The connection is gone; the poll loop reconnects and asks again.
        Err(ClientError::Disconnected | ClientError::Io(_)) => None,
        Err(e) => Some(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coremq_shards::batch::{set_base_offset, BatchBuilder, Compression};

    fn batch(base: i64, values: &[&str]) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for v in values {
            b.push(1000, None, Some(v.as_bytes()), &[("h", Some(b"x"))]);
        }
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, base);
        Bytes::from(raw)
    }

    #[test]
    fn only_listed_offsets_in_listed_order() {
        let mut data = batch(0, &["a", "b", "c"]).to_vec();
        data.extend_from_slice(&batch(3, &["d", "e"]));
        let o = records_from_delivery(2, &[(4, 1), (1, 3)], &[Bytes::from(data)]).unwrap();
        let got: Vec<_> = o
            .records
            .iter()
            .map(|r| (r.queue, r.offset, r.attempt, r.value.clone().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 4, 1, Bytes::from_static(b"e")),
                (2, 1, 3, Bytes::from_static(b"b"))
            ]
        );
        assert_eq!(
            o.records[0].headers,
            vec![("h".to_string(), Some(Bytes::from_static(b"x")))]
        );
        assert!(o.missing.is_empty());
    }

    #[test]
    fn offsets_not_in_the_batches_are_reported_missing() {
        let o = records_from_delivery(0, &[(0, 1), (9, 2)], &[batch(0, &["a"])]).unwrap();
        assert_eq!(o.records.len(), 1);
        assert_eq!(o.missing, vec![9]);
        let o = records_from_delivery(0, &[], &[Bytes::new()]).unwrap();
        assert_eq!(o, DeliveryOutcome::default());
    }

    #[test]
    fn corrupt_batch_is_an_error() {
        let mut raw = batch(0, &["a"]).to_vec();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        assert!(records_from_delivery(0, &[(0, 1)], &[Bytes::from(raw)]).is_err());
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = PushConfig::new("g");
        assert_eq!(c.ack_timeout, Duration::from_secs(30));
        assert_eq!(c.max_attempts, 16);
        assert_eq!(c.queues, None);
        assert!(c.validate().is_ok());
        for bad in [
            PushConfig::new(""),
            PushConfig {
                ack_timeout: Duration::ZERO,
                ..PushConfig::new("g")
            },
            PushConfig {
                ack_timeout: Duration::from_secs(7200),
                ..PushConfig::new("g")
            },
            PushConfig {
                max_attempts: 0,
                ..PushConfig::new("g")
            },
            PushConfig {
                max_messages: 0,
                ..PushConfig::new("g")
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(ClientError::Config(_))),
                "{bad:?}"
            );
        }
    }
}
