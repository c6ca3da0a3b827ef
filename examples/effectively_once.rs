//! Effectively once with push delivery: the broker redelivers what is not
//! acknowledged in time (at-least-once), and a `Deduplicator` remembers the
//! message ids already processed, so each message's effect happens once.
//!
//! Run a broker (`cargo run --release -- serve`), create a topic
//! (`coremq topic create payments --queues 2`), produce a few lines
//! (`seq 1 10 | coremq produce payments`), then:
//! `cargo run --example effectively_once`.

use coremq::client::{Deduplicator, PushConfig, PushConsumer};
use std::time::Duration;

/// Ids remembered: more than can be redelivered within one ack timeout.
const DEDUP_WINDOW_IDS: usize = 100_000;

fn main() -> Result<(), coremq::client::ClientError> {
    let mut config = PushConfig::new("payments-service");
    config.ack_timeout = Duration::from_secs(5);
    let mut consumer = PushConsumer::connect("127.0.0.1:9700", "payments", config)?;
    let mut seen = Deduplicator::new(DEDUP_WINDOW_IDS, Some(Duration::from_secs(3600)));
    let mut idle_polls = 0;
    while idle_polls < 3 {
        let records = consumer.poll(Duration::from_secs(1))?;
        idle_polls = if records.is_empty() {
            idle_polls + 1
        } else {
            0
        };
        for r in records {
            // A redelivered message (attempt > 1) that was already applied is skipped.
            if seen.first_time_pushed("payments", &r) {
                println!("apply {:?} (attempt {})", r.value, r.attempt);
            }
            consumer.ack(&[r.position()])?;
        }
    }
    consumer.close()
}
