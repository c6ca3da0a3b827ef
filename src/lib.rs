//! coremq: a thread-per-core, io_uring message broker.
//!
//! `src/` is the node: the wire protocol, the client library, and (later
//! modules) configuration, metadata, the network server and the CLI. What one
//! core owns — commit log, consume-queue indexes, queue state — lives in the
//! `coremq-shards` crate under `shards/`.

pub mod cli;
pub mod client;
pub mod protocol;
