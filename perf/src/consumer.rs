//! Consumers: the coremq fetcher threads, and the counts every driver's
//! consumers keep.
//!
//! coremq's consumers are fetcher threads, one per shard: each reads every
//! queue of that shard for every subscription (a cursor per topic,
//! subscription and queue), so ten thousand topics do not mean ten thousand
//! threads. A cursor has at most one long-poll `Fetch` in flight; fetches of
//! all cursors are pipelined over the thread's connections (to the shard's
//! own port, or the shared one with `--no-shard-direct`), at most
//! [`FETCHES_PER_CONNECTION_MAX`] per connection because the broker stops
//! reading a connection with 1,024 requests in progress, and more
//! connections when a shard has more queues. Replies come back through a
//! channel from the connections' reader threads and are handled in the
//! order they arrive, so a busy queue cannot starve a quiet one. The
//! position of a cursor starts at its queue's start offset and moves past
//! every record returned; nothing is committed (the subscriptions are
//! positions, not consumer groups on the broker). Each fetch asks for a
//! share of [`FETCH_BUDGET_BYTES`] (between [`FETCH_BYTES_MIN`] and
//! [`FETCH_BYTES_MAX`]), grown when one batch does not fit.
//!
//! A fetcher of more than one cursor (many topics) instead polls its
//! cursors with FetchMany: they are cut into groups of the protocol's
//! `FETCH_MANY_QUEUES_MAX`, each group with one FetchMany in flight that
//! returns as soon as any of its queues has data, asking for
//! [`FETCH_MANY_BYTES_MAX`] in all. A reply moves the cursors it carries
//! data for, and the group goes out again at once (after
//! [`EMPTY_FETCH_PAUSE`] if it came back early and empty).
//!
//! Records are decoded (and decompressed) with the client library's
//! `records_from_fetch`; for every record the thread reads the intended
//! send time from the first [`TIMESTAMP_BYTES`] of the payload and records
//! the time from then to the moment the reply was handled. It stops when
//! the main thread raises the stop flag (noticed within [`POLL_TIMEOUT`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use coremq::client::consumer::records_from_fetch;
use coremq::client::fetch_many_requests;
use coremq::client::{ClientError, Completion, Connection, Timeouts};
use coremq::protocol::{FetchEntry, FetchMany, FetchPart, Reply, Request};

use crate::producer::payload_timestamp;
use crate::run::to_ns;
use crate::schedule::Clock;
use crate::stats::SharedTally;
use crate::workload::TIMESTAMP_BYTES;

/// Longest a fetcher (or a peer consumer) waits for replies before it
/// checks the stop flag again.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the broker may hold a fetch open waiting for data.
pub const MAX_WAIT_MS: u32 = 500;
/// Fetches one connection may have in flight (the broker pauses reading a
/// connection at 1,024 requests in progress).
pub const FETCHES_PER_CONNECTION_MAX: usize = 1000;
/// Reply bytes a fetcher asks for at once over all its cursors.
pub const FETCH_BUDGET_BYTES: usize = 256 << 20;
/// Bounds of what one fetch asks for. A cursor has one fetch in flight,
/// so it reads at most `FETCH_BYTES_MAX` per round trip: at 1 MiB a queue
/// written at 800 MB/s needs 800 rounds a second, more than two shared
/// cores gave, and the consumers of target 1 fell behind the broker's tail
/// cache (to read from disk) in 4 runs of 4; at 4 MiB, in none of 4.
pub const FETCH_BYTES_MIN: u32 = 64 << 10;
pub const FETCH_BYTES_MAX: u32 = 4 << 20;
/// Batch bytes one FetchMany asks for over all its queues: the most a
/// reply carries by default (half the broker's 16 MiB frame limit; Kafka's
/// `fetch.max.bytes` is 50 MiB). Each poll costs the broker a pass over up
/// to 1,024 queues, so fuller replies are cheaper per message: with
/// 10,000 topics 8 MiB cost the broker ~6% less per message than 4 MiB,
/// and 1 MiB ~25% more (docs/benchmarks.md).
pub const FETCH_MANY_BYTES_MAX: u32 = 8 << 20;
/// Largest a fetch grows to so that one batch fits.
pub const FETCH_BYTES_GROWN_MAX: u32 = 32 << 20;
/// Pause before refetching a queue whose fetch came back empty before the
/// broker's wait was up (so a broker that does not hold fetches cannot
/// make us spin), or failed.
const EMPTY_FETCH_PAUSE: Duration = Duration::from_millis(10);
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What a consumer thread (or a peer consumer task) shares with the main
/// thread: per slot — a (topic, subscription) it reads — the messages
/// received; over all of them, the tally.
#[derive(Debug)]
pub struct ConsumerShared {
    /// (topic, subscription) of each slot, run-wide indices.
    pub slots: Vec<(usize, usize)>,
    consumed_by_slot: Vec<AtomicU64>,
    /// Received messages, payload bytes, e2e latencies; `errors` counts
    /// failed fetches and payloads too short to carry a timestamp.
    pub tally: SharedTally,
}

