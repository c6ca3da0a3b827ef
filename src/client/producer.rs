//! The batching, pipelining, idempotent producer.
//!
//! [`Producer::send`] only appends a record to its queue's open batch (under
//! one mutex); a background sender thread owns all network I/O. It seals a
//! batch when it is full or has lingered for `linger`, sends sealed batches
//! without waiting for acks (at most `max_in_flight_per_queue` per queue),
//! collects the acks through the connection's reply callbacks, retries
//! failures and reconnects when the connection breaks.
//!
//! Invariants:
//! - Per queue, batches are sealed, sent and resent in sequence order. A
//!   failed batch is resent together with every later batch of its queue
//!   that was in flight, never overtaking them.
//! - A sealed batch's bytes never change: a retry resends the very same
//!   batch (same producer id, epoch and base sequence), so the broker
//!   recognises a batch it already stored and answers `duplicate: true`.
//! - Per queue and producer id, base sequences are contiguous from 0: a
//!   batch's base sequence is the number of messages batched for the queue
//!   before it. When a batch fails for good (a non-retriable error, or
//!   retries exhausted) the broker never stored it, so its sequence range
//!   can never be filled; the queue then switches to a fresh producer id and
//!   starts again at sequence 0, so later batches are not rejected forever.
//! - Every sealed batch is resolved exactly once: acked (counted in the next
//!   [`ProduceSummary`]) or failed (reported by the next [`Producer::flush`]).
//!
//! Per-message options: a priority (0..=[`PRIORITY_MAX`], 0 the lowest)
//! and a delay or due time ([`Message::with_priority`],
//! [`Message::with_delay`], [`Message::with_due_at`]). The broker stores
//! options per batch, so each queue keeps one open batch per distinct
//! (priority, delay) and options never mix in a batch; a batch with default
//! options goes out as a plain `Produce`, any other as `ProduceWith`
//! (Produce v2). All batches of a queue share its sequence numbers, and a
//! retry resends the same bytes with the same options. Order is kept among
//! messages of one queue with the same options; messages with different
//! options land in different batches, whose offsets follow the order the
//! batches were sealed in. A delayed batch's offset is assigned when it
//! comes due (its ack carries base offset -1).
//!
//! Shard-aware (`shard_aware`, on by default): a queue's batches go over a
//! connection to the port of the shard that owns it (from `DescribeTopic`,
//! one connection per distinct port, opened lazily), or over the shared
//! connection when the port is unknown or unreachable. A queue changes
//! connection only when none of its batches is in flight, so all in-flight
//! batches of a queue share one connection and stay in order. Reconnects
//! are per connection: a broken connection, or one with an overdue batch,
//! is closed and fails (and resends) only the batches in flight on it.
//! Topic refreshes always use the shared connection.
//!
//! Topics grow while producers run (`topic alter`): every
//! `topic_refresh` (default [`TOPIC_REFRESH_INTERVAL_DEFAULT`]), after an
//! `UNKNOWN_QUEUE` reply, and when a message names a queue past the known
//! count, the sender re-describes the topic; new queues join the round
//! robin and keyed messages hash over the new count (a key may move to
//! another queue, as in Kafka). The queue count never shrinks.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use coremq_shards::batch::{BatchBuilder, Compression, RECORDS_PER_BATCH_MAX};
pub use coremq_shards::segment::PRIORITY_MAX;
pub use coremq_shards::shard::{ProduceOptions, DELAY_MS_MAX};

use crate::protocol::{ApiKey, ErrorCode, Reply, Request};

use super::admin::describe_topic;
use super::connection::{ClientError, Connection, Timeouts, REQUEST_TIMEOUT_DEFAULT};
use super::shard_router::ShardRouter;

/// Default size at which an open batch is sealed (uncompressed bytes, header included).
pub const BATCH_BYTES_MAX_DEFAULT: usize = 64 << 10;
/// Default number of messages at which an open batch is sealed.
pub const BATCH_MESSAGES_MAX_DEFAULT: usize = 10_000;
/// Default time a batch may wait for more messages before it is sent.
pub const LINGER_DEFAULT: Duration = Duration::from_millis(5);
/// Default number of times a batch is resent after a retriable failure.
pub const RETRIES_DEFAULT: u32 = 10;
/// Default wait before the first retry; doubles per attempt up to the max.
pub const RETRY_BACKOFF_DEFAULT: Duration = Duration::from_millis(100);
/// Default cap of the exponential retry backoff.
pub const RETRY_BACKOFF_MAX_DEFAULT: Duration = Duration::from_secs(1);
/// Default number of unacknowledged batches per queue.
pub const MAX_IN_FLIGHT_PER_QUEUE_DEFAULT: usize = 5;
/// Default bytes of sealed, unacknowledged batches before `send` blocks.
pub const BUFFER_BYTES_MAX_DEFAULT: usize = 32 << 20;
/// The epoch of every producer id this client picks.
pub const PRODUCER_EPOCH: i16 = 0;
/// Per-record bytes added to key and value when estimating whether a record
/// still fits the open batch (varint lengths, deltas, attributes).
const RECORD_OVERHEAD_BYTES: usize = 24;
/// Per-header bytes added to its key and value in the same estimate.
const HEADER_OVERHEAD_BYTES: usize = 10;
/// Default interval between re-reads of the topic's queue count.
pub const TOPIC_REFRESH_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// How the producer batches, retries and times out.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Seal a batch once it holds this many bytes (uncompressed).
    pub batch_bytes_max: usize,
    /// Seal a batch once it holds this many messages.
    pub batch_messages_max: usize,
    /// Send a batch at the latest this long after its first message.
    pub linger: Duration,
    pub compression: Compression,
    /// Stamp batches with a producer id and sequence so retries are deduplicated.
    pub idempotent: bool,
    /// Resends of one batch after retriable failures before giving up on it.
    pub retries: u32,
    /// Wait before the first resend; doubles per attempt.
    pub retry_backoff: Duration,
    /// Cap of the doubling retry backoff.
    pub retry_backoff_max: Duration,
    /// Time a batch may wait for its ack before the connection is presumed dead.
    pub request_timeout: Duration,
    /// Batches of one queue sent and not yet acknowledged, at most.
    pub max_in_flight_per_queue: usize,
    /// `send` blocks while sealed, unacknowledged batches hold this many bytes.
    pub buffer_bytes_max: usize,
    /// Re-read the topic's queue count this often (zero: only on
    /// `UNKNOWN_QUEUE` or an explicit queue past the known count).
    pub topic_refresh: Duration,
    /// Send each queue's batches over a connection to its shard's own port
    /// (from `DescribeTopic`), falling back to the shared address when the
    /// port is unknown or unreachable.
    pub shard_aware: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            batch_messages_max: BATCH_MESSAGES_MAX_DEFAULT,
            linger: LINGER_DEFAULT,
            compression: Compression::None,
            idempotent: true,
            retries: RETRIES_DEFAULT,
            retry_backoff: RETRY_BACKOFF_DEFAULT,
            retry_backoff_max: RETRY_BACKOFF_MAX_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            max_in_flight_per_queue: MAX_IN_FLIGHT_PER_QUEUE_DEFAULT,
            buffer_bytes_max: BUFFER_BYTES_MAX_DEFAULT,
            topic_refresh: TOPIC_REFRESH_INTERVAL_DEFAULT,
            shard_aware: true,
        }
    }
}

impl ProducerConfig {
    fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: &str| Err(ClientError::Config(format!("producer config: {what}")));
        if self.batch_bytes_max == 0 {
            return bad("batch_bytes_max must be positive");
        }
        if self.batch_messages_max == 0 || self.batch_messages_max > RECORDS_PER_BATCH_MAX as usize
        {
            return bad("batch_messages_max must be between 1 and 2^24");
        }
        if self.max_in_flight_per_queue == 0 {
            return bad("max_in_flight_per_queue must be positive");
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive");
        }
        Ok(())
    }

    /// The wait before resend number `attempt` (1-based): doubling, capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.retry_backoff
            .saturating_mul(1 << doublings)
            .min(self.retry_backoff_max.max(self.retry_backoff))
    }
}

