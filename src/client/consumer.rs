//! The group consumer: long-poll fetches over a set of queues of one topic.
//!
//! Each assigned queue has a position (the next offset to hand out) and at
//! most one fetch in flight; fetches of all queues are pipelined on one
//! connection and handled in the order they complete, so a busy queue cannot
//! starve a quiet one. A fetch returns whole stored batches, so records
//! below the position are skipped.
//!
//! The set of queues can change while the consumer runs ([`Consumer::assign`],
//! used by the group consumer on a rebalance): a new queue starts at the
//! group's committed offset (else at its start or end, per
//! [`ConsumerConfig::from`]); a removed queue's cursor is dropped.
//!
//! Invariants: a position only moves forward by records [`Consumer::poll`]
//! has returned (or by a reset/seek); a fetch reply is applied only if it
//! answers its queue's current fetch (its token; tokens are never reused),
//! so a reply to a fetch issued before a seek, reconnect or reassignment is
//! dropped; when an error comes with records already decoded, the records
//! are returned and the error is reported by the next poll, so no record is
//! skipped unseen.

use std::time::{Duration, Instant};

use bytes::Bytes;
use coremq_shards::batch::{decode_records_shared, split_batches, BatchError};

use crate::protocol::messages::GROUP_NAME_BYTES_MAX;
use crate::protocol::{ApiKey, ErrorCode, Reply, Request, TopicInfo};

use super::admin::{commit_request, describe_topic, fetch_offset_request, offset_reply};
use super::connection::{
    ClientError, Connection, REQUEST_TIMEOUT_DEFAULT, RESPONSE_FRAME_BYTES_MAX,
};
use super::pipeline::{timeouts, Answer, Pipeline, Slot};
use super::shard_router::ShardRouter;

/// Default time the broker holds a fetch open waiting for data.
pub const MAX_WAIT_MS_DEFAULT: u32 = 500;
/// Default bytes a fetch asks for per queue.
pub const FETCH_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Ceiling of a queue's fetch size when one batch is larger than `max_bytes`
/// (the fetch grows so it can return at least that batch).
pub const FETCH_BYTES_GROWN_MAX: u32 = (RESPONSE_FRAME_BYTES_MAX - (64 << 10)) as u32;
/// Pause before refetching a queue whose fetch came back empty early (a
/// broker that does not hold fetches open must not make us spin).
const EMPTY_FETCH_PAUSE: Duration = Duration::from_millis(10);

/// Where a group with no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The queue's log start: everything still stored.
    #[default]
    Earliest,
    /// The queue's end: only messages produced from now on.
    Latest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Consumer group whose committed offsets are read and written.
    pub group: String,
    pub from: StartFrom,
    /// Queues to read; all queues of the topic when `None`.
    pub queues: Option<Vec<u32>>,
    /// How long the broker may hold a fetch open waiting for data.
    pub max_wait_ms: u32,
    /// Bytes a fetch asks for per queue.
    pub max_bytes: u32,
    /// Time a reply may take beyond `max_wait_ms`.
    pub request_timeout: Duration,
    /// Fetch each queue over a connection to its shard's own port (from
    /// `DescribeTopic`), falling back to the shared address when the port
    /// is unknown or unreachable.
    pub shard_aware: bool,
}

impl ConsumerConfig {
    pub fn new(group: impl Into<String>) -> ConsumerConfig {
        ConsumerConfig {
            group: group.into(),
            ..ConsumerConfig::default()
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: String::new(),
            from: StartFrom::Earliest,
            queues: None,
            max_wait_ms: MAX_WAIT_MS_DEFAULT,
            max_bytes: FETCH_BYTES_MAX_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            shard_aware: true,
        }
    }
}

/// One record as the consumer hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub queue: u32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Where a position goes after OFFSET_OUT_OF_RANGE: the log start if it fell
/// behind (retention deleted its data), the log end if it is past it (the
/// log was truncated or recreated); `None` if it is in range after all.
pub fn out_of_range_reset(position: i64, log_start: i64, next_offset: i64) -> Option<i64> {
    if position < log_start {
        Some(log_start)
    } else if position > next_offset {
        Some(next_offset)
    } else {
        None
    }
}

