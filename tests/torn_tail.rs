//! A torn or corrupt end of the active segment, made while the broker is
//! down: the broker restarts, serves everything before the damage, says
//! what it dropped, and keeps writing after it.

mod common;
use common::*;
use coremq::client::{Message, Producer, ProducerConfig};
use coremq::protocol::Flush;
use std::path::{Path, PathBuf};

/// Writes `n` single-message batches (one flush each) to a 1-queue topic.
fn write_batches(b: &Broker, topic: &str, n: usize) {
    let p = Producer::connect(&b.addr, topic, ProducerConfig::default()).unwrap();
    for i in 0..n {
        p.send(Message::new(format!("{topic}-{i}"))).unwrap();
        p.flush().unwrap();
    }
}

/// The only segment file of the shard that holds data.
fn active_segment(dir: &Path) -> PathBuf {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        let log = shard.unwrap().path().join("log");
        if let Ok(entries) = std::fs::read_dir(&log) {
            for e in entries {
                let p = e.unwrap().path();
                if std::fs::metadata(&p).unwrap().len() > 0 {
                    found.push(p);
                }
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

/// The first MiB of `seg`: all the tests write, without reading the
/// rest of the space the broker reserves for the segment.
fn head(seg: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(seg)
        .unwrap()
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).unwrap() + 1
}

#[test]
fn a_cut_last_entry_is_dropped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "1"]);
    b.create_topic("t", 1, Flush::Sync);
    write_batches(&b, "t", 20);
    b.kill9();

    // Cut the file in the middle of the last entry.
    let seg = active_segment(dir.path());
    let bytes = head(&seg);
    let end = data_end(&bytes);
    std::fs::write(&seg, &bytes[..end - 10]).unwrap();

    let b = Broker::start(dir.path(), &["--shards", "1"]);
    let got: Vec<String> = consume_all(&b.addr, "t", "g", 19)
        .iter()
        .map(value)
        .collect();
    assert_eq!(got, (0..19).map(|i| format!("t-{i}")).collect::<Vec<_>>());
    let log = b.stderr_text();
    assert!(log.contains("recovery dropped a damaged log tail"), "{log}");
    // Writing continues at the cut, at the next offset, and survives a restart.
    write_batches(&b, "t", 1);
    let info = b.admin().describe_topic("t").unwrap();
    assert_eq!(info.queues[0].end_offset, 20);
    b.kill9();
    let b = Broker::start(dir.path(), &["--shards", "1"]);
    assert!(!b.stderr_text().contains("dropped"), "{}", b.stderr_text());
    assert_eq!(consume_all(&b.addr, "t", "g2", 20).len(), 20);
}

#[test]
fn corrupt_bytes_at_the_end_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &["--shards", "1"]);
    b.create_topic("t", 1, Flush::Sync);
    write_batches(&b, "t", 10);
    b.kill9();

    // Flip a byte inside the last entry's value, and add garbage after the end.
    let seg = active_segment(dir.path());
    let mut bytes = head(&seg);
    let end = data_end(&bytes);
    bytes[end - 5] ^= 0xff;
    bytes.extend_from_slice(b"garbage that is not an entry");
    std::fs::write(&seg, &bytes).unwrap();

    let b = Broker::start(dir.path(), &["--shards", "1"]);
    let got: Vec<String> = consume_all(&b.addr, "t", "g", 10)
        .iter()
        .map(value)
        .collect();
    assert_eq!(got, (0..9).map(|i| format!("t-{i}")).collect::<Vec<_>>());
    assert!(b
        .stderr_text()
        .contains("recovery dropped a damaged log tail"));
}