/// Why a message cannot be produced as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("priority must be 0..={max} (0 the lowest), not {priority}")]
    Priority { priority: i64, max: u8 },
    #[error("delay must not be negative, not {delay_ms} ms")]
    NegativeDelay { delay_ms: i64 },
    #[error("delay must be at most {max_ms} ms (90 days), not {delay_ms} ms")]
    DelayTooLong { delay_ms: u128, max_ms: i64 },
}

/// Checks a priority given as any integer (a command-line value, say).
pub fn check_priority(priority: i64) -> Result<u8, MessageError> {
    match u8::try_from(priority) {
        Ok(p) if p <= PRIORITY_MAX => Ok(p),
        _ => Err(MessageError::Priority {
            priority,
            max: PRIORITY_MAX,
        }),
    }
}

/// Checks a delay in milliseconds (0 = none) and turns it into a [`Delay`].
pub fn delay_from_ms(delay_ms: i64) -> Result<Option<Delay>, MessageError> {
    if delay_ms < 0 {
        return Err(MessageError::NegativeDelay { delay_ms });
    }
    if delay_ms > DELAY_MS_MAX {
        return Err(MessageError::DelayTooLong {
            delay_ms: delay_ms as u128,
            max_ms: DELAY_MS_MAX,
        });
    }
    Ok((delay_ms > 0).then(|| Delay::After(Duration::from_millis(delay_ms as u64))))
}

/// When a delayed message becomes visible to consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// This long after its batch is sent (the linger adds at most `linger`).
    After(Duration),
    /// At this wall-clock time (a time in the past means at once).
    At(SystemTime),
}

impl Delay {
    /// The batch key: an `After` delay in ms, rounded up so a message is
    /// never early; an `At` time in ms since the UNIX epoch.
    fn key(self) -> DelayKey {
        match self {
            Delay::After(d) => {
                let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
                DelayKey::AfterMs(ms.min(i64::MAX as u128) as i64)
            }
            Delay::At(t) => {
                let ms = match t.duration_since(UNIX_EPOCH) {
                    Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
                    Err(_) => 0,
                };
                DelayKey::AtMs(ms)
            }
        }
    }

    fn check(self) -> Result<(), MessageError> {
        let delay_ms = match self.key() {
            DelayKey::None => 0,
            DelayKey::AfterMs(ms) => ms,
            DelayKey::AtMs(at) => at.saturating_sub(now_ms()),
        };
        if delay_ms > DELAY_MS_MAX {
            return Err(MessageError::DelayTooLong {
                delay_ms: delay_ms as u128,
                max_ms: DELAY_MS_MAX,
            });
        }
        Ok(())
    }
}

/// A delay as batches are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DelayKey {
    None,
    AfterMs(i64),
    /// Due at this many ms since the UNIX epoch.
    AtMs(i64),
}

/// What a batch shares besides its queue: messages with different options
/// never share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchKey {
    priority: u8,
    delay: DelayKey,
}

impl BatchKey {
    fn of(msg: &Message) -> BatchKey {
        BatchKey {
            priority: msg.priority,
            delay: msg.delay.map_or(DelayKey::None, Delay::key),
        }
    }

    /// The produce options of a batch sealed at `now_ms`.
    fn options(self, now_ms: i64) -> ProduceOptions {
        let delay_ms = match self.delay {
            DelayKey::None => 0,
            DelayKey::AfterMs(ms) => ms,
            DelayKey::AtMs(at) => at.saturating_sub(now_ms).max(0),
        };
        ProduceOptions {
            priority: self.priority,
            delay_ms,
        }
    }
}

/// The request that carries one batch: a plain `Produce` when the options
/// are the defaults, `ProduceWith` (Produce v2) otherwise.
pub fn produce_request(topic: &str, queue: u32, options: ProduceOptions, batch: Bytes) -> Request {
    if options == ProduceOptions::default() {
        Request::Produce {
            topic: topic.to_string(),
            queue,
            batch,
        }
    } else {
        Request::ProduceWith {
            topic: topic.to_string(),
            queue,
            options,
            batch,
        }
    }
}

/// One message to produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Send to this queue; otherwise by key hash, otherwise round robin.
    pub queue: Option<u32>,
    /// Record timestamp; the current time when absent.
    pub timestamp_ms: Option<i64>,
    /// Record headers, in order. An `id` header ([`crate::client::dedup::ID_HEADER`])
    /// names the message for consumer-side deduplication.
    pub headers: Vec<(String, Bytes)>,
    /// 0 (the lowest, default) to [`PRIORITY_MAX`]: push delivery hands out
    /// pending messages of a higher priority first. Offsets do not change.
    pub priority: u8,
    /// Keep the message invisible until then; `None` = at once.
    pub delay: Option<Delay>,
}

impl Message {
    /// A message with only a value.
    pub fn new(value: impl Into<Bytes>) -> Message {
        Message {
            value: value.into(),
            ..Message::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Message {
        self.key = Some(key.into());
        self
    }

    pub fn with_queue(mut self, queue: u32) -> Message {
        self.queue = Some(queue);
        self
    }

    /// Adds a record header (appended; names may repeat).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Message {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the priority, 0 (lowest) to [`PRIORITY_MAX`]; a higher one is
    /// refused by [`Producer::send`].
    pub fn with_priority(mut self, priority: u8) -> Message {
        self.priority = priority;
        self
    }

    /// Delivers the message `delay` after it is sent (zero: at once).
    pub fn with_delay(mut self, delay: Duration) -> Message {
        self.delay = (!delay.is_zero()).then_some(Delay::After(delay));
        self
    }

    /// Delivers the message at `due` (wall clock; a past time means at once).
    pub fn with_due_at(mut self, due: SystemTime) -> Message {
        self.delay = Some(Delay::At(due));
        self
    }

    /// Checks the options: priority in range, delay at most 90 days.
    pub fn validate(&self) -> Result<(), MessageError> {
        check_priority(i64::from(self.priority))?;
        if let Some(d) = self.delay {
            d.check()?;
        }
        Ok(())
    }
}

/// What a flush saw acknowledged since the previous flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProduceSummary {
    /// Messages the broker acknowledged (duplicates included).
    pub acked_messages: u64,
    /// Of those, messages in batches the broker had already stored (retries).
    pub duplicates: u64,
}

/// Picks the queue of a message: explicit queue, else key hash, else round robin.
#[derive(Debug, Clone)]
pub struct Partitioner {
    queues: u32,
    next: u32,
}

impl Partitioner {
    pub fn new(queues: u32) -> Partitioner {
        Partitioner { queues, next: 0 }
    }

    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// Raises the queue count (never lowers it); returns whether it grew.
    pub fn grow(&mut self, queues: u32) -> bool {
        if queues > self.queues {
            self.queues = queues;
            true
        } else {
            false
        }
    }