/// What one fetch reply yields for a queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FetchOutcome {
    /// Records at or after the position, in offset order.
    pub records: Vec<ConsumedRecord>,
    /// The position after them.
    pub position: i64,
    /// Set when not one whole batch came back: the bytes the first batch needs.
    pub needed_bytes: Option<usize>,
}

/// Decodes the batches of a fetch reply for `queue`: records below
/// `position` are skipped (a fetch returns whole batches), control batches
/// only move the position. A partial batch at the end is normal (the fetch
/// size cut it) and is left for the next fetch.
pub fn records_from_fetch(
    queue: u32,
    position: i64,
    data: &[Bytes],
) -> Result<FetchOutcome, BatchError> {
    let mut out = FetchOutcome {
        position,
        ..FetchOutcome::default()
    };
    let mut whole_batches = 0usize;
    for chunk in data {
        for batch in split_batches(chunk) {
            let batch = match batch {
                Ok(b) => b,
                Err(BatchError::Truncated { needed, .. }) => {
                    if whole_batches == 0 {
                        out.needed_bytes = Some(needed);
                    }
                    break;
                }
                Err(e) => return Err(e),
            };
            whole_batches += 1;
            let (header, records) = decode_records_shared(&chunk.slice_ref(batch))?;
            if !header.is_control() {
                for r in records {
                    if r.offset < out.position {
                        continue;
                    }
                    out.position = r.offset + 1;
                    out.records.push(ConsumedRecord {
                        queue,
                        offset: r.offset,
                        timestamp: r.timestamp,
                        key: r.key,
                        value: r.value,
                        headers: r.headers,
                    });
                }
            }
            // Also past offsets the batch reserved without records (control, compaction).
            out.position = out.position.max(header.last_offset() + 1);
        }
    }
    Ok(out)
}

/// A queue's read state.
#[derive(Debug)]
struct Cursor {
    position: i64,
    /// The group's committed offset as this consumer last knew it (`None`:
    /// nothing committed when the queue was assigned).
    committed: Option<i64>,
    max_bytes: u32,
}

/// Reads a topic's queues for a consumer group. Not `Sync`: one thread polls.
pub struct Consumer {
    topic: String,
    config: ConsumerConfig,
    /// The connection and every assigned queue's cursor, ascending by queue.
    pipeline: Pipeline<Cursor>,
    resets: u64,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("addr", &self.pipeline.addr())
            .field("topic", &self.topic)
            .field("group", &self.config.group)
            .field("positions", &self.positions())
            .finish()
    }
}

