//! A fetch over many queues of one shard: one pass over all of them, and
//! when none has anything, one wait on all their `arrived` signals at once
//! (no polling), so a consumer of thousands of small queues parks one
//! request instead of one per queue.

use crate::error::{Result, ShardError};
use crate::notify::{AnyNotified, Notify};
use crate::shard::{Fetched, Shard};
use crate::QueueKey;
use futures::future::{select, Either};
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
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
    /// error, as (index in `wants`, result). Batches are added in `wants`
    /// order while the total stays ≤ `max_bytes` (the reply's first batch
    /// is always whole). With nothing to return it waits until any of the
    /// queues gets a batch, `max_wait` passes or `hurry` completes (a
    /// gatherer that has data from another shard), then passes once more.
    pub async fn fetch_many(
        &self,
        wants: &[FetchWant],
        max_bytes: usize,
        max_wait: Duration,
        hurry: impl Future<Output = ()>,
    ) -> FetchedMany {
        let deadline = Instant::now() + max_wait;
        let mut hurry = pin!(hurry);
        let mut last_pass = false;
        loop {
            let (found, signals) = self.fetch_pass(wants, max_bytes);
            let now = Instant::now();
            if !found.is_empty() || last_pass || now >= deadline {
                return found;
            }
            // No await since the pass: no append can slip between it and the wait.
            let any = AnyNotified::new(&signals);
            let timer = glommio::timer::sleep(deadline - now);
            match select(pin!(any), select(pin!(timer), hurry.as_mut())).await {
                Either::Left(_) => {}
                Either::Right(_) => last_pass = true,
            }
        }
    }

    /// One look at every wanted queue: what it has now, and its signal.
    fn fetch_pass(&self, wants: &[FetchWant], max_bytes: usize) -> (FetchedMany, Vec<Rc<Notify>>) {
        let visible = self.log.end();
        let mut found = Vec::new();
        let mut signals = Vec::with_capacity(wants.len());
        let mut total = 0usize;
        let mut queues = self.queues.borrow_mut();
        for (i, w) in wants.iter().enumerate() {
            let q = queues.entry(w.key).or_default();
            signals.push(q.arrived.clone());
            let (start, next) = (q.index.start_offset(), q.index.visible_next_offset(visible));
            if w.offset < start || w.offset > next {
                found.push((
                    i,
                    Err(ShardError::OffsetOutOfRange {
                        offset: w.offset,
                        start,
                        next,
                    }),
                ));
                continue;
            }
            if w.offset == next || (total > 0 && total >= max_bytes) {
                continue;
            }
            let room = if total == 0 {
                w.max_bytes.min(max_bytes)
            } else {
                w.max_bytes.min(max_bytes - total)
            };
            let mut batches = Vec::new();
            for e in q.index.lookup(w.offset, visible, room) {
                // Only the reply's first batch may go over the limits.
                if total > 0 && total + e.batch_len as usize > max_bytes {
                    break;
                }
                match self.log.read(e.batch_pos, e.batch_len as usize) {
                    Some(b) => {
                        total += b.len();
                        batches.push(b);
                    }
                    None => break,
                }
            }
            if !batches.is_empty() {
                found.push((
                    i,
                    Ok(Fetched {
                        log_start: start,
                        next_offset: next,
                        batches,
                    }),
                ));
            }
        }
        (found, signals)
    }
}
