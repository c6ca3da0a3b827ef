//! The node's control-plane state: topics, their queues and the shard each
//! queue is placed on.
//!
//! Readers on the data path take a snapshot (`ArcSwap::load`, no lock);
//! changes are rare, serialised by a mutex, written to `metadata.bin`
//! (an rkyv archive with a version and a CRC-32, replaced atomically) and
//! then published. A queue's shard is fixed when the queue is created (round
//! robin: queue q of topic id t goes to shard (t + q) % shards), so it never changes when the
//! core count does; the node refuses to start with fewer shards than its
//! placement needs. This file is written with blocking `std::fs` under the
//! lock: it is small, rare, and never on the data path.

use crate::protocol::messages::TOPIC_NAME_BYTES_MAX;
use crate::protocol::{ErrorCode, ErrorReply, TopicSpec};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Format version of `metadata.bin`.
const METADATA_FILE_VERSION: u32 = 1;
/// Most queues one topic may have.
pub const QUEUES_PER_TOPIC_MAX: u32 = 4096;
/// Smallest per-topic segment size.
pub const TOPIC_SEGMENT_BYTES_MIN: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TopicMeta {
    pub spec: TopicSpec,
    /// Never reused, so a re-created topic never sees an old topic's data.
    pub id: u32,
    /// Queue index → owning shard.
    pub placement: Vec<u32>,
}

#[derive(Debug, Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Metadata {
    pub topics: BTreeMap<String, TopicMeta>,
    pub next_topic_id: u32,
    /// Topic id → name, derived from `topics` (not stored): shards name
    /// their queues by id, and with 10,000 topics a scan per lookup shows.
    #[rkyv(with = rkyv::with::Skip)]
    names_by_id: HashMap<u32, String>,
}

impl Metadata {
    pub fn topic(&self, name: &str) -> Result<&TopicMeta, ErrorReply> {
        self.topics.get(name).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownTopic,
                format!("topic {name:?} does not exist"),
            )
        })
    }

    pub fn topic_by_id(&self, id: u32) -> Option<&TopicMeta> {
        self.topics.get(self.names_by_id.get(&id)?)
    }

    fn insert(&mut self, topic: TopicMeta) {
        self.names_by_id.insert(topic.id, topic.spec.name.clone());
        self.topics.insert(topic.spec.name.clone(), topic);
    }

    fn remove(&mut self, name: &str) {
        if let Some(t) = self.topics.remove(name) {
            self.names_by_id.remove(&t.id);
        }
    }
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

pub struct MetaStore {
    path: PathBuf,
    shards: u32,
    current: ArcSwap<Metadata>,
    write_lock: Mutex<()>,
}

