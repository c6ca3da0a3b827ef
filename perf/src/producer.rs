//! One producer thread: builds record batches itself and pipelines them.
//!
//! A thread carries one or more of the workload's producers (many topics
//! need not mean as many threads): it owns their routes — one per
//! (producer, queue), each with the thread's connection to the queue's
//! shard — and follows one schedule at the sum of their rates. Messages go
//! round robin over the routes, ordered so that each producer gets every
//! k-th message (k producers on the thread) and cycles over its topic's
//! queues, as a producer of its own would.
//!
//! The library's `Producer` hides per-message ack times behind its sender
//! thread, so the benchmark batches on its own: one open batch per route
//! (its messages' intended send times and its exact encoded size, from
//! [`value_record_bytes`]; the records are encoded when it is sealed, into
//! a buffer of that size: a builder growing as messages came copied its
//! records over and over, 11% of the tool's CPU with 10,000 topics); a
//! batch is sealed when the next message would push it past
//! `batch_bytes`, when it has lingered `linger` (open batches wait in a
//! queue in the order they were opened, so finding the lingered ones costs
//! nothing per route), or at once when `linger` is zero (each message its
//! own batch: the single-message latency case). A sealed batch goes out with
//! [`Connection::send_with`] without waiting for earlier acks; its reply
//! callback records, for every message in it, the time from the message's
//! intended send time to the ack.
//!
//! Every payload starts with its intended send time (nanoseconds since the
//! UNIX epoch, big-endian, see [`TIMESTAMP_BYTES`]) so consumers can measure
//! end-to-end latency from the same origin; the rest comes from the
//! thread's [`Payloads`]. Batches are compressed with the workload's codec
//! when they are sealed (`batchBytes` counts uncompressed bytes, as the
//! builder estimates them); the stored size of every acked batch is
//! counted, for the compression ratio.
//!
//! Many queues per connection (many topics on a thread): sealed batches
//! bound for the same connection are gathered into one ProduceMany
//! ([`ProduceManyBuilder`], at most [`PRODUCE_MANY_BYTES_MAX`] and the
//! protocol's entry limit) and sent when it is full, when the thread is
//! about to wait for acks (a full window), or [`PRODUCE_MANY_GATHER`]
//! after its first batch (a pause in the schedule waits for that too).
//! Each entry's result is applied to that batch alone, with the same
//! per-message latency accounting (intended send time to the reply). With one queue per connection a batch goes out as a
//! single Produce at once, as before (`multi_queue` false).
//!
//! In-flight limits, per thread: in open loop only a large safety cap on
//! unacknowledged bytes (hitting it delays sends, which the schedule-based
//! latency shows); in closed loop a window of unacknowledged batches (the
//! run gives each thread `--window` per producer it carries), which is
//! what sets the pace. Batches are never retried: a failed batch counts its messages
//! as errors. After the last scheduled message the thread waits for every
//! outstanding ack (up to [`ACK_WAIT_MAX`]); what is still unanswered then
//! is failed by closing the connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use coremq::client::{ClientError, Connection, ProduceManyBuilder, Timeouts};
use coremq::protocol::messages::ProduceOptions;
use coremq::protocol::{ProduceEntry, Reply, Request};
use coremq_shards::batch::{
    value_record_bytes, BatchBuilder, Compression, BATCH_HEADER_BYTES, RECORDS_PER_BATCH_MAX,
};

use crate::payload::Payloads;
use crate::run::to_ns;
use crate::schedule::{Clock, EndTime, Pacing};
use crate::stats::{lock, SharedTally, Tally};
use crate::workload::TIMESTAMP_BYTES;

/// Bytes a record adds to its payload inside a batch, at most (attributes,
/// varint length, timestamp and offset deltas, null key, header count).
pub const RECORD_OVERHEAD_BYTES: usize = 24;
/// Open loop: unacknowledged bytes per producer before sending pauses (a
/// guard against unbounded memory if the broker stops answering).
pub const OPEN_LOOP_IN_FLIGHT_BYTES_MAX: usize = 256 << 20;
/// Closed loop: default unacknowledged batches per producer.
pub const CLOSED_LOOP_WINDOW_DEFAULT: usize = 16;
/// Longest wait for outstanding acks after the last message.
pub const ACK_WAIT_MAX: Duration = Duration::from_secs(30);
/// Pause after a failed reconnect before the next attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Wire bytes of one gathered ProduceMany, at most.
pub const PRODUCE_MANY_BYTES_MAX: usize = 1 << 20;
/// Longest a sealed batch waits for others to share its ProduceMany.
pub const PRODUCE_MANY_GATHER: Duration = Duration::from_millis(1);
/// Nanoseconds per millisecond (record timestamps are in ms).
const NANOS_PER_MILLI: u64 = 1_000_000;

