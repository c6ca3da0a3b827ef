//! What the data path needs of a topic to serve one of its queues: the
//! topic's id, its policy and each queue's shard, kept inside the name
//! index's own slots.
//!
//! Every produce and fetch entry names its topic. Reaching this through
//! `Arc<TopicMeta>` cost a cache miss for the topic and another for its
//! placement list on top of the index's own; with 10,000 topics and one
//! message per batch those misses were a tenth of the broker's CPU. A
//! route carries the first `OWNERS_INLINE` queues' shards itself; larger
//! topics read the rest from the topic.

use super::TopicMeta;
use crate::protocol::Flush;
use coremq_shards::shard::QueuePolicy;
use std::sync::Arc;

/// Queues whose shard a route holds inline.
pub const OWNERS_INLINE: usize = 4;

#[derive(Debug, Clone)]
pub struct Route {
    pub id: u32,
    pub policy: QueuePolicy,
    queues: u32,
    owners: [u32; OWNERS_INLINE],
    topic: Arc<TopicMeta>,
}

impl Route {
    pub fn of(topic: &Arc<TopicMeta>) -> Route {
        let mut owners = [0; OWNERS_INLINE];
        for (o, &p) in owners.iter_mut().zip(&topic.placement) {
            *o = p;
        }
        Route {
            id: topic.id,
            policy: policy(topic),
            queues: topic.placement.len() as u32,
            owners,
            topic: topic.clone(),
        }
    }

    /// Number of queues.
    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// The shard that owns `queue`, if the topic has it.
    pub fn owner(&self, queue: u32) -> Option<u32> {
        if queue >= self.queues {
            return None;
        }
        match self.owners.get(queue as usize) {
            Some(&o) => Some(o),
            None => self.topic.placement.get(queue as usize).copied(),
        }
    }
}

/// How a topic's queues store and keep their data.
pub fn policy(t: &TopicMeta) -> QueuePolicy {
    QueuePolicy {
        sync_flush: t.spec.flush == Flush::Sync,
        segment_bytes: t.spec.segment_bytes,
        retention_ms: t.spec.retention_ms,
        retention_bytes: t.spec.retention_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TopicSpec;

    fn topic(queues: u32) -> Arc<TopicMeta> {
        Arc::new(TopicMeta {
            spec: TopicSpec {
                name: "t".into(),
                queues,
                flush: Flush::Sync,
                segment_bytes: 4096,
                retention_ms: 7,
                retention_bytes: 9,
            },
            id: 3,
            placement: (0..queues).map(|q| (q + 3) % 2).collect(),
        })
    }

    #[test]
    fn owners_inline_and_beyond_match_the_placement() {
        for queues in [1, OWNERS_INLINE as u32, OWNERS_INLINE as u32 + 3] {
            let t = topic(queues);
            let r = Route::of(&t);
            assert_eq!((r.id, r.queues()), (3, queues));
            for q in 0..queues {
                assert_eq!(r.owner(q), Some(t.placement[q as usize]), "{queues} {q}");
            }
            assert_eq!(r.owner(queues), None);
            assert_eq!(r.policy, policy(&t));
        }
    }
}