impl Consumer {
    /// Connects, looks the topic up and sets every assigned queue's position
    /// to the group's committed offset, else to its start or end.
    pub fn connect(
        addr: &str,
        topic: &str,
        config: ConsumerConfig,
    ) -> Result<Consumer, ClientError> {
        if config.group.is_empty() || config.group.len() > GROUP_NAME_BYTES_MAX {
            return Err(ClientError::Config(format!(
                "group name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
            )));
        }
        if config.max_bytes == 0 {
            return Err(ClientError::Config("max_bytes must be positive".into()));
        }
        let conn = Connection::connect(addr, timeouts(config.request_timeout))?;
        let info = describe_topic(&conn, topic)?;
        let assigned: Vec<u32> = match &config.queues {
            Some(qs) => sorted_set(qs.clone()),
            None => info.queues.iter().map(|q| q.queue).collect(),
        };
        let cursors = start_cursors(&conn, topic, &config, &info, &assigned)?;
        let mut router = ShardRouter::new(addr, conn.timeouts(), config.shard_aware);
        router.set_topic(&info);
        let pipeline = Pipeline::new(addr, conn, router, "fetch", config.max_wait_ms, cursors);
        Ok(Consumer {
            topic: topic.to_string(),
            config,
            pipeline,
            resets: 0,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.config.group
    }

    /// The assigned queues, ascending.
    pub fn queues(&self) -> Vec<u32> {
        self.pipeline.slots.iter().map(|c| c.queue).collect()
    }

    /// Every assigned queue with its position (the next offset to read).
    pub fn positions(&self) -> Vec<(u32, i64)> {
        self.pipeline
            .slots
            .iter()
            .map(|c| (c.queue, c.state.position))
            .collect()
    }

    /// The shard ports this consumer has a connection to (empty when every
    /// fetch uses the shared address), ascending.
    pub fn shard_ports_in_use(&self) -> Vec<u16> {
        self.pipeline.shard_ports_in_use()
    }

    /// How many times a position was reset after OFFSET_OUT_OF_RANGE.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Moves a queue's position; a fetch in flight for it is abandoned.
    pub fn seek(&mut self, queue: u32, offset: i64) -> Result<(), ClientError> {
        let c = self
            .pipeline
            .slot_mut(queue)
            .ok_or_else(|| ClientError::Config(format!("queue {queue} is not assigned")))?;
        c.state.position = offset;
        c.restart();
        Ok(())
    }

    /// Changes the set of queues read. A queue not read before starts at the
    /// group's committed offset, else at its start or end (per `from`); the
    /// topic is described again, so queues added since `connect` (`topic
    /// alter`) can be assigned. A queue no longer in the set is dropped with
    /// its position (commit it first, see [`Consumer::commit_queues`]); a
    /// fetch still in flight for it is ignored when it completes. Queues kept
    /// keep their positions. On error nothing changes.
    pub fn assign(&mut self, queues: Vec<u32>) -> Result<(), ClientError> {
        let queues = sorted_set(queues);
        let added: Vec<u32> = queues
            .iter()
            .copied()
            .filter(|q| !self.pipeline.slots.iter().any(|c| c.queue == *q))
            .collect();
        let mut fresh = Vec::new();
        if !added.is_empty() {
            let conn = self.pipeline.connection()?;
            let info = describe_topic(conn, &self.topic)?;
            fresh = start_cursors(conn, &self.topic, &self.config, &info, &added)?;
            self.pipeline.router_mut().set_topic(&info);
        }
        let slots = &mut self.pipeline.slots;
        slots.retain(|c| queues.binary_search(&c.queue).is_ok());
        slots.extend(fresh);
        slots.sort_by_key(|c| c.queue);
        self.config.queues = Some(queues);
        Ok(())
    }

    /// Waits up to `timeout` for records of any assigned queue; returns
    /// what is there as soon as anything is (empty on timeout).
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumedRecord>, ClientError> {
        let topic = &self.topic;
        let max_wait_ms = self.config.max_wait_ms;
        let max_wait = self.pipeline.max_wait();
        let resets = &mut self.resets;
        self.pipeline.poll(
            timeout,
            |c| Request::Fetch {
                topic: topic.clone(),
                queue: c.queue,
                offset: c.state.position,
                max_bytes: c.state.max_bytes,
                max_wait_ms,
            },
            |c, answer, out| apply_fetch(topic, max_wait, resets, c, answer, out),
        )
    }

    /// Commits every assigned queue's position for the group. A queue
    /// whose position is the offset this consumer already knows to be
    /// committed (read at assignment, or committed since) is skipped: so a
    /// queue's new owner that has read nothing yet does not overwrite a
    /// later commit of its previous owner with a stale offset.
    pub fn commit(&mut self) -> Result<(), ClientError> {
        self.commit_where(|_| true)
    }

    /// Commits the positions of `queues` only (those assigned; others are
    /// ignored; unchanged ones skipped as by `commit`): what a group member
    /// does with queues it is about to lose.
    pub fn commit_queues(&mut self, queues: &[u32]) -> Result<(), ClientError> {
        self.commit_where(|q| queues.contains(&q))
    }

    fn commit_where(&mut self, pick: impl Fn(u32) -> bool) -> Result<(), ClientError> {
        let positions: Vec<(u32, i64)> = self
            .pipeline
            .slots
            .iter()
            .filter(|c| pick(c.queue) && c.state.committed != Some(c.state.position))
            .map(|c| (c.queue, c.state.position))
            .collect();
        if positions.is_empty() {
            return Ok(());
        }
        let conn = self.pipeline.connection()?;
        let mut pending = Vec::with_capacity(positions.len());
        for &(queue, position) in &positions {
            let req = commit_request(&self.config.group, &self.topic, queue, position);
            pending.push((queue, position, conn.send(&req)?));
        }
        let mut first_err = None;
        let mut done = Vec::with_capacity(pending.len());
        for (queue, position, p) in pending {
            match p.wait(conn.timeouts().request) {
                Ok(Reply::Done) => done.push((queue, position)),
                Ok(_) => {
                    first_err.get_or_insert(ClientError::UnexpectedReply(ApiKey::CommitOffset));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for (queue, position) in done {
            if let Some(c) = self.pipeline.slot_mut(queue) {
                c.state.committed = Some(position);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Applies one fetch reply to its queue's cursor; returns the error to
/// report, if any.
fn apply_fetch(
    topic: &str,
    max_wait: Duration,
    resets: &mut u64,
    slot: &mut Slot<Cursor>,
    answer: Answer,
    out: &mut Vec<ConsumedRecord>,
) -> Option<ClientError> {
    let Some(sent_at) = answer.sent_at else {
        return None; // stale: superseded by a seek, reconnect or reassignment
    };
    let queue = slot.queue;
    let c = &mut slot.state;
    match answer.result {
        Ok(Reply::Fetch { batches, .. }) => match records_from_fetch(queue, c.position, &batches) {
            Ok(o) => {
                if let Some(needed) = o.needed_bytes {
                    let grown = (needed as u64).max(u64::from(c.max_bytes) * 2);
                    c.max_bytes = grown.min(u64::from(FETCH_BYTES_GROWN_MAX)) as u32;
                }
                let early = sent_at.elapsed() < max_wait;
                if o.records.is_empty() && o.position == c.position && early {
                    slot.not_before = Some(Instant::now() + EMPTY_FETCH_PAUSE);
                }
                c.position = o.position;
                out.extend(o.records);
                None
            }
            Err(e) => Some(ClientError::Batch(e)),
        },
        Ok(_) => Some(ClientError::UnexpectedReply(ApiKey::Fetch)),
        Err(ClientError::Broker(e)) if e.code == ErrorCode::OffsetOutOfRange => {
            match e.offsets.and_then(|(start, next)| {
                out_of_range_reset(c.position, start, next).map(|p| (p, start))
            }) {
                Some((p, log_start)) => {
                    tracing::warn!(
                        topic = %topic,
                        queue,
                        "offset {} is out of range; the log now starts at {log_start}; resetting to {p}",
                        c.position
                    );
                    c.position = p;
                    *resets += 1;
                    None
                }
                None => Some(ClientError::Broker(e)),
            }
        }
        // The connection is gone; the poll loop reconnects and refetches.
        Err(ClientError::Disconnected | ClientError::Io(_)) => None,
        Err(e) => Some(e),
    }
}

/// Sorted, without duplicates.
fn sorted_set(mut queues: Vec<u32>) -> Vec<u32> {
    queues.sort_unstable();
    queues.dedup();
    queues
}

/// Cursors for `queues` (of topic `info`): each at the group's committed
/// offset, else at the queue's start or end per `config.from`. The
/// committed offsets are asked for all at once, then collected.
fn start_cursors(
    conn: &Connection,
    topic: &str,
    config: &ConsumerConfig,
    info: &TopicInfo,
    queues: &[u32],
) -> Result<Vec<Slot<Cursor>>, ClientError> {
    let mut pending = Vec::with_capacity(queues.len());
    for &q in queues {
        let Some(qi) = info.queues.iter().find(|qi| qi.queue == q) else {
            return Err(ClientError::Config(format!(
                "queue {q} does not exist (topic {topic} has {} queues)",
                info.queues.len()
            )));
        };
        let p = conn.send(&fetch_offset_request(&config.group, topic, q))?;
        pending.push((qi, p));
    }
    let mut cursors = Vec::with_capacity(pending.len());
    for (qi, p) in pending {
        let committed = offset_reply(p.wait(conn.timeouts().request)?)?;
        let position = committed.unwrap_or(match config.from {
            StartFrom::Earliest => qi.start_offset,
            StartFrom::Latest => qi.end_offset,
        });
        cursors.push(Slot::new(
            qi.queue,
            Cursor {
                position,
                committed,
                max_bytes: config.max_bytes,
            },
        ));
    }
    Ok(cursors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coremq_shards::batch::{set_base_offset, BatchBuilder, Compression};

    /// A stored batch of `values` starting at `base`.
    fn batch(base: i64, values: &[&str]) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for v in values {
            b.push(1000, Some(b"k"), Some(v.as_bytes()), &[]);
        }
        let mut raw = b.build().to_vec();
        set_base_offset(&mut raw, base);
        Bytes::from(raw)
    }

    fn offsets(o: &FetchOutcome) -> Vec<i64> {
        o.records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn records_below_position_are_skipped() {
        let mut data = batch(10, &["a", "b", "c"]).to_vec();
        data.extend_from_slice(&batch(13, &["d", "e"]));
        let o = records_from_fetch(3, 12, &[Bytes::from(data)]).unwrap();
        assert_eq!(offsets(&o), vec![12, 13, 14]);
        assert_eq!(o.position, 15);
        assert_eq!(o.records[0].value.as_deref(), Some(&b"c"[..]));
        assert_eq!(o.records[0].queue, 3);
        assert_eq!(o.needed_bytes, None);
    }

    #[test]
    fn a_batch_entirely_below_position_yields_nothing() {
        let o = records_from_fetch(0, 20, &[batch(10, &["a", "b"])]).unwrap();
        assert!(o.records.is_empty());
        assert_eq!(o.position, 20);
    }

    #[test]
    fn trailing_partial_batch_is_left_for_next_fetch() {
        let mut data = batch(0, &["a"]).to_vec();
        let second = batch(1, &["b"]);
        data.extend_from_slice(&second[..second.len() - 3]);
        let o = records_from_fetch(0, 0, &[Bytes::from(data)]).unwrap();
        assert_eq!(offsets(&o), vec![0]);
        assert_eq!(o.position, 1);
        assert_eq!(o.needed_bytes, None);

        // Only a partial batch: the outcome says how much one batch needs.
        let o = records_from_fetch(0, 1, &[second.slice(..second.len() - 3)]).unwrap();
        assert!(o.records.is_empty());
        assert_eq!(o.position, 1);
        assert_eq!(o.needed_bytes, Some(second.len()));
    }

    #[test]
    fn corrupt_batch_is_an_error() {
        let mut raw = batch(0, &["a"]).to_vec();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        assert!(records_from_fetch(0, 0, &[Bytes::from(raw)]).is_err());
    }

    #[test]
    fn out_of_range_resets() {
        // Behind the log start (retention): jump to the start.
        assert_eq!(out_of_range_reset(5, 100, 200), Some(100));
        // Past the end (log truncated): back to the end.
        assert_eq!(out_of_range_reset(500, 100, 200), Some(200));
        // In range: not a reset, the error stands.
        assert_eq!(out_of_range_reset(150, 100, 200), None);
        assert_eq!(out_of_range_reset(200, 100, 200), None);
    }

    #[test]
    fn config_defaults() {
        let c = ConsumerConfig::new("g");
        assert_eq!(c.group, "g");
        assert_eq!(c.from, StartFrom::Earliest);
        assert_eq!(c.queues, None);
        assert_eq!(c.max_wait_ms, 500);
        assert_eq!(c.max_bytes, 1 << 20);
    }
}
