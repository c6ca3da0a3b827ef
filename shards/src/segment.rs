//! One segment file of a shard's commit log, and the entry format inside it.
//!
//! A segment is named by the log position of its first byte
//! (`00000000000000001234.log`) and holds log entries back to back:
//!
//! ```text
//! entry = batch_len u32 | topic_id u32 | queue u32 | flags u16 | version u8 | reserved u8
//!       | deliver_at_ms i64 | origin_pos u64 | header_crc u32 | batch
//! ```
//! (big-endian; `batch` is one Kafka RecordBatch v2). `flags`: bits 0-1 the
//! batch's priority, bit 2 DELAYED (waits on the shard's time wheel until
//! `deliver_at_ms`, not yet in its queue), bit 3 FROM_DELAY (a delayed batch
//! re-appended to its queue when due; `origin_pos` is the DELAYED entry).
//! The batch carries its own CRC-32C over everything after its CRC field;
//! `header_crc` (CRC-32) covers this header's first 32 bytes and the
//! batch's first 21 bytes, the ones the batch CRC leaves out (base offset,
//! length, leader epoch, magic, CRC). So every stored byte is under a
//! checksum. Files are written with
//! O_DIRECT in 4 KiB blocks, so a file ends in zero padding; a zero
//! `batch_len` marks the end of the entries.
//!
//! Reads go through a read-only `memmap2` map of the whole file, handed out
//! as `Bytes` slices that keep the map alive: no copy into a per-request
//! buffer (read-ahead for readers behind the tail cache: `read_ahead`; the
//! way from a slice back to its file, for `sendfile`: `file_map`).

use crate::batch;
use crate::file_map;
use crate::read_ahead::Window;
use crate::QueueKey;
use bytes::Bytes;
use std::path::{Path, PathBuf};

/// Bytes of a log entry header.
pub const ENTRY_HEADER_BYTES: usize = 36;
/// Entry header format version.
pub const ENTRY_VERSION: u8 = 1;
/// Highest priority level (levels are 0..=PRIORITY_MAX, 0 the lowest).
pub const PRIORITY_MAX: u8 = 3;
const FLAG_PRIORITY_MASK: u16 = 0b11;
const FLAG_DELAYED: u16 = 1 << 2;
const FLAG_FROM_DELAY: u16 = 1 << 3;
/// Every flag this version knows; an entry with another is refused, not misread.
const FLAGS_KNOWN: u16 = FLAG_PRIORITY_MASK | FLAG_DELAYED | FLAG_FROM_DELAY;
/// Bytes of the header covered by `header_crc`.
const HEADER_CRC_COVERS: usize = 32;

/// What an entry is, beyond its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// An ordinary batch of its queue.
    #[default]
    Normal,
    /// Waits on the time wheel; joins its queue at `deliver_at_ms`.
    Delayed { deliver_at_ms: i64 },
    /// A delayed batch that came due and joined its queue; `origin_pos` is
    /// the log position of the DELAYED entry (its header start).
    FromDelay { origin_pos: u64 },
}

/// The header fields besides length and queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryMeta {
    pub priority: u8,
    pub kind: EntryKind,
}
/// O_DIRECT write granularity, in bytes.
pub const BLOCK_BYTES: u64 = 4096;
/// Bytes of the batch start that `header_crc` covers (those outside the batch CRC).
const BATCH_PREFIX_BYTES: usize = 21;

pub fn align_down(v: u64) -> u64 {
    v & !(BLOCK_BYTES - 1)
}
pub fn align_up(v: u64) -> u64 {
    align_down(v + BLOCK_BYTES - 1)
}

