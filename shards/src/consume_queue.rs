//! The consume-queue index of one queue: RocketMQ's ConsumeQueue.
//!
//! The shard's commit log interleaves every queue's batches; this index
//! maps a queue offset to where its batch sits in the log. One fixed-size
//! entry per stored batch, in offset order (and so in log order), which
//! makes a lookup a binary search. The index is rebuilt from the log at
//! start-up (see `shard::Shard::open`), so it needs no file of its own yet.
//!
//! Invariant: entries are contiguous in offsets — entry i+1's base offset is
//! entry i's base offset + count — except across batches lost to corruption.

use std::collections::VecDeque;

/// One stored batch of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: i64,
    /// Log position of the batch bytes (after the log entry header).
    pub batch_pos: u64,
    pub batch_len: u32,
    pub record_count: u32,
    pub max_timestamp: i64,
    /// 0 (lowest) to `segment::PRIORITY_MAX`; used by push delivery.
    pub priority: u8,
}

impl IndexEntry {
    pub fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.record_count)
    }
    pub fn end_pos(&self) -> u64 {
        self.batch_pos + u64::from(self.batch_len)
    }
}

#[derive(Debug, Default)]
pub struct ConsumeQueue {
    entries: VecDeque<IndexEntry>,
    /// First offset still stored (after retention).
    start_offset: i64,
    /// Offset the next batch gets.
    next_offset: i64,
}

impl ConsumeQueue {
    pub fn new(start_offset: i64) -> Self {
        ConsumeQueue {
            entries: VecDeque::new(),
            start_offset,
            next_offset: start_offset,
        }
    }

    pub fn start_offset(&self) -> i64 {
        self.start_offset
    }
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the entry of a batch just written at the end of the queue.
    pub fn push(&mut self, entry: IndexEntry) {
        debug_assert!(entry.base_offset >= self.next_offset);
        debug_assert!(self
            .entries
            .back()
            .is_none_or(|e| e.batch_pos < entry.batch_pos));
        if self.entries.is_empty() {
            self.start_offset = entry.base_offset;
        }
        self.next_offset = entry.next_offset();
        self.entries.push_back(entry);
    }

    /// Applies a checkpoint taken before retention deleted data: an empty
    /// queue continues at the checkpoint's next offset, never lower.
    pub fn advance_to(&mut self, next_offset: i64) {
        self.next_offset = self.next_offset.max(next_offset);
        if self.entries.is_empty() {
            self.start_offset = self.next_offset;
        }
    }

    /// The batches holding `offset` and after, up to `max_bytes` (at least
    /// one batch), that end at or before `visible_pos` in the log.
    pub fn lookup(&self, offset: i64, visible_pos: u64, max_bytes: usize) -> Vec<IndexEntry> {
        let first = self.entries.partition_point(|e| e.next_offset() <= offset);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in self.entries.range(first..) {
            if e.end_pos() > visible_pos
                || (!out.is_empty() && bytes + e.batch_len as usize > max_bytes)
            {
                break;
            }
            bytes += e.batch_len as usize;
            out.push(*e);
        }
        out
    }

    /// Index entries from the batch holding `offset` onwards.
    pub fn entries_from(&self, offset: i64) -> impl Iterator<Item = &IndexEntry> {
        let first = self.entries.partition_point(|e| e.next_offset() <= offset);
        self.entries.range(first..)
    }

    /// The next offset whose batch ends at or before `visible_pos`.
    pub fn visible_next_offset(&self, visible_pos: u64) -> i64 {
        match self
            .entries
            .iter()
            .rev()
            .find(|e| e.end_pos() <= visible_pos)
        {
            Some(e) => e.next_offset(),
            None => self
                .entries
                .front()
                .map_or(self.next_offset, |e| e.base_offset),
        }
    }

    /// Forgets every batch stored before log position `log_start` (deleted segments).
    pub fn truncate_before(&mut self, log_start: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.batch_pos < log_start)
        {
            self.entries.pop_front();
        }
        self.start_offset = self
            .entries
            .front()
            .map_or(self.next_offset, |e| e.base_offset);
    }

    /// Log bytes this queue holds at or after `pos`.
    pub fn bytes_from(&self, pos: u64) -> u64 {
        let first = self.entries.partition_point(|e| e.batch_pos < pos);
        self.entries
            .range(first..)
            .map(|e| u64::from(e.batch_len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: i64, pos: u64, count: u32) -> IndexEntry {
        IndexEntry {
            base_offset: base,
            batch_pos: pos,
            batch_len: 100,
            record_count: count,
            max_timestamp: 0,
            priority: 0,
        }
    }

    #[test]
    fn lookup_finds_the_batch_holding_an_offset() {
        let mut q = ConsumeQueue::new(0);
        q.push(entry(0, 0, 10));
        q.push(entry(10, 200, 5));
        q.push(entry(15, 400, 5));
        assert_eq!(q.next_offset(), 20);
        assert_eq!(q.lookup(0, u64::MAX, 1000)[0].base_offset, 0);
        assert_eq!(q.lookup(9, u64::MAX, 1000)[0].base_offset, 0);
        assert_eq!(q.lookup(10, u64::MAX, 1000)[0].base_offset, 10);
        assert_eq!(q.lookup(19, u64::MAX, 1000).len(), 1);
        assert!(q.lookup(20, u64::MAX, 1000).is_empty());
        // max_bytes limits, but one batch is always returned.
        assert_eq!(q.lookup(0, u64::MAX, 150).len(), 1);
        assert_eq!(q.lookup(0, u64::MAX, 0).len(), 1);
        assert_eq!(q.lookup(0, u64::MAX, 300).len(), 3);
        // Batches not yet written are invisible.
        assert_eq!(q.lookup(0, 350, 1000).len(), 2);
        assert_eq!(q.visible_next_offset(350), 15);
    }

    #[test]
    fn truncation_moves_the_start() {
        let mut q = ConsumeQueue::new(0);
        q.push(entry(0, 0, 10));
        q.push(entry(10, 200, 5));
        assert_eq!(q.bytes_from(0), 200);
        assert_eq!(q.bytes_from(150), 100);
        q.truncate_before(150);
        assert_eq!(q.start_offset(), 10);
        q.truncate_before(1000);
        assert_eq!(q.start_offset(), 15);
        assert_eq!(q.next_offset(), 15);
        assert!(q.is_empty());
        q.push(entry(15, 1200, 1));
        assert_eq!(q.start_offset(), 15);
    }

    #[test]
    fn checkpoint_raises_an_empty_queue() {
        let mut q = ConsumeQueue::new(0);
        q.advance_to(50);
        assert_eq!((q.start_offset(), q.next_offset()), (50, 50));
        q.push(entry(50, 0, 1));
        assert_eq!((q.start_offset(), q.next_offset()), (50, 51));
    }
}
