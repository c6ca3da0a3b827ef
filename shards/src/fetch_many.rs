//! A fetch over many queues of one shard: one pass over the queues its
//! session does not know to be empty, then (when that is not enough to
//! answer) a wait on the session's watches, after which only the queues
//! that got data are looked at again. A consumer of thousands of small
//! queues parks one request instead of one per queue, and neither a wake
//! nor the next poll of the same list costs a look at every queue: with
//! 10,000 topics at a fixed rate, polls that each passed over 1,024 queues
//! to return a batch or two took a core.

use crate::error::{Result, ShardError};
use crate::fetch_session::FetchSession;
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
    /// nothing to return, or less than `min_bytes`, it waits for a batch
    /// on any of the queues and reads again each queue that gets one, until
    /// it holds `min_bytes` (any data when `min_bytes` ≤ 1), `max_wait`
    /// passes or `hurry` completes (a gatherer that has data from another
    /// shard). An error answers at once. `session` is what earlier polls of
    /// the same list learnt (a new or other list's session starts over).
    pub async fn fetch_many(
        &self,
        session: &mut FetchSession,
        wants: &[FetchWant],
        min_bytes: usize,
        max_bytes: usize,
        max_wait: Duration,
        hurry: impl Future<Output = ()>,
    ) -> FetchedMany {
        let deadline = Instant::now() + max_wait;
        let mut hurry = pin!(hurry);
        session.begin(wants);
        let mut got = self.fetch_pass(session, wants, max_bytes);
        loop {
            let now = Instant::now();
            if got.enough(min_bytes) || now >= deadline {
                break;
            }
            let timer = glommio::timer::sleep(deadline - now);
            let last = !matches!(
                select(pin!(session.arrival()), select(pin!(timer), hurry.as_mut())).await,
                Either::Left(_)
            );
            let mut queues = self.queues.borrow_mut();
            for i in session.fired() {
                let q = crate::shard::queue_state(&mut queues, wants[i].key, &self.spill);
                // Read again from the wanted offset: its part, if any, is replaced.
                got.remove(i);
                self.look(session, i, q, &wants[i], max_bytes, &mut got);
            }
            if last {
                break;
            }
        }
        let mut found = got.found;
        found.sort_unstable_by_key(|(i, _)| *i);
        found
    }

    /// One look at every wanted queue the session does not know to be empty.
    fn fetch_pass(
        &self,
        session: &mut FetchSession,
        wants: &[FetchWant],
        max_bytes: usize,
    ) -> Gathered {
        let mut got = Gathered::new(wants.len());
        let mut queues = self.queues.borrow_mut();
        for (i, w) in wants.iter().enumerate() {
            if session.has_nothing(i, w.offset) {
                continue;
            }
            let q = crate::shard::queue_state(&mut queues, w.key, &self.spill);
            self.look(session, i, q, w, max_bytes, &mut got);
        }
        got
    }

    /// Looks at want `i`'s queue: its part goes into `got`, and the session
    /// learns whether it is caught up and watches it. No await between the
    /// look and the watch, so no batch can slip between them.
    fn look(
        &self,
        session: &mut FetchSession,
        i: usize,
        q: &QueueState,
        want: &FetchWant,
        max_bytes: usize,
        got: &mut Gathered,
    ) {
        let found = self.fetch_one(q, want, max_bytes, got.bytes);
        session.saw(i, matches!(found, Found::CaughtUp).then_some(want.offset));
        session.watch(i, &q.arrived);
        if let Found::Part(r) = found {
            got.add(i, r);
        }
    }

    /// What queue `q` has for `want` with `total` bytes already in the reply.
    fn fetch_one(&self, q: &QueueState, want: &FetchWant, max_bytes: usize, total: usize) -> Found {
        let visible = self.log.end();
        let (start, next) = (q.index.start_offset(), q.index.visible_next_offset(visible));
        if want.offset < start || want.offset > next {
            return Found::Part(Err(ShardError::OffsetOutOfRange {
                offset: want.offset,
                start,
                next,
            }));
        }
        if want.offset == next {
            return Found::CaughtUp;
        }
        if total > 0 && total >= max_bytes {
            return Found::Nothing;
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
        if batches.is_empty() {
            return Found::Nothing;
        }
        Found::Part(Ok(Fetched {
            log_start: start,
            next_offset: next,
            batches,
        }))
    }
}

