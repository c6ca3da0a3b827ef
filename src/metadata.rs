//! The node's control-plane state: topics, their queues and the shard each
//! queue is placed on.
//!
//! Readers on the data path take a snapshot (`ArcSwap::load`, no lock).
//! Changes go to one writer thread (`writer.rs`), which appends them to
//! `metadata.journal` and `fdatasync`s it before it publishes them and
//! answers; changes that arrive during a sync share the next one (group
//! commit). The journal is folded into the snapshot file `metadata.bin` at
//! open and whenever it outgrows a multiple of that file (`files.rs` has
//! both formats). Why: rewriting the whole snapshot for each change cost
//! O(topics) per change, and 10,000 topics took 20 to 78 s to create or
//! delete; now a change costs O(log topics) in memory and a share of one
//! sync on disk. The published `Metadata` is built of persistent maps
//! (`imbl`), so a change copies a few tree nodes, never every topic.
//!
//! A queue's shard is fixed when the queue is created (round robin: queue q
//! of topic id t goes to shard (t + q) % shards), so it never changes when
//! the core count does; the node refuses to start with fewer shards than its
//! placement needs.

mod files;
mod name_index;
mod route;
mod writer;

pub use files::DroppedTail;
pub use route::{policy, Route};
pub use writer::{JOURNAL_BATCH_CHANGES_MAX, JOURNAL_COMPACT_SNAPSHOT_RATIO};

use crate::protocol::messages::TOPIC_NAME_BYTES_MAX;
use crate::protocol::{ErrorCode, ErrorReply, TopicSpec};
use arc_swap::ArcSwap;
use futures::channel::oneshot;
use std::borrow::Cow;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

/// Most queues one topic may have.
pub const QUEUES_PER_TOPIC_MAX: u32 = 4096;
/// Smallest per-topic segment size.
pub const TOPIC_SEGMENT_BYTES_MIN: u64 = 4096;
/// The journal is compacted once it is larger than this, or than
/// `JOURNAL_COMPACT_SNAPSHOT_RATIO` times the snapshot, whichever is more.
pub const JOURNAL_COMPACT_BYTES_MIN: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TopicMeta {
    pub spec: TopicSpec,
    /// Never reused, so a re-created topic never sees an old topic's data.
    pub id: u32,
    /// Queue index → owning shard.
    pub placement: Vec<u32>,
}

/// One snapshot of the topics. Cloning it is O(1).
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// By name. The values are `Arc`s, so copying a tree node on a change
    /// copies pointers, not topics.
    topics: imbl::OrdMap<Arc<str>, Arc<TopicMeta>>,
    /// By id: shards name their queues by id, and with 10,000 topics a scan
    /// per lookup shows.
    by_id: imbl::OrdMap<u32, Arc<TopicMeta>>,
    /// `topics` hashed, for the data path's lookups; starts over on a change.
    by_name: name_index::NameIndex,
    next_topic_id: u32,
}

fn unknown_topic(name: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownTopic,
        format!("topic {name:?} does not exist"),
    )
}

impl Metadata {
    pub fn topic(&self, name: &str) -> Result<&TopicMeta, ErrorReply> {
        self.topics
            .get(name)
            .map(|t| &**t)
            .ok_or_else(|| unknown_topic(name))
    }