/// How much a producer thread may have unacknowledged: at most `batches`
/// batches and at most `bytes` bytes of them. A single batch always goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub batches: usize,
    pub bytes: usize,
}

impl Window {
    /// At most `n` batches, of any size.
    pub const fn batches(n: usize) -> Window {
        Window {
            batches: n,
            bytes: usize::MAX,
        }
    }

    /// At most `max` bytes (the open loop's safety cap), in any number of batches.
    pub const fn bytes(max: usize) -> Window {
        Window {
            batches: usize::MAX,
            bytes: max,
        }
    }

    fn fits(&self, f: &Flight, bytes: usize) -> bool {
        f.batches == 0 || (f.batches < self.batches && f.bytes.saturating_add(bytes) <= self.bytes)
    }
}

#[derive(Debug, Default)]
struct Flight {
    batches: usize,
    bytes: usize,
}

/// What a producer thread shares with its reply callbacks and the main thread.
#[derive(Debug)]
pub struct ProducerShared {
    /// The run's index of each topic the thread sends to (its topic slots).
    pub topics: Vec<usize>,
    /// Acked messages per topic slot.
    acked_by_slot: Vec<AtomicU64>,
    /// Acked messages, their bytes and latencies; failed messages.
    pub tally: SharedTally,
    /// Messages handed to the connection.
    sent: AtomicU64,
    flight: Mutex<Flight>,
    room: Condvar,
}

impl ProducerShared {
    /// A producer of one topic (a peer driver's).
    pub fn new(topic: usize) -> ProducerShared {
        ProducerShared::for_topics(vec![topic])
    }

