//! Multi-queue requests from the client: [`Connection::produce_many`] sends
//! batches of many queues in one ProduceMany and returns one result per
//! batch; [`Connection::fetch_many`] long-polls many queues at once. For
//! callers that gather batches as they are sealed, [`ProduceManyBuilder`]
//! bounds one request by entries and bytes, and [`fetch_many_requests`]
//! cuts a long list of queues into requests of at most
//! [`FETCH_MANY_QUEUES_MAX`]. Group the queues by shard connection (as the
//! shard router does) to save the broker a hop; mixed shards work too.

use super::connection::{ClientError, Connection};
use crate::protocol::{
    ApiKey, FetchEntry, FetchMany, FetchPart, ProduceEntry, ProduceResult, Reply, Request,
    FETCH_MANY_QUEUES_MAX, PRODUCE_MANY_ENTRIES_MAX,
};
use std::time::Duration;

/// Wire bytes of a ProduceMany entry besides its topic and batch (topic
/// length, queue, priority, delay, batch length).
pub const PRODUCE_ENTRY_OVERHEAD_BYTES: usize = 2 + 4 + 1 + 8 + 4;

/// One ProduceMany being gathered, bounded by entries
/// ([`PRODUCE_MANY_ENTRIES_MAX`]) and wire bytes (`max_bytes`; a single
/// entry always fits).
#[derive(Debug)]
pub struct ProduceManyBuilder {
    entries: Vec<ProduceEntry>,
    bytes: usize,
    max_bytes: usize,
}

impl ProduceManyBuilder {
    pub fn new(max_bytes: usize) -> ProduceManyBuilder {
        ProduceManyBuilder {
            entries: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn entry_bytes(topic: &str, batch_len: usize) -> usize {
        PRODUCE_ENTRY_OVERHEAD_BYTES + topic.len() + batch_len
    }

    /// Whether an entry of `topic` with a batch of `batch_len` bytes fits.
    pub fn fits(&self, topic: &str, batch_len: usize) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < PRODUCE_MANY_ENTRIES_MAX
                && self.bytes + Self::entry_bytes(topic, batch_len) <= self.max_bytes)
    }

    /// Adds an entry (check [`ProduceManyBuilder::fits`] first).
    pub fn push(&mut self, entry: ProduceEntry) {
        self.bytes += Self::entry_bytes(&entry.topic, entry.batch.len());
        self.entries.push(entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Wire bytes of the entries so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The gathered request; the builder starts over empty.
    pub fn take(&mut self) -> Request {
        self.bytes = 0;
        Request::ProduceMany(std::mem::take(&mut self.entries))
    }
}

/// FetchMany requests for `entries`, at most [`FETCH_MANY_QUEUES_MAX`] each.
pub fn fetch_many_requests(
    entries: Vec<FetchEntry>,
    max_wait_ms: u32,
    min_bytes: u32,
    max_bytes: u32,
) -> Vec<FetchMany> {
    let mut out = Vec::with_capacity(entries.len().div_ceil(FETCH_MANY_QUEUES_MAX));
    let mut rest = entries.into_iter().peekable();
    while rest.peek().is_some() {
        out.push(FetchMany {
            max_wait_ms,
            min_bytes,
            max_bytes,
            entries: rest.by_ref().take(FETCH_MANY_QUEUES_MAX).collect(),
        });
    }
    out
}

/// The per-entry results of a ProduceMany reply.
pub fn produce_results(reply: Reply) -> Result<Vec<ProduceResult>, ClientError> {
    match reply {
        Reply::ProduceMany(results) => Ok(results),
        _ => Err(ClientError::UnexpectedReply(ApiKey::ProduceMany)),
    }
}

/// The parts of a FetchMany reply.
pub fn fetch_parts(reply: Reply) -> Result<Vec<FetchPart>, ClientError> {
    match reply {
        Reply::FetchMany(parts) => Ok(parts),
        _ => Err(ClientError::UnexpectedReply(ApiKey::FetchMany)),
    }
}

impl Connection {
    /// Sends batches of many queues in one request and waits for the
    /// reply: one result per entry, in order. A failed entry (unknown
    /// topic, corrupt batch, sequence error…) fails alone.
    pub fn produce_many(
        &self,
        entries: Vec<ProduceEntry>,
    ) -> Result<Vec<ProduceResult>, ClientError> {
        produce_results(self.call(&Request::ProduceMany(entries))?)
    }

    /// Long-polls many queues: returns as soon as any has data (or an
    /// error), or after `max_wait_ms` with no parts. Queues with nothing
    /// are left out; [`FetchPart::index`] is the position in `req.entries`.
    pub fn fetch_many(&self, req: &FetchMany) -> Result<Vec<FetchPart>, ClientError> {
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)) + self.timeouts().request;
        fetch_parts(self.send(&Request::FetchMany(req.clone()))?.wait(wait)?)
    }
}
