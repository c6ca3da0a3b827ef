//! The two metadata files and how they are read back.
//!
//! - `metadata.bin`: a snapshot (version, CRC-32, rkyv archive), replaced
//!   atomically (write a temp file, sync, rename, sync the directory).
//! - `metadata.journal`: the changes since that snapshot. A header names the
//!   snapshot generation it follows; then one CRC-framed frame per group
//!   commit, each holding that commit's changes, appended and `fdatasync`ed
//!   before any of them is acknowledged.
//!
//! Only the last frame can be cut short by a crash: the writer syncs each
//! frame before it writes the next. So a damaged last frame is a torn tail,
//! dropped with a warning; damage anywhere before it is corruption.

use super::{JournalOp, Metadata, MetadataError, TopicMeta};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `metadata.bin` as written before the journal: no generation, a `BTreeMap`.
/// Still read (as generation 0), never written.
const SNAPSHOT_VERSION_V1: u32 = 1;
/// `metadata.bin` with a generation. Bumped with the journal's arrival so
/// that an older binary refuses to start instead of ignoring the journal.
const SNAPSHOT_VERSION: u32 = 2;
/// Bytes of version + CRC in front of the snapshot archive.
const SNAPSHOT_HEADER_BYTES: usize = 8;

const JOURNAL_MAGIC: &[u8; 4] = b"CMQJ";
const JOURNAL_VERSION: u32 = 1;
/// Magic, version, generation, CRC.
pub(super) const JOURNAL_HEADER_BYTES: usize = 20;
/// Body length, CRC-32 of the length, CRC-32 of the body.
pub(super) const FRAME_HEADER_BYTES: usize = 12;
/// Largest frame body a reader accepts. A frame holds at most
/// `JOURNAL_BATCH_CHANGES_MAX` (256) changes of at most about 17 KiB each
/// (4,096 queues' placement plus a name), so about 4.3 MiB.
const JOURNAL_FRAME_BYTES_MAX: usize = 16 << 20;

/// The archived layout of `metadata.bin` version 1 (the old `Metadata`).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SnapshotV1 {
    topics: BTreeMap<String, TopicMeta>,
    next_topic_id: u32,
}

/// The archived layout of `metadata.bin` version 2.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SnapshotV2 {
    /// Which journal continues this snapshot (the journal's header says).
    generation: u64,
    next_topic_id: u32,
    /// By name.
    topics: Vec<TopicMeta>,
}

/// Paths of the metadata files in a data directory.
pub(super) struct Paths {
    pub snapshot: PathBuf,
    pub journal: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            snapshot: dir.join("metadata.bin"),
            journal: dir.join("metadata.journal"),
        }
    }
}

/// What `load` found.
pub(super) struct Loaded {
    pub meta: Metadata,
    /// The snapshot's generation (0 for none, or version 1).
    pub generation: u64,
    pub recovery: super::Recovery,
}

/// Reads the snapshot, then replays the journal over it.
pub(super) fn load(paths: &Paths) -> Result<Loaded, MetadataError> {
    let corrupt = |path: &Path, reason: String| MetadataError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let (mut meta, generation) = match read(&paths.snapshot)? {
        None => (Metadata::default(), 0),
        Some(data) => decode_snapshot(&data).map_err(|r| corrupt(&paths.snapshot, r))?,
    };
    let mut recovery = super::Recovery::default();
    let Some(data) = read(&paths.journal)? else {
        return Ok(Loaded {
            meta,
            generation,
            recovery,
        });
    };
    let journal_generation =
        decode_journal_header(&data).map_err(|r| corrupt(&paths.journal, r))?;
    if journal_generation < generation {
        // The node stopped between writing a snapshot and replacing the
        // journal: the snapshot already holds every change in it.
        tracing::info!(
            journal = %paths.journal.display(),
            journal_generation,
            snapshot_generation = generation,
            "ignoring a metadata journal older than the snapshot"
        );
        recovery.stale_journal = true;
        return Ok(Loaded {
            meta,
            generation,
            recovery,
        });
    }
    if journal_generation > generation {
        return Err(corrupt(
            &paths.journal,
            format!(
                "continues snapshot generation {journal_generation}, but {} is generation {generation}: the snapshot was replaced or lost",
                paths.snapshot.display()
            ),
        ));
    }
    let mut pos = JOURNAL_HEADER_BYTES;
    while pos < data.len() {
        match frame_at(&data, pos) {
            Frame::Whole { body, end } => {
                let ops = decode_ops(body)
                    .map_err(|r| corrupt(&paths.journal, format!("frame at byte {pos}: {r}")))?;
                for op in &ops {
                    meta.apply(op).map_err(|r| {
                        corrupt(&paths.journal, format!("frame at byte {pos}: {r}"))
                    })?;
                }
                recovery.journal_changes += ops.len();
                pos = end;
            }
            Frame::Torn(reason) => {
                tracing::warn!(
                    journal = %paths.journal.display(),
                    position = pos,
                    bytes = data.len() - pos,
                    %reason,
                    "dropping a torn metadata journal tail (a change that was never acknowledged)"
                );
                recovery.dropped_tail = Some(DroppedTail {
                    at: pos as u64,
                    bytes: (data.len() - pos) as u64,
                    reason,
                });
                break;
            }
            Frame::Corrupt(reason) => {
                return Err(corrupt(
                    &paths.journal,
                    format!("frame at byte {pos}: {reason}"),
                ));
            }
        }
    }
    Ok(Loaded {
        meta,
        generation,
        recovery,
    })
}

