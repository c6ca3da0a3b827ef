//! What a fetch over many queues remembers between polls of the same list,
//! as Kafka's fetch sessions (KIP-227) do, but kept by the broker alone:
//! for each queue of the list, the offset at which it was last seen caught
//! up, and a watch on its `arrived` signal that says when that stops being
//! true. A poll looks again only at queues that got data since, that the
//! consumer moved, or that were never seen caught up; the others are known
//! to have nothing. A consumer of 10,000 topics polls lists of 1,024
//! queues, and looking at every queue of every poll (a cache miss each in a
//! map of thousands) was ~8% of the broker's CPU.

use crate::fetch_many::FetchWant;
use crate::notify::{Notify, ReadySet};
use crate::QueueKey;

/// One list's memory. A session only serves the list it was made for: a
/// poll with other queues, or in another order, starts it over.
#[derive(Default)]
pub struct FetchSession {
    keys: Vec<QueueKey>,
    wants: Vec<WantState>,
    ready: ReadySet,
}

#[derive(Default, Clone, Copy)]
struct WantState {
    /// `ready` will hear of this queue's next batch.
    watched: bool,
    /// The offset at which the queue had nothing new, when last looked at.
    caught_up_at: Option<i64>,
}

impl FetchSession {
    /// Readies the session for a poll of `wants`: starts over if they are
    /// not the queues it knows, and forgets what it knew of the queues
    /// that got data since the last poll.
    pub(crate) fn begin(&mut self, wants: &[FetchWant]) {
        let same =
            self.keys.len() == wants.len() && self.keys.iter().zip(wants).all(|(k, w)| *k == w.key);
        if !same {
            *self = FetchSession {
                keys: wants.iter().map(|w| w.key).collect(),
                wants: vec![WantState::default(); wants.len()],
                ready: ReadySet::default(),
            };
        }
        self.fired();
    }

    /// Whether want `i` at `offset` is known to have nothing: it was seen
    /// caught up at that offset and no batch has arrived since.
    pub(crate) fn has_nothing(&self, i: usize, offset: i64) -> bool {
        let w = self.wants[i];
        w.watched && w.caught_up_at == Some(offset)
    }

    /// What a look at want `i` found: caught up at an offset, or not.
    pub(crate) fn saw(&mut self, i: usize, caught_up_at: Option<i64>) {
        self.wants[i].caught_up_at = caught_up_at;
    }

    /// Hears of the next batch of want `i`'s queue (once, however often asked).
    pub(crate) fn watch(&mut self, i: usize, arrived: &Notify) {
        if !std::mem::replace(&mut self.wants[i].watched, true) {
            self.ready.watch(arrived, i);
        }
    }

    /// The wants whose queues got a batch since the last call; no longer watched.
    pub(crate) fn fired(&mut self) -> Vec<usize> {
        let fired = self.ready.take();
        for &i in &fired {
            self.wants[i].watched = false;
        }
        fired
    }

    /// Completes once a watched queue has got a batch.
    pub(crate) async fn arrival(&self) {
        self.ready.fired().await
    }
}
