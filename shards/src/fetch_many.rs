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

/// How often a fetch that holds less than its `min_bytes` looks again.
pub const MIN_BYTES_RECHECK: Duration = Duration::from_millis(2);

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
    /// queues gets a batch; with less than `min_bytes` it looks again every
    /// `MIN_BYTES_RECHECK` — until `max_wait` passes or `hurry` completes (a
    /// gatherer that has data from another shard), then passes once more.
    /// An error answers at once.
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
        let mut last_pass = false;
        loop {
            let found = self.fetch_pass(wants, max_bytes);
            let now = Instant::now();
            let failed = found.iter().any(|(_, r)| r.is_err());
            let bytes: usize = found
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .flat_map(|f| &f.batches)
                .map(|b| b.len())
                .sum();
            let enough = failed || (!found.is_empty() && bytes >= min_bytes);
            if enough || last_pass || now >= deadline {
                return found;
            }
            let done = if found.is_empty() {
                // No await since the pass: no append can slip between it and the wait.
                let signals = self.arrived_signals(wants);
                let any = AnyNotified::new(&signals);
                let timer = glommio::timer::sleep(deadline - now);
                matches!(
                    select(pin!(any), select(pin!(timer), hurry.as_mut())).await,
                    Either::Right(_)
                )
            } else {
                // Some data but not enough: let more gather. A timer, not
                // the queues' signals, so busy queues cost one pass per
                // recheck instead of one per append.
                let recheck = MIN_BYTES_RECHECK.min(deadline - now);
                let timer = glommio::timer::sleep(recheck);
                match select(pin!(timer), hurry.as_mut()).await {
                    Either::Left(_) => now + recheck >= deadline,
                    Either::Right(_) => true,
                }
            };
            last_pass = done;
        }
    }

    /// The `arrived` signal of every wanted queue, to wait on after a pass
    /// that found nothing (taken only then: a pass that finds data, as most
    /// do under load, skips a refcount per queue).
    fn arrived_signals(&self, wants: &[FetchWant]) -> Vec<Rc<Notify>> {
        let mut queues = self.queues.borrow_mut();
        wants
            .iter()
            .map(|w| {
                crate::shard::queue_state(&mut queues, w.key, &self.spill)
                    .arrived
                    .clone()
            })
            .collect()
    }

    /// One look at every wanted queue: what it has now.
    fn fetch_pass(&self, wants: &[FetchWant], max_bytes: usize) -> FetchedMany {
        let visible = self.log.end();
        let mut found = Vec::new();
        let mut total = 0usize;
        let mut queues = self.queues.borrow_mut();
        for (i, w) in wants.iter().enumerate() {
            let q = crate::shard::queue_state(&mut queues, w.key, &self.spill);
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
        found
    }
}