    /// What the data path needs of topic `name` (one hash probe).
    pub fn route(&self, name: &str) -> Result<Cow<'_, Route>, ErrorReply> {
        self.by_name
            .get(&self.topics, name)
            .ok_or_else(|| unknown_topic(name))
    }

    pub fn topic_by_id(&self, id: u32) -> Option<&TopicMeta> {
        self.by_id.get(&id).map(|t| &**t)
    }

    /// Every topic, by name.
    pub fn topics(&self) -> impl Iterator<Item = &TopicMeta> + '_ {
        self.topics.values().map(|t| &**t)
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// The id the next created topic gets.
    pub fn next_topic_id(&self) -> u32 {
        self.next_topic_id
    }

    /// Builds the maps from a snapshot file's topics.
    fn from_topics(
        topics: impl IntoIterator<Item = TopicMeta>,
        next_topic_id: u32,
    ) -> Result<Metadata, String> {
        let mut meta = Metadata {
            next_topic_id,
            ..Metadata::default()
        };
        for t in topics {
            if t.id >= next_topic_id {
                return Err(format!(
                    "topic {:?} has id {}, not below the next id {next_topic_id}",
                    t.spec.name, t.id
                ));
            }
            check_placement(&t)?;
            if meta.topics.contains_key(t.spec.name.as_str()) || meta.by_id.contains_key(&t.id) {
                return Err(format!(
                    "topic {:?} (id {}) is there twice",
                    t.spec.name, t.id
                ));
            }
            meta.insert(Arc::new(t));
        }
        Ok(meta)
    }

    fn insert(&mut self, t: Arc<TopicMeta>) {
        self.by_name = Default::default();
        self.by_id.insert(t.id, t.clone());
        self.topics.insert(Arc::from(t.spec.name.as_str()), t);
    }

    /// The journal record for `change`, and the topic to answer with.
    fn plan(&self, change: &Change, shards: u32) -> Result<(JournalOp, TopicMeta), ErrorReply> {
        match change {
            Change::Create(spec) => {
                if self.topics.contains_key(spec.name.as_str()) {
                    return Err(ErrorReply::new(
                        ErrorCode::TopicExists,
                        format!("topic {:?} already exists", spec.name),
                    ));
                }
                let id = self.next_topic_id;
                if id == u32::MAX {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidRequest,
                        "the node has used up its topic ids",
                    ));
                }
                // Start each topic on the next shard, so many small topics spread out.
                let placement = (0..spec.queues).map(|q| (id + q) % shards).collect();
                let topic = TopicMeta {
                    spec: spec.clone(),
                    id,
                    placement,
                };
                Ok((JournalOp::Create(topic.clone()), topic))
            }
            Change::Alter { name, queues } => {
                let mut t = self.topic(name)?.clone();
                let queues = *queues;
                if queues <= t.spec.queues || queues > QUEUES_PER_TOPIC_MAX {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "topic {name:?} has {} queues; --queues must be more than that and at most {QUEUES_PER_TOPIC_MAX}, not {queues}",
                            t.spec.queues
                        ),
                    ));
                }
                // The new queues continue the round robin.
                t.placement
                    .extend((t.spec.queues..queues).map(|q| (t.id + q) % shards));
                t.spec.queues = queues;
                Ok((JournalOp::Alter(t.clone()), t))
            }
            Change::Delete { name } => {
                let t = self.topic(name)?.clone();
                let op = JournalOp::Delete {
                    id: t.id,
                    name: t.spec.name.clone(),
                };
                Ok((op, t))
            }
        }
    }

    /// Applies a journal record. A record that does not fit the state
    /// (which `plan` never makes) is an error: at open, corruption.
    fn apply(&mut self, op: &JournalOp) -> Result<(), String> {
        match op {
            JournalOp::Create(t) => {
                let name = &t.spec.name;
                if self.topics.contains_key(name.as_str()) {
                    return Err(format!("creates topic {name:?}, which exists"));
                }
                if t.id < self.next_topic_id || t.id == u32::MAX {
                    return Err(format!(
                        "creates topic {name:?} with id {}, but the next id is {}",
                        t.id, self.next_topic_id
                    ));
                }
                check_placement(t)?;
                self.next_topic_id = t.id + 1;
                self.insert(Arc::new(t.clone()));
            }
            JournalOp::Alter(t) => {
                let name = &t.spec.name;
                match self.topics.get(name.as_str()) {
                    Some(old) if old.id == t.id && t.placement.starts_with(&old.placement) => {}
                    _ => {
                        return Err(format!(
                            "grows topic {name:?} (id {}), which it cannot",
                            t.id
                        ))
                    }
                }
                check_placement(t)?;
                self.insert(Arc::new(t.clone()));
            }
            JournalOp::Delete { id, name } => {
                match self.topics.get(name.as_str()) {
                    Some(old) if old.id == *id => {}
                    _ => {
                        return Err(format!(
                            "deletes topic {name:?} (id {id}), which does not exist"
                        ))
                    }
                }
                self.by_name = Default::default();
                self.topics.remove(name.as_str());
                self.by_id.remove(id);
            }
        }
        Ok(())
    }
}

