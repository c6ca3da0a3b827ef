//! Touching the broker's memory once at start (as the JVM's AlwaysPreTouch
//! and RocketMQ's warm-up of mapped files do). A fresh page costs a fault
//! and zeroing the first time it is written; on a VM, also the host backing
//! it. Paid by the first seconds of traffic, that cost queued the messages
//! behind it: a fresh broker's first run at 500,000 msg/s had publish p99
//! of 75-254 ms, later runs on the same broker 2-4 ms (docs/benchmarks.md).
//! The memory is freed back to the allocator, which keeps it and hands it
//! out again to the shards' buffers.

use std::time::{Duration, Instant};

/// Allocation size for touching: large enough to be few allocations, small
/// enough that the allocator keeps freed chunks in its own pages instead
/// of unmapping them (mimalloc returns only huge objects to the OS at once).
const CHUNK_BYTES: usize = 1 << 20;

/// Writes every byte of `bytes` (rounded up to whole MiB) of fresh heap
/// memory, then frees it; returns the bytes touched and how long it took.
pub fn pretouch(bytes: usize) -> (usize, Duration) {
    let started = Instant::now();
    let chunks: Vec<Vec<u8>> = (0..bytes.div_ceil(CHUNK_BYTES))
        // Not zeroes: `vec![0; n]` asks for zeroed memory, which fresh
        // pages already are, and would touch nothing.
        .map(|_| std::hint::black_box(vec![1u8; CHUNK_BYTES]))
        .collect();
    (chunks.len() * CHUNK_BYTES, started.elapsed())
}

/// The memory this process may use: physical memory, or its cgroup's
/// limit when that is lower (a container's `memory.max`).
pub fn memory_bytes() -> usize {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let (pages, page_bytes) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = usize::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(usize::try_from(page_bytes).unwrap_or(0));
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroups
        .lines()
        .filter_map(cgroup_limit_file)
        .filter_map(|file| std::fs::read_to_string(file).ok()?.trim().parse().ok())
        .fold(ram, usize::min)
}

/// Where the memory limit of a `/proc/self/cgroup` line's group is, if the
/// line is the unified (v2) hierarchy or v1's memory controller.
fn cgroup_limit_file(line: &str) -> Option<String> {
    let mut fields = line.splitn(3, ':');
    let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    if controllers.is_empty() {
        Some(format!("/sys/fs/cgroup{path}/memory.max"))
    } else if controllers.split(',').any(|c| c == "memory") {
        Some(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_whole_chunks_and_knows_the_machines_memory() {
        assert_eq!(pretouch(0).0, 0);
        assert_eq!(pretouch(1).0, CHUNK_BYTES);
        assert_eq!(pretouch(3 * CHUNK_BYTES).0, 3 * CHUNK_BYTES);
        // Anything that runs these tests has more than 64 MiB.
        assert!(memory_bytes() > 64 << 20);
    }

    #[test]
    fn finds_the_memory_limit_of_either_cgroup_version() {
        assert_eq!(
            cgroup_limit_file("0::/user.slice/a").as_deref(),
            Some("/sys/fs/cgroup/user.slice/a/memory.max")
        );
        assert_eq!(
            cgroup_limit_file("4:memory:/box").as_deref(),
            Some("/sys/fs/cgroup/memory/box/memory.limit_in_bytes")
        );
        assert_eq!(
            cgroup_limit_file("5:cpu,memory:/b").as_deref(),
            Some("/sys/fs/cgroup/memory/b/memory.limit_in_bytes")
        );
        assert_eq!(cgroup_limit_file("1:cpu:/"), None);
        assert_eq!(cgroup_limit_file("garbage"), None);
    }
}