impl ConsumerShared {
    /// A consumer of one topic's subscription (a peer driver's).
    pub fn new(topic: usize, subscription: usize) -> ConsumerShared {
        ConsumerShared::for_slots(vec![(topic, subscription)])
    }

    pub fn for_slots(slots: Vec<(usize, usize)>) -> ConsumerShared {
        ConsumerShared {
            consumed_by_slot: slots.iter().map(|_| AtomicU64::new(0)).collect(),
            slots,
            tally: SharedTally::default(),
        }
    }

    /// ((topic, subscription), messages consumed) of each slot.
    pub fn consumed_by_slot(&self) -> impl Iterator<Item = ((usize, usize), u64)> + '_ {
        self.slots
            .iter()
            .zip(&self.consumed_by_slot)
            .map(|(&s, n)| (s, n.load(Ordering::Relaxed)))
    }

    /// Counts payloads received at `now_ns` (a peer consumer's: slot 0).
    pub fn record_payloads<'a>(&self, payloads: impl IntoIterator<Item = &'a [u8]>, now_ns: u64) {
        self.record_slot(0, payloads, now_ns);
    }

    /// Counts payloads of slot `slot` received at `now_ns`.
    pub fn record_slot<'a>(
        &self,
        slot: usize,
        payloads: impl IntoIterator<Item = &'a [u8]>,
        now_ns: u64,
    ) {
        let mut bad = 0u64;
        let mut good = 0u64;
        {
            let mut t = self.tally.lock();
            for value in payloads {
                match payload_timestamp(value) {
                    Some(sent_ns) => {
                        good += 1;
                        t.bytes += value.len() as u64;
                        t.latency.record_between_ns(sent_ns, now_ns);
                    }
                    None => bad += 1,
                }
            }
            t.messages += good;
        }
        if let Some(n) = self.consumed_by_slot.get(slot) {
            n.fetch_add(good, Ordering::Relaxed);
        }
        if bad > 0 {
            self.tally.fail(
                1,
                format!("{bad} records shorter than the {TIMESTAMP_BYTES}-byte timestamp"),
            );
        }
    }
}

/// One queue of one subscription, as a fetcher reads it.
#[derive(Debug, Clone)]
pub struct CursorSpec {
    /// Slot in the fetcher's [`ConsumerShared`].
    pub slot: usize,
    pub topic: String,
    pub queue: u32,
    /// Where reading starts.
    pub position: i64,
}

#[derive(Debug)]
struct Cursor {
    spec: CursorSpec,
    max_bytes: u32,
    conn: usize,
    /// Identifies the fetch in flight (replies to older ones are ignored).
    token: u64,
    sent_ns: u64,
}

/// What one fetch asks for when a fetcher has `cursors` of them.
pub fn fetch_bytes(cursors: usize) -> u32 {
    let share = FETCH_BUDGET_BYTES / cursors.max(1);
    (share.min(FETCH_BYTES_MAX as usize) as u32).max(FETCH_BYTES_MIN)
}

