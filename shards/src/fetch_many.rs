//! A fetch over many queues of one shard: one pass over all of them, then
//! (when that is not enough to answer) a watch on all their `arrived`
//! signals at once, after which only the queues that got data are looked
//! at again. A consumer of thousands of small queues parks one request
//! instead of one per queue, and a wake costs the queues that woke it, not
//! a pass over all of them: with 10,000 topics at a fixed rate, polls that
//! each passed over 1,024 queues to return a batch or two took a core.

use crate::error::{Result, ShardError};
use crate::notify::ReadySet;
use crate::shard::{Fetched, QueueState, Shard};
use crate::QueueKey;
use futures::future::{select, Either};
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

/// One queue of a fetch over many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchWant {
    pub key: QueueKey,
    pub offset: i64,
    /// This queue's byte share; its first batch is whole even if larger,
    /// when nothing else is in the reply yet.
    pub max_bytes: usize,
}

/// Queues with something to return, as (index in the wants, result).
pub type FetchedMany = Vec<(usize, Result<Fetched>)>;

impl Shard {
    /// Reads `wants` in one pass and returns the queues with data or an
    /// error, as (index in `wants`, result), in `wants` order. The total
    /// stays ≤ `max_bytes` (the reply's first batch is always whole). With
    /// nothing to return, or less than `min_bytes`, it watches every
    /// queue and reads again each queue that gets a batch, until it holds
    /// `min_bytes` (any data when `min_bytes` ≤ 1), `max_wait` passes or
    /// `hurry` completes (a gatherer that has data from another shard). An
    /// error answers at once.
    pub async fn fetch_many(
        &self,
        wants: &[FetchWant],
        min_bytes: usize,
        max_bytes: usize,
        max_wait: Duration,
        hurry: impl Future<Output = ()>,
    ) -> FetchedMany {
        let deadline = Instant::now() + max_wait;
        let mut hurry = pin!(hurry);
        let mut got = self.fetch_pass(wants, max_bytes);
        let ready = ReadySet::default();
        let mut watching = false;
        loop {
            let now = Instant::now();
            if got.enough(min_bytes) || now >= deadline {
                break;
            }
            if !watching {
                // No await since the pass: no append can slip between it and the watch.
                self.watch_all(wants, &ready);
                watching = true;
            }
            let timer = glommio::timer::sleep(deadline - now);
            let last = !matches!(
                select(pin!(ready.fired()), select(pin!(timer), hurry.as_mut())).await,
                Either::Left(_)
            );
            let mut queues = self.queues.borrow_mut();
            for i in ready.take() {
                let q = crate::shard::queue_state(&mut queues, wants[i].key, &self.spill);
                // Read again from the wanted offset: its part, if any, is replaced.
                got.remove(i);
                if let Some(r) = self.fetch_one(q, &wants[i], max_bytes, got.bytes) {
                    got.add(i, r);
                }
                if !last {
                    ready.watch(&q.arrived, i);
                }
            }
            if last {
                break;
            }
        }
        let mut found = got.found;
        found.sort_unstable_by_key(|(i, _)| *i);
        found
    }

    /// Watches every wanted queue's `arrived` signal, as its index.
    fn watch_all(&self, wants: &[FetchWant], ready: &ReadySet) {
        let mut queues = self.queues.borrow_mut();
        for (i, w) in wants.iter().enumerate() {
            ready.watch(
                &crate::shard::queue_state(&mut queues, w.key, &self.spill).arrived,
                i,
            );
        }
    }

    /// One look at every wanted queue: what it has now.
    fn fetch_pass(&self, wants: &[FetchWant], max_bytes: usize) -> Gathered {
        let mut got = Gathered::new(wants.len());
        let mut queues = self.queues.borrow_mut();
        for (i, w) in wants.iter().enumerate() {
            let q = crate::shard::queue_state(&mut queues, w.key, &self.spill);
            if let Some(r) = self.fetch_one(q, w, max_bytes, got.bytes) {
                got.add(i, r);
            }
        }
        got
    }

    /// What queue `q` has for `want` with `total` bytes already in the
    /// reply: an error, batches, or nothing (no new data, or no room left).
    fn fetch_one(
        &self,
        q: &QueueState,
        want: &FetchWant,
        max_bytes: usize,
        total: usize,
    ) -> Option<Result<Fetched>> {
        let visible = self.log.end();
        let (start, next) = (q.index.start_offset(), q.index.visible_next_offset(visible));
        if want.offset < start || want.offset > next {
            return Some(Err(ShardError::OffsetOutOfRange {
                offset: want.offset,
                start,
                next,
            }));
        }
        if want.offset == next || (total > 0 && total >= max_bytes) {
            return None;
        }
        let room = if total == 0 {
            want.max_bytes.min(max_bytes)
        } else {
            want.max_bytes.min(max_bytes - total)
        };
        let mut batches = Vec::new();
        let mut added = 0usize;
        for e in q.index.lookup(want.offset, visible, room) {
            // Only the reply's first batch may go over the limits.
            if total + added > 0 && total + added + e.batch_len as usize > max_bytes {
                break;
            }
            match self.log.read(e.batch_pos, e.batch_len as usize) {
                Some(b) => {
                    added += b.len();
                    batches.push(b);
                }
                None => break,
            }
        }
        (!batches.is_empty()).then_some(Ok(Fetched {
            log_start: start,
            next_offset: next,
            batches,
        }))
    }
}

/// What a fetch over many holds so far, with its totals kept as it goes
/// (a wake may replace many queues' parts; none of it rescans the rest).
struct Gathered {
    found: FetchedMany,
    /// Batch bytes in `found`.
    bytes: usize,
    /// Entries of `found` that are errors.
    errors: usize,
    /// Whether want i has a part in `found`.
    held: Vec<bool>,
}

impl Gathered {
    fn new(wants: usize) -> Gathered {
        Gathered {
            found: Vec::new(),
            bytes: 0,
            errors: 0,
            held: vec![false; wants],
        }
    }

    /// Answer now: an error, or data of at least `min_bytes` (any when ≤ 1).
    fn enough(&self, min_bytes: usize) -> bool {
        self.errors > 0 || (!self.found.is_empty() && self.bytes >= min_bytes)
    }

    fn add(&mut self, i: usize, r: Result<Fetched>) {
        self.bytes += part_bytes(&r);
        self.errors += usize::from(r.is_err());
        self.held[i] = true;
        self.found.push((i, r));
    }

    fn remove(&mut self, i: usize) {
        if !std::mem::take(&mut self.held[i]) {
            return;
        }
        if let Some(at) = self.found.iter().position(|(j, _)| *j == i) {
            let (_, r) = self.found.swap_remove(at);
            self.bytes -= part_bytes(&r);
            self.errors -= usize::from(r.is_err());
        }
    }
}

fn part_bytes(r: &Result<Fetched>) -> usize {
    r.as_ref()
        .map_or(0, |f| f.batches.iter().map(|b| b.len()).sum())
}