    pub fn pick(&mut self, explicit: Option<u32>, key: Option<&[u8]>) -> Result<u32, ClientError> {
        if self.queues == 0 {
            return Err(ClientError::Config("the topic has no queues".into()));
        }
        if let Some(q) = explicit {
            if q >= self.queues {
                return Err(ClientError::Config(format!(
                    "queue {q} does not exist (the topic has {} queues)",
                    self.queues
                )));
            }
            return Ok(q);
        }
        if let Some(k) = key {
            return Ok(key_queue(k, self.queues));
        }
        let q = self.next % self.queues;
        self.next = self.next.wrapping_add(1);
        Ok(q)
    }
}

/// The queue a key maps to: CRC-32 of the key modulo the queue count.
/// Stable across runs and processes, so a key always lands in one queue.
pub fn key_queue(key: &[u8], queues: u32) -> u32 {
    crc32fast::hash(key) % queues.max(1)
}

/// Adds `by` to a base sequence, wrapping from `i32::MAX` to 0 as Kafka does.
pub fn increment_sequence(seq: i32, by: i32) -> i32 {
    if seq > i32::MAX - by {
        by - (i32::MAX - seq) - 1
    } else {
        seq + by
    }
}

/// A random 63-bit producer id (never 0 or negative, which mean "none").
fn new_producer_id() -> i64 {
    ((rand::random::<u64>() >> 1) as i64).max(1)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A batch of a queue that is still accepting messages (one per options).
#[derive(Debug)]
struct OpenBatch {
    key: BatchKey,
    builder: BatchBuilder,
    opened_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// Sealed, to be sent (first time or again).
    Waiting,
    /// Sent as attempt `token`; a reply to any other token is stale.
    InFlight { token: u64, sent_at: Instant },
    /// Acknowledged, but an earlier batch of the queue is not yet.
    Acked,
}

#[derive(Debug)]
struct SealedBatch {
    no: u64,
    producer_id: i64,
    base_seq: i32,
    messages: u64,
    bytes: Bytes,
    /// Fixed at sealing, like the bytes: a resend carries the same options.
    options: ProduceOptions,
    /// Resends so far.
    attempts: u32,
    state: BatchState,
}

#[derive(Debug)]
struct QueueState {
    /// The producer id new batches of this queue are stamped with.
    producer_id: i64,
    /// Base sequence of the next sealed batch.
    next_seq: i32,
    /// Open batches, oldest first, at most one per options.
    open: Vec<OpenBatch>,
    /// Sealed, unresolved batches in sequence order (acked ones linger until the front clears).
    batches: VecDeque<SealedBatch>,
    /// No (re)send from this queue before this instant (retry backoff).
    retry_at: Option<Instant>,
    /// The shard port its in-flight batches went to (0: the shared connection).
    route: u16,
}

impl QueueState {
    fn new(producer_id: i64) -> QueueState {
        QueueState {
            producer_id,
            next_seq: 0,
            open: Vec::new(),
            batches: VecDeque::new(),
            retry_at: None,
            route: 0,
        }
    }

    fn in_flight(&self) -> usize {
        self.batches
            .iter()
            .filter(|b| matches!(b.state, BatchState::InFlight { .. }))
            .count()
    }

    fn has_waiting(&self) -> bool {
        self.batches.iter().any(|b| b.state == BatchState::Waiting)
    }
}

/// A batch the sender thread is about to write.
#[derive(Debug)]
struct Outgoing {
    /// The shard port to send it to (0: the shared connection).
    route: u16,
    queue: u32,
    no: u64,
    token: u64,
    bytes: Bytes,
    options: ProduceOptions,
}

/// Everything the producer's threads share, behind one mutex.
#[derive(Debug)]
struct State {
    queues: Vec<QueueState>,
    partitioner: Partitioner,
    conn: Option<Arc<Connection>>,
    /// Connections to the shards' own ports.
    router: ShardRouter,
    /// No connect attempt before this instant (backoff after failures).
    next_connect_at: Option<Instant>,
    connect_failures: u32,
    next_batch_no: u64,
    next_token: u64,
    /// Numbers of sealed batches not yet acked or failed.
    unresolved: BTreeSet<u64>,
    /// Bytes of the unresolved batches.
    buffered_bytes: usize,
    acked_messages: u64,
    duplicates: u64,
    failed_messages: u64,
    first_error: Option<ClientError>,
    shutdown: bool,
    sender_exited: bool,
    /// The producer id queues start with (also queues added by a refresh).
    producer_id: i64,
    /// The next periodic refresh of the topic's queue count.
    next_refresh_at: Option<Instant>,
    /// Refresh as soon as possible (an UNKNOWN_QUEUE reply came).
    refresh_now: bool,
    refresh_in_flight: bool,
}

impl State {
    fn new(queues: u32, producer_id: i64) -> State {
        State {
            producer_id,
            next_refresh_at: None,
            refresh_now: false,
            refresh_in_flight: false,
            queues: (0..queues).map(|_| QueueState::new(producer_id)).collect(),
            partitioner: Partitioner::new(queues),
            conn: None,
            router: ShardRouter::disabled(),
            next_connect_at: None,
            connect_failures: 0,
            next_batch_no: 0,
            next_token: 0,
            unresolved: BTreeSet::new(),
            buffered_bytes: 0,
            acked_messages: 0,
            duplicates: 0,
            failed_messages: 0,
            first_error: None,
            shutdown: false,
            sender_exited: false,
        }
    }

    /// Appends a message to its queue's open batch. Returns whether the
    /// sender thread must be woken (a batch was opened or sealed).
    fn append(
        &mut self,
        cfg: &ProducerConfig,
        msg: Message,
        now: Instant,
    ) -> Result<bool, ClientError> {
        msg.validate()?;
        let q = self.partitioner.pick(msg.queue, msg.key.as_deref())? as usize;
        let key_len = msg.key.as_ref().map_or(0, |k| k.len());
        if key_len > i32::MAX as usize || msg.value.len() > i32::MAX as usize {
            return Err(ClientError::Config("message over 2 GiB".into()));
        }
        let header_bytes: usize = msg
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD_BYTES)
            .sum();
        if header_bytes > i32::MAX as usize {
            return Err(ClientError::Config("message headers over 2 GiB".into()));
        }
        let record_bytes = key_len + msg.value.len() + header_bytes + RECORD_OVERHEAD_BYTES;
        let ts = msg.timestamp_ms.unwrap_or_else(now_ms);
        let mut wake = false;

        let key = BatchKey::of(&msg);
        let slot = self.queues[q].open.iter().position(|o| o.key == key);
        let full = slot.is_some_and(|i| {
            let o = &self.queues[q].open[i];
            !o.builder.is_empty()
                && o.builder.estimated_bytes() + record_bytes > cfg.batch_bytes_max
        });
        let slot = match slot {
            Some(i) if full => {
                self.seal(cfg, q, i);
                None
            }
            other => other,
        };
        let slot = match slot {
            Some(i) => i,
            None => {
                wake = true;
                let open = &mut self.queues[q].open;
                open.push(OpenBatch {
                    key,
                    builder: BatchBuilder::new(cfg.compression),
                    opened_at: now,
                });
                open.len() - 1
            }
        };
        let open = &mut self.queues[q].open[slot];
        let headers: Vec<(&str, Option<&[u8]>)> = msg
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_ref())))
            .collect();
        open.builder
            .push(ts, msg.key.as_deref(), Some(&msg.value), &headers);
        if open.builder.len() >= cfg.batch_messages_max
            || open.builder.estimated_bytes() >= cfg.batch_bytes_max
            || cfg.linger.is_zero()
        {
            self.seal(cfg, q, slot);
            wake = true;
        }
        Ok(wake)
    }

    /// Closes open batch `slot` of queue `q`: stamps producer id and base
    /// sequence, fixes its produce options, encodes it and queues it for sending.
    fn seal(&mut self, cfg: &ProducerConfig, q: usize, slot: usize) {
        let qs = &mut self.queues[q];
        if slot >= qs.open.len() {
            return;
        }
        let open = qs.open.remove(slot);
        if open.builder.is_empty() {
            return;
        }
        let messages = open.builder.len();
        let base_seq = qs.next_seq;
        let builder = if cfg.idempotent {
            open.builder
                .producer(qs.producer_id, PRODUCER_EPOCH, base_seq)
        } else {
            open.builder
        };
        qs.next_seq = increment_sequence(base_seq, messages as i32);
        let options = open.key.options(now_ms());
        let bytes = builder.build();
        let no = self.next_batch_no;
        self.next_batch_no += 1;
        self.unresolved.insert(no);
        self.buffered_bytes += bytes.len();
        qs.batches.push_back(SealedBatch {
            no,
            producer_id: qs.producer_id,
            base_seq,
            messages: messages as u64,
            bytes,
            options,
            attempts: 0,
            state: BatchState::Waiting,
        });
    }

    /// The topic now has `queues` queues: new ones join the partitioner
    /// (round robin and key hash) with a fresh sequence under the
    /// producer's id. A smaller count is ignored (topics only grow).
    fn grow(&mut self, queues: u32) {
        if !self.partitioner.grow(queues) {
            return;
        }
        tracing::info!(
            from = self.queues.len(),
            to = queues,
            "the topic grew; producing to its new queues"
        );
        let id = self.producer_id;
        self.queues
            .resize_with(queues as usize, || QueueState::new(id));
    }

    /// Whether the sender should re-describe the topic now.
    fn refresh_due(&self, now: Instant) -> bool {
        self.conn.is_some()
            && !self.refresh_in_flight
            && (self.refresh_now || self.next_refresh_at.is_some_and(|t| t <= now))
    }

    /// Seals open batches whose linger has passed (all of them if
    /// `force`), oldest first within a queue.
    fn seal_due(&mut self, cfg: &ProducerConfig, now: Instant, force: bool) {
        for q in 0..self.queues.len() {
            let mut slot = 0;
            while slot < self.queues[q].open.len() {
                let o = &self.queues[q].open[slot];
                if force || o.opened_at + cfg.linger <= now {
                    self.seal(cfg, q, slot);
                } else {
                    slot += 1;
                }
            }
        }
    }

    fn has_waiting(&self) -> bool {
        self.queues.iter().any(QueueState::has_waiting)
    }

    /// Picks the connection of every queue with nothing in flight: its
    /// shard's if open, else the shared one.
    fn update_routes(&mut self) {
        for (q, qs) in self.queues.iter_mut().enumerate() {
            if qs.in_flight() == 0 {
                let port = self.router.port_of(q as u32);
                qs.route = if self.router.open(port).is_some() {
                    port
                } else {
                    0
                };
            }
        }
    }

    /// Shard ports that queues with batches waiting would use but that have
    /// no connection yet (and no recent connect failure).
    fn wanted_ports(&self, now: Instant) -> Vec<u16> {
        let mut ports: Vec<u16> = (0..self.queues.len())
            .filter(|q| self.queues[*q].has_waiting() && self.queues[*q].in_flight() == 0)
            .map(|q| self.router.port_of(q as u32))
            .filter(|p| self.router.wants(*p, now))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Marks the batches that may be sent now as in flight, in queue order.
    fn take_sendable(&mut self, cfg: &ProducerConfig, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for (q, qs) in self.queues.iter_mut().enumerate() {
            if qs.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let mut in_flight = qs.in_flight();
            for b in qs.batches.iter_mut() {
                if in_flight >= cfg.max_in_flight_per_queue {
                    break;
                }
                if b.state == BatchState::Waiting {
                    let token = self.next_token;
                    self.next_token += 1;
                    b.state = BatchState::InFlight {
                        token,
                        sent_at: now,
                    };
                    in_flight += 1;
                    out.push(Outgoing {
                        route: qs.route,
                        queue: q as u32,
                        no: b.no,
                        token,
                        bytes: b.bytes.clone(),
                        options: b.options,
                    });
                }
            }
        }
        out
    }

    /// The routes (shard ports, 0: shared) of the queues with a batch that
    /// has waited for its ack longer than the request timeout.
    fn overdue_routes(&self, cfg: &ProducerConfig, now: Instant) -> Vec<u16> {
        let mut routes: Vec<u16> = self
            .queues
            .iter()
            .filter(|qs| {
                qs.batches.iter().any(|b| {
                    matches!(b.state, BatchState::InFlight { sent_at, .. } if sent_at + cfg.request_timeout <= now)
                })
            })
            .map(|qs| qs.route)
            .collect();
        routes.sort_unstable();
        routes.dedup();
        routes
    }

    /// The connections (routes) for which `dropped` holds are being
    /// dropped: each batch in flight on them fails now (Timeout if overdue,
    /// else Disconnected) and is resent on the next connection. Applying
    /// this at once, rather than waiting for the old connection's
    /// Disconnected callbacks, keeps an overdue batch from also condemning
    /// the new connection.
    fn fail_in_flight_on(
        &mut self,
        cfg: &ProducerConfig,
        now: Instant,
        dropped: impl Fn(u16) -> bool,
    ) {
        let mut failed = Vec::new();
        for (q, qs) in self.queues.iter().enumerate() {
            if !dropped(qs.route) {
                continue;
            }
            for b in &qs.batches {
                if let BatchState::InFlight { token, sent_at } = b.state {
                    failed.push((q, b.no, token, sent_at + cfg.request_timeout <= now));
                }
            }
        }
        // In queue order: the first failure of a queue resets the later
        // batches, whose own failures are then stale and ignored.
        for (q, no, token, overdue) in failed {
            let e = if overdue {
                ClientError::Timeout
            } else {
                ClientError::Disconnected
            };
            self.on_reply(cfg, q, no, token, Err(e), now);
        }
    }

    /// When the sender thread must look again even if no reply arrives.
    fn next_deadline(&self, cfg: &ProducerConfig, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for qs in &self.queues {
            for o in &qs.open {
                consider(o.opened_at + cfg.linger);
            }
            if let Some(t) = qs.retry_at {
                if t > now && qs.has_waiting() {
                    consider(t);
                }
            }
            if self.conn.is_some() {
                for b in &qs.batches {
                    if let BatchState::InFlight { sent_at, .. } = b.state {
                        consider(sent_at + cfg.request_timeout);
                    }
                }
            }
        }
        if self.conn.is_none() && self.has_waiting() {
            consider(self.next_connect_at.unwrap_or(now));
        }
        if self.conn.is_some() && !self.refresh_in_flight {
            if let Some(t) = self.next_refresh_at {
                consider(t);
            }
        }
        next
    }

    /// Applies the outcome of one send attempt of batch `no` of queue `q`.
    fn on_reply(
        &mut self,
        cfg: &ProducerConfig,
        q: usize,
        no: u64,
        token: u64,
        result: Result<Reply, ClientError>,
        now: Instant,
    ) {
        if let Err(e) = &result {
            if e.broker_code() == Some(ErrorCode::UnknownQueue) {
                self.refresh_now = true;
            }
        }
        let Some(qs) = self.queues.get_mut(q) else {
            return;
        };
        // Absent: already acked or failed.
        let Some(idx) = qs.batches.iter().position(|b| b.no == no) else {
            return;
        };
        let state = qs.batches[idx].state;
        if state == BatchState::Acked {
            return; // a late reply to an earlier attempt of an acked batch
        }
        let current = matches!(state, BatchState::InFlight { token: t, .. } if t == token);
        match result {
            // Even a stale success means the broker stored the batch.
            Ok(Reply::Produce { duplicate, .. }) => self.ack(q, idx, duplicate),
            // An old duplicate the broker no longer has offsets for: stored.
            Err(ClientError::Broker(e)) if e.code == ErrorCode::DuplicateSequence => {
                self.ack(q, idx, true)
            }
            Ok(_) if current => {
                self.fail(cfg, q, idx, ClientError::UnexpectedReply(ApiKey::Produce))
            }
            Err(e) if current => {
                let qs = &mut self.queues[q];
                // A sequence gap behind a batch still being retried heals once that one lands.
                let earlier_pending = qs
                    .batches
                    .iter()
                    .take(idx)
                    .any(|b| b.state != BatchState::Acked);
                let retriable = e.is_retriable()
                    || (e.broker_code() == Some(ErrorCode::OutOfOrderSequence) && earlier_pending);
                let b = &mut qs.batches[idx];
                if retriable && b.attempts < cfg.retries {
                    b.attempts += 1;
                    tracing::debug!(
                        queue = q,
                        base_sequence = b.base_seq,
                        attempt = b.attempts,
                        "produce failed, will resend: {e}"
                    );
                    let wait = cfg.backoff(b.attempts);
                    // Resend this batch and everything after it, in order.
                    for later in qs.batches.iter_mut().skip(idx) {
                        if matches!(later.state, BatchState::InFlight { .. }) {
                            later.state = BatchState::Waiting;
                        }
                    }
                    qs.retry_at = Some(now + wait);
                } else {
                    self.fail(cfg, q, idx, e);
                }
            }
            // A stale failure: the batch was already reset for a resend.
            _ => {}
        }
    }

    fn ack(&mut self, q: usize, idx: usize, duplicate: bool) {
        let qs = &mut self.queues[q];
        let b = &mut qs.batches[idx];
        b.state = BatchState::Acked;
        self.acked_messages += b.messages;
        if duplicate {
            self.duplicates += b.messages;
        }
        self.unresolved.remove(&b.no);
        self.buffered_bytes = self.buffered_bytes.saturating_sub(b.bytes.len());
        while qs
            .batches
            .front()
            .is_some_and(|b| b.state == BatchState::Acked)
        {
            qs.batches.pop_front();
        }
    }

    /// Gives up on a batch: its messages are reported lost.
    fn fail(&mut self, cfg: &ProducerConfig, q: usize, idx: usize, e: ClientError) {
        let qs = &mut self.queues[q];
        let Some(b) = qs.batches.remove(idx) else {
            return;
        };
        tracing::warn!(
            queue = q,
            base_sequence = b.base_seq,
            messages = b.messages,
            "produce failed for good: {e}"
        );
        // The broker never stored this sequence range; later batches of the
        // same producer id could never follow it. Start a fresh id at 0.
        if cfg.idempotent && b.producer_id == qs.producer_id {
            qs.producer_id = new_producer_id();
            qs.next_seq = 0;
        }
        self.failed_messages += b.messages;
        self.unresolved.remove(&b.no);
        self.buffered_bytes = self.buffered_bytes.saturating_sub(b.bytes.len());
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
        while qs
            .batches
            .front()
            .is_some_and(|b| b.state == BatchState::Acked)
        {
            qs.batches.pop_front();
        }
    }

    /// A connect attempt failed: it counts as an attempt of every batch
    /// waiting to be sent; those out of retries fail with this error.
    fn on_connect_failure(&mut self, cfg: &ProducerConfig, e: ClientError, now: Instant) {
        self.connect_failures += 1;
        self.next_connect_at = Some(now + cfg.backoff(self.connect_failures));
        tracing::debug!(attempt = self.connect_failures, "connect failed: {e}");
        let mut err = Some(e);
        for q in 0..self.queues.len() {
            let mut idx = 0;
            while idx < self.queues[q].batches.len() {
                let b = &mut self.queues[q].batches[idx];
                if b.state == BatchState::Waiting {
                    if b.attempts >= cfg.retries {
                        let e = err.take().unwrap_or(ClientError::Disconnected);
                        self.fail(cfg, q, idx, e);
                        continue;
                    }
                    b.attempts += 1;
                }
                idx += 1;
            }
        }
    }
}

