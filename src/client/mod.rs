//! The blocking client library: admin, producer and consumer over the
//! native protocol, on `std::net` threads (no async runtime), usable from
//! any thread.
//!
//! A request flows like this: the caller encodes a [`Request`] into one
//! frame (header with a fresh request id, then the body) and, after
//! registering a waiter for that id, writes it under the connection's
//! writer mutex; it does not wait for earlier requests, so many are in
//! flight at once (pipelining). The connection's reader thread reads
//! response frames, looks up the waiter by request id — replies may come
//! back in any order, e.g. from different shards — and completes it; the
//! caller decodes the body into a [`Reply`], or a broker error code into
//! [`ClientError::Broker`]. When the socket fails every waiter completes
//! with [`ClientError::Disconnected`].
//!
//! On top of [`Connection`]: [`Admin`] does one round trip per call;
//! [`Producer`] batches records into Kafka v2 record batches per queue and
//! ships them from a background thread with retries and idempotent
//! sequence numbers, and follows a topic that grows; [`Consumer`] long-polls
//! a set of queues and tracks the group's positions; [`GroupConsumer`] is a
//! consumer-group member whose queues the broker assigns and rebalances
//! (see its module for the protocol and the at-least-once duplicate window);
//! [`PushConsumer`] has the broker push messages to a group with
//! acknowledgements, redelivery and dead letters (see its module for the
//! loop and its guarantees); [`Deduplicator`] skips redelivered messages on
//! the consumer side. [`Connection::produce_many`] and
//! [`Connection::fetch_many`] carry many queues per request (`many.rs`). Messages may carry a priority and a delay
//! ([`Message::with_priority`], [`Message::with_delay`]).
//!
//! Shard-aware by default (`shard_aware` in each config): the producer and
//! the consumers send a queue's requests over a connection to the port of
//! the shard that owns it (reported by `DescribeTopic`), one connection per
//! shard port, falling back to the shared address when the port is unknown
//! or unreachable; control requests use the shared address.
//!
//! [`Request`]: crate::protocol::Request
//! [`Reply`]: crate::protocol::Reply

pub mod admin;
pub mod connection;
pub mod consumer;
pub mod dedup;
pub mod group_consumer;
pub mod many;
mod pipeline;
pub mod producer;
pub mod push_consumer;
mod shard_router;

pub use crate::protocol::Strategy;
pub use admin::Admin;
pub use connection::{
    ClientError, Completion, Connection, PendingReply, Timeouts, RESPONSE_FRAME_BYTES_MAX,
};
pub use consumer::{ConsumedRecord, Consumer, ConsumerConfig, StartFrom};
pub use coremq_shards::batch::Compression;
pub use dedup::{Deduplicator, MessageId};
pub use group_consumer::{AssignmentChange, GroupConfig, GroupConsumer};
pub use many::{fetch_many_requests, ProduceManyBuilder};
pub use producer::{Delay, Message, MessageError, ProduceSummary, Producer, ProducerConfig};
pub use push_consumer::{PushConfig, PushConsumer, PushedRecord};

#[cfg(test)]
pub(crate) mod fake_broker;
#[cfg(test)]
mod tests;
