//! The consume-queue index of one queue: RocketMQ's ConsumeQueue.
//!
//! The shard's commit log interleaves every queue's batches; this index
//! maps a queue offset to where its batch sits in the log. One entry per
//! stored batch, in offset order (and so in log order), which makes a
//! lookup a binary search. The index is rebuilt from the log at start-up
//! (see `shard::Shard::open`).
//!
//! Entries are packed: 12 bytes each, in chunks of up to `CHUNK_ENTRIES`
//! that hold their first offset and log position in full and every entry's
//! as a 32-bit delta from them. With 10,000 topics a batch holds one or two
//! messages, and the unpacked 40-byte entries in one doubling `VecDeque`
//! per queue took ~100 MiB of a 15-second run. Even packed, the index grows
//! with the log, so a queue with a spill (`index_spill`) keeps only its
//! newest `CHUNKS_IN_MEMORY` chunks in memory and writes older ones there;
//! a lookup that lands in a spilled chunk reads it back.
//!
//! Invariant: entries are contiguous in offsets — entry i+1's base offset is
//! entry i's base offset + count — except across batches lost to corruption.
//! A chunk never spans such a gap, so within a chunk each entry's base
//! offset is the previous entry's next offset.

use crate::index_spill::{IndexSpill, SpillRef};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;

/// One stored batch of the queue, as lookups return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: i64,
    /// Log position of the batch bytes (after the log entry header).
    pub batch_pos: u64,
    pub batch_len: u32,
    pub record_count: u32,
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

/// Entries per chunk: a power of two, so a chunk's `Vec` grows by doubling
/// to exactly this size and a queue wastes at most one half-filled chunk.
pub const CHUNK_ENTRIES: usize = 128;

/// Chunks a spilling queue keeps in memory: the one filling and the one
/// before it, so readers up to 128 batches behind the tail never touch the
/// spill files.
pub const CHUNKS_IN_MEMORY: usize = 2;

/// Bits of a packed entry's last word that hold the batch length; the
/// priority (0..=3) takes the two above them.
const LEN_BITS: u32 = 30;
/// Longest batch the index can hold, in bytes (frames are at most 64 MiB).
pub const BATCH_LEN_MAX_BYTES: u32 = (1 << LEN_BITS) - 1;

/// One stored batch, relative to its chunk.
#[derive(Debug, Clone, Copy)]
struct Packed {
    /// The batch's next offset minus the chunk's first offset.
    end_offset: u32,
    /// The batch's log position minus the chunk's first position.
    pos: u32,
    /// Batch length (low `LEN_BITS`) and priority (above them).
    len_priority: u32,
}

const _: () = assert!(std::mem::size_of::<Packed>() == 12);
const _: () = assert!(crate::segment::PRIORITY_MAX < 4);

/// Bytes of a packed entry in a spill file.
const PACKED_BYTES: usize = 12;

impl Packed {
    fn batch_len(&self) -> u32 {
        self.len_priority & BATCH_LEN_MAX_BYTES
    }

    fn put(&self, out: &mut Vec<u8>) {
        for word in [self.end_offset, self.pos, self.len_priority] {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }

    fn from_bytes(b: &[u8]) -> Packed {
        let word = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        Packed {
            end_offset: word(0),
            pos: word(1),
            len_priority: word(2),
        }
    }
}

#[derive(Debug)]
enum Entries {
    Here(Vec<Packed>),
    /// In the shard's spill files; the last entry stays at hand, as the
    /// chunk's end is what searches over chunks compare.
    Spilled {
        at: SpillRef,
        len: u32,
        last: Packed,
    },
}

#[derive(Debug)]
struct Chunk {
    /// Base offset and log position of the chunk's first entry.
    base_offset: i64,
    base_pos: u64,
    /// Batch bytes of its entries: retention by size sums whole chunks
    /// without reading spilled ones back.
    batch_bytes: u64,
    entries: Entries,
}

impl Chunk {
    fn new(first: &IndexEntry) -> Self {
        Chunk {
            base_offset: first.base_offset,
            base_pos: first.batch_pos,
            batch_bytes: 0,
            entries: Entries::Here(Vec::new()),
        }
    }

