//! Keeps the commit log's I/O off glommio's polled ring on devices that
//! cannot poll.
//!
//! glommio sends a DMA file's reads and writes to an `IORING_SETUP_IOPOLL`
//! ring when a probe read through that ring succeeds. On a device without
//! poll queues (`queue/io_poll` = 0: virtio disks, NVMe without the
//! `poll_queues` module option) the kernel still accepts the probe, so
//! glommio picks the polled ring — and with two shards, writes on it were
//! measured to complete 1–12 s late while the disk sat idle
//! (docs/benchmarks.md, "The polled-ring stall"). glommio caches its verdict
//! per device and per thread, and a failed probe marks the device
//! non-pollable. So before a shard opens its log, it opens one scratch file
//! write-only on an unpollable device: glommio's probe read fails on it, and
//! every later DMA file of that device uses the interrupt-driven main ring.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::ShardError;

/// Name of the scratch file, removed again at once.
const PROBE_FILE: &str = ".io-poll-probe";

/// What the kernel says about polled I/O on the device holding a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollSupport {
    /// The device has poll queues: polled completion works.
    Pollable,
    /// The device completes I/O by interrupt only.
    Unpollable,
    /// Not a block device sysfs describes (tmpfs, overlay, no sysfs).
    Unknown,
}

/// Reads `queue/io_poll` of the block device holding `dir` (its parent
/// disk's, for a partition).
pub fn support(dir: &Path) -> PollSupport {
    let Ok(meta) = std::fs::metadata(dir) else {
        return PollSupport::Unknown;
    };
    let dev = meta.dev();
    let (major, minor) = (dev_major(dev), dev_minor(dev));
    let Ok(node) = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")) else {
        return PollSupport::Unknown;
    };
    // A partition has no queue of its own; its disk is the parent directory.
    let queue = [node.join("queue"), node.join("../queue")]
        .into_iter()
        .find(|q| q.is_dir());
    match queue.map(|q| std::fs::read_to_string(q.join("io_poll"))) {
        Some(Ok(s)) if s.trim() == "1" => PollSupport::Pollable,
        Some(Ok(s)) if s.trim() == "0" => PollSupport::Unpollable,
        _ => PollSupport::Unknown,
    }
}

/// On an unpollable device, makes this thread's glommio executor use its
/// main ring for every DMA file under `dir`. Call on the shard's thread
/// before the first DMA file of that device is opened.
pub async fn keep_off_polled_ring(dir: &Path) -> Result<PollSupport, ShardError> {
    let support = support(dir);
    if support != PollSupport::Unpollable {
        return Ok(support);
    }
    let path: PathBuf = dir.join(PROBE_FILE);
    let _ = std::fs::remove_file(&path);
    // A FIFO on the same file system: glommio attributes it to the same
    // device, and its probe read through the polled ring fails with
    // EOPNOTSUPP (a pipe has no iopoll), which glommio records silently.
    make_fifo(&path)?;
    let opened = glommio::io::OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(&path)
        .await;
    let removed = std::fs::remove_file(&path);
    opened?.close().await?;
    removed?;
    Ok(support)
}

fn make_fifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `major(3)` of a `st_dev`, as glibc encodes it.
fn dev_major(dev: u64) -> u64 {
    ((dev & 0x0000_0000_000f_ff00) >> 8) | ((dev & 0xffff_f000_0000_0000) >> 32)
}

/// `minor(3)` of a `st_dev`, as glibc encodes it.
fn dev_minor(dev: u64) -> u64 {
    (dev & 0x0000_0000_0000_00ff) | ((dev & 0x0000_0fff_fff0_0000) >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_decode_like_glibc() {
        // makedev(259, 1) and makedev(8, 17) as glibc encodes them.
        assert_eq!((dev_major(0x10301), dev_minor(0x10301)), (259, 1));
        assert_eq!((dev_major(0x811), dev_minor(0x811)), (8, 17));
        // Numbers past 12 (major) and 8 (minor) bits use the high bits:
        // makedev(0x12345, 0x6789a).
        let dev = (0x12345u64 & 0xfff) << 8
            | (0x12345u64 & !0xfff) << 32
            | (0x6789au64 & 0xff)
            | (0x6789au64 & !0xff) << 12;
        assert_eq!((dev_major(dev), dev_minor(dev)), (0x12345, 0x6789a));
    }

    /// On an unpollable device the log's writes go through the main ring.
    #[test]
    fn log_writes_skip_the_polled_ring() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        if support(&d) != PollSupport::Unpollable {
            eprintln!(
                "skipped: {} is not on an unpollable block device",
                d.display()
            );
            return;
        }
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                keep_off_polled_ring(&d).await.unwrap();
                let f = glommio::io::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .dma_open(d.join("data"))
                    .await
                    .unwrap();
                let _ = glommio::executor().io_stats();
                let mut buf = f.alloc_dma_buffer(4096);
                buf.as_bytes_mut().fill(7);
                f.write_at(buf, 0).await.unwrap();
                f.close().await.unwrap();
                let stats = glommio::executor().io_stats();
                assert_eq!(
                    stats.poll_ring.file_writes().0,
                    0,
                    "write on the polled ring"
                );
                assert_eq!(stats.main_ring.file_writes().0, 1);
                assert!(!d.join(PROBE_FILE).exists(), "the probe FIFO is removed");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_missing_directory_is_unknown() {
        assert_eq!(support(Path::new("/nonexistent/dir")), PollSupport::Unknown);
    }
}