fn check_placement(t: &TopicMeta) -> Result<(), String> {
    if t.placement.len() != t.spec.queues as usize {
        return Err(format!(
            "topic {:?} has {} queues but {} placed",
            t.spec.name,
            t.spec.queues,
            t.placement.len()
        ));
    }
    Ok(())
}

/// A change a client asks for.
#[derive(Debug)]
enum Change {
    Create(TopicSpec),
    Alter { name: String, queues: u32 },
    Delete { name: String },
}

/// One record of `metadata.journal`: a change, as applied.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum JournalOp {
    /// A new topic, with the id and placement it got.
    Create(TopicMeta),
    /// A grown topic: the whole new `TopicMeta`.
    Alter(TopicMeta),
    /// The id too, so a replay can tell a re-created topic from the deleted one.
    Delete { id: u32, name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("metadata i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("topic {topic:?} queue {queue} is placed on shard {shard}, but the node has {shards} shards; start with --shards {need} or more")]
    TooFewShards {
        topic: String,
        queue: usize,
        shard: u32,
        shards: usize,
        need: u32,
    },
}

/// What `MetaStore::open` found in the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Changes replayed from the journal over the snapshot.
    pub journal_changes: usize,
    /// A damaged last frame (a crash during its append), dropped.
    pub dropped_tail: Option<DroppedTail>,
    /// The journal predated the snapshot (a crash during compaction) and was ignored.
    pub stale_journal: bool,
}

pub struct MetaStore {
    current: Arc<ArcSwap<Metadata>>,
    /// To the writer thread; `None` only while dropping.
    changes: Option<mpsc::Sender<writer::Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    recovery: Recovery,
}

impl MetaStore {
    /// Loads `dir/metadata.bin` and replays `dir/metadata.journal` (absent =
    /// empty), checks the placement fits `shards`, compacts both into a new
    /// snapshot and starts the writer thread.
    pub fn open(dir: &Path, shards: usize) -> Result<MetaStore, MetadataError> {
        MetaStore::open_with(dir, shards, JOURNAL_COMPACT_BYTES_MIN)
    }