    /// Packs `e` after the last entry, if the chunk is in memory, `e`
    /// continues its offsets and its deltas fit.
    fn try_push(&mut self, e: &IndexEntry) -> bool {
        let next_offset = self.next_offset();
        let Entries::Here(entries) = &mut self.entries else {
            return false;
        };
        if entries.len() == CHUNK_ENTRIES || e.base_offset != next_offset {
            return false;
        }
        let Ok(end_offset) = u32::try_from(e.next_offset() - self.base_offset) else {
            return false;
        };
        let Ok(pos) = u32::try_from(e.batch_pos - self.base_pos) else {
            return false;
        };
        entries.push(Packed {
            end_offset,
            pos,
            len_priority: e.batch_len | (u32::from(e.priority) << LEN_BITS),
        });
        self.batch_bytes += u64::from(e.batch_len);
        true
    }

    fn len(&self) -> usize {
        match &self.entries {
            Entries::Here(v) => v.len(),
            Entries::Spilled { len, .. } => *len as usize,
        }
    }

    fn last(&self) -> Option<Packed> {
        match &self.entries {
            Entries::Here(v) => v.last().copied(),
            Entries::Spilled { last, .. } => Some(*last),
        }
    }

    /// The entries, read back from the spill if they are there; `None` when
    /// that read fails (logged): callers then stop rather than skip them.
    fn entries<'a>(&'a self, spill: Option<&IndexSpill>) -> Option<Cow<'a, [Packed]>> {
        let (at, len) = match &self.entries {
            Entries::Here(v) => return Some(Cow::Borrowed(v)),
            Entries::Spilled { at, len, .. } => (*at, *len as usize),
        };
        let mut bytes = vec![0; len * PACKED_BYTES];
        let read = match spill {
            Some(s) => s.read(at, &mut bytes),
            None => Err(std::io::Error::other("no spill to read from")),
        };
        if let Err(e) = read {
            tracing::error!(error = %e, base_offset = self.base_offset,
                "cannot read a spilled consume-queue chunk; reads stop before it");
            return None;
        }
        Some(Cow::Owned(
            bytes
                .chunks_exact(PACKED_BYTES)
                .map(Packed::from_bytes)
                .collect(),
        ))
    }

    /// Moves the entries to `spill`; they stay here if the write fails.
    fn spill(&mut self, spill: &IndexSpill) {
        let Entries::Here(v) = &self.entries else {
            return;
        };
        let Some(&last) = v.last() else {
            return;
        };
        let mut bytes = Vec::with_capacity(v.len() * PACKED_BYTES);
        v.iter().for_each(|p| p.put(&mut bytes));
        if let Some(at) = spill.write(self.last_pos(), &bytes) {
            self.entries = Entries::Spilled {
                at,
                len: v.len() as u32,
                last,
            };
        }
    }

    fn decode(&self, p: Packed, start: u32) -> IndexEntry {
        IndexEntry {
            base_offset: self.base_offset + i64::from(start),
            batch_pos: self.base_pos + u64::from(p.pos),
            batch_len: p.batch_len(),
            record_count: p.end_offset - start,
            priority: (p.len_priority >> LEN_BITS) as u8,
        }
    }

    /// Entry `i` of `entries` (this chunk's).
    fn get(&self, entries: &[Packed], i: usize) -> IndexEntry {
        self.decode(entries[i], start_of(entries, i))
    }

    fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last().map_or(0, |p| p.end_offset))
    }

    fn last_pos(&self) -> u64 {
        self.base_pos + u64::from(self.last().map_or(0, |p| p.pos))
    }

    fn last_end_pos(&self) -> u64 {
        self.last().map_or(self.base_pos, |p| {
            self.base_pos + u64::from(p.pos) + u64::from(p.batch_len())
        })
    }

    /// Drops the first `n` entries of an in-memory chunk; the rest are
    /// re-based on the new first.
    fn drop_front(&mut self, n: usize) {
        let Entries::Here(entries) = &mut self.entries else {
            debug_assert!(false, "drop_front of a spilled chunk");
            return;
        };
        // The new first entry starts where entry n - 1 ended.
        let (off, pos) = (entries[n - 1].end_offset, entries[n].pos);
        let dropped: u64 = entries.drain(..n).map(|p| u64::from(p.batch_len())).sum();
        self.batch_bytes -= dropped;
        for p in entries.iter_mut() {
            p.end_offset -= off;
            p.pos -= pos;
        }
        self.base_offset += i64::from(off);
        self.base_pos += u64::from(pos);
    }
}