/// File name of the segment starting at log position `base`.
pub fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The base position a segment file name encodes.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Builds the header of an entry holding `batch` for `key`.
pub fn entry_header(key: QueueKey, meta: EntryMeta, batch: &[u8]) -> [u8; ENTRY_HEADER_BYTES] {
    debug_assert!(meta.priority <= PRIORITY_MAX);
    let mut h = [0u8; ENTRY_HEADER_BYTES];
    h[0..4].copy_from_slice(&(batch.len() as u32).to_be_bytes());
    h[4..8].copy_from_slice(&key.topic_id.to_be_bytes());
    h[8..12].copy_from_slice(&key.queue.to_be_bytes());
    let mut flags = u16::from(meta.priority) & FLAG_PRIORITY_MASK;
    let (deliver_at, origin) = match meta.kind {
        EntryKind::Normal => (0i64, 0u64),
        EntryKind::Delayed { deliver_at_ms } => {
            flags |= FLAG_DELAYED;
            (deliver_at_ms, 0)
        }
        EntryKind::FromDelay { origin_pos } => {
            flags |= FLAG_FROM_DELAY;
            (0, origin_pos)
        }
    };
    h[12..14].copy_from_slice(&flags.to_be_bytes());
    h[14] = ENTRY_VERSION;
    h[16..24].copy_from_slice(&deliver_at.to_be_bytes());
    h[24..32].copy_from_slice(&origin.to_be_bytes());
    let crc = header_crc(&h[..HEADER_CRC_COVERS], batch);
    h[32..36].copy_from_slice(&crc.to_be_bytes());
    h
}

fn parse_meta(h: &[u8]) -> Result<EntryMeta, String> {
    let flags = u16::from_be_bytes([h[12], h[13]]);
    if h[14] != ENTRY_VERSION {
        return Err(format!("unknown entry version {}", h[14]));
    }
    if flags & !FLAGS_KNOWN != 0 {
        return Err(format!("unknown entry flags {flags:#06x}"));
    }
    let deliver_at_ms = i64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
    let origin_pos = u64::from_be_bytes(h[24..32].try_into().expect("8 bytes"));
    let kind = match (flags & FLAG_DELAYED != 0, flags & FLAG_FROM_DELAY != 0) {
        (false, false) => EntryKind::Normal,
        (true, false) => EntryKind::Delayed { deliver_at_ms },
        (false, true) => EntryKind::FromDelay { origin_pos },
        (true, true) => return Err("entry both delayed and re-appended".into()),
    };
    Ok(EntryMeta {
        priority: (flags & FLAG_PRIORITY_MASK) as u8,
        kind,
    })
}

fn header_crc(head: &[u8], batch: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(head);
    c.update(&batch[..BATCH_PREFIX_BYTES.min(batch.len())]);
    c.finalize()
}

/// A valid entry found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedEntry {
    pub key: QueueKey,
    pub meta: EntryMeta,
    /// Position of the entry header relative to the segment start.
    pub entry_rel: u64,
    /// Position of the batch relative to the segment start.
    pub batch_rel: u64,
    pub header: batch::BatchHeader,
}

/// What a scan found wrong, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Relative position of the first bad byte.
    pub at: u64,
    /// Non-padding bytes from `at` to the end of the file.
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<ScannedEntry>,
    /// Relative end of the last valid entry.
    pub valid_end: u64,
    pub damage: Option<Damage>,
}

