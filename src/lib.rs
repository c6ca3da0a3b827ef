//! coremq: a thread-per-core, io_uring message broker.
//!
//! `src/` is the node: `config` (flags and file), `metadata` (topics and
//! placement), `protocol` (the wire format), `server` (shards, connections,
//! routing), `client` (the library users link) and `cli` (the `coremq`
//! command). What one core owns — commit log, consume-queue indexes, queue
//! state — lives in the `coremq-shards` crate under `shards/`.

pub mod cli;
pub mod client;
pub mod config;
pub mod metadata;
pub mod pretouch;
pub mod protocol;
pub mod server;