enum Event {
    /// Something changed (a batch opened or sealed, flush, shutdown).
    Wake,
    Reply {
        queue: u32,
        no: u64,
        token: u64,
        result: Result<Reply, ClientError>,
    },
    /// The answer to a refresh of the topic's description.
    Topic(Result<Reply, ClientError>),
}

struct Shared {
    addr: String,
    topic: String,
    config: ProducerConfig,
    state: Mutex<State>,
    /// Signalled whenever batches resolve or the sender thread exits.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            request: self.config.request_timeout,
            ..Timeouts::default()
        }
    }
}

/// Sends messages of one topic. `Send + Sync`: call [`Producer::send`] from
/// any number of threads.
pub struct Producer {
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    sender: Option<JoinHandle<()>>,
    producer_id: i64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("addr", &self.shared.addr)
            .field("topic", &self.shared.topic)
            .field("producer_id", &self.producer_id)
            .finish()
    }
}

impl Producer {
    /// Connects, looks the topic up for its queue count and starts the sender thread.
    pub fn connect(
        addr: &str,
        topic: &str,
        config: ProducerConfig,
    ) -> Result<Producer, ClientError> {
        config.validate()?;
        let timeouts = Timeouts {
            request: config.request_timeout,
            ..Timeouts::default()
        };
        let conn = Connection::connect(addr, timeouts)?;
        let info = describe_topic(&conn, topic)?;
        let queues = info.queues.len() as u32;
        if queues == 0 {
            return Err(ClientError::Config(format!("topic {topic} has no queues")));
        }
        let producer_id = new_producer_id();
        let mut state = State::new(queues, producer_id);
        state.router = ShardRouter::new(addr, timeouts, config.shard_aware);
        state.router.set_topic(&info);
        state.conn = Some(Arc::new(conn));
        if !config.topic_refresh.is_zero() {
            state.next_refresh_at = Some(Instant::now() + config.topic_refresh);
        }
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            topic: topic.to_string(),
            config,
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread_tx = tx.clone();
        let sender = thread::Builder::new()
            .name(format!("coremq-producer-{topic}"))
            .spawn(move || run_sender(thread_shared, thread_tx, rx))?;
        Ok(Producer {
            shared,
            events: tx,
            sender: Some(sender),
            producer_id,
        })
    }

    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The topic's queue count as the producer knows it (it grows when a
    /// refresh sees a grown topic).
    pub fn queues(&self) -> u32 {
        self.shared.lock().partitioner.queues()
    }