    /// A thread sending to `topics` (run-wide indices; slot i is topics[i]).
    pub fn for_topics(topics: Vec<usize>) -> ProducerShared {
        ProducerShared {
            acked_by_slot: topics.iter().map(|_| AtomicU64::new(0)).collect(),
            topics,
            tally: SharedTally::default(),
            sent: AtomicU64::new(0),
            flight: Mutex::new(Flight::default()),
            room: Condvar::new(),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// (run-wide topic index, messages acked on it) for each topic slot.
    pub fn acked_by_topic(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.topics
            .iter()
            .zip(&self.acked_by_slot)
            .map(|(&t, n)| (t, n.load(Ordering::Relaxed)))
    }

    /// Batches sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        lock(&self.flight).batches
    }

    /// Whether a batch of `bytes` fits the window now.
    pub(crate) fn has_room(&self, window: Window, bytes: usize) -> bool {
        window.fits(&lock(&self.flight), bytes)
    }

    /// Blocks until a batch of `bytes` fits the window, then counts it in.
    pub(crate) fn acquire(&self, window: Window, bytes: usize) {
        let mut f = lock(&self.flight);
        while !window.fits(&f, bytes) {
            f = self.room.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        f.batches += 1;
        f.bytes += bytes;
    }

    pub(crate) fn release(&self, bytes: usize) {
        self.release_many(1, bytes);
    }

    /// `batches` answered batches of `bytes` in all leave the window.
    fn release_many(&self, batches: usize, bytes: usize) {
        let mut f = lock(&self.flight);
        f.batches = f.batches.saturating_sub(batches);
        f.bytes = f.bytes.saturating_sub(bytes);
        self.room.notify_all();
    }

    /// Counts `n` messages as handed to the client (before the send: the
    /// ack may beat the send's return).
    pub(crate) fn count_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back [`ProducerShared::count_sent`] for messages that never left.
    pub(crate) fn uncount_sent(&self, n: u64) {
        self.sent.fetch_sub(n, Ordering::Relaxed);
    }

    /// One batch acked at `ack_ns`: every message's latency (from its
    /// intended time) is recorded and the batch leaves the window (a peer
    /// driver's: what the broker stores is not known, so not counted).
    pub(crate) fn acked(
        &self,
        intended: &[u64],
        ack_ns: u64,
        payload_bytes: u64,
        batch_bytes: usize,
    ) {
        self.record_ack(0, intended, ack_ns, payload_bytes, batch_bytes, 0);
    }

    /// [`ProducerShared::acked`] for topic slot `slot`, counting
    /// `stored_bytes` as stored.
    fn record_ack(
        &self,
        slot: usize,
        intended: &[u64],
        ack_ns: u64,
        payload_bytes: u64,
        batch_bytes: usize,
        stored_bytes: u64,
    ) {
        let mut t = self.tally.lock();
        self.count_acked(&mut t, slot, intended, ack_ns, payload_bytes, stored_bytes);
        drop(t);
        self.release(batch_bytes);
    }

    /// Counts one acked batch into `t` (the tally, locked) and its slot.
    fn count_acked(
        &self,
        t: &mut Tally,
        slot: usize,
        intended: &[u64],
        ack_ns: u64,
        payload_bytes: u64,
        stored_bytes: u64,
    ) {
        t.messages += intended.len() as u64;
        t.bytes += payload_bytes;
        t.stored_bytes += stored_bytes;
        for &i in intended {
            t.latency.record_between_ns(i, ack_ns);
        }
        if let Some(n) = self.acked_by_slot.get(slot) {
            n.fetch_add(intended.len() as u64, Ordering::Relaxed);
        }
    }

    /// One batch of `messages` failed: counted as errors, out of the window.
    pub(crate) fn failed(&self, messages: u64, batch_bytes: usize, e: impl std::fmt::Display) {
        self.tally.fail(messages, e);
        self.release(batch_bytes);
    }

    /// Applies the reply to one batch: on success every message's latency
    /// (intended time to `ack_ns`) is recorded.
    fn complete(
        &self,
        slot: usize,
        outcome: Result<Reply, ClientError>,
        intended: &[u64],
        ack_ns: u64,
        payload_bytes: u64,
        batch_bytes: usize,
    ) {
        let n = intended.len() as u64;
        match outcome {
            Ok(Reply::Produce { .. }) => self.record_ack(
                slot,
                intended,
                ack_ns,
                payload_bytes,
                batch_bytes,
                batch_bytes as u64,
            ),
            Ok(other) => self.failed(
                n,
                batch_bytes,
                format!("unexpected reply to a produce: {other:?}"),
            ),
            Err(e) => self.failed(n, batch_bytes, format!("produce failed: {e}")),
        }
    }

    /// Applies a ProduceMany's reply: entry i's result to `sent[i]`, or the
    /// request's failure to every one of them.
    fn complete_many(&self, outcome: Result<Reply, ClientError>, sent: &[SentBatch], ack_ns: u64) {
        let results = match outcome {
            Ok(Reply::ProduceMany(results)) if results.len() == sent.len() => results,
            other => {
                let why = match other {
                    Err(e) => format!("produce failed: {e}"),
                    Ok(r) => format!("unexpected reply to a ProduceMany: {r:?}"),
                };
                for b in sent {
                    self.failed(b.intended.len() as u64, b.batch_bytes, &why);
                }
                return;
            }
        };
        // One lock of the tally and of the window for the whole reply, not
        // one each per batch: with 10,000 topics a reply answers hundreds
        // of one-message batches.
        let mut failed = Vec::new();
        {
            let mut t = self.tally.lock();
            for (b, r) in sent.iter().zip(results) {
                match r {
                    Ok(_) => self.count_acked(
                        &mut t,
                        b.slot,
                        &b.intended,
                        ack_ns,
                        b.payload_bytes,
                        b.batch_bytes as u64,
                    ),
                    Err(e) => failed.push((b.intended.len() as u64, e)),
                }
            }
        }
        for (messages, e) in failed {
            self.tally.fail(
                messages,
                format!("produce failed: {}", ClientError::Broker(e)),
            );
        }
        self.release_many(sent.len(), sent.iter().map(|b| b.batch_bytes).sum());
    }

    /// Waits up to `timeout` for every sent batch to be answered.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut f = lock(&self.flight);
        while f.batches > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            f = self
                .room
                .wait_timeout(f, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Where one (producer, queue) of the thread is sent: the topic slot (in
/// [`ProducerSpec::topics`]), the queue, and the index of the connection
/// (the queue's shard, or the shared port) in `conns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub topic: usize,
    pub queue: u32,
    pub conn: usize,
}

/// The routes of a thread's producers, in the order messages take them:
/// `producers[p]` is producer p's (topic slot, connection of each queue);
/// message m goes to producer `m % k` and that producer's queues in turn,
/// so each producer gets every k-th message and cycles over its queues.
pub fn interleave_routes(producers: &[(usize, Vec<(u32, usize)>)]) -> Vec<Route> {
    let k = producers.len();
    let longest = producers.iter().map(|(_, q)| q.len()).max().unwrap_or(0);
    let mut routes = Vec::new();
    for i in 0..longest {
        for (topic, queues) in producers {
            if let Some(&(queue, conn)) = queues.get(i % queues.len().max(1)) {
                routes.push(Route {
                    topic: *topic,
                    queue,
                    conn,
                });
            }
        }
    }
    debug_assert!(k == 0 || routes.len() == k * longest);
    routes
}

/// Everything a producer thread needs.
#[derive(Debug)]
pub struct ProducerSpec {
    /// Name of each topic slot (cloned per ProduceMany entry: a refcount,
    /// not an allocation).
    pub topics: Vec<ByteString>,
    pub routes: Vec<Route>,
    pub conns: Vec<Connection>,
    pub pacing: Pacing,
    /// No message is sent before this time (ns since the epoch).
    pub start_ns: u64,
    /// No message intended at or after this time is sent.
    pub end: EndTime,
    pub message_size: usize,
    pub batch_bytes: usize,
    /// Codec of every batch.
    pub compression: Compression,
    pub payloads: Payloads,
    pub linger: Duration,
    pub window: Window,
    pub clock: Clock,
    /// Set by the main thread to end the run early.
    pub abort: Arc<AtomicBool>,
    /// Gather sealed batches into ProduceMany requests per connection.
    pub multi_queue: bool,
}

/// Whether a thread with these routes and connections gathers its batches
/// into ProduceMany requests: only when some connection carries more than
/// one queue (one queue per connection gains nothing from it).
pub fn use_produce_many(routes: usize, conns: usize) -> bool {
    routes > conns
}

/// A batch inside a gathered ProduceMany, for its reply.
#[derive(Debug)]
struct SentBatch {
    slot: usize,
    intended: Vec<u64>,
    payload_bytes: u64,
    batch_bytes: usize,
}

/// A ProduceMany being gathered for one connection.
struct Gathering {
    builder: ProduceManyBuilder,
    sent: Vec<SentBatch>,
    /// When its first batch came (ns); it goes out `PRODUCE_MANY_GATHER` later at most.
    since_ns: u64,
}

struct OpenBatch {
    /// Intended send time of each message, in batch order.
    intended: Vec<u64>,
    /// Encoded size so far (uncompressed, header included).
    bytes: usize,
    /// The first message's timestamp (ms), which the others are deltas of.
    base_ts_ms: i64,
    /// Tells this batch from an earlier one of the same route in `lingering`.
    serial: u64,
}

/// A producer thread's state.
pub struct Producer {
    spec: ProducerSpec,
    shared: Arc<ProducerShared>,
    open: Vec<Option<OpenBatch>>,
    /// (seal-by time, route, serial) of open batches, oldest first (the
    /// linger is the same for all); entries of batches sealed early are
    /// skipped when they come up.
    lingering: VecDeque<(u64, usize, u64)>,
    next_serial: u64,
    next_route: usize,
    linger_ns: u64,
    /// Per connection (multi-queue mode).
    gathering: Vec<Gathering>,
}

/// A record's timestamp (ms) for a message intended at `ns`.
fn timestamp_ms(ns: u64) -> i64 {
    i64::try_from(ns / NANOS_PER_MILLI).unwrap_or(i64::MAX)
}

/// The intended send time stamped at the start of a payload.
pub fn payload_timestamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; TIMESTAMP_BYTES] = payload.get(..TIMESTAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

impl Producer {
    pub fn new(spec: ProducerSpec, shared: Arc<ProducerShared>) -> Producer {
        let open = spec.routes.iter().map(|_| None).collect();
        let linger_ns = u64::try_from(spec.linger.as_nanos()).unwrap_or(u64::MAX);
        let gathering = spec
            .conns
            .iter()
            .map(|_| Gathering {
                builder: ProduceManyBuilder::new(PRODUCE_MANY_BYTES_MAX),
                sent: Vec::new(),
                since_ns: 0,
            })
            .collect();
        Producer {
            gathering,
            spec,
            shared,
            open,
            lingering: VecDeque::new(),
            next_serial: 0,
            next_route: 0,
            linger_ns,
        }
    }

    /// Sends until the end of the schedule, then waits for the acks.
    pub fn run(mut self) {
        let clock = self.spec.clock;
        clock.sleep_until(self.spec.start_ns);
        let gather_ns = to_ns(PRODUCE_MANY_GATHER);
        while !self.spec.abort.load(Ordering::Relaxed) {
            let now = clock.now_ns();
            self.seal_lingered(now);
            self.send_gathered_older_than(now.saturating_sub(gather_ns));
            let due = self.spec.pacing.next_due(now);
            if due >= self.spec.end.get() {
                break;
            }
            if due > now {
                // A pause between messages does not send what is gathered:
                // it waits out its PRODUCE_MANY_GATHER like the batches
                // their linger (sending at every pause made one request per
                // message at open-loop rates: the broker and the tool spent
                // their CPU per request, not per message).
                let gathered = self.gathered_since().map(|t| t.saturating_add(gather_ns));
                let wake = [self.linger_deadline(), gathered]
                    .into_iter()
                    .flatten()
                    .fold(due, u64::min);
                clock.sleep_until(wake);
                continue;
            }
            let intended = self.spec.pacing.take(now);
            self.append(intended, now);
        }
        for q in 0..self.open.len() {
            self.seal(q);
        }
        self.send_gathered();
        if !self.shared.wait_idle(ACK_WAIT_MAX) {
            self.shared.tally.note_error(format!(
                "{} batches unanswered {ACK_WAIT_MAX:?} after the last send",
                self.shared.in_flight()
            ));
            // Closing fails every waiting request exactly once (Disconnected).
            for c in &self.spec.conns {
                c.close();
            }
            self.shared.wait_idle(ACK_WAIT_MAX);
        }
    }

    /// Whether `lingering`'s entry is still an open batch.
    fn is_open(&self, route: usize, serial: u64) -> bool {
        self.open[route]
            .as_ref()
            .is_some_and(|b| b.serial == serial)
    }

    /// Earliest time an open batch must be sealed for lingering.
    fn linger_deadline(&mut self) -> Option<u64> {
        while let Some(&(due, route, serial)) = self.lingering.front() {
            if self.is_open(route, serial) {
                return Some(due);
            }
            self.lingering.pop_front();
        }
        None
    }

    fn seal_lingered(&mut self, now_ns: u64) {
        while let Some(&(due, route, serial)) = self.lingering.front() {
            if due > now_ns {
                break;
            }
            self.lingering.pop_front();
            if self.is_open(route, serial) {
                self.seal(route);
            }
        }
    }

    /// Adds one message (round robin over the routes) to its route's open batch.
    fn append(&mut self, intended_ns: u64, now_ns: u64) {
        let q = self.next_route;
        self.next_route = (q + 1) % self.open.len();
        let ts_ms = timestamp_ms(intended_ns);
        let size = self.spec.message_size;
        let record_bytes = |b: &OpenBatch| {
            let n = i32::try_from(b.intended.len()).unwrap_or(i32::MAX);
            value_record_bytes(ts_ms.wrapping_sub(b.base_ts_ms), n, size)
        };
        let full = self.open[q].as_ref().is_some_and(|b| {
            !b.intended.is_empty() && b.bytes + record_bytes(b) > self.spec.batch_bytes
        });
        if full {
            self.seal(q);
        }
        if self.open[q].is_none() {
            let serial = self.next_serial;
            self.next_serial += 1;
            self.open[q] = Some(OpenBatch {
                intended: Vec::new(),
                bytes: BATCH_HEADER_BYTES,
                base_ts_ms: ts_ms,
                serial,
            });
            if self.linger_ns > 0 {
                let due = now_ns.saturating_add(self.linger_ns);
                self.lingering.push_back((due, q, serial));
            }
        }
        let Some(b) = self.open[q].as_mut() else {
            return;
        };
        b.bytes += record_bytes(b);
        b.intended.push(intended_ns);
        let seal_now = self.linger_ns == 0
            || b.bytes >= self.spec.batch_bytes
            || b.intended.len() >= RECORDS_PER_BATCH_MAX as usize;
        if seal_now {
            self.seal(q);
        }
    }

    /// Sends route `q`'s open batch, waiting for room in the window first.
    fn seal(&mut self, q: usize) {
        let Some(b) = self.open[q].take() else {
            return;
        };
        let n = b.intended.len() as u64;
        if n == 0 {
            return;
        }
        let mut builder = BatchBuilder::with_capacity(self.spec.compression, b.bytes);
        for &i in &b.intended {
            builder.push(timestamp_ms(i), None, Some(self.spec.payloads.next(i)), &[]);
        }
        debug_assert_eq!(builder.estimated_bytes(), b.bytes);
        let batch = builder.build();
        let batch_bytes = batch.len();
        if !self.shared.has_room(self.spec.window, batch_bytes) {
            // About to wait for acks: what is gathered must be out first.
            self.send_gathered();
        }
        self.shared.acquire(self.spec.window, batch_bytes);
        let route = self.spec.routes[q];
        if self.spec.multi_queue {
            self.gather(route, batch, b.intended);
            return;
        }
        let req = Request::Produce {
            topic: self.spec.topics[route.topic].to_string(),
            queue: route.queue,
            batch,
        };
        let shared = Arc::clone(&self.shared);
        let clock = self.spec.clock;
        let payload_bytes = n * self.spec.message_size as u64;
        let intended = b.intended;
        self.shared.count_sent(n);
        let result = self.spec.conns[route.conn].send_with(&req, move |c| {
            let ack_ns = clock.now_ns();
            shared.complete(
                route.topic,
                c.into_reply(),
                &intended,
                ack_ns,
                payload_bytes,
                batch_bytes,
            );
        });
        if let Err(e) = result {
            // The callback will never run: undo and count the failure here.
            self.shared.uncount_sent(n);
            self.shared
                .failed(n, batch_bytes, format!("send failed: {e}"));
            self.reconnect(route.conn);
        }
    }

    /// Adds a sealed (and window-counted) batch to its connection's ProduceMany.
    fn gather(&mut self, route: Route, batch: bytes::Bytes, intended: Vec<u64>) {
        let topic = self.spec.topics[route.topic].clone();
        if !self.gathering[route.conn].builder.fits(&topic, batch.len()) {
            self.send_gathering(route.conn);
        }
        let n = intended.len() as u64;
        let g = &mut self.gathering[route.conn];
        if g.builder.is_empty() {
            g.since_ns = self.spec.clock.now_ns();
        }
        g.sent.push(SentBatch {
            slot: route.topic,
            intended,
            payload_bytes: n * self.spec.message_size as u64,
            batch_bytes: batch.len(),
        });
        g.builder.push(ProduceEntry {
            topic,
            queue: route.queue,
            options: ProduceOptions::default(),
            batch: batch.into(),
        });
    }

    /// When the oldest gathered ProduceMany got its first batch.
    fn gathered_since(&self) -> Option<u64> {
        self.gathering
            .iter()
            .filter(|g| !g.builder.is_empty())
            .map(|g| g.since_ns)
            .min()
    }

    /// Sends every gathered ProduceMany.
    fn send_gathered(&mut self) {
        self.send_gathered_older_than(u64::MAX);
    }

    /// Sends the gathered ProduceManys whose first batch came at or before `ns`.
    fn send_gathered_older_than(&mut self, ns: u64) {
        for c in 0..self.gathering.len() {
            let g = &self.gathering[c];
            if !g.builder.is_empty() && g.since_ns <= ns {
                self.send_gathering(c);
            }
        }
    }

    /// Sends connection `c`'s gathered ProduceMany.
    fn send_gathering(&mut self, c: usize) {
        let g = &mut self.gathering[c];
        if g.builder.is_empty() {
            return;
        }
        let req = g.builder.take();
        let sent = std::mem::take(&mut g.sent);
        let messages: u64 = sent.iter().map(|b| b.intended.len() as u64).sum();
        let shared = Arc::clone(&self.shared);
        let clock = self.spec.clock;
        self.shared.count_sent(messages);
        let sent = Arc::new(sent);
        let for_reply = Arc::clone(&sent);
        let result = self.spec.conns[c].send_with(&req, move |completion| {
            let ack_ns = clock.now_ns();
            shared.complete_many(completion.into_reply(), &for_reply, ack_ns);
        });
        if let Err(e) = result {
            // The callback will never run: undo and count the failures here.
            self.shared.uncount_sent(messages);
            let why = format!("send failed: {e}");
            for b in sent.iter() {
                self.shared
                    .failed(b.intended.len() as u64, b.batch_bytes, &why);
            }
            self.reconnect(c);
        }
    }

    /// Replaces a closed connection (one attempt; sends fail until it works).
    fn reconnect(&mut self, idx: usize) {
        let old = &self.spec.conns[idx];
        if !old.is_closed() {
            return;
        }
        let (addr, timeouts): (String, Timeouts) = (old.addr().to_string(), old.timeouts());
        match Connection::connect(&addr, timeouts) {
            Ok(c) => self.spec.conns[idx] = c,
            Err(e) => {
                self.shared
                    .tally
                    .note_error(format!("reconnect to {addr} failed: {e}"));
                thread::sleep(RECONNECT_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_its_timestamp() {
        let mut p = vec![0u8; 64];
        p[..TIMESTAMP_BYTES].copy_from_slice(&1_234_567_890_123u64.to_be_bytes());
        assert_eq!(payload_timestamp(&p), Some(1_234_567_890_123));
        assert_eq!(payload_timestamp(&p[..7]), None);
    }

    #[test]
    fn record_overhead_bounds_the_real_encoding() {
        // A batch of n records of `size` bytes stays within the estimate
        // the producer uses to decide whether the next record fits.
        for size in [8usize, 256, 1024, 100_000] {
            let mut b = BatchBuilder::new(Compression::None);
            let mut p = Payloads::new(crate::payload::PayloadKind::Random, size, 3, 1);
            for k in 0..10 {
                b.push(1_700_000_000_000, None, Some(p.next(k)), &[]);
            }
            let est = b.estimated_bytes();
            let built = b.build().len();
            assert_eq!(est, built);
            assert!(built <= 61 + 10 * (size + RECORD_OVERHEAD_BYTES), "{size}");
        }
    }

    #[test]
    fn acks_are_counted_per_topic() {
        let s = ProducerShared::for_topics(vec![7, 3]);
        s.acquire(Window::batches(4), 10);
        s.acquire(Window::batches(4), 10);
        let ok = || {
            Ok(Reply::Produce {
                base_offset: 0,
                duplicate: false,
            })
        };
        s.complete(1, ok(), &[1, 2], 5, 2048, 10);
        s.complete(0, ok(), &[1], 5, 1024, 10);
        assert_eq!(s.acked_by_topic().collect::<Vec<_>>(), [(7, 1), (3, 2)]);
    }

    #[test]
    fn routes_interleave_producers_and_cycle_queues() {
        // Two producers (topic slots 0 and 1) of two queues each, on
        // connections 0 (shard 0) and 1 (shard 1).
        let r = interleave_routes(&[(0, vec![(0, 0), (1, 1)]), (1, vec![(0, 1), (1, 0)])]);
        let got: Vec<(usize, u32, usize)> = r.iter().map(|r| (r.topic, r.queue, r.conn)).collect();
        assert_eq!(got, [(0, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 0)]);
        // One producer: its queues in order, as a producer of its own.
        let r = interleave_routes(&[(0, vec![(0, 0), (1, 1), (2, 0)])]);
        assert_eq!(r.iter().map(|r| r.queue).collect::<Vec<_>>(), [0, 1, 2]);
        // Many single-queue producers: one route each.
        let many: Vec<(usize, Vec<(u32, usize)>)> =
            (0..1000).map(|t| (t, vec![(0, t % 2)])).collect();
        let r = interleave_routes(&many);
        assert_eq!(r.len(), 1000);
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, r)| r.topic == i && r.queue == 0));
        assert!(interleave_routes(&[]).is_empty());
    }

    #[test]
    fn produce_many_results_apply_to_their_own_batches() {
        use coremq::protocol::{ErrorCode, ErrorReply, ProduceAck};
        let s = ProducerShared::for_topics(vec![7, 3]);
        let ms = NANOS_PER_MILLI;
        let sent = [
            SentBatch {
                slot: 0,
                intended: vec![ms, 2 * ms],
                payload_bytes: 2048,
                batch_bytes: 100,
            },
            SentBatch {
                slot: 1,
                intended: vec![3 * ms],
                payload_bytes: 1024,
                batch_bytes: 60,
            },
            SentBatch {
                slot: 1,
                intended: vec![4 * ms],
                payload_bytes: 1024,
                batch_bytes: 60,
            },
        ];
        for b in &sent {
            s.acquire(Window::batches(8), b.batch_bytes);
        }
        let ack = ProduceAck {
            base_offset: 0,
            duplicate: false,
        };
        let reply = Reply::ProduceMany(vec![
            Ok(ack),
            Err(ErrorReply::new(ErrorCode::UnknownTopic, "gone")),
            Ok(ack),
        ]);
        s.complete_many(Ok(reply), &sent, 5 * ms);
        let t = s.tally.snapshot();
        // The bad entry fails alone; latencies from each message's own time.
        assert_eq!((t.messages, t.errors, t.stored_bytes), (3, 1, 160));
        assert!(t.latency.summary().max.abs_diff(4_000) <= 4);
        assert!(t.latency.quantile(0.0).abs_diff(1_000) <= 1);
        assert_eq!(s.acked_by_topic().collect::<Vec<_>>(), [(7, 2), (3, 1)]);
        assert_eq!(s.in_flight(), 0);
        // A failed request fails every batch in it.
        for b in &sent {
            s.acquire(Window::batches(8), b.batch_bytes);
        }
        s.complete_many(Err(ClientError::Disconnected), &sent, 6 * ms);
        assert_eq!(s.tally.snapshot().errors, 1 + 4);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn produce_many_only_when_a_connection_carries_many_queues() {
        assert!(!use_produce_many(2, 2));
        assert!(!use_produce_many(1, 1));
        assert!(use_produce_many(2500, 2));
    }

    #[test]
    fn window_counts_batches_and_bytes() {
        let s = ProducerShared::new(0);
        s.acquire(Window::batches(2), 10);
        s.acquire(Window::batches(2), 10);
        assert_eq!(s.in_flight(), 2);
        s.release(10);
        s.acquire(Window::batches(2), 10);
        // A single batch bigger than the byte cap still goes through.
        let t = ProducerShared::new(0);
        t.acquire(Window::bytes(5), 100);
        assert_eq!(t.in_flight(), 1);
        t.release(100);
        assert!(t.wait_idle(Duration::from_millis(1)));
        assert!(!s.wait_idle(Duration::from_millis(1)));
        // Both limits at once: room for batches is not room for bytes.
        let both = Window {
            batches: 10,
            bytes: 250,
        };
        let u = ProducerShared::new(0);
        u.acquire(both, 100);
        u.acquire(both, 100);
        assert!(!u.has_room(both, 100), "300 bytes would pass the cap");
        assert!(u.has_room(both, 50));
        u.release(100);
        assert!(u.has_room(both, 100));
        let few = Window {
            batches: 2,
            bytes: 1 << 20,
        };
        u.acquire(few, 1);
        assert!(!u.has_room(few, 1), "two batches fill a window of two");
    }

    #[test]
    fn completion_records_every_message() {
        let s = ProducerShared::new(0);
        s.acquire(Window::batches(4), 100);
        s.acquire(Window::batches(4), 100);
        let ms = NANOS_PER_MILLI;
        s.complete(
            0,
            Ok(Reply::Produce {
                base_offset: 0,
                duplicate: false,
            }),
            &[10 * ms, 11 * ms, 12 * ms],
            15 * ms,
            3 * 1024,
            100,
        );
        s.complete(
            0,
            Err(ClientError::Disconnected),
            &[13 * ms, 14 * ms],
            16 * ms,
            2 * 1024,
            100,
        );
        let t = s.tally.snapshot();
        assert_eq!((t.messages, t.bytes, t.errors), (3, 3 * 1024, 2));
        // The stored size of the acked batch only.
        assert_eq!(t.stored_bytes, 100);
        // A peer's ack counts nothing as stored.
        let peer = ProducerShared::new(0);
        peer.acquire(Window::batches(4), 1024);
        peer.acked(&[10 * ms], 11 * ms, 1024, 1024);
        assert_eq!(peer.tally.snapshot().stored_bytes, 0);
        assert_eq!(t.latency.summary().count, 3);
        // Latencies are from each message's own intended time: 5, 4 and 3 ms.
        assert!(t.latency.summary().max.abs_diff(5_000) <= 5); // 3 significant digits
        assert!(t.latency.quantile(0.0).abs_diff(3_000) <= 2);
        assert_eq!(s.in_flight(), 0);
        assert!(s.tally.first_error().unwrap().contains("closed"));
        assert_eq!(s.acked_by_topic().collect::<Vec<_>>(), [(0, 3)]);
    }
}
