//! Micro-benchmarks of the hot paths, without a framework: each runs a
//! closure for a fixed wall time and prints nanoseconds per operation and
//! throughput. `cargo bench --bench hot_paths` (add a name to filter).
//! Figures go to docs/benchmarks.md with the command that made them.

use bytes::Bytes;
use coremq::protocol::{Request, TopicSpec};
use coremq_shards::batch::{self, BatchBuilder, Compression};
use coremq_shards::consume_queue::{ConsumeQueue, IndexEntry};
use coremq_shards::delay_queue::{DelayQueue, DelayedRef};
use coremq_shards::index_spill::IndexSpill;
use coremq_shards::segment;
use coremq_shards::time_wheel::TimeWheel;
use coremq_shards::QueueKey;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Wall time each benchmark runs for.
const RUN_TIME: Duration = Duration::from_millis(500);

fn bench(name: &str, bytes_per_op: usize, mut f: impl FnMut()) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
        return;
    }
    for _ in 0..10 {
        f();
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < RUN_TIME {
        for _ in 0..64 {
            f();
        }
        ops += 64;
    }
    let ns = start.elapsed().as_nanos() as f64 / ops as f64;
    let mb_s = if bytes_per_op > 0 {
        format!("{:>10.1} MB/s", bytes_per_op as f64 / ns * 1e3)
    } else {
        String::new()
    };
    println!("{name:<44} {ns:>12.1} ns/op {mb_s}");
}

fn build(n: usize, size: usize, c: Compression) -> Bytes {
    let value = vec![b'x'; size];
    let mut b = BatchBuilder::new(c).producer(1, 0, 0);
    for i in 0..n {
        b.push(i as i64, None, Some(&value), &[]);
    }
    b.build()
}

fn main() {
    let one_kib = vec![b'x'; 1024];
    bench("batch encode 64 x 1 KiB (none)", 64 * 1024, || {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..64 {
            b.push(i, None, Some(&one_kib), &[]);
        }
        black_box(b.build());
    });
    for c in [
        Compression::None,
        Compression::Lz4,
        Compression::Zstd,
        Compression::Snappy,
        Compression::Gzip,
    ] {
        let b = build(64, 1024, c);
        bench(
            &format!(
                "batch validate (crc32c) 64 x 1 KiB ({}, {} B stored)",
                c.name(),
                b.len()
            ),
            b.len(),
            || {
                black_box(batch::validate(&b).unwrap());
            },
        );
        bench(
            &format!("batch decode 64 x 1 KiB ({})", c.name()),
            64 * 1024,
            || {
                black_box(batch::decode_records(&b).unwrap());
            },
        );
    }
    let b = build(64, 1024, Compression::None);
    let key = QueueKey {
        topic_id: 1,
        queue: 0,
    };
    bench("log entry header (crc32) for 64 KiB batch", 0, || {
        black_box(segment::entry_header(
            key,
            segment::EntryMeta::default(),
            &b,
        ));
    });
    let mut seg = Vec::new();
    for _ in 0..16 {
        seg.extend_from_slice(&segment::entry_header(
            key,
            segment::EntryMeta::default(),
            &b,
        ));
        seg.extend_from_slice(&b);
    }
    bench("recovery scan of 16 x 64 KiB entries", seg.len(), || {
        black_box(segment::scan(&seg, 1 << 20));
    });
    // The same index in memory, and spilled (all but the newest chunks in
    // the shard's spill files, read back with `pread` from the page cache).
    let spill_dir = tempfile::tempdir().expect("temp dir");
    let spill = IndexSpill::open(&spill_dir.path().join("spill")).expect("spill");
    for (name, mut q) in [
        (
            "index lookup in 1M batches (+collect 1 MiB)",
            ConsumeQueue::new(0),
        ),
        (
            "index lookup in 1M spilled batches (+collect 1 MiB)",
            ConsumeQueue::spilling(0, spill.clone()),
        ),
    ] {
        for i in 0..1_000_000u64 {
            q.push(IndexEntry {
                base_offset: i as i64 * 10,
                batch_pos: i * 1000,
                batch_len: 900,
                record_count: 10,
                priority: 0,
            });
        }
        let mut o = 0i64;
        bench(name, 0, || {
            o = (o + 7_919_993) % 10_000_000;
            black_box(q.lookup(o, u64::MAX, 1 << 20));
        });
    }
    // Time wheel: insert, and insert + expiry, at 10 ms ticks.
    let mut wheel = TimeWheel::new(10, 0);
    let mut due = 0u64;
    bench("time wheel insert (spread over 1 h)", 0, || {
        due = (due + 7_919) % 3_600_000;
        wheel.insert(due, 1u64);
    });
    let mut wheel = TimeWheel::new(10, 0);
    let mut now = 0u64;
    bench("time wheel insert + expire (due in 1 s)", 0, || {
        wheel.insert(now + 1_000, 1u64);
        now += 1;
        black_box(wheel.advance(now));
    });
    delayed_memory();

    let req = Request::Produce {
        topic: "orders".into(),
        queue: 1,
        batch: b.clone(),
    };
    bench("produce request decode (64 KiB batch)", b.len(), || {
        let mut out = bytes::BytesMut::new();
        req.encode_body(&mut out);
        black_box(Request::decode(1, out.freeze()).unwrap());
    });
    let spec = Request::CreateTopic(TopicSpec {
        name: "orders".into(),
        queues: 4,
        flush: coremq::protocol::Flush::Sync,
        segment_bytes: 0,
        retention_ms: 0,
        retention_bytes: 0,
    });
    bench("create-topic request encode+decode (rkyv)", 0, || {
        let mut out = bytes::BytesMut::new();
        spec.encode_body(&mut out);
        black_box(Request::decode(3, out.freeze()).unwrap());
    });
}

/// Resident memory of this process, in bytes (from /proc/self/statm).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Memory one pending delayed message costs: 1M of them on a delay queue and its wheel.
fn delayed_memory() {
    const PENDING: u64 = 1_000_000;
    let before = rss_bytes();
    let mut q = DelayQueue::default();
    let mut wheel = TimeWheel::new(10, 0);
    for i in 0..PENDING {
        let due = (i * 7_919) % 86_400_000;
        q.add(
            i * 100,
            DelayedRef {
                key: QueueKey {
                    topic_id: 1,
                    queue: 0,
                },
                batch_pos: i * 100 + 36,
                batch_len: 64,
                priority: 0,
                deliver_at_ms: due as i64,
            },
        );
        wheel.insert(due, i * 100);
    }
    let after = rss_bytes();
    black_box((&q, &wheel));
    println!(
        "{:<44} {:>12.1} bytes/message (1M pending, delays up to 24 h)",
        "delayed message memory (queue + wheel)",
        after.saturating_sub(before) as f64 / PENDING as f64
    );
}