    /// Re-reads the topic's queue count now (blocking round trip) and
    /// starts using new queues; returns the count.
    pub fn refresh(&self) -> Result<u32, ClientError> {
        let conn = self.connection()?;
        let info = describe_topic(&conn, &self.shared.topic)?;
        let mut st = self.shared.lock();
        st.grow(info.queues.len() as u32);
        st.router.set_topic(&info);
        Ok(st.partitioner.queues())
    }

    /// The shard ports the producer has a connection to (empty when every
    /// batch goes to the shared address), ascending.
    pub fn shard_ports_in_use(&self) -> Vec<u16> {
        self.shared.lock().router.ports_in_use()
    }

    /// The producer id batches are stamped with at start (a queue switches
    /// to a fresh one after a batch of it fails for good).
    pub fn producer_id(&self) -> i64 {
        self.producer_id
    }

    /// Queues a message; it is sent with its batch. Blocks only while the
    /// unacknowledged bytes are over `buffer_bytes_max`.
    pub fn send(&self, msg: Message) -> Result<(), ClientError> {
        let cfg = &self.shared.config;
        let known = self.shared.lock().partitioner.queues();
        if msg.queue.is_some_and(|q| q >= known) {
            // Perhaps the topic grew since the last refresh: look before refusing.
            self.refresh()?;
        }
        let mut st = self.shared.lock();
        while st.buffered_bytes >= cfg.buffer_bytes_max && !st.sender_exited {
            st = self.shared.wait(st);
        }
        if st.sender_exited {
            return Err(ClientError::Disconnected);
        }
        let wake = st.append(cfg, msg, Instant::now())?;
        drop(st);
        if wake {
            let _ = self.events.send(Event::Wake);
        }
        Ok(())
    }

    /// Sends every open batch and waits until every batch sealed so far is
    /// acknowledged or given up on. Returns what was acknowledged since the
    /// previous flush, or the first error if any message was lost.
    pub fn flush(&self) -> Result<ProduceSummary, ClientError> {
        let cfg = &self.shared.config;
        let mut st = self.shared.lock();
        st.seal_due(cfg, Instant::now(), true);
        let target = st.next_batch_no;
        let _ = self.events.send(Event::Wake);
        while st.unresolved.range(..target).next().is_some() {
            if st.sender_exited {
                return Err(ClientError::Disconnected);
            }
            st = self.shared.wait(st);
        }
        let summary = ProduceSummary {
            acked_messages: std::mem::take(&mut st.acked_messages),
            duplicates: std::mem::take(&mut st.duplicates),
        };
        if let Some(e) = st.first_error.take() {
            let failed = std::mem::take(&mut st.failed_messages);
            tracing::warn!(
                failed,
                acked = summary.acked_messages,
                "messages were not acknowledged"
            );
            return Err(e);
        }
        Ok(summary)
    }

    /// Flushes and stops the sender thread.
    pub fn close(self) -> Result<ProduceSummary, ClientError> {
        self.flush()
        // Drop stops the thread.
    }

