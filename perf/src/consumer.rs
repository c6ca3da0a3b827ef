//! One consumer thread: long-polls its queues and measures end-to-end latency.
//!
//! Each thread drives one library [`Consumer`] (one connection, one fetch in
//! flight per queue) of a subscription's consumer group, over the queues it
//! was assigned. For every record it reads the intended send time from the
//! first [`TIMESTAMP_BYTES`] of the payload and records the time from then
//! to the moment the poll returned it. It stops when the main thread raises
//! the stop flag (noticed within [`POLL_TIMEOUT`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use coremq::client::{ConsumedRecord, Consumer};

use crate::producer::payload_timestamp;
use crate::schedule::Clock;
use crate::stats::SharedTally;
use crate::workload::TIMESTAMP_BYTES;

/// Longest a poll blocks before the stop flag is checked again.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause after a failed poll before the next one.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What a consumer thread shares with the main thread.
#[derive(Debug)]
pub struct ConsumerShared {
    /// Index of the topic in the run.
    pub topic: usize,
    /// Index of the subscription within the topic.
    pub subscription: usize,
    /// Received messages, payload bytes, e2e latencies; `errors` counts
    /// failed polls and payloads too short to carry a timestamp.
    pub tally: SharedTally,
}

impl ConsumerShared {
    pub fn new(topic: usize, subscription: usize) -> ConsumerShared {
        ConsumerShared {
            topic,
            subscription,
            tally: SharedTally::default(),
        }
    }

    /// Counts the records of one poll, all received at `now_ns`.
    pub fn record(&self, records: &[ConsumedRecord], now_ns: u64) {
        self.record_payloads(
            records.iter().map(|r| r.value.as_deref().unwrap_or(&[])),
            now_ns,
        );
    }

    /// Counts payloads received at `now_ns` (any driver's messages).
    pub fn record_payloads<'a>(&self, payloads: impl IntoIterator<Item = &'a [u8]>, now_ns: u64) {
        let mut bad = 0u64;
        {
            let mut t = self.tally.lock();
            for value in payloads {
                match payload_timestamp(value) {
                    Some(sent_ns) => {
                        t.messages += 1;
                        t.bytes += value.len() as u64;
                        t.latency.record_between_ns(sent_ns, now_ns);
                    }
                    None => bad += 1,
                }
            }
        }
        if bad > 0 {
            self.tally.fail(
                1,
                format!("{bad} records shorter than the {TIMESTAMP_BYTES}-byte timestamp"),
            );
        }
    }
}

/// Polls until `stop` is raised.
pub fn run(
    mut consumer: Consumer,
    clock: Clock,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(POLL_TIMEOUT) {
            Ok(records) => {
                if !records.is_empty() {
                    shared.record(&records, clock.now_ns());
                }
            }
            Err(e) => {
                let retriable = e.is_retriable();
                shared.tally.fail(1, format!("poll failed: {e}"));
                if !retriable {
                    return;
                }
                thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(value: &[u8]) -> ConsumedRecord {
        ConsumedRecord {
            queue: 0,
            offset: 0,
            timestamp: 0,
            key: None,
            value: Some(Bytes::copy_from_slice(value)),
            headers: vec![],
        }
    }

    #[test]
    fn e2e_latency_from_the_payload_timestamp() {
        let s = ConsumerShared::new(0, 0);
        let mut v = vec![0u8; 32];
        v[..8].copy_from_slice(&1_000_000u64.to_be_bytes());
        s.record(&[rec(&v), rec(&v), rec(b"short")], 3_000_000);
        let t = s.tally.snapshot();
        assert_eq!((t.messages, t.bytes, t.errors), (2, 64, 1));
        assert_eq!(t.latency.summary().max, 2_000);
        assert!(s.tally.first_error().unwrap().contains("shorter"));
    }
}