/// What one look at a queue found.
enum Found {
    /// Nothing past the wanted offset.
    CaughtUp,
    /// Data, but no room for it in this reply (or not readable now).
    Nothing,
    /// Batches, or an error.
    Part(Result<Fetched>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::{batch, with_shard, ASYNC, K};

    const K2: QueueKey = QueueKey {
        topic_id: 1,
        queue: 1,
    };

    fn want(key: QueueKey, offset: i64) -> FetchWant {
        FetchWant {
            key,
            offset,
            max_bytes: 1 << 20,
        }
    }

    /// The wants that got batches, as (index, batches); errors fail the test.
    async fn poll(
        shard: &Shard,
        session: &mut FetchSession,
        wants: &[FetchWant],
        max_bytes: usize,
        wait: Duration,
    ) -> Vec<(usize, usize)> {
        let found = shard
            .fetch_many(
                session,
                wants,
                1,
                max_bytes,
                wait,
                futures::future::pending(),
            )
            .await;
        found
            .into_iter()
            .map(|(i, r)| (i, r.unwrap().batches.len()))
            .collect()
    }

    async fn produce(shard: &Shard, key: QueueKey, value: &str) {
        let p = shard.produce(key, batch(&[value], 0), ASYNC).unwrap();
        shard.durable(&p).await.unwrap();
    }

    #[test]
    fn a_session_sees_what_arrived_between_polls_and_after_a_rewind() {
        with_shard(|shard| async move {
            let mut s = FetchSession::default();
            produce(&shard, K, "a").await;
            let now = Duration::ZERO;
            let got = poll(&shard, &mut s, &[want(K, 0), want(K2, 0)], 1 << 20, now).await;
            assert_eq!(got, vec![(0, 1)]);
            // Both caught up now; the session knows it.
            let caught_up = [want(K, 1), want(K2, 0)];
            assert!(poll(&shard, &mut s, &caught_up, 1 << 20, now)
                .await
                .is_empty());
            assert!(s.has_nothing(0, 1) && s.has_nothing(1, 0));
            produce(&shard, K2, "b").await;
            assert_eq!(
                poll(&shard, &mut s, &caught_up, 1 << 20, now).await,
                vec![(1, 1)],
                "a queue known empty got a batch"
            );
            // A consumer that moves back is answered from where it asks.
            assert_eq!(
                poll(&shard, &mut s, &[want(K, 0), want(K2, 1)], 1 << 20, now).await,
                vec![(0, 1)]
            );
        });
    }

    #[test]
    fn a_parked_poll_wakes_for_a_queue_its_session_knew_empty() {
        with_shard(|shard| async move {
            let mut s = FetchSession::default();
            let wants = [want(K, 0), want(K2, 0)];
            assert!(poll(&shard, &mut s, &wants, 1 << 20, Duration::ZERO)
                .await
                .is_empty());
            let later = shard.clone();
            glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(20)).await;
                produce(&later, K2, "b").await;
            })
            .detach();
            // Without the watches this waits the whole minute and finds nothing.
            let got = poll(&shard, &mut s, &wants, 1 << 20, Duration::from_secs(60)).await;
            assert_eq!(got, vec![(1, 1)]);
        });
    }

    #[test]
    fn a_session_starts_over_for_another_list_and_remembers_no_room_as_nothing() {
        with_shard(|shard| async move {
            let mut s = FetchSession::default();
            let now = Duration::ZERO;
            assert!(poll(&shard, &mut s, &[want(K, 0)], 1 << 20, now)
                .await
                .is_empty());
            produce(&shard, K2, "b").await;
            // K2 stands where K stood, at the same offset: another list.
            assert_eq!(
                poll(&shard, &mut s, &[want(K2, 0)], 1 << 20, now).await,
                vec![(0, 1)]
            );
            produce(&shard, K, "a").await;
            // One byte of room: K's batch fills the reply; K2 has data but no room.
            let wants = [want(K, 0), want(K2, 0)];
            assert_eq!(poll(&shard, &mut s, &wants, 1, now).await, vec![(0, 1)]);
            assert!(!s.has_nothing(1, 0));
            assert_eq!(
                poll(&shard, &mut s, &[want(K, 1), want(K2, 0)], 1, now).await,
                vec![(1, 1)]
            );
        });
    }
}