/// Offset delta at which entry `i` starts: its predecessor's end.
fn start_of(entries: &[Packed], i: usize) -> u32 {
    match i {
        0 => 0,
        _ => entries[i - 1].end_offset,
    }
}

#[derive(Debug, Default)]
pub struct ConsumeQueue {
    chunks: VecDeque<Chunk>,
    /// Where chunks older than the newest `CHUNKS_IN_MEMORY` go; `None`
    /// keeps everything in memory.
    spill: Option<Arc<IndexSpill>>,
    len: usize,
    /// First offset still stored (after retention).
    start_offset: i64,
    /// Offset the next batch gets.
    next_offset: i64,
    /// The last entry's end position and next offset (meaningful while
    /// `len > 0`): a poll of many queues asks each for its visible end, and
    /// reading it from the last chunk was a cache miss per queue.
    last_end_pos: u64,
    last_next_offset: i64,
}

impl ConsumeQueue {
    /// An index kept wholly in memory.
    pub fn new(start_offset: i64) -> Self {
        ConsumeQueue {
            chunks: VecDeque::new(),
            spill: None,
            len: 0,
            start_offset,
            next_offset: start_offset,
            last_end_pos: 0,
            last_next_offset: start_offset,
        }
    }

    /// An index that keeps its older chunks in `spill`.
    pub fn spilling(start_offset: i64, spill: Arc<IndexSpill>) -> Self {
        ConsumeQueue {
            spill: Some(spill),
            ..ConsumeQueue::new(start_offset)
        }
    }

