//! Moving messages that used up their delivery attempts to the group's
//! dead-letter topic, `<group>-dlq` (created on first use, one queue, sync
//! flush). Each dead message is re-produced on its own, with headers naming
//! where it came from, so `coremq consume <group>-dlq` reads it like any
//! other topic.

use super::shard_context::ShardCtx;
use crate::protocol::messages::TOPIC_NAME_BYTES_MAX;
use crate::protocol::{ErrorCode, Flush, Reply, Request, TopicSpec};
use coremq_shards::batch::{self, BatchBuilder};
use coremq_shards::push_delivery::DeadLetter;
use std::rc::Rc;

/// Suffix of a group's dead-letter topic.
pub const DLQ_SUFFIX: &str = "-dlq";

/// The dead-letter topic of `group`.
pub fn dlq_topic(group: &str) -> String {
    let keep = TOPIC_NAME_BYTES_MAX - DLQ_SUFFIX.len();
    format!("{}{DLQ_SUFFIX}", &group[..group.len().min(keep)])
}

impl ShardCtx {
    /// Writes each dead letter to the group's dead-letter topic.
    pub async fn dead_letter(self: &Rc<Self>, group: &str, topic: &str, letters: Vec<DeadLetter>) {
        if letters.is_empty() {
            return;
        }
        let dlq = dlq_topic(group);
        if self.meta.snapshot().topic(&dlq).is_err() {
            let spec = TopicSpec {
                name: dlq.clone(),
                queues: 1,
                flush: Flush::Sync,
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: 0,
            };
            match self.meta.create_topic(spec).await {
                Ok(_) => tracing::info!(topic = %dlq, "dead-letter topic created"),
                Err(e) if e.code == ErrorCode::TopicExists => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the dead-letter topic");
                    return;
                }
            }
        }
        for d in letters {
            let Some(batch) = dead_batch(&d, topic) else {
                tracing::error!(offset = d.offset, "a dead letter could not be decoded");
                continue;
            };
            let req = Request::Produce {
                topic: dlq.clone(),
                queue: 0,
                batch,
            };
            match self.dispatch(req).await.await {
                Ok(Reply::Produce { .. }) => tracing::info!(
                    %group, %topic, queue = d.key.queue, offset = d.offset, attempts = d.attempts,
                    "message dead-lettered"
                ),
                other => tracing::error!(?other, "writing a dead letter failed"),
            }
        }
    }
}

/// A one-record batch holding the dead message, with its origin in headers.
fn dead_batch(d: &DeadLetter, topic: &str) -> Option<bytes::Bytes> {
    let (_, records) = batch::decode_records(&d.batch).ok()?;
    let r = records.into_iter().find(|r| r.offset == d.offset)?;
    let (queue, offset, attempts) = (
        d.key.queue.to_string(),
        d.offset.to_string(),
        d.attempts.to_string(),
    );
    let mut headers: Vec<(&str, Option<&[u8]>)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    headers.push(("coremq-dlq-topic", Some(topic.as_bytes())));
    headers.push(("coremq-dlq-queue", Some(queue.as_bytes())));
    headers.push(("coremq-dlq-offset", Some(offset.as_bytes())));
    headers.push(("coremq-dlq-attempts", Some(attempts.as_bytes())));
    let mut b = BatchBuilder::new(batch::Compression::None);
    b.push(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
    Some(b.build())
}