/// Walks the entries of a segment's bytes, checking every checksum, and
/// stops at the end marker or the first damaged entry. `batch_bytes_max`
/// bounds a plausible entry.
pub fn scan(data: &[u8], batch_bytes_max: usize) -> Scan {
    let mut out = Scan::default();
    let mut at = 0usize;
    let reason = loop {
        if at + ENTRY_HEADER_BYTES > data.len() {
            if data[at..].iter().all(|&b| b == 0) {
                break None;
            }
            break Some("truncated entry header".to_string());
        }
        let h = &data[at..at + ENTRY_HEADER_BYTES];
        let len = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            if data[at..].iter().all(|&b| b == 0) {
                break None;
            }
            break Some("non-zero bytes after the end marker".to_string());
        }
        if len > batch_bytes_max {
            break Some(format!("entry length {len} over the limit"));
        }
        let start = at + ENTRY_HEADER_BYTES;
        if start + len > data.len() {
            break Some(format!(
                "entry of {len} bytes cut off by the end of the file"
            ));
        }
        let body = &data[start..start + len];
        let stored = u32::from_be_bytes(h[32..36].try_into().expect("4 bytes"));
        if header_crc(&h[..HEADER_CRC_COVERS], body) != stored {
            break Some("entry header checksum mismatch".to_string());
        }
        let meta = match parse_meta(h) {
            Ok(m) => m,
            Err(e) => break Some(e),
        };
        let header = match batch::validate(body) {
            Ok(hd) if hd.total_bytes() == len => hd,
            Ok(_) => break Some("batch length disagrees with entry length".to_string()),
            Err(e) => break Some(format!("batch: {e}")),
        };
        out.entries.push(ScannedEntry {
            key: QueueKey {
                topic_id: u32::from_be_bytes(h[4..8].try_into().expect("4 bytes")),
                queue: u32::from_be_bytes(h[8..12].try_into().expect("4 bytes")),
            },
            meta,
            entry_rel: at as u64,
            batch_rel: start as u64,
            header,
        });
        at = start + len;
    };
    out.valid_end = at as u64;
    if let Some(reason) = reason {
        let bytes = data[at..]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p + 1) as u64;
        out.damage = Some(Damage {
            at: at as u64,
            bytes,
            reason,
        });
    }
    out
}

/// End of the last byte range of `file` that holds data, at most `size`.
/// Space reserved but never written (an unwritten extent, a hole) reads as
/// zeros and is skipped, so recovery need not read a mostly empty, fully
/// reserved active segment to know its tail is clean. A file system that
/// cannot tell reports all of `size` as data: then every byte is read.
pub fn written_end(file: &std::fs::File, size: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // `None`: no data at or after `pos` (ENXIO).
    let seek = |pos: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor touches no memory of ours.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut end = 0;
    while end < size {
        let data = match seek(end, libc::SEEK_DATA) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            // No SEEK_DATA here: treat the whole file as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(size),
            Err(e) => return Err(e),
        };
        match seek(data, libc::SEEK_HOLE)? {
            Some(hole) if hole > data => end = hole,
            _ => return Ok(size),
        }
    }
    Ok(end.min(size))
}

/// A segment file as the log keeps it.
pub struct Segment {
    pub base: u64,
    pub path: PathBuf,
    /// Read-only view of the whole file (and the space it may grow into).
    pub map: Bytes,
    /// Where its reader's read-ahead stands.
    pub read_ahead: Window,
}

impl Segment {
    /// Maps `path` read-only, `len` bytes (may exceed the file size for the
    /// active segment: only bytes already written are ever read).
    pub fn map(base: u64, path: &Path, len: u64) -> std::io::Result<Segment> {
        let len = len.max(BLOCK_BYTES) as usize;
        Ok(Segment {
            base,
            path: path.to_path_buf(),
            map: file_map::map(path, len)?,
            read_ahead: Window::default(),
        })
    }

    /// Unmaps the pages a scan touched (they stay in the page cache): a
    /// recovery reads every segment, and left mapped, its pages counted in
    /// the broker's RSS (6.7 GB after a restart over 6 GB of log).
    pub fn release_pages(&self) {
        // SAFETY: the range is this live, read-only mapping; DONTNEED only
        // drops its page-table entries, and the next read faults them in.
        unsafe {
            libc::madvise(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                libc::MADV_DONTNEED,
            );
        }
    }