    pub fn start_offset(&self) -> i64 {
        self.start_offset
    }
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes the index holds (capacity, not just entries in use).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self
                .chunks
                .iter()
                .map(|c| match &c.entries {
                    Entries::Here(v) => v.capacity() * std::mem::size_of::<Packed>(),
                    Entries::Spilled { .. } => 0,
                })
                .sum::<usize>()
    }

    fn entries_of<'a>(&'a self, c: &'a Chunk) -> Option<Cow<'a, [Packed]>> {
        c.entries(self.spill.as_deref())
    }

    /// Appends the entry of a batch just written at the end of the queue.
    pub fn push(&mut self, entry: IndexEntry) {
        debug_assert!(entry.base_offset >= self.next_offset);
        debug_assert!(self
            .chunks
            .back()
            .is_none_or(|c| c.last_pos() < entry.batch_pos));
        // The log refuses batches this long long before (`batch_bytes_max`).
        assert!(
            entry.batch_len <= BATCH_LEN_MAX_BYTES,
            "batch of {} bytes is too long to index",
            entry.batch_len
        );
        if self.len == 0 {
            self.start_offset = entry.base_offset;
        }
        self.next_offset = entry.next_offset();
        self.len += 1;
        self.last_end_pos = entry.end_pos();
        self.last_next_offset = entry.next_offset();
        if let Some(c) = self.chunks.back_mut() {
            if c.try_push(&entry) {
                return;
            }
        }
        let mut c = Chunk::new(&entry);
        let pushed = c.try_push(&entry);
        debug_assert!(pushed, "a fresh chunk takes any entry");
        self.chunks.push_back(c);
        // The chunk that just stopped being one of the newest.
        self.spill_if_old(self.chunks.len().saturating_sub(CHUNKS_IN_MEMORY + 1));
    }

    /// Spills chunk `i` unless it is one of the newest `CHUNKS_IN_MEMORY`.
    fn spill_if_old(&mut self, i: usize) {
        if let Some(spill) = &self.spill {
            if i + CHUNKS_IN_MEMORY < self.chunks.len() {
                self.chunks[i].spill(spill);
            }
        }
    }

    /// Applies a checkpoint taken before retention deleted data: an empty
    /// queue continues at the checkpoint's next offset, never lower.
    pub fn advance_to(&mut self, next_offset: i64) {
        self.next_offset = self.next_offset.max(next_offset);
        if self.len == 0 {
            self.start_offset = self.next_offset;
        }
    }

    /// The batches holding `offset` and after, up to `max_bytes` (at least
    /// one batch), that end at or before `visible_pos` in the log.
    pub fn lookup(&self, offset: i64, visible_pos: u64, max_bytes: usize) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in self.entries_from(offset) {
            if e.end_pos() > visible_pos
                || (!out.is_empty() && bytes + e.batch_len as usize > max_bytes)
            {
                break;
            }
            bytes += e.batch_len as usize;
            out.push(e);
        }
        out
    }

    /// Index entries from the batch holding `offset` onwards (the first
    /// whose next offset is past it). A spilled chunk is read back once,
    /// for both the search and the walk.
    pub fn entries_from(&self, offset: i64) -> impl Iterator<Item = IndexEntry> + '_ {
        // Search on the chunks' first offsets, which sit in the deque itself:
        // a chunk's next offset is behind a pointer, and probing those was a
        // cache miss per step (6% of the broker with 10,000 queues). The last
        // chunk starting at or before `offset` holds it unless `offset` is in
        // a gap after it (batches lost to corruption): then the next does.
        let mut c = self.chunks.partition_point(|c| c.base_offset <= offset);
        if c > 0 && self.chunks[c - 1].next_offset() > offset {
            c -= 1;
        }
        let mut it = Iter {
            queue: self,
            c,
            chunk: None,
            entries: Cow::Borrowed(&[]),
            i: 0,
            start: 0,
        };
        let Some(chunk) = self.chunks.get(c) else {
            return it;
        };
        // Unreadable: the walk stays empty rather than skip the chunk.
        if let Some(entries) = self.entries_of(chunk) {
            it.i =
                entries.partition_point(|p| chunk.base_offset + i64::from(p.end_offset) <= offset);
            it.start = start_of(&entries, it.i);
            it.entries = entries;
            it.chunk = Some(chunk);
        }
        it
    }

    /// The next offset whose batch ends at or before `visible_pos`.
    pub fn visible_next_offset(&self, visible_pos: u64) -> i64 {
        if self.len > 0 && self.last_end_pos <= visible_pos {
            return self.last_next_offset;
        }
        for c in self.chunks.iter().rev() {
            if c.last_end_pos() <= visible_pos {
                return c.next_offset();
            }
            // Unreadable: claim nothing of it is visible rather than skip it.
            let Some(entries) = self.entries_of(c) else {
                return c.base_offset;
            };
            let last_visible = (0..entries.len())
                .rev()
                .map(|j| c.get(&entries, j))
                .find(|e| e.end_pos() <= visible_pos);
            if let Some(e) = last_visible {
                return e.next_offset();
            }
        }
        self.chunks
            .front()
            .map_or(self.next_offset, |c| c.base_offset)
    }

    /// Forgets every batch stored before log position `log_start` (deleted segments).
    pub fn truncate_before(&mut self, log_start: u64) {
        while self
            .chunks
            .front()
            .is_some_and(|c| c.last_pos() < log_start)
        {
            let c = self.chunks.pop_front().expect("checked");
            self.len -= c.len();
        }
        if let Some(c) = self.chunks.front_mut() {
            if c.base_pos < log_start {
                // Brought back to drop its dead front, then spilled again
                // unless it is one of the newest.
                if let Some(entries) = c.entries(self.spill.as_deref()).map(Cow::into_owned) {
                    let n = entries.partition_point(|p| c.base_pos + u64::from(p.pos) < log_start);
                    c.entries = Entries::Here(entries);
                    c.drop_front(n);
                    self.len -= n;
                    self.spill_if_old(0);
                }
            }
        }
        self.start_offset = self
            .chunks
            .front()
            .map_or(self.next_offset, |c| c.base_offset);
    }

    /// Log bytes this queue holds at or after `pos`: the chunk holding
    /// `pos` entry by entry (read back if spilled), the later ones whole.
    pub fn bytes_from(&self, pos: u64) -> u64 {
        let c = self.chunks.partition_point(|c| c.last_pos() < pos);
        let Some(chunk) = self.chunks.get(c) else {
            return 0;
        };
        let later: u64 = self.chunks.range(c + 1..).map(|c| c.batch_bytes).sum();
        let first = if chunk.base_pos >= pos {
            chunk.batch_bytes
        } else {
            // Unreadable: count none of it, so retention waits rather than
            // deleting early.
            self.entries_of(chunk).map_or(0, |entries| {
                entries
                    .iter()
                    .filter(|p| chunk.base_pos + u64::from(p.pos) >= pos)
                    .map(|p| u64::from(p.batch_len()))
                    .sum()
            })
        };
        first + later
    }
}