/// A damaged last journal frame dropped at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedTail {
    /// Byte position of the frame in the journal.
    pub at: u64,
    /// Bytes from there to the end of the file.
    pub bytes: u64,
    pub reason: String,
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, MetadataError> {
    match std::fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(MetadataError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(super) fn encode_snapshot(meta: &Metadata, generation: u64) -> Vec<u8> {
    let snapshot = SnapshotV2 {
        generation,
        next_topic_id: meta.next_topic_id,
        topics: meta.topics().cloned().collect(),
    };
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(&snapshot)
        .expect("serialising into memory cannot fail");
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len());
    out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The snapshot's metadata and generation.
pub(super) fn decode_snapshot(data: &[u8]) -> Result<(Metadata, u64), String> {
    if data.len() < SNAPSHOT_HEADER_BYTES {
        return Err("shorter than its header".into());
    }
    let version = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_V1 {
        return Err(format!("unknown version {version}"));
    }
    let crc = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
    let body = &data[SNAPSHOT_HEADER_BYTES..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    if version == SNAPSHOT_VERSION_V1 {
        let s = rkyv::from_bytes::<SnapshotV1, rkyv::rancor::Error>(&aligned)
            .map_err(|e| e.to_string())?;
        let meta = Metadata::from_topics(s.topics.into_values(), s.next_topic_id)?;
        return Ok((meta, 0));
    }
    let s =
        rkyv::from_bytes::<SnapshotV2, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())?;
    Ok((
        Metadata::from_topics(s.topics, s.next_topic_id)?,
        s.generation,
    ))
}

pub(super) fn encode_journal_header(generation: u64) -> [u8; JOURNAL_HEADER_BYTES] {
    let mut out = [0u8; JOURNAL_HEADER_BYTES];
    out[0..4].copy_from_slice(JOURNAL_MAGIC);
    out[4..8].copy_from_slice(&JOURNAL_VERSION.to_be_bytes());
    out[8..16].copy_from_slice(&generation.to_be_bytes());
    let crc = crc32fast::hash(&out[0..16]);
    out[16..20].copy_from_slice(&crc.to_be_bytes());
    out
}

/// The generation the journal continues. The header is written before the
/// journal is renamed into place, so any damage here is corruption.
fn decode_journal_header(data: &[u8]) -> Result<u64, String> {
    if data.len() < JOURNAL_HEADER_BYTES {
        return Err("shorter than its header".into());
    }
    if &data[0..4] != JOURNAL_MAGIC {
        return Err("not a metadata journal (bad magic)".into());
    }
    let crc = u32::from_be_bytes(data[16..20].try_into().expect("4 bytes"));
    if crc32fast::hash(&data[0..16]) != crc {
        return Err("header checksum mismatch".into());
    }
    let version = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
    if version != JOURNAL_VERSION {
        return Err(format!("unknown version {version}"));
    }
    Ok(u64::from_be_bytes(data[8..16].try_into().expect("8 bytes")))
}

/// One frame: the changes of one group commit.
pub(super) fn encode_frame(ops: &[JournalOp]) -> Vec<u8> {
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(&ops.to_vec())
        .expect("serialising into memory cannot fail");
    let len = (body.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32fast::hash(&len).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_ops(body: &[u8]) -> Result<Vec<JournalOp>, String> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<Vec<JournalOp>, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
}

enum Frame<'a> {
    Whole {
        body: &'a [u8],
        end: usize,
    },
    /// The last frame, cut short or never fully written: dropped.
    Torn(String),
    /// Damage that a crash during an append cannot explain.
    Corrupt(String),
}

/// Reads the frame at `pos`. The length has its own CRC, so a damaged
/// length is never trusted to say where the next frame starts.
fn frame_at(data: &[u8], pos: usize) -> Frame<'_> {
    let rest = &data[pos..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Frame::Torn(format!("{} bytes, shorter than a frame header", rest.len()));
    }
    let u32_at = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
    let (len, len_crc, body_crc) = (u32_at(0), u32_at(4), u32_at(8));
    if crc32fast::hash(&rest[0..4]) != len_crc {
        // Blocks of an append that never reached the disk read as zeros.
        return if rest.iter().all(|&b| b == 0) {
            Frame::Torn("zeros where a frame should be".into())
        } else {
            Frame::Corrupt("length checksum mismatch".into())
        };
    }
    let len = len as usize;
    if len == 0 || len > JOURNAL_FRAME_BYTES_MAX {
        return Frame::Corrupt(format!(
            "frame length {len} is outside 1..={JOURNAL_FRAME_BYTES_MAX}"
        ));
    }
    let end = pos + FRAME_HEADER_BYTES + len;
    if end > data.len() {
        return Frame::Torn(format!(
            "frame of {len} bytes, but only {} follow its header",
            rest.len() - FRAME_HEADER_BYTES
        ));
    }
    let body = &data[pos + FRAME_HEADER_BYTES..end];
    if crc32fast::hash(body) != body_crc {
        return if end == data.len() {
            Frame::Torn("checksum mismatch in the last frame".into())
        } else {
            Frame::Corrupt("checksum mismatch".into())
        };
    }
    Frame::Whole { body, end }
}

/// Replaces `path` with `data`: temp file, sync, rename, sync the directory.
pub(super) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Puts an empty journal for `generation` in place, atomically, and returns
/// it open for appending.
pub(super) fn create_journal(path: &Path, generation: u64) -> std::io::Result<File> {
    let tmp = path.with_extension("journal.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&encode_journal_header(generation))?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)?;
    // The handle follows the rename; its cursor is after the header.
    Ok(f)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
