//! Consumer groups' committed offsets for the queues of one shard.
//!
//! A commit updates memory and rewrites the shard's offsets file atomically
//! (`durable_file`) before it is acknowledged, so a committed offset survives
//! `kill -9`. The file is small: one row per (group, queue).

use crate::durable_file;
use crate::error::{Result, ShardError};
use crate::QueueKey;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Format version of the offsets file.
const OFFSETS_FILE_VERSION: u8 = 1;

pub struct GroupOffsets {
    path: PathBuf,
    offsets: BTreeMap<(String, QueueKey), i64>,
}

impl GroupOffsets {
    /// Loads the offsets file at `path` (absent = no commits yet).
    pub fn open(path: PathBuf) -> Result<GroupOffsets> {
        let offsets = match durable_file::read_checked(&path)? {
            None => BTreeMap::new(),
            Some(data) => decode(&data).ok_or_else(|| ShardError::CorruptFile {
                path: path.display().to_string(),
                reason: "undecodable offsets".into(),
            })?,
        };
        Ok(GroupOffsets { path, offsets })
    }

    pub fn get(&self, group: &str, key: QueueKey) -> Option<i64> {
        self.offsets.get(&(group.to_string(), key)).copied()
    }

    /// Sets an offset in memory; returns the file path and the snapshot
    /// the caller must write (`durable_file::write_atomic`) before acking.
    pub fn set(&mut self, group: &str, key: QueueKey, offset: i64) -> (PathBuf, Vec<u8>) {
        self.offsets.insert((group.to_string(), key), offset);
        (self.path.clone(), encode(&self.offsets))
    }

    /// The file path and contents as they would be with `offset` set,
    /// without setting it: a commit applies it only once the file is written.
    pub fn preview(&self, group: &str, key: QueueKey, offset: i64) -> (PathBuf, Vec<u8>) {
        self.preview_all(&[(group.to_string(), key, offset)])
    }

    /// `preview` for several offsets at once.
    pub fn preview_all(&self, updates: &[(String, QueueKey, i64)]) -> (PathBuf, Vec<u8>) {
        let mut next = self.offsets.clone();
        for (g, k, o) in updates {
            next.insert((g.clone(), *k), *o);
        }
        (self.path.clone(), encode(&next))
    }

    /// Drops the offsets of queues that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(QueueKey) -> bool) {
        self.offsets.retain(|(_, k), _| keep(*k));
    }

    /// Every committed offset: (group, queue, offset).
    pub fn iter(&self) -> impl Iterator<Item = (&str, QueueKey, i64)> {
        self.offsets.iter().map(|((g, k), o)| (g.as_str(), *k, *o))
    }
}

fn encode(offsets: &BTreeMap<(String, QueueKey), i64>) -> Vec<u8> {
    let mut out = vec![OFFSETS_FILE_VERSION];
    out.extend_from_slice(&(offsets.len() as u32).to_be_bytes());
    for ((group, key), offset) in offsets {
        out.extend_from_slice(&(group.len() as u16).to_be_bytes());
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&key.topic_id.to_be_bytes());
        out.extend_from_slice(&key.queue.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out
}

fn decode(data: &[u8]) -> Option<BTreeMap<(String, QueueKey), i64>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at + n)?;
        at += n;
        Some(s)
    };
    if take(1)?[0] != OFFSETS_FILE_VERSION {
        return None;
    }
    let count = u32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let glen = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
        let group = String::from_utf8(take(glen)?.to_vec()).ok()?;
        let topic_id = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let queue = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let offset = i64::from_be_bytes(take(8)?.try_into().ok()?);
        map.insert((group, QueueKey { topic_id, queue }), offset);
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_reopen_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        let p2 = path.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut g = GroupOffsets::open(p2.clone()).unwrap();
                let k = QueueKey {
                    topic_id: 1,
                    queue: 2,
                };
                let (p, snap) = g.set("g1", k, 42);
                durable_file::write_atomic(&p, &snap).await.unwrap();
                let (p, snap) = g.set("g2", k, 7);
                durable_file::write_atomic(&p, &snap).await.unwrap();
                let g = GroupOffsets::open(p2).unwrap();
                assert_eq!(g.get("g1", k), Some(42));
                assert_eq!(g.get("g2", k), Some(7));
                assert_eq!(g.get("g3", k), None);
            })
            .unwrap()
            .join()
            .unwrap();
        let mut data = std::fs::read(&path).unwrap();
        data[3] ^= 0xff;
        std::fs::write(&path, data).unwrap();
        assert!(matches!(
            GroupOffsets::open(path),
            Err(ShardError::CorruptFile { .. })
        ));
    }
}
