//! What one coremq core owns, and may touch without synchronisation.
//!
//! A shard is one pinned glommio executor. It owns one commit log that every
//! queue placed on it appends to (`commit_log`, made of `segment`s), one
//! consume-queue index per queue (`consume_queue`), the idempotent-producer
//! table of each queue (`producer_state`) and the consumer groups' committed
//! offsets for its queues (`group_offsets`). `shard::Shard` ties them
//! together behind the operations the network layer calls. Nothing here is
//! `Send`: data crosses cores only as explicit messages from `src/` (and
//! to the log's read-ahead thread, which only gives the kernel advice, and
//! the file reaper's, which frees deleted files).

pub mod assignment;
pub mod batch;
pub mod batch_buf;
pub mod commit_log;
pub mod consume_queue;
pub mod copy_slab;
pub mod delay_queue;
pub mod delivery;
pub mod durable_file;
pub mod error;
pub mod fetch_many;
pub mod fetch_session;
pub mod file_map;
pub mod file_reaper;
pub mod group_coordinator;
pub mod group_offsets;
pub mod index_spill;
pub mod io_poll;
pub mod notify;
pub mod producer_state;
pub mod push_delivery;
pub mod read_ahead;
pub mod segment;
pub mod segment_shares;
pub mod shard;
pub mod time_wheel;

pub use error::ShardError;

/// A queue as the shard knows it: the topic's id (never reused, so a
/// re-created topic never sees an old topic's data) and the queue index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub topic_id: u32,
    pub queue: u32,
}

/// A map by queue. Looked up for every stored batch, so hashed with
/// foldhash: SipHash's cost showed with 10,000 queues, and queue keys are
/// the broker's own numbers, not input an attacker picks.
pub type QueueMap<V> = std::collections::HashMap<QueueKey, V, foldhash::fast::RandomState>;