    /// The stored bytes at relative position `rel`, without copying.
    pub fn slice(&self, rel: u64, len: usize) -> Option<Bytes> {
        let start = usize::try_from(rel).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.map.len()).then(|| self.map.slice(start..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, Compression};

    fn entry(key: QueueKey, n: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..n {
            b.push(i as i64, None, Some(format!("v{i}").as_bytes()), &[]);
        }
        let batch = b.build();
        let mut out = entry_header(key, EntryMeta::default(), &batch).to_vec();
        out.extend_from_slice(&batch);
        out
    }

    const K: QueueKey = QueueKey {
        topic_id: 3,
        queue: 1,
    };

    #[test]
    fn scan_finds_entries_and_a_clean_end() {
        let mut data = entry(K, 2);
        data.extend(entry(K, 3));
        let used = data.len();
        data.resize(align_up(used as u64) as usize, 0);
        let s = scan(&data, 1 << 20);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.entries[1].header.records_count, 3);
        assert_eq!(s.entries[0].key, K);
        assert_eq!(s.valid_end, used as u64);
        assert_eq!(s.damage, None);
    }

    #[test]
    fn every_flipped_byte_is_damage_never_a_panic() {
        let mut good = entry(K, 2);
        let first_len = good.len();
        good.extend(entry(K, 1));
        good.resize(align_up(good.len() as u64) as usize, 0);
        for i in first_len..first_len + 60 {
            let mut data = good.clone();
            data[i] ^= 0x5a;
            let s = scan(&data, 1 << 20);
            assert_eq!(s.entries.len(), 1, "flip at {i}");
            assert_eq!(s.valid_end, first_len as u64);
            assert!(s.damage.is_some(), "flip at {i}");
        }
    }

    #[test]
    fn truncated_tails_are_damage() {
        let mut data = entry(K, 2);
        let first = data.len();
        data.extend(entry(K, 4));
        for cut in first + 1..data.len() {
            let s = scan(&data[..cut], 1 << 20);
            assert_eq!(s.entries.len(), 1);
            assert_eq!(s.valid_end, first as u64);
            // A tail of zeros is padding; anything else is reported.
            let zeros = data[first..cut].iter().all(|&b| b == 0);
            assert_eq!(s.damage.is_none(), zeros, "cut at {cut}");
        }
    }

    #[test]
    fn entry_meta_round_trips() {
        for meta in [
            EntryMeta::default(),
            EntryMeta {
                priority: 3,
                kind: EntryKind::Delayed {
                    deliver_at_ms: 1_700_000_000_123,
                },
            },
            EntryMeta {
                priority: 1,
                kind: EntryKind::FromDelay {
                    origin_pos: 987_654,
                },
            },
        ] {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(0, None, Some(b"v"), &[]);
            let batch = b.build();
            let mut data = entry_header(K, meta, &batch).to_vec();
            data.extend_from_slice(&batch);
            let s = scan(&data, 1 << 20);
            assert_eq!(s.damage, None);
            assert_eq!(s.entries[0].meta, meta);
        }
    }

    /// Everything past `written_end` reads as zeros, and data is never
    /// left out, wherever it sits in a file with unwritten space.
    #[test]
    fn written_end_skips_only_space_never_written() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let size = 8u64 << 20;
        let check = |name: &str, reserve: bool, writes: &[u64]| -> u64 {
            let path = dir.path().join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(size).unwrap();
            if reserve {
                // SAFETY: fallocate on an open descriptor.
                unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
            }
            for &at in writes {
                f.write_all_at(&[0xab; 100], at).unwrap();
            }
            let end = written_end(&f, size).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let last = bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |p| p as u64 + 1);
            assert!(
                end >= last && end <= size,
                "{name}: end {end}, data to {last}"
            );
            end
        };
        assert_eq!(check("empty", false, &[]), 0);
        assert!(check("head", false, &[0]) < size, "a hole is skipped");
        check("reserved-head", true, &[0]);
        check("two-runs", true, &[0, 5 << 20]);
        assert_eq!(check("at-the-end", true, &[size - 100]), size);
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(1234)), Some(1234));
        assert_eq!(parse_file_name("x.log"), None);
        assert_eq!(parse_file_name("+0000000000000000001.log"), None);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_down(4097), 4096);
    }
}