    /// Raw escape hatch for tests: sends a pre-built batch to `queue` on the
    /// producer's connection and waits for its reply, bypassing batching,
    /// sequencing and retries.
    pub fn send_batch(&self, queue: u32, batch: Bytes) -> Result<Reply, ClientError> {
        let conn = self.connection()?;
        conn.call(&Request::Produce {
            topic: self.shared.topic.clone(),
            queue,
            batch,
        })
    }
}

impl Producer {
    /// The sender's connection, or a new one if it has none (or a dead one).
    fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut st = self.shared.lock();
        match &st.conn {
            Some(c) if !c.is_closed() => Ok(Arc::clone(c)),
            _ => {
                let c = Arc::new(Connection::connect(
                    &self.shared.addr,
                    self.shared.timeouts(),
                )?);
                st.conn = Some(Arc::clone(&c));
                Ok(c)
            }
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        let _ = self.events.send(Event::Wake);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}

/// Marks the sender thread gone (also on panic) so no caller waits forever.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let conn = {
            let mut st = self.0.lock();
            st.sender_exited = true;
            let sealed: u64 = st
                .queues
                .iter()
                .flat_map(|q| q.batches.iter())
                .filter(|b| b.state != BatchState::Acked)
                .map(|b| b.messages)
                .sum();
            let open: u64 = st
                .queues
                .iter()
                .flat_map(|q| q.open.iter())
                .map(|o| o.builder.len() as u64)
                .sum();
            let lost = sealed + open;
            if lost > 0 {
                tracing::warn!(lost, "producer closed with unacknowledged messages");
            }
            (st.conn.take(), st.router.take_all())
        };
        drop(conn);
        self.0.changed.notify_all();
    }
}