/// Connections a fetcher of `cursors` cursors needs.
pub fn connections_for(cursors: usize) -> usize {
    cursors.div_ceil(FETCHES_PER_CONNECTION_MAX).max(1)
}

/// A reply, tagged with its cursor (a group of cursors in FetchMany
/// mode) and fetch.
struct Event {
    cursor: usize,
    token: u64,
    completion: Completion,
}

/// One fetcher thread: the cursors of one shard, and its connections.
pub struct Fetcher {
    cursors: Vec<Cursor>,
    conns: Vec<Connection>,
    clock: Clock,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
    /// Cursors with no fetch in flight, to be sent one now.
    ready: VecDeque<usize>,
    /// (not before, cursor) of cursors pausing, in time order.
    paused: VecDeque<(u64, usize)>,
    next_token: u64,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// FetchMany mode: groups of cursor indices, each polled by one
    /// FetchMany (`ready` and `paused` then hold group indices).
    groups: Option<Vec<FetchGroup>>,
    /// What each FetchMany waits to gather (`--fetch-min-bytes`).
    fetch_min_bytes: u32,
}

/// Cursors polled together by one FetchMany.
#[derive(Debug)]
struct FetchGroup {
    cursors: Vec<usize>,
    /// The request's entries, kept between sends (positions updated in
    /// place): a fresh list cloned every topic name per poll.
    entries: Vec<FetchEntry>,
    conn: usize,
    token: u64,
    sent_ns: u64,
}

/// Groups cursor indices `0..cursors` for FetchMany (what
/// `fetch_many_requests` cuts a list into).
pub fn fetch_groups(cursors: usize) -> Vec<Vec<usize>> {
    let all: Vec<FetchEntry> = (0..cursors)
        .map(|i| FetchEntry {
            topic: String::new().into(),
            queue: i as u32,
            offset: 0,
            max_bytes: 0,
        })
        .collect();
    fetch_many_requests(all, 0, 0, 0)
        .into_iter()
        .map(|r| r.entries.iter().map(|e| e.queue as usize).collect())
        .collect()
}

