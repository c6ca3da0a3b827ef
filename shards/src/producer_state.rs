//! Idempotent producers of one queue: Kafka's producer-state table.
//!
//! A producer stamps each batch with (producer id, epoch, base sequence).
//! Per producer the queue remembers its epoch and its last few batches;
//! a retried batch that matches one of them is a duplicate (answered with the
//! original offset, not stored again), a batch that skips sequences is a gap
//! (refused, so nothing is silently lost), an older epoch is a zombie
//! (refused). The table is rebuilt from the batches in the log at start-up,
//! so it survives a restart without a file of its own.

use crate::batch::{BatchHeader, NO_PRODUCER_ID};
use crate::error::ShardError;
use std::collections::{HashMap, VecDeque};

/// Batches remembered per producer for duplicate detection (Kafka's in-flight limit).
pub const BATCHES_REMEMBERED_PER_PRODUCER: usize = 5;
/// Producers remembered per queue; the oldest are forgotten beyond this.
pub const PRODUCERS_PER_QUEUE_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StoredBatch {
    first_seq: i32,
    last_seq: i32,
    base_offset: i64,
}

#[derive(Debug, Default)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<StoredBatch>,
    /// For forgetting the least recently used producer.
    last_used: u64,
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Store it.
    Append,
    /// Already stored at this base offset: answer without storing.
    Duplicate { base_offset: i64 },
}

#[derive(Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerEntry>,
    clock: u64,
}

impl ProducerTable {
    /// Decides whether a batch is new, a duplicate, or refused.
    pub fn check(&self, h: &BatchHeader) -> Result<SequenceCheck, ShardError> {
        if h.producer_id == NO_PRODUCER_ID {
            return Ok(SequenceCheck::Append);
        }
        let Some(p) = self.producers.get(&h.producer_id) else {
            // A producer we do not know may start anywhere: its history may
            // have been deleted by retention.
            return Ok(SequenceCheck::Append);
        };
        if h.producer_epoch < p.epoch {
            return Err(ShardError::InvalidProducerEpoch {
                producer_id: h.producer_id,
                got: h.producer_epoch,
                current: p.epoch,
            });
        }
        if h.producer_epoch > p.epoch {
            // A new epoch starts its sequences again, at 0.
            if h.base_sequence != 0 {
                return Err(ShardError::OutOfOrderSequence {
                    producer_id: h.producer_id,
                    expected: 0,
                    got: h.base_sequence,
                });
            }
            return Ok(SequenceCheck::Append);
        }
        let last_seq = h.last_sequence();
        if let Some(b) = p
            .batches
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq)
        {
            return Ok(SequenceCheck::Duplicate {
                base_offset: b.base_offset,
            });
        }
        let expected = p
            .batches
            .back()
            .map_or(0, |b| b.last_seq.wrapping_add(1) & i32::MAX);
        if h.base_sequence == expected {
            return Ok(SequenceCheck::Append);
        }
        let oldest = p.batches.front().map_or(0, |b| b.first_seq);
        if h.base_sequence < oldest || h.base_sequence < expected {
            return Err(ShardError::DuplicateSequence {
                producer_id: h.producer_id,
                seq: h.base_sequence,
            });
        }
        Err(ShardError::OutOfOrderSequence {
            producer_id: h.producer_id,
            expected,
            got: h.base_sequence,
        })
    }

    /// Records a batch that was stored at `base_offset`.
    pub fn record(&mut self, h: &BatchHeader, base_offset: i64) {
        if h.producer_id == NO_PRODUCER_ID {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        if !self.producers.contains_key(&h.producer_id)
            && self.producers.len() >= PRODUCERS_PER_QUEUE_MAX
        {
            if let Some((&oldest, _)) = self.producers.iter().min_by_key(|(_, p)| p.last_used) {
                self.producers.remove(&oldest);
            }
        }
        let p = self.producers.entry(h.producer_id).or_default();
        if h.producer_epoch != p.epoch {
            p.epoch = h.producer_epoch;
            p.batches.clear();
        }
        p.last_used = clock;
        if p.batches.len() == BATCHES_REMEMBERED_PER_PRODUCER {
            p.batches.pop_front();
        }
        p.batches.push_back(StoredBatch {
            first_seq: h.base_sequence,
            last_seq: h.last_sequence(),
            base_offset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, Compression};

    fn header(pid: i64, epoch: i16, seq: i32, n: usize) -> BatchHeader {
        let mut b = BatchBuilder::new(Compression::None).producer(pid, epoch, seq);
        for _ in 0..n {
            b.push(0, None, Some(b"v"), &[]);
        }
        BatchHeader::parse(&b.build()).unwrap()
    }

    #[test]
    fn duplicates_gaps_and_epochs() {
        let mut t = ProducerTable::default();
        let h0 = header(7, 0, 0, 3);
        assert_eq!(t.check(&h0).unwrap(), SequenceCheck::Append);
        t.record(&h0, 100);
        // The same batch again is a duplicate with the original offset.
        assert_eq!(
            t.check(&h0).unwrap(),
            SequenceCheck::Duplicate { base_offset: 100 }
        );
        // The next batch follows on.
        let h1 = header(7, 0, 3, 2);
        assert_eq!(t.check(&h1).unwrap(), SequenceCheck::Append);
        t.record(&h1, 103);
        // A gap is refused.
        assert!(matches!(
            t.check(&header(7, 0, 9, 1)),
            Err(ShardError::OutOfOrderSequence {
                expected: 5,
                got: 9,
                ..
            })
        ));
        // An old epoch is refused; a new one restarts.
        let h2 = header(7, 1, 0, 1);
        t.record(&h2, 105);
        assert!(matches!(
            t.check(&header(7, 0, 5, 1)),
            Err(ShardError::InvalidProducerEpoch { .. })
        ));
        // A newer epoch must start at sequence 0.
        assert!(matches!(
            t.check(&header(7, 2, 5, 1)),
            Err(ShardError::OutOfOrderSequence { expected: 0, .. })
        ));
        // Non-idempotent batches always append.
        assert_eq!(
            t.check(&header(NO_PRODUCER_ID, -1, -1, 1)).unwrap(),
            SequenceCheck::Append
        );
    }

    #[test]
    fn forgotten_duplicates_are_refused_not_stored() {
        let mut t = ProducerTable::default();
        for seq in 0..10 {
            t.record(&header(1, 0, seq, 1), i64::from(seq));
        }
        assert!(matches!(
            t.check(&header(1, 0, 0, 1)),
            Err(ShardError::DuplicateSequence { .. })
        ));
    }
}