/// The sender thread: seals lingering batches, connects, sends, applies replies.
fn run_sender(shared: Arc<Shared>, tx: mpsc::Sender<Event>, rx: mpsc::Receiver<Event>) {
    let _guard = ExitGuard(Arc::clone(&shared));
    let cfg = &shared.config;
    loop {
        let now = Instant::now();
        let mut st = shared.lock();
        if st.shutdown {
            return;
        }
        st.seal_due(cfg, now, false);

        // A dead or overdue connection (shared, or to a shard port) is
        // closed and replaced; only the batches in flight on it fail now
        // and are resent on the new one.
        let mut dropped = st.router.take_closed();
        for p in st.overdue_routes(cfg, now) {
            if !dropped.contains(&p) {
                dropped.push(p);
            }
        }
        let mut stale = None;
        if st.conn.as_ref().is_some_and(|c| c.is_closed()) || dropped.contains(&0) {
            stale = st.conn.take();
            if !dropped.contains(&0) {
                dropped.push(0);
            }
        }
        let stale_shards: Vec<Arc<Connection>> = dropped
            .iter()
            .filter_map(|p| (*p != 0).then(|| st.router.take(*p)).flatten())
            .collect();
        if !dropped.is_empty() {
            tracing::debug!(ports = ?dropped, "connection dropped (0: shared); resending its batches");
            st.fail_in_flight_on(cfg, now, |p| dropped.contains(&p));
        }
        let need_conn =
            st.conn.is_none() && st.has_waiting() && st.next_connect_at.is_none_or(|t| t <= now);
        let shard_ports = if st.conn.is_some() {
            st.wanted_ports(now)
        } else {
            Vec::new()
        };
        if need_conn || stale.is_some() || !stale_shards.is_empty() || !shard_ports.is_empty() {
            let shard_addrs: Vec<(u16, String)> = shard_ports
                .iter()
                .map(|p| (*p, st.router.addr_of(*p)))
                .collect();
            drop(st);
            if let Some(c) = stale {
                c.close();
            }
            for c in stale_shards {
                c.close();
            }
            if !shard_addrs.is_empty() {
                let opened: Vec<_> = shard_addrs
                    .into_iter()
                    .map(|(p, a)| (p, Connection::connect(&a, shared.timeouts())))
                    .collect();
                let mut st = shared.lock();
                let now = Instant::now();
                for (p, result) in opened {
                    st.router.install(p, result, now);
                }
            }
            if need_conn {
                let result = Connection::connect(&shared.addr, shared.timeouts());
                let mut st = shared.lock();
                match result {
                    Ok(c) => {
                        st.conn = Some(Arc::new(c));
                        st.connect_failures = 0;
                        st.next_connect_at = None;
                    }
                    Err(e) => st.on_connect_failure(cfg, e, Instant::now()),
                }
            }
            // Batches may have run out of retries above.
            shared.changed.notify_all();
            continue;
        }

        st.update_routes();
        let (conn, outgoing) = match &st.conn {
            Some(c) => (Some(Arc::clone(c)), st.take_sendable(cfg, now)),
            None => (None, Vec::new()),
        };
        let routes: Vec<Option<Arc<Connection>>> = outgoing
            .iter()
            .map(|o| (o.route != 0).then(|| st.router.conn(o.route)).flatten())
            .collect();
        let refresh = st.refresh_due(now);
        if refresh {
            st.refresh_in_flight = true;
            st.refresh_now = false;
            st.next_refresh_at = (!cfg.topic_refresh.is_zero()).then(|| now + cfg.topic_refresh);
        }
        let deadline = st.next_deadline(cfg, now);
        drop(st);

        if let Some(conn) = conn {
            if refresh {
                let req = Request::DescribeTopic {
                    name: shared.topic.clone(),
                };
                let reply_tx = tx.clone();
                let sent = conn.send_with(&req, move |c| {
                    let _ = reply_tx.send(Event::Topic(c.into_reply()));
                });
                if let Err(e) = sent {
                    let _ = tx.send(Event::Topic(Err(e)));
                }
            }
            for (o, route) in outgoing.into_iter().zip(routes) {
                let req = produce_request(&shared.topic, o.queue, o.options, o.bytes);
                let reply_tx = tx.clone();
                let (queue, no, token) = (o.queue, o.no, o.token);
                // A shard connection that broke meanwhile fails the send
                // (Disconnected): the batch is resent like any other failure.
                let conn = route.as_ref().unwrap_or(&conn);
                let sent = conn.send_with(&req, move |c| {
                    let _ = reply_tx.send(Event::Reply {
                        queue,
                        no,
                        token,
                        result: c.into_reply(),
                    });
                });
                if let Err(e) = sent {
                    let _ = tx.send(Event::Reply {
                        queue,
                        no,
                        token,
                        result: Err(e),
                    });
                }
            }
        }

        let first = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut events = match first {
            Ok(e) => vec![e],
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        events.extend(rx.try_iter());
        let mut resolved = false;
        if events.iter().any(|e| !matches!(e, Event::Wake)) {
            let mut st = shared.lock();
            let now = Instant::now();
            for e in events.drain(..) {
                match e {
                    Event::Reply {
                        queue,
                        no,
                        token,
                        result,
                    } => {
                        st.on_reply(cfg, queue as usize, no, token, result, now);
                        resolved = true;
                    }
                    Event::Topic(result) => {
                        st.refresh_in_flight = false;
                        match result {
                            Ok(Reply::Topic(info)) => {
                                st.grow(info.queues.len() as u32);
                                st.router.set_topic(&info);
                            }
                            Ok(_) => tracing::debug!("unexpected reply to a topic refresh"),
                            Err(e) => tracing::debug!("topic refresh failed: {e}"),
                        }
                    }
                    Event::Wake => {}
                }
            }
        }
        if resolved {
            shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorReply;
    use coremq_shards::batch::{decode_records, BatchHeader};

    fn cfg() -> ProducerConfig {
        ProducerConfig {
            linger: Duration::from_secs(3600),
            ..ProducerConfig::default()
        }
    }

    fn ack() -> Result<Reply, ClientError> {
        Ok(Reply::Produce {
            base_offset: 0,
            duplicate: false,
        })
    }

    fn header(b: &Bytes) -> BatchHeader {
        BatchHeader::parse(b).unwrap()
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let mut p = Partitioner::new(4);
        let mut counts = [0u32; 4];
        for _ in 0..400 {
            counts[p.pick(None, None).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }

    #[test]
    fn key_hash_is_stable_and_explicit_queue_wins() {
        let mut p = Partitioner::new(8);
        let q = p.pick(None, Some(b"order-17")).unwrap();
        for _ in 0..10 {
            assert_eq!(p.pick(None, Some(b"order-17")).unwrap(), q);
        }
        assert_eq!(q, crc32fast::hash(b"order-17") % 8);
        // Pinned so a change of hash function (which would move keys) is noticed.
        assert_eq!(key_queue(b"a", 1000), 0xe8b7be43 % 1000);
        assert_eq!(p.pick(Some(5), Some(b"order-17")).unwrap(), 5);
        assert!(matches!(p.pick(Some(8), None), Err(ClientError::Config(_))));
    }

    #[test]
    fn sequence_increment_wraps_like_kafka() {
        assert_eq!(increment_sequence(0, 5), 5);
        assert_eq!(increment_sequence(i32::MAX - 2, 2), i32::MAX);
        assert_eq!(increment_sequence(i32::MAX - 2, 3), 0);
        assert_eq!(increment_sequence(i32::MAX, 4), 3);
    }

    #[test]
    fn base_sequence_counts_messages_batched_before() {
        let cfg = ProducerConfig {
            batch_messages_max: 3,
            ..cfg()
        };
        let mut st = State::new(2, 77);
        let now = Instant::now();
        for i in 0..8u32 {
            st.append(&cfg, Message::new(format!("m{i}")).with_queue(0), now)
                .unwrap();
        }
        st.append(&cfg, Message::new("x").with_queue(1), now)
            .unwrap();
        st.seal_due(&cfg, now, true);
        let q0: Vec<_> = st.queues[0]
            .batches
            .iter()
            .map(|b| {
                let h = header(&b.bytes);
                (
                    h.producer_id,
                    h.producer_epoch,
                    h.base_sequence,
                    h.records_count,
                )
            })
            .collect();
        assert_eq!(q0, vec![(77, 0, 0, 3), (77, 0, 3, 3), (77, 0, 6, 2)]);
        let q1 = header(&st.queues[1].batches[0].bytes);
        assert_eq!((q1.base_sequence, q1.records_count), (0, 1));
        // Values survive in order.
        let (_, recs) = decode_records(&st.queues[0].batches[1].bytes).unwrap();
        let values: Vec<_> = recs.iter().map(|r| r.value.clone().unwrap()).collect();
        assert_eq!(values, vec!["m3", "m4", "m5"]);
        assert_eq!(st.unresolved.len(), 4);
    }

    #[test]
    fn batch_is_sealed_before_it_would_overflow_bytes() {
        let cfg = ProducerConfig {
            batch_bytes_max: 200,
            ..cfg()
        };
        let mut st = State::new(1, 1);
        let now = Instant::now();
        for _ in 0..5 {
            st.append(&cfg, Message::new(vec![b'x'; 60]), now).unwrap();
        }
        for b in &st.queues[0].batches {
            assert!(b.bytes.len() <= 200, "{} bytes", b.bytes.len());
        }
        assert!(!st.queues[0].batches.is_empty());
    }

    #[test]
    fn non_idempotent_batches_carry_no_producer() {
        let cfg = ProducerConfig {
            idempotent: false,
            ..cfg()
        };
        let mut st = State::new(1, 5);
        st.append(&cfg, Message::new("a"), Instant::now()).unwrap();
        st.seal_due(&cfg, Instant::now(), true);
        let h = header(&st.queues[0].batches[0].bytes);
        assert_eq!((h.producer_id, h.base_sequence), (-1, -1));
    }

    #[test]
    fn linger_seals_only_when_due() {
        let cfg = ProducerConfig {
            linger: Duration::from_millis(5),
            ..ProducerConfig::default()
        };
        let mut st = State::new(1, 1);
        let t0 = Instant::now();
        assert!(st.append(&cfg, Message::new("a"), t0).unwrap());
        assert!(!st.append(&cfg, Message::new("b"), t0).unwrap());
        assert_eq!(st.next_deadline(&cfg, t0), Some(t0 + cfg.linger));
        st.seal_due(&cfg, t0 + Duration::from_millis(1), false);
        assert!(st.queues[0].batches.is_empty());
        st.seal_due(&cfg, t0 + cfg.linger, false);
        assert_eq!(st.queues[0].batches.len(), 1);
    }

    /// Sealed state with `n` batches of one message in queue 0.
    fn sealed(cfg: &ProducerConfig, n: usize) -> State {
        let mut st = State::new(1, 9);
        for i in 0..n {
            st.append(cfg, Message::new(format!("{i}")), Instant::now())
                .unwrap();
            st.seal_due(cfg, Instant::now(), true);
        }
        st
    }

    #[test]
    fn in_flight_is_capped_per_queue_and_sent_in_order() {
        let cfg = ProducerConfig {
            max_in_flight_per_queue: 2,
            ..cfg()
        };
        let mut st = sealed(&cfg, 4);
        let now = Instant::now();
        let first: Vec<u64> = st.take_sendable(&cfg, now).iter().map(|o| o.no).collect();
        assert_eq!(first, vec![0, 1]);
        assert!(st.take_sendable(&cfg, now).is_empty());
        st.on_reply(&cfg, 0, 0, 0, ack(), now);
        let next: Vec<u64> = st.take_sendable(&cfg, now).iter().map(|o| o.no).collect();
        assert_eq!(next, vec![2]);
    }

    #[test]
    fn retriable_failure_resends_it_and_everything_after_with_same_bytes() {
        let cfg = cfg();
        let mut st = sealed(&cfg, 3);
        let now = Instant::now();
        let sent = st.take_sendable(&cfg, now);
        let bytes1 = sent[1].bytes.clone();
        // Batch 0 acked, batch 1 fails retriably, batch 2's failure is then stale.
        st.on_reply(&cfg, 0, 0, sent[0].token, ack(), now);
        st.on_reply(
            &cfg,
            0,
            1,
            sent[1].token,
            Err(ClientError::Disconnected),
            now,
        );
        st.on_reply(
            &cfg,
            0,
            2,
            sent[2].token,
            Err(ClientError::Disconnected),
            now,
        );
        assert_eq!(st.queues[0].batches[0].attempts, 1);
        assert_eq!(st.queues[0].batches[1].attempts, 0);
        // Nothing before the backoff, then 1 and 2 again, in order, same bytes.
        assert!(st.take_sendable(&cfg, now).is_empty());
        let later = now + cfg.backoff(1);
        let again = st.take_sendable(&cfg, later);
        assert_eq!(again.iter().map(|o| o.no).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(again[0].bytes, bytes1);
        st.on_reply(
            &cfg,
            0,
            1,
            again[0].token,
            Ok(Reply::Produce {
                base_offset: 1,
                duplicate: true,
            }),
            later,
        );
        st.on_reply(&cfg, 0, 2, again[1].token, ack(), later);
        assert_eq!((st.acked_messages, st.duplicates), (3, 1));
        assert!(st.unresolved.is_empty());
        assert_eq!(st.buffered_bytes, 0);
        assert!(st.first_error.is_none());
    }

    #[test]
    fn retries_run_out_and_fatal_errors_fail_at_once() {
        let cfg = ProducerConfig {
            retries: 2,
            ..cfg()
        };
        let mut st = sealed(&cfg, 2);
        let mut now = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..3 {
            now += Duration::from_secs(10);
            sent = st.take_sendable(&cfg, now);
            assert_eq!(sent[0].no, 0);
            st.on_reply(&cfg, 0, 0, sent[0].token, Err(ClientError::Timeout), now);
        }
        assert_eq!(st.failed_messages, 1);
        assert!(matches!(st.first_error, Some(ClientError::Timeout)));
        // The queue restarted its sequence under a new producer id.
        assert_ne!(st.queues[0].producer_id, 9);
        assert_eq!(st.queues[0].next_seq, 0);

        // A non-retriable broker error fails without a retry (batch 1 is
        // still in flight from the last round).
        assert_eq!(sent[1].no, 1);
        let err = ErrorReply::new(ErrorCode::MessageTooLarge, "big");
        st.on_reply(
            &cfg,
            0,
            1,
            sent[1].token,
            Err(ClientError::Broker(err)),
            now,
        );
        assert_eq!(st.failed_messages, 2);
        assert!(st.unresolved.is_empty());
    }

    #[test]
    fn out_of_order_behind_a_retried_batch_is_retried() {
        let cfg = cfg();
        let mut st = sealed(&cfg, 2);
        let now = Instant::now();
        let sent = st.take_sendable(&cfg, now);
        let ooo = ErrorReply::new(ErrorCode::OutOfOrderSequence, "gap");
        st.on_reply(
            &cfg,
            0,
            1,
            sent[1].token,
            Err(ClientError::Broker(ooo.clone())),
            now,
        );
        assert_eq!(st.failed_messages, 0);
        assert_eq!(st.queues[0].batches[1].state, BatchState::Waiting);
        // With nothing pending before it, the same error is fatal.
        st.on_reply(&cfg, 0, 0, sent[0].token, ack(), now);
        let later = now + Duration::from_secs(5);
        let again = st.take_sendable(&cfg, later);
        st.on_reply(
            &cfg,
            0,
            1,
            again[0].token,
            Err(ClientError::Broker(ooo)),
            later,
        );
        assert_eq!(st.failed_messages, 1);
    }

    #[test]
    fn stale_success_still_acks_once() {
        let cfg = cfg();
        let mut st = sealed(&cfg, 1);
        let now = Instant::now();
        let s1 = st.take_sendable(&cfg, now);
        st.on_reply(&cfg, 0, 0, s1[0].token, Err(ClientError::Disconnected), now);
        let later = now + Duration::from_secs(5);
        let s2 = st.take_sendable(&cfg, later);
        // The first attempt's success arrives late, then the resend's duplicate.
        st.on_reply(&cfg, 0, 0, s1[0].token, ack(), later);
        st.on_reply(
            &cfg,
            0,
            0,
            s2[0].token,
            Ok(Reply::Produce {
                base_offset: 0,
                duplicate: true,
            }),
            later,
        );
        assert_eq!((st.acked_messages, st.duplicates), (1, 0));
    }

    #[test]
    fn connect_failures_use_up_retries_of_waiting_batches() {
        let cfg = ProducerConfig {
            retries: 1,
            ..cfg()
        };
        let mut st = sealed(&cfg, 2);
        let now = Instant::now();
        let refused = || ClientError::Io(std::io::ErrorKind::ConnectionRefused.into());
        st.on_connect_failure(&cfg, refused(), now);
        assert_eq!(st.failed_messages, 0);
        assert!(st.next_connect_at.is_some());
        st.on_connect_failure(&cfg, refused(), now);
        assert_eq!(st.failed_messages, 2);
        assert!(matches!(st.first_error, Some(ClientError::Io(_))));
    }

    #[test]
    fn dropping_the_connection_resends_everything_in_flight() {
        let cfg = cfg();
        let mut st = sealed(&cfg, 3);
        let t0 = Instant::now();
        let sent = st.take_sendable(&cfg, t0);
        assert_eq!(sent.len(), 3);
        let late = t0 + cfg.request_timeout;
        assert_eq!(st.overdue_routes(&cfg, late), vec![0]);
        st.fail_in_flight_on(&cfg, late, |_| true);
        assert!(st.overdue_routes(&cfg, late).is_empty());
        let attempts: Vec<u32> = st.queues[0].batches.iter().map(|b| b.attempts).collect();
        assert_eq!(attempts, vec![1, 0, 0]);
        // The old connection's Disconnected callbacks are stale now.
        for o in &sent {
            st.on_reply(&cfg, 0, o.no, o.token, Err(ClientError::Disconnected), late);
        }
        assert_eq!(st.queues[0].batches[0].attempts, 1);
        let again = st.take_sendable(&cfg, late + cfg.backoff(1));
        assert_eq!(
            again.iter().map(|o| o.no).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn dropping_a_shard_connection_resends_only_its_queues() {
        let cfg = cfg();
        let mut st = State::new(2, 9);
        for q in 0..2 {
            st.append(&cfg, Message::new("m").with_queue(q), Instant::now())
                .unwrap();
        }
        st.seal_due(&cfg, Instant::now(), true);
        // Queue 0 went to shard port 7000, queue 1 to the shared connection.
        st.queues[0].route = 7000;
        let t0 = Instant::now();
        let sent = st.take_sendable(&cfg, t0);
        assert_eq!(
            sent.iter().map(|o| (o.queue, o.route)).collect::<Vec<_>>(),
            vec![(0, 7000), (1, 0)]
        );
        st.fail_in_flight_on(&cfg, t0, |p| p == 7000);
        assert_eq!(st.queues[0].batches[0].attempts, 1);
        assert_eq!(st.queues[0].batches[0].state, BatchState::Waiting);
        assert_eq!(st.queues[1].batches[0].attempts, 0);
        assert!(matches!(
            st.queues[1].batches[0].state,
            BatchState::InFlight { .. }
        ));
        // Without a shard connection the queue falls back to the shared one.
        st.update_routes();
        assert_eq!(st.queues[0].route, 0);
    }

    #[test]
    fn growing_adds_queues_to_the_round_robin_and_rehashes_keys() {
        let cfg = cfg();
        let mut st = State::new(2, 42);
        let now = Instant::now();
        st.grow(1); // topics never shrink
        assert_eq!((st.queues.len(), st.partitioner.queues()), (2, 2));
        st.grow(4);
        assert_eq!((st.queues.len(), st.partitioner.queues()), (4, 4));
        assert!(!st.partitioner.grow(4));
        for i in 0..8 {
            st.append(&cfg, Message::new(format!("{i}")), now).unwrap();
        }
        let key_q = key_queue(b"user-1", 4) as usize;
        st.append(&cfg, Message::new("k").with_key("user-1"), now)
            .unwrap();
        st.seal_due(&cfg, now, true);
        for (q, qs) in st.queues.iter().enumerate() {
            let h = header(&qs.batches[0].bytes);
            let extra = i32::from(q == key_q);
            assert_eq!(h.records_count, 2 + extra, "queue {q}");
            // A new queue starts its sequence at 0 under the producer's id.
            assert_eq!((h.producer_id, h.base_sequence), (42, 0));
        }
    }

    #[test]
    fn headers_are_written_into_the_record() {
        let cfg = cfg();
        let mut st = State::new(1, 1);
        let msg = Message::new("v")
            .with_header("id", "order-1")
            .with_header("trace", Bytes::from_static(b"\x00\x01"));
        st.append(&cfg, msg, Instant::now()).unwrap();
        st.seal_due(&cfg, Instant::now(), true);
        let (_, recs) = decode_records(&st.queues[0].batches[0].bytes).unwrap();
        assert_eq!(
            recs[0].headers,
            vec![
                ("id".to_string(), Some(Bytes::from_static(b"order-1"))),
                ("trace".to_string(), Some(Bytes::from_static(b"\x00\x01"))),
            ]
        );
    }

    #[test]
    fn unknown_queue_reply_asks_for_a_refresh() {
        let cfg = cfg();
        let mut st = sealed(&cfg, 1);
        st.conn = None;
        let now = Instant::now();
        let sent = st.take_sendable(&cfg, now);
        let e = ErrorReply::new(ErrorCode::UnknownQueue, "gone");
        st.on_reply(&cfg, 0, 0, sent[0].token, Err(ClientError::Broker(e)), now);
        assert!(st.refresh_now);
        // Only with a connection to ask on, and one refresh at a time.
        assert!(!st.refresh_due(now));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = ProducerConfig {
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_millis(350),
            ..cfg()
        };
        let ms: Vec<u128> = (1..=4).map(|a| cfg.backoff(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 350, 350]);
    }
}
