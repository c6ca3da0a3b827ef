//! Read-ahead for log readers behind the tail cache.
//!
//! The log is written with O_DIRECT, so what a lagging consumer reads
//! through a segment's map is on disk, not in the page cache; left alone,
//! each page fault waits for the disk on the shard's thread, one read at a
//! time. Each segment keeps a `Window`, the frontier of what its readers
//! asked for, and asks for `READ_AHEAD_BYTES` beyond the leading reader
//! (`MADV_WILLNEED`, several disk reads in flight, like fio's queue
//! depth). The advice itself allocates and queues
//! thousands of pages, milliseconds of work, so a `ReadAhead` thread per
//! log, free to run on any core, gives it rather than the shard's reactor.

use bytes::Bytes;
use std::cell::Cell;
use std::path::Path;
use std::sync::mpsc;

/// How far ahead of a reader the kernel is asked to read.
pub const READ_AHEAD_BYTES: usize = 16 << 20;
/// Bytes per advice where the device's read-ahead size is unknown: Linux's
/// default `read_ahead_kb`.
const CHUNK_BYTES_DEFAULT: usize = 128 << 10;
/// madvise's granularity (x86-64 and aarch64 base pages).
pub const PAGE_BYTES: usize = 4096;

/// One segment's read-ahead frontier: the end of what was already asked
/// for. One per segment, not per reader: every queue of the shard shares
/// the log, so readers of many queues move through it together, and
/// asking again for pages already asked for would cost a page-cache
/// lookup per page (seen: 10,000 queues' readers kept a core busy).
#[derive(Default)]
pub struct Window(Cell<usize>);

impl Window {
    /// A reader reads `[start, end)`; returns the range to ask for next, if
    /// any: `READ_AHEAD_BYTES` beyond it once it comes within half of that
    /// of the frontier, from the frontier on (or from `start` when it is
    /// ahead of it), never at or past `stable` (the block the writer
    /// rewrites must not be cached). A reader far behind the frontier gets
    /// none: what it reads was asked for before (or evicted since, and the
    /// kernel's own fault read-ahead serves it).
    pub fn next(&self, start: usize, end: usize, stable: usize) -> Option<(usize, usize)> {
        let to = self.0.get();
        if end + READ_AHEAD_BYTES / 2 <= to {
            return None;
        }
        let ask_from = to.max(start) & !(PAGE_BYTES - 1);
        let ask_to = (end + READ_AHEAD_BYTES).min(stable);
        self.0.set(to.max(ask_to));
        (ask_to > ask_from).then_some((ask_from, ask_to))
    }
}

struct Request {
    /// Keeps the mapping alive until the advice is given.
    map: Bytes,
    from: usize,
    to: usize,
}

/// A log's read-ahead thread.
pub struct ReadAhead {
    tx: mpsc::Sender<Request>,
}

impl ReadAhead {
    /// Starts the thread for a log in `dir` (it ends when this is dropped).
    pub fn start(dir: &Path, name: String) -> std::io::Result<ReadAhead> {
        let chunk = chunk_bytes(dir);
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new().name(name).spawn(move || {
            unpin();
            for r in rx {
                advise(&r.map, r.from, r.to, chunk);
            }
        })?;
        Ok(ReadAhead { tx })
    }

    /// Asks the kernel to read `[from, to)` of `map` into the page cache.
    pub fn ask(&self, map: &Bytes, from: usize, to: usize) {
        debug_assert!(from < to && to <= map.len());
        let _ = self.tx.send(Request {
            map: map.clone(),
            from,
            to,
        });
    }
}

fn advise(map: &Bytes, from: usize, to: usize, chunk: usize) {
    // The kernel cuts each advice to the device's read-ahead size, so ask
    // in pieces of that.
    for at in (from..to.min(map.len())).step_by(chunk) {
        let len = chunk.min(to - at);
        // SAFETY: the range lies inside the mapping, which `map` keeps
        // alive, and WILLNEED only starts reads into the page cache.
        unsafe {
            libc::madvise(
                map.as_ptr().add(at) as *mut libc::c_void,
                len,
                libc::MADV_WILLNEED,
            );
        }
    }
}

