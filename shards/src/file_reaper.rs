//! Frees deleted files' blocks off the shards' threads, a slice at a time.
//!
//! Unlinking a file frees nothing while it is open or mapped: its blocks
//! go when the last descriptor or map of it closes, on whichever thread
//! that is, and freeing them is not cheap. On the test VM (ext4 mounted
//! with `discard`) the last close of a deleted 1 GiB segment took ~195 ms
//! (the discard of every block), so retention stalled the shard that
//! dropped the segment, and with it every produce and fetch on it (publish
//! max 332–620 ms in 30–60 s runs with retention). Concurrent O_DIRECT
//! writes also stalled behind the discard (fio: max 23 ms while a 1 GiB
//! file was removed, 6 ms without).
//!
//! So the last holder of a deleted file hands its descriptor here instead
//! of closing it (`file_map::FileMap`, `index_spill`): one thread cuts the
//! file down `TRUNCATE_STEP_BYTES` at a time with `TRUNCATE_PAUSE` between
//! (RocksDB's delete scheduler does the same for its SST files), then
//! closes it. fio's writes during such a delete: p99.99 5.7–8.8 ms, max
//! 8.7–27.5 ms, noisy, against ~20 and 23 ms for a plain `rm`. It frees at
//! most ~2 GiB/s (16 MiB per 5 ms pause plus ~3 ms of discard): faster
//! than the log is written here, so space is back within a second or so
//! of a deletion.

use std::fs::File;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Bytes freed per truncation: ~3 ms of discard on the test VM.
pub const TRUNCATE_STEP_BYTES: u64 = 16 << 20;
/// Pause between truncations, leaving the device to other writes.
pub const TRUNCATE_PAUSE: Duration = Duration::from_millis(5);

static REAPER: OnceLock<Mutex<Sender<File>>> = OnceLock::new();

/// Frees and closes `file`, an unlinked file nobody maps any more, in the
/// background. Falls back to closing it here if the thread cannot start.
pub fn reap(file: File) {
    let sender = REAPER.get_or_init(|| {
        let (tx, rx) = channel::<File>();
        let started = std::thread::Builder::new()
            .name("file-reaper".into())
            .spawn(move || {
                for file in rx {
                    free_slowly(file);
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the file reaper; deleted files are freed inline");
        }
        Mutex::new(tx)
    });
    let sent = sender.lock().unwrap_or_else(|e| e.into_inner()).send(file);
    if let Err(unsent) = sent {
        drop(unsent.0); // no reaper thread: the close frees the blocks here
    }
}

/// Whether `file` has been unlinked (its last close frees its blocks).
pub fn is_unlinked(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|m| m.nlink() == 0)
}

fn free_slowly(file: File) {
    let mut len = file.metadata().map_or(0, |m| m.len());
    while len > 0 {
        len = len.saturating_sub(TRUNCATE_STEP_BYTES);
        if let Err(e) = file.set_len(len) {
            // Read-only descriptor or an I/O error: the close frees the rest.
            tracing::debug!(error = %e, "cannot truncate a deleted file; closing it whole");
            break;
        }
        std::thread::sleep(TRUNCATE_PAUSE);
    }
}