/// Entries in order, each decoded from where its predecessor ended; a
/// spilled chunk is read back when the walk reaches it. Fetches walk up to
/// a MiB of entries per call, so the current chunk and its entries are
/// held, not looked up per entry.
struct Iter<'a> {
    queue: &'a ConsumeQueue,
    /// Index of the current chunk, and the chunk (`None`: the walk ended,
    /// or stopped before an unreadable chunk).
    c: usize,
    chunk: Option<&'a Chunk>,
    entries: Cow<'a, [Packed]>,
    /// Next entry of the chunk, and the offset delta it starts at.
    i: usize,
    start: u32,
}

impl Iter<'_> {
    /// Moves to the next chunk; false at the end or before an unreadable
    /// chunk (the walk stops there, never skips it). Kept out of `next`,
    /// which runs per entry and must stay small enough to inline.
    #[cold]
    #[inline(never)]
    fn next_chunk(&mut self) -> bool {
        self.chunk = None;
        self.c += 1;
        let Some(next) = self.queue.chunks.get(self.c) else {
            return false;
        };
        let Some(entries) = self.queue.entries_of(next) else {
            return false;
        };
        self.entries = entries;
        self.chunk = Some(next);
        self.i = 0;
        self.start = 0;
        true
    }
}

impl Iterator for Iter<'_> {
    type Item = IndexEntry;

    #[inline]
    fn next(&mut self) -> Option<IndexEntry> {
        loop {
            let chunk = self.chunk?;
            if let Some(&p) = self.entries.get(self.i) {
                let e = chunk.decode(p, self.start);
                self.start = p.end_offset;
                self.i += 1;
                return Some(e);
            }
            if !self.next_chunk() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index_spill::SPAN_BYTES;

    fn entry(base: i64, pos: u64, count: u32) -> IndexEntry {
        IndexEntry {
            base_offset: base,
            batch_pos: pos,
            batch_len: 100,
            record_count: count,
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

    #[test]
    fn packing_keeps_length_priority_and_far_positions() {
        let mut q = ConsumeQueue::new(0);
        let far = u64::from(u32::MAX) * 3;
        let entries = [
            IndexEntry {
                base_offset: 0,
                batch_pos: 0,
                batch_len: BATCH_LEN_MAX_BYTES,
                record_count: 1,
                priority: 3,
            },
            // Beyond a 32-bit position delta: a new chunk.
            IndexEntry {
                base_offset: 1,
                batch_pos: far,
                batch_len: 1,
                record_count: u32::MAX,
                priority: 2,
            },
            // Beyond a 32-bit offset delta: a new chunk.
            IndexEntry {
                base_offset: 1 + i64::from(u32::MAX),
                batch_pos: far + 10,
                batch_len: 7,
                record_count: 2,
                priority: 0,
            },
        ];
        for e in entries {
            q.push(e);
        }
        assert_eq!(q.entries_from(0).collect::<Vec<_>>(), entries);
        assert_eq!(q.len(), 3);
        assert_eq!(q.entries_from(u32::MAX.into()).next(), Some(entries[1]));
        assert_eq!(q.next_offset(), 3 + i64::from(u32::MAX));
    }

    #[test]
    fn a_corruption_gap_keeps_offsets_exact() {
        let mut q = ConsumeQueue::new(0);
        q.push(entry(0, 0, 2));
        // Offsets 2..5 were lost with a damaged segment.
        q.push(entry(5, 1000, 1));
        q.push(entry(6, 1200, 1));
        let got: Vec<_> = q.entries_from(0).map(|e| e.base_offset).collect();
        assert_eq!(got, [0, 5, 6]);
        // An offset inside the gap finds the first batch after it.
        assert_eq!(q.entries_from(3).next().map(|e| e.base_offset), Some(5));
        assert_eq!(q.entries_from(1).next().map(|e| e.record_count), Some(2));
    }

    /// A tiny deterministic generator: the same "random" queue every run.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    /// The packed index answers exactly as a plain list of entries does,
    /// across chunk boundaries, gaps, far positions and truncations.
    #[test]
    fn agrees_with_a_plain_list() {
        check_against_a_plain_list(ConsumeQueue::new(0), None);
    }

    #[test]
    fn agrees_with_a_plain_list_when_spilling() {
        let dir = tempfile::tempdir().unwrap();
        let spill = IndexSpill::open(&dir.path().join("spill")).unwrap();
        let q = ConsumeQueue::spilling(0, spill.clone());
        check_against_a_plain_list(q, Some(&spill));
        assert!(spill.disk_bytes() > 0, "nothing was spilled");
    }

    /// With a spill, its files are also deleted as retention would.
    fn check_against_a_plain_list(mut q: ConsumeQueue, spill: Option<&IndexSpill>) {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut model: Vec<IndexEntry> = Vec::new();
        let (mut offset, mut pos) = (0i64, 0u64);
        for round in 0..2000 {
            if rng.next(50) == 0 {
                offset += 1 + rng.next(5) as i64; // a corruption gap
            }
            if rng.next(100) == 0 {
                pos += u64::from(u32::MAX); // another queue wrote 4 GiB
            }
            let e = IndexEntry {
                base_offset: offset,
                batch_pos: pos,
                batch_len: 1 + rng.next(3000) as u32,
                record_count: 1 + rng.next(4) as u32,
                priority: rng.next(4) as u8,
            };
            q.push(e);
            model.push(e);
            offset = e.next_offset();
            pos = e.end_pos() + rng.next(20_000);
            if round % 300 == 299 {
                let cut = model[rng.next(model.len() as u64) as usize].batch_pos + 1;
                q.truncate_before(cut);
                model.retain(|e| e.batch_pos >= cut);
                if let Some(s) = spill {
                    s.forget_before(cut);
                }
            }
            if round % 37 != 0 {
                continue;
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(
                q.start_offset(),
                model.first().map_or(offset, |e| e.base_offset)
            );
            assert_eq!(q.entries_from(i64::MIN).collect::<Vec<_>>(), model);
            for _ in 0..20 {
                let at = q.start_offset() + rng.next((offset - q.start_offset() + 2) as u64) as i64;
                let want = model.iter().find(|e| e.next_offset() > at).copied();
                assert_eq!(q.entries_from(at).next(), want, "offset {at}");
                let visible = rng.next(pos + 1);
                let want = model
                    .iter()
                    .rev()
                    .find(|e| e.end_pos() <= visible)
                    .map_or(model.first().map_or(offset, |e| e.base_offset), |e| {
                        e.next_offset()
                    });
                assert_eq!(q.visible_next_offset(visible), want);
                let from = rng.next(pos + 1);
                let want: u64 = model
                    .iter()
                    .filter(|e| e.batch_pos >= from)
                    .map(|e| u64::from(e.batch_len))
                    .sum();
                assert_eq!(q.bytes_from(from), want);
            }
        }
    }

    #[test]
    fn a_spilling_queue_keeps_only_its_newest_chunks_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spill = IndexSpill::open(&dir.path().join("spill")).unwrap();
        let mut q = ConsumeQueue::spilling(0, spill.clone());
        let n = 100_000u64;
        // 1 KiB batches interleaved with other queues': spans are crossed.
        let pos = |i: u64| i * 100 * 1100;
        for i in 0..n {
            q.push(entry(i as i64, pos(i), 1));
        }
        let per_batch = q.heap_bytes() as f64 / n as f64;
        assert!(per_batch < 1.0, "{per_batch} bytes per batch in memory");
        assert!(spill.disk_bytes() >= (n as usize - CHUNKS_IN_MEMORY * CHUNK_ENTRIES) as u64 * 12);
        // Old and new entries read the same.
        for at in [0, 1, 127, 128, 50_000, 99_871, 99_999] {
            let e = q.entries_from(at).next().unwrap();
            assert_eq!((e.base_offset, e.batch_pos), (at, pos(at as u64)));
        }
        assert_eq!(q.entries_from(0).count(), n as usize);
        // Retention: whole spans before the new start go, the rest reads on.
        let spans = spill.spans_held();
        let cut = pos(60_000) + 1;
        q.truncate_before(cut);
        assert!(spill.forget_before(cut) > 0);
        assert!(spill.spans_held() < spans);
        assert_eq!(q.start_offset(), 60_001);
        assert_eq!(q.entries_from(0).count(), (n - 60_001) as usize);
        assert_eq!(
            q.entries_from(80_000).next().unwrap().batch_pos,
            pos(80_000)
        );
        // Retention by size asks for the bytes after a position: the chunk
        // holding it is read back, the later ones are summed unread.
        let reads = spill.reads();
        assert_eq!(q.bytes_from(pos(70_000) + 1), 29_999 * 100);
        assert_eq!(q.bytes_from(pos(70_016)), 29_984 * 100);
        assert!(
            spill.reads() - reads <= 2,
            "{} chunk reads",
            spill.reads() - reads
        );
    }

    #[test]
    fn an_unreadable_spilled_chunk_stops_reads_instead_of_skipping() {
        let dir = tempfile::tempdir().unwrap();
        let spill = IndexSpill::open(&dir.path().join("spill")).unwrap();
        let mut q = ConsumeQueue::spilling(0, spill.clone());
        // Offsets 0..128 go to span 0; everything after to span 1.
        for i in 0..1000u64 {
            let pos = if i < 128 {
                i * 100
            } else {
                SPAN_BYTES + i * 100
            };
            q.push(entry(i as i64, pos, 1));
        }
        // The spill loses span 0 while the queue still indexes it.
        spill.forget_before(SPAN_BYTES);
        assert_eq!(q.entries_from(0).next(), None);
        assert!(q.lookup(5, u64::MAX, 1 << 20).is_empty());
        assert_eq!(q.entries_from(128).next().map(|e| e.base_offset), Some(128));
    }

    /// What the index costs per stored batch, slack included: the 10,000-
    /// topic run stores millions of one- or two-message batches.
    #[test]
    fn memory_per_batch_stays_compact() {
        let mut q = ConsumeQueue::new(0);
        let n = 100_000u64;
        for i in 0..n {
            // Interleaved with 10,000 other queues' 1 KiB batches.
            q.push(entry(i as i64, i * 10_000 * 1100, 1));
        }
        let per_batch = q.heap_bytes() as f64 / n as f64;
        assert!(per_batch <= 13.0, "{per_batch} bytes per batch");

        // Many small queues: one half-filled chunk at most each.
        let queues: Vec<ConsumeQueue> = (0..1000)
            .map(|_| {
                let mut q = ConsumeQueue::new(0);
                for i in 0..300u64 {
                    q.push(entry(i as i64, i * 1100, 1));
                }
                q
            })
            .collect();
        let bytes: usize = queues.iter().map(ConsumeQueue::heap_bytes).sum();
        let per_batch = bytes as f64 / (1000.0 * 300.0);
        assert!(per_batch <= 16.0, "{per_batch} bytes per batch");
    }
}