impl Fetcher {
    /// Connects to `addr` (as many connections as the cursors need).
    pub fn connect(
        addr: &str,
        specs: Vec<CursorSpec>,
        clock: Clock,
        shared: Arc<ConsumerShared>,
        stop: Arc<AtomicBool>,
        fetch_many_min_bytes: Option<u32>,
    ) -> Result<Fetcher, ClientError> {
        let groups = fetch_many_min_bytes
            .filter(|_| specs.len() > 1)
            .map(|_| fetch_groups(specs.len()));
        let requests = groups.as_ref().map_or(specs.len(), Vec::len);
        let n = connections_for(requests);
        let conns = (0..n)
            .map(|_| Connection::connect(addr, Timeouts::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let max_bytes = fetch_bytes(specs.len());
        let cursors: Vec<Cursor> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| Cursor {
                spec,
                max_bytes,
                conn: i % n,
                token: 0,
                sent_ns: 0,
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        let groups = groups.map(|g| {
            g.into_iter()
                .enumerate()
                .map(|(i, cursors)| FetchGroup {
                    cursors,
                    entries: Vec::new(),
                    conn: i % n,
                    token: 0,
                    sent_ns: 0,
                })
                .collect::<Vec<_>>()
        });
        Ok(Fetcher {
            ready: (0..requests).collect(),
            groups,
            fetch_min_bytes: fetch_many_min_bytes.unwrap_or(0),
            cursors,
            conns,
            clock,
            shared,
            stop,
            paused: VecDeque::new(),
            next_token: 1,
            tx,
            rx,
        })
    }

    /// Fetches until the stop flag is raised.
    pub fn run(mut self) {
        let poll_ns = to_ns(POLL_TIMEOUT);
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.clock.now_ns();
            while let Some(&(not_before, c)) = self.paused.front() {
                if not_before > now {
                    break;
                }
                self.paused.pop_front();
                self.ready.push_back(c);
            }
            while let Some(c) = self.ready.pop_front() {
                self.send(c);
            }
            let wait_ns = self
                .paused
                .front()
                .map_or(poll_ns, |&(t, _)| t.saturating_sub(now).min(poll_ns));
            match self.rx.recv_timeout(Duration::from_nanos(wait_ns)) {
                Ok(e) => {
                    self.handle(e);
                    // Everything else already there, before sending again.
                    while let Ok(e) = self.rx.try_recv() {
                        self.handle(e);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn pause(&mut self, c: usize, d: Duration) {
        self.paused.push_back((self.clock.now_ns() + to_ns(d), c));
    }

    /// Sends cursor `c`'s next fetch (group `c`'s in FetchMany mode).
    fn send(&mut self, c: usize) {
        if self.groups.is_some() {
            return self.send_many(c);
        }
        let token = self.next_token;
        self.next_token += 1;
        let cur = &mut self.cursors[c];
        cur.token = token;
        cur.sent_ns = self.clock.now_ns();
        let req = Request::Fetch {
            topic: cur.spec.topic.clone(),
            queue: cur.spec.queue,
            offset: cur.spec.position,
            max_bytes: cur.max_bytes,
            max_wait_ms: MAX_WAIT_MS,
        };
        let conn = cur.conn;
        self.send_tagged(conn, &req, c, token);
    }

    /// Sends group `g`'s FetchMany.
    fn send_many(&mut self, g: usize) {
        let token = self.next_token;
        self.next_token += 1;
        let Some(groups) = self.groups.as_mut() else {
            return;
        };
        let group = &mut groups[g];
        group.token = token;
        group.sent_ns = self.clock.now_ns();
        if group.entries.len() != group.cursors.len() {
            group.entries = group
                .cursors
                .iter()
                .map(|&c| FetchEntry {
                    topic: self.cursors[c].spec.topic.clone().into(),
                    queue: self.cursors[c].spec.queue,
                    offset: 0,
                    max_bytes: 0,
                })
                .collect();
        }
        for (e, &c) in group.entries.iter_mut().zip(&group.cursors) {
            let cur = &self.cursors[c];
            e.offset = cur.spec.position;
            e.max_bytes = cur.max_bytes;
        }
        let req = Request::FetchMany(FetchMany {
            max_wait_ms: MAX_WAIT_MS,
            min_bytes: self.fetch_min_bytes,
            max_bytes: FETCH_MANY_BYTES_MAX,
            entries: std::mem::take(&mut group.entries),
        });
        let conn = group.conn;
        self.send_tagged(conn, &req, g, token);
        if let (Request::FetchMany(f), Some(groups)) = (req, self.groups.as_mut()) {
            groups[g].entries = f.entries;
        }
    }

    /// Sends `req` on connection `conn`; its reply comes back as an `Event`
    /// for `cursor` (a cursor, or a group in FetchMany mode) and `token`. A
    /// failed send reconnects and pauses that cursor.
    fn send_tagged(&mut self, conn: usize, req: &Request, cursor: usize, token: u64) {
        let tx = self.tx.clone();
        let sent = self.conns[conn].send_with(req, move |completion| {
            // The fetcher may be gone (stopped): nothing to do then.
            let _ = tx.send(Event {
                cursor,
                token,
                completion,
            });
        });
        if let Err(e) = sent {
            self.shared.tally.fail(1, format!("fetch failed: {e}"));
            self.reconnect(conn);
            self.pause(cursor, ERROR_PAUSE);
        }
    }

    /// Applies one FetchMany reply to its group's cursors.
    fn handle_many(&mut self, e: Event, now: u64) {
        let Some(group) = self.groups.as_ref().and_then(|gs| gs.get(e.cursor)) else {
            return;
        };
        if group.token != e.token {
            return;
        }
        let (conn, sent_ns) = (group.conn, group.sent_ns);
        let members = group.cursors.clone();
        match e.completion.into_reply() {
            Ok(Reply::FetchMany(parts)) => {
                let early = now.saturating_sub(sent_ns) < u64::from(MAX_WAIT_MS) * 1_000_000;
                let empty = parts.is_empty();
                let mut failed = false;
                for part in parts {
                    match members.get(part.index as usize) {
                        Some(&c) => failed |= !self.apply_part(c, part, now),
                        None => failed = true,
                    }
                }
                if failed {
                    self.pause(e.cursor, ERROR_PAUSE);
                } else if empty && early {
                    self.pause(e.cursor, EMPTY_FETCH_PAUSE);
                } else {
                    self.ready.push_back(e.cursor);
                }
            }
            Ok(other) => {
                self.shared
                    .tally
                    .fail(1, format!("unexpected reply to a FetchMany: {other:?}"));
                self.pause(e.cursor, ERROR_PAUSE);
            }
            Err(err) => self.fetch_failed(e.cursor, conn, &err),
        }
    }

    /// A fetch (or FetchMany) for `cursor` on `conn` failed: count it
    /// (unless stopping), reconnect a lost connection, retry later.
    fn fetch_failed(&mut self, cursor: usize, conn: usize, err: &ClientError) {
        if !self.stop.load(Ordering::Relaxed) {
            self.shared.tally.fail(1, format!("fetch failed: {err}"));
        }
        if matches!(err, ClientError::Disconnected | ClientError::Io(_)) {
            self.reconnect(conn);
        }
        self.pause(cursor, ERROR_PAUSE);
    }

    /// Reads `batches` for cursor `c` from its position: grows its fetch
    /// size when a batch did not fit, moves it on and records what it got.
    /// Returns whether the answer was empty (nothing read, nothing waiting
    /// on a larger fetch), or `None` for a bad batch (counted).
    fn apply_batches(&mut self, c: usize, batches: &[Bytes], now: u64) -> Option<bool> {
        let cur = &mut self.cursors[c];
        match records_from_fetch(cur.spec.queue, cur.spec.position, batches) {
            Ok(o) => {
                if let Some(needed) = o.needed_bytes {
                    let grown = (needed as u64).max(u64::from(cur.max_bytes) * 2);
                    cur.max_bytes = grown.min(u64::from(FETCH_BYTES_GROWN_MAX)) as u32;
                }
                let empty = o.records.is_empty()
                    && o.position == cur.spec.position
                    && o.needed_bytes.is_none();
                cur.spec.position = o.position;
                let slot = cur.spec.slot;
                if !o.records.is_empty() {
                    self.shared.record_slot(
                        slot,
                        o.records.iter().map(|r| r.value.as_deref().unwrap_or(&[])),
                        now,
                    );
                }
                Some(empty)
            }
            Err(err) => {
                self.shared
                    .tally
                    .fail(1, format!("bad batch in a fetch reply: {err}"));
                None
            }
        }
    }

    /// Applies one queue's part of a FetchMany reply to cursor `c`; false
    /// when it is an error (counted).
    fn apply_part(&mut self, c: usize, part: FetchPart, now: u64) -> bool {
        let cur = &mut self.cursors[c];
        let fetched = match part.result {
            Ok(f) => f,
            Err(err) => {
                self.shared.tally.fail(
                    1,
                    format!(
                        "fetch of {}/{} failed: {err}",
                        cur.spec.topic, cur.spec.queue
                    ),
                );
                return false;
            }
        };
        self.apply_batches(c, &fetched.batches, now).is_some()
    }

    /// Applies one reply.
    fn handle(&mut self, e: Event) {
        let now = self.clock.now_ns();
        if self.groups.is_some() {
            return self.handle_many(e, now);
        }
        let cur = &mut self.cursors[e.cursor];
        if cur.token != e.token {
            return; // not the fetch in flight (cannot happen: one at a time)
        }
        match e.completion.into_reply() {
            Ok(Reply::Fetch { batches, .. }) => {
                let early = now.saturating_sub(cur.sent_ns) < u64::from(MAX_WAIT_MS) * 1_000_000;
                match self.apply_batches(e.cursor, &batches, now) {
                    Some(true) if early => self.pause(e.cursor, EMPTY_FETCH_PAUSE),
                    Some(_) => self.ready.push_back(e.cursor),
                    None => self.pause(e.cursor, ERROR_PAUSE),
                }
            }
            Ok(other) => {
                self.shared
                    .tally
                    .fail(1, format!("unexpected reply to a fetch: {other:?}"));
                self.pause(e.cursor, ERROR_PAUSE);
            }
            Err(err) => {
                let conn = cur.conn;
                self.fetch_failed(e.cursor, conn, &err);
            }
        }
    }

    /// Replaces a closed connection (one attempt; its cursors retry later).
    fn reconnect(&mut self, idx: usize) {
        let old = &self.conns[idx];
        if !old.is_closed() || self.stop.load(Ordering::Relaxed) {
            return;
        }
        let (addr, timeouts) = (old.addr().to_string(), old.timeouts());
        match Connection::connect(&addr, timeouts) {
            Ok(c) => self.conns[idx] = c,
            Err(e) => {
                self.shared
                    .tally
                    .note_error(format!("reconnect to {addr} failed: {e}"));
                thread::sleep(ERROR_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2e_latency_from_the_payload_timestamp() {
        let s = ConsumerShared::for_slots(vec![(0, 0), (3, 1)]);
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&1_000_000u64.to_be_bytes());
        s.record_slot(1, [&v[..], &v[..], b"short"], 3_000_000);
        let t = s.tally.snapshot();
        assert_eq!((t.messages, t.bytes, t.errors), (2, 64, 1));
        assert_eq!(t.latency.summary().max, 2_000);
        assert!(s.tally.first_error().unwrap().contains("shorter"));
        assert_eq!(
            s.consumed_by_slot().collect::<Vec<_>>(),
            [((0, 0), 0), ((3, 1), 2)]
        );
        // A peer's consumer has one slot.
        let p = ConsumerShared::new(4, 2);
        p.record_payloads([&v[..]], 2_000_000);
        assert_eq!(p.consumed_by_slot().collect::<Vec<_>>(), [((4, 2), 1)]);
    }

    #[test]
    fn fetch_sizes_share_a_budget() {
        assert_eq!(fetch_bytes(1), FETCH_BYTES_MAX);
        assert_eq!(fetch_bytes(64), FETCH_BYTES_MAX);
        assert_eq!(fetch_bytes(256), 1 << 20);
        assert_eq!(fetch_bytes(1024), 256 << 10);
        assert_eq!(fetch_bytes(10_000), FETCH_BYTES_MIN);
        assert_eq!(fetch_bytes(0), FETCH_BYTES_MAX);
    }

    #[test]
    fn fetch_many_groups_cover_every_cursor_once() {
        use coremq::protocol::FETCH_MANY_QUEUES_MAX;
        assert!(fetch_groups(0).is_empty());
        assert_eq!(fetch_groups(3), [vec![0, 1, 2]]);
        let g = fetch_groups(2 * FETCH_MANY_QUEUES_MAX + 5);
        assert_eq!(
            g.iter().map(Vec::len).collect::<Vec<_>>(),
            [FETCH_MANY_QUEUES_MAX, FETCH_MANY_QUEUES_MAX, 5]
        );
        let all: Vec<usize> = g.into_iter().flatten().collect();
        assert_eq!(all, (0..2 * FETCH_MANY_QUEUES_MAX + 5).collect::<Vec<_>>());
    }

    #[test]
    fn connections_keep_under_the_broker_limit() {
        assert_eq!(connections_for(0), 1);
        assert_eq!(connections_for(2), 1);
        assert_eq!(connections_for(1000), 1);
        assert_eq!(connections_for(1001), 2);
        assert_eq!(connections_for(5000), 5);
    }
}