    /// `open` with another compaction threshold (tests make it small).
    pub fn open_with(
        dir: &Path,
        shards: usize,
        compact_bytes_min: u64,
    ) -> Result<MetaStore, MetadataError> {
        let paths = files::Paths::new(dir);
        let loaded = files::load(&paths)?;
        check_shards(&loaded.meta, shards)?;
        let current = Arc::new(ArcSwap::from_pointee(loaded.meta.clone()));
        let mut writer = writer::Writer {
            paths,
            shards: shards as u32,
            durable: loaded.meta,
            generation: loaded.generation,
            journal: None,
            journal_bytes: 0,
            snapshot_bytes: 0,
            compact_bytes_min,
            published: current.clone(),
        };
        // Also drops a torn tail and retires a version-1 snapshot, so that
        // appends always go to a clean journal after a current snapshot.
        writer.compact().map_err(|source| MetadataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("coremq-meta".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| MetadataError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(MetaStore {
            current,
            changes: Some(tx),
            writer: Some(handle),
            recovery: loaded.recovery,
        })
    }

    /// The current metadata, lock-free.
    pub fn snapshot(&self) -> Arc<Metadata> {
        self.current.load_full()
    }

    /// What open found in the journal.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Creates a topic; resolves once it is durable and visible.
    pub async fn create_topic(&self, spec: TopicSpec) -> Result<TopicMeta, ErrorReply> {
        validate_spec(&spec)?;
        self.change(Change::Create(spec)).await
    }

    /// Grows a live topic to `queues` queues; the new ones are placed like
    /// the first ones, continuing the round robin.
    pub async fn alter_topic(&self, name: &str, queues: u32) -> Result<TopicMeta, ErrorReply> {
        self.change(Change::Alter {
            name: name.to_string(),
            queues,
        })
        .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ErrorReply> {
        self.change(Change::Delete {
            name: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    async fn change(&self, change: Change) -> Result<TopicMeta, ErrorReply> {
        let stopped = || ErrorReply::new(ErrorCode::Internal, "the metadata writer has stopped");
        let (reply, answer) = oneshot::channel();
        let request = writer::Request { change, reply };
        match &self.changes {
            Some(tx) if tx.send(request).is_ok() => {}
            _ => return Err(stopped()),
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

impl Drop for MetaStore {
    /// Waits for the writer, so a compaction it started is finished before
    /// anyone opens the files again.
    fn drop(&mut self) {
        drop(self.changes.take());
        if let Some(h) = self.writer.take() {
            if h.join().is_err() {
                tracing::error!("the metadata writer thread panicked");
            }
        }
    }
}

fn check_shards(meta: &Metadata, shards: usize) -> Result<(), MetadataError> {
    let need = meta
        .topics()
        .flat_map(|t| t.placement.iter().copied())
        .max()
        .map_or(0, |s| s + 1);
    if need as usize <= shards {
        return Ok(());
    }
    let (topic, queue, shard) = meta
        .topics()
        .flat_map(|t| t.placement.iter().enumerate().map(move |(q, s)| (t, q, *s)))
        .find(|(_, _, s)| *s as usize >= shards)
        .map(|(t, q, s)| (t.spec.name.clone(), q, s))
        .expect("some queue needs the missing shard");
    Err(MetadataError::TooFewShards {
        topic,
        queue,
        shard,
        shards,
        need,
    })
}

pub fn validate_topic_name(name: &str) -> Result<(), ErrorReply> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!(
                "invalid topic name {name:?}: use 1 to {TOPIC_NAME_BYTES_MAX} of [A-Za-z0-9._-]"
            ),
        ))
    }
}

fn validate_spec(spec: &TopicSpec) -> Result<(), ErrorReply> {
    validate_topic_name(&spec.name)?;
    let invalid = |m: String| Err(ErrorReply::new(ErrorCode::InvalidRequest, m));
    if spec.queues == 0 || spec.queues > QUEUES_PER_TOPIC_MAX {
        return invalid(format!(
            "--queues must be 1..={QUEUES_PER_TOPIC_MAX}, not {}",
            spec.queues
        ));
    }
    if spec.segment_bytes != 0 && spec.segment_bytes < TOPIC_SEGMENT_BYTES_MIN {
        return invalid(format!(
            "--segment-bytes must be at least {TOPIC_SEGMENT_BYTES_MIN}, not {}",
            spec.segment_bytes
        ));
    }
    if spec.retention_ms > i64::MAX as u64 {
        return invalid("--retention-ms is too large".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::files::{FRAME_HEADER_BYTES, JOURNAL_HEADER_BYTES};
    use super::*;
    use crate::protocol::Flush;
    use futures::executor::block_on;
    use std::collections::BTreeMap;

    fn spec(name: &str, queues: u32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            queues,
            flush: Flush::Async,
            segment_bytes: 0,
            retention_ms: 0,
            retention_bytes: 0,
        }
    }

    fn create(store: &MetaStore, name: &str, queues: u32) -> TopicMeta {
        block_on(store.create_topic(spec(name, queues))).unwrap()
    }

    fn names(store: &MetaStore) -> Vec<String> {
        store
            .snapshot()
            .topics()
            .map(|t| t.spec.name.clone())
            .collect()
    }

    fn journal(dir: &Path) -> PathBuf {
        dir.join("metadata.journal")
    }

    /// Where each frame of a journal starts.
    fn frames(data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = JOURNAL_HEADER_BYTES;
        while pos < data.len() {
            out.push(pos);
            let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            pos += FRAME_HEADER_BYTES + len;
        }
        out
    }

    fn corrupt_reason(dir: &Path) -> String {
        match MetaStore::open(dir, 2) {
            Err(MetadataError::Corrupt { reason, .. }) => reason,
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("expected Corrupt, it opened"),
        }
    }

    /// Past `TREE_LOOKUPS_MAX` a snapshot answers from its hash index; the
    /// snapshots after a change must still see the change, and the old one
    /// must not.
    #[test]
    fn name_lookups_see_every_change_after_the_index_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        for i in 0..50 {
            create(&store, &format!("t{i}"), 1);
        }
        let before = store.snapshot();
        for round in 0..25 {
            for i in 0..50 {
                assert_eq!(
                    before.topic(&format!("t{i}")).unwrap().spec.name,
                    format!("t{i}")
                );
            }
            assert_eq!(
                before.topic("new").unwrap_err().code,
                ErrorCode::UnknownTopic,
                "round {round}"
            );
        }
        block_on(store.delete_topic("t7")).unwrap();
        create(&store, "new", 3);
        block_on(store.alter_topic("t8", 2)).unwrap();
        let after = store.snapshot();
        for _ in 0..1100 {
            assert_eq!(after.topic("t7").unwrap_err().code, ErrorCode::UnknownTopic);
            assert_eq!(after.topic("new").unwrap().spec.queues, 3);
            assert_eq!(after.topic("t8").unwrap().placement.len(), 2);
        }
        assert_eq!(before.topic("t7").unwrap().spec.name, "t7");
        assert_eq!(before.topic("t8").unwrap().placement.len(), 1);
        assert!(before.topic("new").is_err());
    }

    #[test]
    fn topics_persist_and_placement_is_round_robin() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        let t = create(&store, "a", 4);
        assert_eq!(t.placement, vec![0, 1, 0, 1]);
        let t2 = create(&store, "b", 1);
        assert_eq!(t2.placement, vec![1]);
        assert_eq!(
            block_on(store.create_topic(spec("a", 1))).unwrap_err().code,
            ErrorCode::TopicExists
        );
        let grown = block_on(store.alter_topic("a", 6)).unwrap();
        assert_eq!(grown.placement, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(
            block_on(store.alter_topic("a", 6)).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        block_on(store.delete_topic("b")).unwrap();
        assert_eq!(
            block_on(store.delete_topic("b")).unwrap_err().code,
            ErrorCode::UnknownTopic
        );
        drop(store);
        let store = MetaStore::open(dir.path(), 2).unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.topic("a").unwrap().placement, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(snap.topic("b").unwrap_err().code, ErrorCode::UnknownTopic);
        // The id index is rebuilt on load and follows deletes.
        assert_eq!(snap.topic_by_id(0).unwrap().spec.name, "a");
        assert!(snap.topic_by_id(1).is_none(), "b was deleted");
        // Ids are never reused.
        assert_eq!(create(&store, "b", 1).id, 2);
        assert_eq!(store.snapshot().topic_by_id(2).unwrap().spec.name, "b");
        drop(store);
        // Fewer shards than the placement needs is refused with advice.
        let err = MetaStore::open(dir.path(), 1).err().unwrap().to_string();
        assert!(err.contains("--shards 2"), "{err}");
    }

    #[test]
    fn bad_specs_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 1).unwrap();
        for s in [spec("", 1), spec("a/b", 1), spec("ok", 0), spec("..", 1)] {
            assert_eq!(
                block_on(store.create_topic(s)).unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        create(&store, "x", 1);
        drop(store);
        // Reopening folds the journal into the snapshot: damage that.
        drop(MetaStore::open(dir.path(), 1).unwrap());
        let path = dir.path().join("metadata.bin");
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, data).unwrap();
        assert!(corrupt_reason(dir.path()).contains("checksum"));
    }

    #[test]
    fn journal_is_replayed_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        create(&store, "a", 2);
        create(&store, "b", 1);
        create(&store, "c", 1);
        block_on(store.alter_topic("a", 3)).unwrap();
        block_on(store.delete_topic("b")).unwrap();
        drop(store);
        // One after another, each change was its own group commit.
        let data = std::fs::read(journal(dir.path())).unwrap();
        assert_eq!(frames(&data).len(), 5);
        let (on_disk, _) =
            files::decode_snapshot(&std::fs::read(dir.path().join("metadata.bin")).unwrap())
                .unwrap();
        assert_eq!(
            on_disk.topic_count(),
            0,
            "the changes are only in the journal"
        );

        let store = MetaStore::open(dir.path(), 2).unwrap();
        assert_eq!(store.recovery().journal_changes, 5);
        assert_eq!(store.recovery().dropped_tail, None);
        assert_eq!(names(&store), ["a", "c"]);
        let snap = store.snapshot();
        assert_eq!(snap.topic("a").unwrap().placement, vec![0, 1, 0]);
        assert_eq!(snap.topic("c").unwrap().id, 2);
        assert_eq!(snap.next_topic_id(), 3);
        drop(store);
        // Open compacted: the snapshot holds it all, the journal nothing.
        let data = std::fs::read(journal(dir.path())).unwrap();
        assert_eq!(data.len(), JOURNAL_HEADER_BYTES);
        let store = MetaStore::open(dir.path(), 2).unwrap();
        assert_eq!(store.recovery().journal_changes, 0);
        assert_eq!(names(&store), ["a", "c"]);
        assert_eq!(create(&store, "b", 1).id, 3);
    }

    #[test]
    fn a_torn_journal_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 1).unwrap();
        for name in ["a", "b", "c"] {
            create(&store, name, 1);
        }
        drop(store);
        let path = journal(dir.path());

        // The last append cut short.
        let data = std::fs::read(&path).unwrap();
        let last = *frames(&data).last().unwrap();
        std::fs::write(&path, &data[..data.len() - 3]).unwrap();
        let store = MetaStore::open(dir.path(), 1).unwrap();
        let dropped = store.recovery().dropped_tail.clone().unwrap();
        assert_eq!(dropped.at, last as u64);
        assert_eq!(names(&store), ["a", "b"]);
        // "c" never happened: its id is given again.
        assert_eq!(create(&store, "c", 1).id, 2);
        drop(store);

        // Blocks of the last append that never reached the disk read as zeros.
        let mut data = std::fs::read(&path).unwrap();
        data.extend_from_slice(&[0; 4096]);
        std::fs::write(&path, &data).unwrap();
        let store = MetaStore::open(dir.path(), 1).unwrap();
        assert!(store.recovery().dropped_tail.is_some());
        assert_eq!(names(&store), ["a", "b", "c"]);
        create(&store, "d", 1);
        drop(store);

        // A whole last frame whose body did not all reach the disk.
        let mut data = std::fs::read(&path).unwrap();
        let end = data.len() - 1;
        data[end] ^= 0x40;
        std::fs::write(&path, &data).unwrap();
        let store = MetaStore::open(dir.path(), 1).unwrap();
        assert!(store.recovery().dropped_tail.is_some());
        assert_eq!(names(&store), ["a", "b", "c"]);
        drop(store);

        // Dropping it left a clean journal.
        let store = MetaStore::open(dir.path(), 1).unwrap();
        assert_eq!(store.recovery(), &Recovery::default());
        assert_eq!(names(&store), ["a", "b", "c"]);
    }

    #[test]
    fn a_damaged_journal_before_its_tail_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        for name in ["a", "b", "c"] {
            create(&store, name, 1);
        }
        drop(store);
        let path = journal(dir.path());
        let data = std::fs::read(&path).unwrap();
        let f = frames(&data);
        assert_eq!(f.len(), 3);

        // A flipped bit in the first frame's body.
        let mut bad = data.clone();
        bad[f[0] + FRAME_HEADER_BYTES + 2] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let reason = corrupt_reason(dir.path());
        assert!(reason.contains(&format!("byte {}", f[0])), "{reason}");
        assert!(reason.contains("checksum mismatch"), "{reason}");

        // A flipped bit in the second frame's length: it has its own CRC, so
        // it is not taken for a frame cut short at the end.
        let mut bad = data.clone();
        bad[f[1] + 2] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let reason = corrupt_reason(dir.path());
        assert!(reason.contains("length checksum"), "{reason}");

        // Zeros in the middle are not a torn tail either.
        let mut bad = data.clone();
        bad[f[1]..f[2]].fill(0);
        std::fs::write(&path, &bad).unwrap();
        corrupt_reason(dir.path());

        // A damaged header.
        let mut bad = data.clone();
        bad[9] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(corrupt_reason(dir.path()).contains("header"));

        // Nothing was changed by the refusals.
        std::fs::write(&path, &data).unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        assert_eq!(names(&store), ["a", "b", "c"]);
    }

    #[test]
    fn a_journal_older_than_the_snapshot_is_ignored_and_an_orphan_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        create(&store, "a", 1);
        create(&store, "b", 1);
        drop(store);
        let old = std::fs::read(journal(dir.path())).unwrap();
        drop(MetaStore::open(dir.path(), 2).unwrap());
        // As if the node stopped after the compaction renamed the snapshot
        // and before it replaced the journal.
        std::fs::write(journal(dir.path()), &old).unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        assert!(store.recovery().stale_journal);
        assert_eq!(store.recovery().journal_changes, 0);
        assert_eq!(names(&store), ["a", "b"]);
        drop(store);
        // A journal whose snapshot is gone.
        std::fs::remove_file(dir.path().join("metadata.bin")).unwrap();
        assert!(corrupt_reason(dir.path()).contains("generation"));
    }