/// The read-ahead size of the block device holding `dir`, which caps each
/// `MADV_WILLNEED` (`/sys/dev/block/MAJ:MIN/queue/read_ahead_kb`, or the
/// whole disk's for a partition); the default where sysfs does not say.
fn chunk_bytes(dir: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata(dir).map(|m| m.dev()) else {
        return CHUNK_BYTES_DEFAULT;
    };
    let block = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    ["queue", "../queue"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{block}/{q}/read_ahead_kb")).ok())
        .and_then(|kb| kb.trim().parse::<usize>().ok())
        .map_or(CHUNK_BYTES_DEFAULT, |kb| {
            (kb << 10).clamp(CHUNK_BYTES_DEFAULT, READ_AHEAD_BYTES)
        })
}

/// Lets the calling thread run on every online CPU: a thread inherits its
/// creator's pinning, and the shard's own core is the busiest.
fn unpin() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus.min(libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    #[test]
    fn the_window_follows_its_readers() {
        let w = Window::default();
        let mib = 1 << 20;
        let stable = 1 << 30;
        assert_eq!(w.next(0, mib, stable), Some((0, mib + READ_AHEAD_BYTES)));
        // Well inside the window: nothing more to ask.
        assert_eq!(w.next(mib, 2 * mib, stable), None);
        // Half-way through: the next stretch, from where the last one ended.
        let end = READ_AHEAD_BYTES / 2 + 2 * mib;
        assert_eq!(
            w.next(end - mib, end, stable),
            Some((mib + READ_AHEAD_BYTES, end + READ_AHEAD_BYTES))
        );
        // Another reader behind the frontier asks for nothing again.
        assert_eq!(w.next(10, 100, stable), None);
        // A reader ahead of the frontier starts from itself, at a page boundary.
        let far = 100 * mib + 10;
        assert_eq!(
            w.next(far, far + 100, stable),
            Some((100 * mib, far + 100 + READ_AHEAD_BYTES))
        );
        // Never at or past the stable end.
        let w = Window::default();
        assert_eq!(w.next(0, 4096, 8192), Some((0, 8192)));
        assert_eq!(w.next(4096, 8192, 8192), None);
    }

    /// Whether the page holding `at` of `map` is in the page cache.
    fn resident(map: &Bytes, at: usize) -> bool {
        let mut v = [0u8; 1];
        // SAFETY: one page inside the mapping, and a one-byte result vector.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(at & !(PAGE_BYTES - 1)) as *mut libc::c_void,
                PAGE_BYTES,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        v[0] & 1 == 1
    }

    /// A file of `len` bytes on disk and out of the page cache, as the log's
    /// O_DIRECT writes leave it, mapped.
    fn cold_map(dir: &Path, len: usize) -> Bytes {
        use std::os::fd::AsRawFd;
        let path: PathBuf = dir.join("cold");
        std::fs::write(&path, vec![0xab; len]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a plain advice call on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        // SAFETY: a private test file nobody else writes.
        Bytes::from_owner(unsafe { memmap2::Mmap::map(&f).unwrap() })
    }

    /// An asked range arrives in the page cache, in full, and no more.
    #[test]
    fn asked_pages_are_read_into_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let len = 2 * READ_AHEAD_BYTES;
        let map = cold_map(dir.path(), len);
        let last = READ_AHEAD_BYTES - PAGE_BYTES;
        assert!(
            !resident(&map, last),
            "the file should start out of the cache"
        );
        let ra = ReadAhead::start(dir.path(), "read-ahead-test".into()).unwrap();
        ra.ask(&map, 0, READ_AHEAD_BYTES);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(resident(&map, last) && resident(&map, READ_AHEAD_BYTES / 2))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            resident(&map, READ_AHEAD_BYTES / 2),
            "the middle was not read"
        );
        assert!(resident(&map, last), "the end was not read");
        assert!(
            !resident(&map, len - PAGE_BYTES),
            "read past the asked range"
        );
    }
}