impl MetaStore {
    /// Loads `dir/metadata.bin` (absent = empty) and checks the placement fits `shards`.
    pub fn open(dir: &Path, shards: usize) -> Result<MetaStore, MetadataError> {
        let path = dir.join("metadata.bin");
        let meta = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Metadata::default(),
            Err(source) => return Err(MetadataError::Io { path, source }),
            Ok(data) => decode(&data).map_err(|reason| MetadataError::Corrupt {
                path: path.clone(),
                reason,
            })?,
        };
        let need = meta
            .topics
            .values()
            .flat_map(|t| t.placement.iter().copied())
            .max()
            .map_or(0, |s| s + 1);
        if need as usize > shards {
            let (topic, queue, shard) = meta
                .topics
                .values()
                .flat_map(|t| t.placement.iter().enumerate().map(move |(q, s)| (t, q, *s)))
                .find(|(_, _, s)| *s as usize >= shards)
                .map(|(t, q, s)| (t.spec.name.clone(), q, s))
                .expect("some queue needs the missing shard");
            return Err(MetadataError::TooFewShards {
                topic,
                queue,
                shard,
                shards,
                need,
            });
        }
        Ok(MetaStore {
            path,
            shards: shards as u32,
            current: ArcSwap::from_pointee(meta),
            write_lock: Mutex::new(()),
        })
    }

    /// The current metadata, lock-free.
    pub fn snapshot(&self) -> Arc<Metadata> {
        self.current.load_full()
    }

    pub fn create_topic(&self, spec: TopicSpec) -> Result<TopicMeta, ErrorReply> {
        validate_spec(&spec)?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut meta = (*self.current.load_full()).clone();
        if meta.topics.contains_key(&spec.name) {
            return Err(ErrorReply::new(
                ErrorCode::TopicExists,
                format!("topic {:?} already exists", spec.name),
            ));
        }
        let id = meta.next_topic_id;
        // Start each topic on the next shard, so many small topics spread out.
        let placement = (0..spec.queues).map(|q| (id + q) % self.shards).collect();
        let topic = TopicMeta {
            spec,
            id,
            placement,
        };
        meta.next_topic_id += 1;
        meta.insert(topic.clone());
        self.publish(meta)?;
        Ok(topic)
    }

    /// Grows a live topic to `queues` queues; the new ones are placed like
    /// the first ones, continuing the round robin.
    pub fn alter_topic(&self, name: &str, queues: u32) -> Result<TopicMeta, ErrorReply> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut meta = (*self.current.load_full()).clone();
        let t = meta.topic(name)?.clone();
        if queues <= t.spec.queues || queues > QUEUES_PER_TOPIC_MAX {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!(
                    "topic {name:?} has {} queues; --queues must be more than that and at most {QUEUES_PER_TOPIC_MAX}, not {queues}",
                    t.spec.queues
                ),
            ));
        }
        let mut t = t;
        t.placement
            .extend((t.spec.queues..queues).map(|q| (t.id + q) % self.shards));
        t.spec.queues = queues;
        meta.insert(t.clone());
        self.publish(meta)?;
        Ok(t)
    }

    pub fn delete_topic(&self, name: &str) -> Result<(), ErrorReply> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut meta = (*self.current.load_full()).clone();
        meta.topic(name)?;
        meta.remove(name);
        self.publish(meta)
    }

    fn publish(&self, meta: Metadata) -> Result<(), ErrorReply> {
        write_atomic(&self.path, &encode(&meta)).map_err(|e| {
            ErrorReply::new(
                ErrorCode::StorageError,
                format!("cannot write {}: {e}", self.path.display()),
            )
        })?;
        self.current.store(Arc::new(meta));
        Ok(())
    }
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

fn encode(meta: &Metadata) -> Vec<u8> {
    let body =
        rkyv::to_bytes::<rkyv::rancor::Error>(meta).expect("serialising into memory cannot fail");
    let mut out = METADATA_FILE_VERSION.to_be_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode(data: &[u8]) -> Result<Metadata, String> {
    if data.len() < 8 {
        return Err("shorter than its header".into());
    }
    let version = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
    if version != METADATA_FILE_VERSION {
        return Err(format!("unknown version {version}"));
    }
    let crc = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
    let body = &data[8..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let mut meta =
        rkyv::from_bytes::<Metadata, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())?;
    meta.names_by_id = meta
        .topics
        .values()
        .map(|t| (t.id, t.spec.name.clone()))
        .collect();
    Ok(meta)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Flush;

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

    #[test]
    fn topics_persist_and_placement_is_round_robin() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        let t = store.create_topic(spec("a", 4)).unwrap();
        assert_eq!(t.placement, vec![0, 1, 0, 1]);
        let t2 = store.create_topic(spec("b", 1)).unwrap();
        assert_eq!(t2.placement, vec![1]);
        assert_eq!(
            store.create_topic(spec("a", 1)).unwrap_err().code,
            ErrorCode::TopicExists
        );
        let grown = store.alter_topic("a", 6).unwrap();
        assert_eq!(grown.placement, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(
            store.alter_topic("a", 6).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        store.delete_topic("b").unwrap();
        let store = MetaStore::open(dir.path(), 2).unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.topic("a").unwrap().placement, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(snap.topic("b").unwrap_err().code, ErrorCode::UnknownTopic);
        // The id index is rebuilt on load and follows deletes.
        assert_eq!(snap.topic_by_id(0).unwrap().spec.name, "a");
        assert!(snap.topic_by_id(1).is_none(), "b was deleted");
        // Ids are never reused.
        assert_eq!(store.create_topic(spec("b", 1)).unwrap().id, 2);
        assert_eq!(store.snapshot().topic_by_id(2).unwrap().spec.name, "b");
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
                store.create_topic(s).unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        store.create_topic(spec("x", 1)).unwrap();
        let path = dir.path().join("metadata.bin");
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, data).unwrap();
        assert!(matches!(
            MetaStore::open(dir.path(), 1),
            Err(MetadataError::Corrupt { .. })
        ));
    }
}
