//! The metadata writer: one thread that applies every change, in arrival
//! order, appends it to the journal, syncs, and only then publishes the new
//! snapshot and answers.
//!
//! Group commit: the changes that queued up while one `fdatasync` ran go
//! into the next frame and share its sync. The writer has its own thread so
//! that a sync never blocks a shard's reactor (blocking `std::fs` is fine
//! here), and so that no lock is held across one.

use super::files::{self, Paths, JOURNAL_HEADER_BYTES};
use super::{Change, JournalOp, Metadata, TopicMeta};
use crate::protocol::{ErrorCode, ErrorReply};
use arc_swap::ArcSwap;
use futures::channel::oneshot;
use std::fs::File;
use std::io::Write;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// Most changes in one journal frame (one group commit). Bounds a frame to
/// a few MiB even when every change places 4,096 queues.
pub const JOURNAL_BATCH_CHANGES_MAX: usize = 256;
/// The journal is compacted into a new snapshot once it is larger than this
/// many times the snapshot: each compaction writes the snapshot once for at
/// least that many bytes of changes, so it costs amortised O(1) per change.
pub const JOURNAL_COMPACT_SNAPSHOT_RATIO: u64 = 2;

pub(super) struct Request {
    pub change: Change,
    pub reply: oneshot::Sender<Result<TopicMeta, ErrorReply>>,
}

pub(super) struct Writer {
    pub paths: Paths,
    pub shards: u32,
    /// Everything in the files; also what readers see.
    pub durable: Metadata,
    /// Generation of the last snapshot written (or read).
    pub generation: u64,
    /// `None` after a failed append or compaction: the file's tail is
    /// unknown, so nothing more goes into it; the next change compacts first.
    pub journal: Option<File>,
    pub journal_bytes: u64,
    pub snapshot_bytes: u64,
    /// Compact when the journal is larger than this, whatever the snapshot's size.
    pub compact_bytes_min: u64,
    pub published: Arc<ArcSwap<Metadata>>,
}

impl Writer {
    /// Serves changes until every sender is gone.
    pub fn run(mut self, changes: Receiver<Request>) {
        while let Ok(first) = changes.recv() {
            let mut batch = vec![first];
            while batch.len() < JOURNAL_BATCH_CHANGES_MAX {
                match changes.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Request>) {
        // O(1): the maps are persistent; `next` shares them until it changes.
        let mut next = self.durable.clone();
        let mut ops = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        for r in batch {
            // Checked against the changes before it in this batch too.
            match next.plan(&r.change, self.shards) {
                Err(e) => {
                    let _ = r.reply.send(Err(e));
                }
                Ok((op, topic)) => {
                    next.apply(&op).expect("a planned change applies");
                    ops.push(op);
                    accepted.push((r.reply, topic));
                }
            }
        }
        if ops.is_empty() {
            return;
        }
        if let Err(e) = self.append(&ops) {
            let reply = ErrorReply::new(ErrorCode::StorageError, format!("cannot write {e}"));
            tracing::error!(error = %e, changes = ops.len(), "metadata journal write failed");
            for (tx, _) in accepted {
                let _ = tx.send(Err(reply.clone()));
            }
            return;
        }
        self.durable = next;
        self.published.store(Arc::new(self.durable.clone()));
        for (tx, topic) in accepted {
            let _ = tx.send(Ok(topic));
        }
        let limit = self
            .compact_bytes_min
            .max(JOURNAL_COMPACT_SNAPSHOT_RATIO * self.snapshot_bytes);
        if self.journal_bytes > limit {
            if let Err(e) = self.compact() {
                // Nothing is lost: the next change retries before it appends.
                tracing::error!(error = %e, "metadata compaction failed");
            }
        }
    }

    /// Appends one frame and syncs it.
    fn append(&mut self, ops: &[JournalOp]) -> std::io::Result<()> {
        if self.journal.is_none() {
            // Start over from what is known durable, without whatever the
            // failed write left in the old journal.
            self.compact()?;
        }
        let frame = files::encode_frame(ops);
        let f = self.journal.as_mut().expect("compact opened a journal");
        match f.write_all(&frame).and_then(|()| f.sync_data()) {
            Ok(()) => {
                self.journal_bytes += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.journal = None;
                Err(on(&self.paths.journal, e))
            }
        }
    }

    /// Writes the durable state as a new snapshot and starts an empty
    /// journal after it.
    pub fn compact(&mut self) -> std::io::Result<()> {
        // Once the new snapshot is renamed into place the old journal is
        // stale (ignored at open): nothing may be appended to it any more.
        self.journal = None;
        // Every attempt takes a new generation, so a journal is never
        // mistaken for one that continues a later snapshot.
        self.generation += 1;
        let snapshot = files::encode_snapshot(&self.durable, self.generation);
        files::write_atomic(&self.paths.snapshot, &snapshot)
            .map_err(|e| on(&self.paths.snapshot, e))?;
        self.snapshot_bytes = snapshot.len() as u64;
        let journal = files::create_journal(&self.paths.journal, self.generation)
            .map_err(|e| on(&self.paths.journal, e))?;
        self.journal = Some(journal);
        self.journal_bytes = JOURNAL_HEADER_BYTES as u64;
        tracing::debug!(
            generation = self.generation,
            snapshot_bytes = self.snapshot_bytes,
            topics = self.durable.topic_count(),
            "metadata compacted"
        );
        Ok(())
    }
}

/// `e`, saying which file it happened on.
fn on(path: &std::path::Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