    #[test]
    fn the_journal_is_compacted_when_it_outgrows_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let compact_min = 4096;
        let store = MetaStore::open_with(dir.path(), 2, compact_min).unwrap();
        for i in 0..100 {
            create(&store, &format!("topic-{i:03}"), 2);
        }
        block_on(store.delete_topic("topic-000")).unwrap();
        let journal_len = std::fs::metadata(journal(dir.path())).unwrap().len();
        let snapshot = std::fs::read(dir.path().join("metadata.bin")).unwrap();
        drop(store);
        // 100 changes of ~150 bytes did not all pile up in the journal...
        let limit = compact_min.max(JOURNAL_COMPACT_SNAPSHOT_RATIO * snapshot.len() as u64);
        assert!(journal_len <= limit, "{journal_len} > {limit}");
        // ...they went into snapshots written after open.
        let (on_disk, generation) = files::decode_snapshot(&snapshot).unwrap();
        assert!(generation > 1, "generation {generation}");
        assert!(on_disk.topic_count() > 50, "{}", on_disk.topic_count());
        let store = MetaStore::open(dir.path(), 2).unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.topic_count(), 99);
        assert!(snap.topic("topic-000").is_err());
        assert_eq!(snap.topic("topic-099").unwrap().id, 99);
        assert_eq!(snap.next_topic_id(), 100);
    }

    #[test]
    fn thousands_of_topics_created_and_deleted_survive_reopen() {
        let n = 3000u32;
        let name = |i: u32| format!("load.topic-{i:05}");
        let dir = tempfile::tempdir().unwrap();
        // A small threshold: compactions happen between group commits.
        let store = MetaStore::open_with(dir.path(), 4, 64 << 10).unwrap();
        // All in flight at once, as pipelined requests are; one name twice.
        let created = block_on(futures::future::join_all(
            (0..n)
                .map(|i| spec(&name(i), 1 + i % 3))
                .chain([spec(&name(7), 1)])
                .map(|s| store.create_topic(s)),
        ));
        let mut expected: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for r in &created[..n as usize] {
            let t = r.as_ref().unwrap();
            expected.insert(t.spec.name.clone(), (t.id, t.spec.queues));
        }
        assert_eq!(
            created[n as usize].as_ref().unwrap_err().code,
            ErrorCode::TopicExists
        );
        let mut ids: Vec<u32> = expected.values().map(|v| v.0).collect();
        ids.sort();
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        // Delete two in three, grow some of the rest, re-create a few.
        let doomed: Vec<String> = (0..n).filter(|i| i % 3 != 0).map(name).collect();
        let deleted = block_on(futures::future::join_all(
            doomed.iter().map(|nm| store.delete_topic(nm)),
        ));
        for (nm, r) in doomed.iter().zip(deleted) {
            r.unwrap();
            expected.remove(nm);
        }
        for i in (0..n).filter(|i| i % 30 == 0) {
            let t = block_on(store.alter_topic(&name(i), 5)).unwrap();
            expected.insert(name(i), (t.id, 5));
        }
        for i in [1, 2, 4] {
            let t = create(&store, &name(i), 2);
            assert!(t.id >= n, "ids are not reused");
            expected.insert(name(i), (t.id, 2));
        }
        drop(store);

        let check = |store: &MetaStore| {
            let snap = store.snapshot();
            let got: BTreeMap<String, (u32, u32)> = snap
                .topics()
                .map(|t| {
                    assert_eq!(t.placement.len(), t.spec.queues as usize);
                    assert_eq!(snap.topic_by_id(t.id), Some(t));
                    (t.spec.name.clone(), (t.id, t.spec.queues))
                })
                .collect();
            assert_eq!(got, expected);
            assert_eq!(snap.next_topic_id(), n + 3);
        };
        let store = MetaStore::open(dir.path(), 4).unwrap();
        check(&store);
        drop(store);
        let store = MetaStore::open(dir.path(), 4).unwrap();
        check(&store);
        // Delete all that is left; the next id is still remembered.
        let left: Vec<String> = expected.keys().cloned().collect();
        for r in block_on(futures::future::join_all(
            left.iter().map(|nm| store.delete_topic(nm)),
        )) {
            r.unwrap();
        }
        drop(store);
        let store = MetaStore::open(dir.path(), 4).unwrap();
        assert_eq!(store.snapshot().topic_count(), 0);
        assert_eq!(create(&store, "after", 1).id, n + 3);
    }

    #[test]
    fn a_version_1_snapshot_is_read_and_replaced() {
        // Written by the broker before the journal: "orders" (3 queues, sync,
        // 60 s retention), "gone" (deleted), "events" (2 queues grown to 4).
        const V1: &[u8] = include_bytes!("metadata/testdata/metadata-v1.bin");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.bin");
        std::fs::write(&path, V1).unwrap();
        let check = |store: &MetaStore| {
            let snap = store.snapshot();
            assert_eq!(names(store), ["events", "orders"]);
            let orders = snap.topic("orders").unwrap();
            assert_eq!((orders.id, orders.spec.flush), (0, Flush::Sync));
            assert_eq!(orders.spec.retention_ms, 60_000);
            assert_eq!(orders.placement, vec![0, 1, 0]);
            let events = snap.topic("events").unwrap();
            assert_eq!(events.id, 2);
            assert_eq!(events.spec.segment_bytes, 8192);
            assert_eq!(events.placement, vec![0, 1, 0, 1]);
            assert_eq!(snap.next_topic_id(), 3);
        };
        let store = MetaStore::open(dir.path(), 2).unwrap();
        check(&store);
        drop(store);
        // Rewritten as version 2, so an older binary refuses it rather than
        // ignore the journal next to it.
        assert_eq!(std::fs::read(&path).unwrap()[..4], 2u32.to_be_bytes());
        let store = MetaStore::open(dir.path(), 2).unwrap();
        check(&store);
    }
}
