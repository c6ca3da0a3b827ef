//! Sealed consume-queue index chunks, kept in files instead of memory.
//!
//! A queue's index grows 12 bytes per stored batch. With 10,000 topics a
//! batch holds one or two messages, so a minute at full speed is ~20
//! million entries (240 MiB of heap), and a broker that runs for days would
//! hold its whole log's index. Lookups almost always want the newest
//! entries (consumers read at the tail), so each queue keeps its newest
//! `consume_queue::CHUNKS_IN_MEMORY` chunks in memory and writes the older
//! ones here: a spilled chunk costs a few dozen bytes of memory per 128
//! batches, and reading one back (a catch-up read) is one `pread` of 1.5
//! KiB, from the page cache as a rule. RocketMQ keeps its ConsumeQueue in
//! files for the same reason.
//!
//! The files are a cache, not a persisted index: the index is still rebuilt
//! from the log at start-up, and `open` deletes what an earlier run left.
//! A chunk goes to the file of the log span (`SPAN_BYTES`) holding its last
//! entry, so span k's file only refers to log bytes before (k + 1) ×
//! `SPAN_BYTES` and is deleted whole once retention moves the log start
//! past that.
//!
//! Shared by the queues of one shard; the files are only appended to
//! (`pwrite` at a reserved offset) and read (`pread`), so a lock guards
//! just the map of open files.

use crate::file_reaper;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Log bytes whose chunks share one file: retention frees spilled chunks a
/// span at a time, so this bounds how long dead chunks stay on disk.
pub const SPAN_BYTES: u64 = 1 << 30;

/// Where a spilled chunk is: its span's file and the byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpillRef {
    span: u64,
    at: u64,
}

struct SpanFile {
    file: File,
    /// Bytes reserved so far: the next chunk goes here.
    len: AtomicU64,
}

pub struct IndexSpill {
    dir: PathBuf,
    spans: Mutex<BTreeMap<u64, Arc<SpanFile>>>,
    /// A failed write is logged once; chunks then stay in memory.
    warned: AtomicBool,
    /// Chunks read back.
    reads: AtomicU64,
}

impl std::fmt::Debug for IndexSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexSpill")
            .field("dir", &self.dir)
            .finish()
    }
}

impl IndexSpill {
    /// The spill directory `dir`, emptied of an earlier run's files.
    pub fn open(dir: &Path) -> io::Result<Arc<IndexSpill>> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(dir)?;
        Ok(Arc::new(IndexSpill {
            dir: dir.to_path_buf(),
            spans: Mutex::new(BTreeMap::new()),
            warned: AtomicBool::new(false),
            reads: AtomicU64::new(0),
        }))
    }

    fn spans(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<SpanFile>>> {
        // The map stays consistent whatever a panicking holder did.
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, span: u64) -> PathBuf {
        self.dir.join(format!("{span:08}.spill"))
    }

    /// Stores `bytes`, a chunk whose last entry is at log position
    /// `last_pos`. `None` when the write failed: the caller keeps the
    /// chunk in memory (logged once per spill, not per chunk).
    pub(crate) fn write(&self, last_pos: u64, bytes: &[u8]) -> Option<SpillRef> {
        let span = last_pos / SPAN_BYTES;
        let written = self.span_file(span).and_then(|f| {
            let at = f.len.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            f.file
                .write_all_at(bytes, at)
                .map(|_| SpillRef { span, at })
        });
        match written {
            Ok(r) => Some(r),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, dir = %self.dir.display(),
                        "cannot spill consume-queue index chunks; they stay in memory");
                }
                None
            }
        }
    }

    fn span_file(&self, span: u64) -> io::Result<Arc<SpanFile>> {
        let mut spans = self.spans();
        if let Some(f) = spans.get(&span) {
            return Ok(f.clone());
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path(span))?;
        let f = Arc::new(SpanFile {
            file,
            len: AtomicU64::new(0),
        });
        spans.insert(span, f.clone());
        Ok(f)
    }

    /// Fills `out` with the chunk stored at `r`.
    pub(crate) fn read(&self, r: SpillRef, out: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let file = self.spans().get(&r.span).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("spill span {} was deleted", r.span),
            )
        })?;
        file.file.read_exact_at(out, r.at)
    }

    /// Deletes the files of spans wholly before log position `log_start`:
    /// retention has dropped every chunk they hold. Returns how many.
    pub fn forget_before(&self, log_start: u64) -> usize {
        let dead = {
            let mut spans = self.spans();
            let keep = spans.split_off(&(log_start / SPAN_BYTES));
            std::mem::replace(&mut *spans, keep)
        };
        let n = dead.len();
        for (span, file) in dead {
            if let Err(e) = std::fs::remove_file(self.path(span)) {
                tracing::warn!(error = %e, span, "cannot delete a spill file");
            }
            // Freed off this thread unless a read holds it for a moment.
            if let Ok(f) = Arc::try_unwrap(file) {
                file_reaper::reap(f.file);
            }
        }
        n
    }

    /// Bytes in the spill files.
    pub fn disk_bytes(&self) -> u64 {
        self.spans()
            .values()
            .map(|f| f.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Chunks read back since `open`: a queue's readers far behind its
    /// tail, and retention by size.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Spans with a file.
    pub fn spans_held(&self) -> usize {
        self.spans().len()
    }
}
