//! The queues of recent FetchMany lists, resolved once per metadata snapshot.
//!
//! A consumer of many queues polls the same list again and again
//! (coremq-perf sends each group of 1,024 queues again as soon as it is
//! answered), and resolving every topic name of every poll was the largest
//! part of a poll: 18% of the broker's CPU at a fixed 100k msg/s over
//! 10,000 topics. A list seen before under the same snapshot reuses its
//! resolution after one hash of its names and one compare with the names
//! it keeps side by side; any topic change makes a new snapshot, so a
//! list is resolved afresh after it. A list also keeps its fetch session
//! (`coremq_shards::fetch_session`): what its last poll learnt of which
//! queues have nothing new.

use super::shard_context::queue_of;
use crate::metadata::Metadata;
use crate::protocol::{ErrorReply, FetchEntry};
use coremq_shards::fetch_session::FetchSession;
use coremq_shards::QueueKey;
use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

/// Lists a shard keeps resolved; more starts the cache over.
pub const FETCH_LISTS_MAX: usize = 32;

/// An entry's queue and owning shard, or why it has none.
pub type Resolved = Result<(QueueKey, u32), ErrorReply>;

/// A list's fetch session, taken by the poll that uses it and put back
/// after: a second poll of the same list at the same time starts its own.
pub type SessionSlot = Rc<Cell<Option<FetchSession>>>;

type Hasher64 = foldhash::fast::FixedState;

#[derive(Default)]
pub struct FetchLists {
    lists: HashMap<u64, List>,
}

struct List {
    meta: Arc<Metadata>,
    /// The entries' topic names one after another, and where each ends.
    names: String,
    ends: Vec<usize>,
    queues: Vec<u32>,
    resolved: Rc<[Resolved]>,
    session: SessionSlot,
}

impl List {
    fn new(meta: Arc<Metadata>, entries: &[FetchEntry], resolved: Rc<[Resolved]>) -> List {
        let mut names = String::new();
        let ends = entries
            .iter()
            .map(|e| {
                names.push_str(&e.topic);
                names.len()
            })
            .collect();
        List {
            meta,
            names,
            ends,
            queues: entries.iter().map(|e| e.queue).collect(),
            resolved,
            session: SessionSlot::default(),
        }
    }

    /// Whether `entries` name the same queues, in the same order.
    fn is(&self, entries: &[FetchEntry]) -> bool {
        entries.len() == self.ends.len()
            && entries.iter().enumerate().all(|(i, e)| {
                let start = if i == 0 { 0 } else { self.ends[i - 1] };
                self.queues[i] == e.queue && self.names[start..self.ends[i]] == *e.topic
            })
    }
}

impl FetchLists {
    /// Each entry's queue and owner under `meta`, in entry order, and the
    /// list's fetch session.
    pub fn resolve(
        &mut self,
        meta: &Arc<Metadata>,
        entries: &[FetchEntry],
    ) -> (Rc<[Resolved]>, SessionSlot) {
        let key = fingerprint(entries);
        if let Some(l) = self.lists.get(&key) {
            if Arc::ptr_eq(&l.meta, meta) && l.is(entries) {
                return (l.resolved.clone(), l.session.clone());
            }
        }
        let resolved: Rc<[Resolved]> = entries
            .iter()
            .map(|e| queue_of(meta, &e.topic, e.queue).map(|(key, owner, _)| (key, owner)))
            .collect();
        if self.lists.len() >= FETCH_LISTS_MAX {
            self.lists.clear();
        }
        let list = List::new(meta.clone(), entries, resolved.clone());
        let session = list.session.clone();
        self.lists.insert(key, list);
        (resolved, session)
    }
}

/// A hash of the entries' names and queues, in order.
fn fingerprint(entries: &[FetchEntry]) -> u64 {
    let mut h = Hasher64::default().build_hasher();
    for e in entries {
        e.topic.hash(&mut h);
        e.queue.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, queue: u32) -> FetchEntry {
        FetchEntry {
            topic: topic.into(),
            queue,
            offset: 7,
            max_bytes: 9,
        }
    }

    #[test]
    fn a_list_is_the_same_only_with_the_same_queues_in_order() {
        let l = List::new(
            Arc::new(Metadata::default()),
            &[entry("ab", 0), entry("c", 1)],
            Rc::from(Vec::new()),
        );
        assert!(l.is(&[entry("ab", 0), entry("c", 1)]));
        // Offsets and byte shares are not part of it.
        assert!(l.is(&[
            FetchEntry {
                offset: 99,
                ..entry("ab", 0)
            },
            entry("c", 1)
        ]));
        assert!(
            !l.is(&[entry("a", 0), entry("bc", 1)]),
            "same bytes, cut elsewhere"
        );
        assert!(!l.is(&[entry("ab", 0), entry("c", 2)]));
        assert!(!l.is(&[entry("c", 1), entry("ab", 0)]));
        assert!(!l.is(&[entry("ab", 0)]));
    }

    #[test]
    fn unknown_topics_resolve_to_errors_and_a_new_snapshot_resolves_again() {
        let mut lists = FetchLists::default();
        let (m1, m2) = (Arc::new(Metadata::default()), Arc::new(Metadata::default()));
        let entries = [entry("nope", 0)];
        let (a, session) = lists.resolve(&m1, &entries);
        assert!(a[0].is_err());
        let (again, same_session) = lists.resolve(&m1, &entries);
        assert!(Rc::ptr_eq(&a, &again), "reused");
        assert!(Rc::ptr_eq(&session, &same_session), "with its session");
        let (fresh, new_session) = lists.resolve(&m2, &entries);
        assert!(!Rc::ptr_eq(&a, &fresh), "new snapshot");
        assert!(!Rc::ptr_eq(&session, &new_session), "and a new session");
    }
}
