//! A file mapped read-only, and the way back from a slice of the map to the
//! file it shows.
//!
//! Readers get stored batches as `Bytes` slices of a segment's map (no copy
//! into a request buffer). Sending such a slice with `write` still makes the
//! kernel copy it from the map into the socket; `sendfile` from the file
//! instead hands the socket the page-cache pages themselves. So every map
//! registers its address range here, and the send path asks `region_of` for
//! the file and offset behind a slice.

use crate::file_reaper;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;

/// Live maps by start address: (length in bytes, file descriptor).
static MAPS: Mutex<BTreeMap<usize, (usize, i32)>> = Mutex::new(BTreeMap::new());

/// Owner of one map; the `Bytes` slices of it keep it, and so its file, open.
struct FileMap {
    /// Unmapped first when the last slice goes (see `Drop`).
    map: ManuallyDrop<memmap2::Mmap>,
    /// Open as long as the map lives: `region_of` hands out its descriptor.
    /// Writable only so that the file reaper can cut a deleted file down.
    file: Option<File>,
}

impl AsRef<[u8]> for FileMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // Before `file` closes and its descriptor number can be reused.
        lock().remove(&(self.map.as_ptr() as usize));
        // SAFETY: dropped once, here, and never touched again.
        unsafe { ManuallyDrop::drop(&mut self.map) };
        // A segment deleted by retention is freed when its last map and
        // descriptor close: now that the map is gone, that is this
        // descriptor, and freeing a GiB of blocks belongs off this thread.
        if let Some(file) = self.file.take().filter(file_reaper::is_unlinked) {
            file_reaper::reap(file);
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<usize, (usize, i32)>> {
    // The map holds plain numbers: a panic elsewhere cannot leave it torn.
    MAPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Maps `len` bytes of `path` read-only (`len` may exceed the file's size:
/// the caller reads only bytes already written).
pub fn map(path: &Path, len: usize) -> std::io::Result<Bytes> {
    let file = File::options().read(true).write(true).open(path)?;
    // SAFETY: the file is only written by its shard's log, through O_DIRECT
    // writes to blocks past every position handed to readers, and no one
    // truncates a mapped region that is read (see `segment`).
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file)? };
    lock().insert(map.as_ptr() as usize, (map.len(), file.as_raw_fd()));
    Ok(Bytes::from_owner(FileMap {
        map: ManuallyDrop::new(map),
        file: Some(file),
    }))
}

/// The file and offset behind `bytes` when it is a slice of a live map.
/// The descriptor borrows `bytes`: the slice keeps its map and file open.
pub fn region_of(bytes: &Bytes) -> Option<(BorrowedFd<'_>, u64)> {
    let addr = bytes.as_ptr() as usize;
    let maps = lock();
    let (&start, &(len, fd)) = maps.range(..=addr).next_back()?;
    let offset = addr - start;
    if offset.checked_add(bytes.len())? > len {
        return None;
    }
    // SAFETY: `bytes` lies inside a live map, whose owner (kept alive by
    // `bytes`) holds the file open for at least the returned lifetime.
    Some((unsafe { BorrowedFd::borrow_raw(fd) }, offset as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    #[test]
    fn a_slice_leads_back_to_its_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let map = map(&path, data.len()).unwrap();
        let slice = map.slice(1000..3000);
        let (fd, offset) = region_of(&slice).expect("a slice of a map");
        assert_eq!(offset, 1000);
        let mut file = File::from(fd.try_clone_to_owned().unwrap());
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut read = vec![0; slice.len()];
        file.read_exact(&mut read).unwrap();
        assert_eq!(read, &slice[..]);
    }

    /// Waits up to 10 s for `f` to hold.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if f() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_deleted_files_last_map_hands_it_to_the_reaper() {
        let dir = tempfile::tempdir().unwrap();
        let (deleted, kept) = (dir.path().join("deleted"), dir.path().join("kept"));
        let len = 40 << 20;
        for p in [&deleted, &kept] {
            std::fs::write(p, vec![3u8; len]).unwrap();
        }
        let (a, b) = (map(&deleted, len).unwrap(), map(&kept, len).unwrap());
        // A second descriptor to watch the inode through once unlinked.
        let watch = File::open(&deleted).unwrap();
        std::fs::remove_file(&deleted).unwrap();
        let slice = a.slice(100..200);
        drop(a);
        assert_eq!(
            watch.metadata().unwrap().len(),
            len as u64,
            "a slice still maps it"
        );
        drop((slice, b));
        assert!(
            eventually(|| watch.metadata().unwrap().len() == 0),
            "the reaper never cut the deleted file down"
        );
        // A file still linked is closed as it is.
        assert_eq!(std::fs::metadata(&kept).unwrap().len(), len as u64);
    }

    #[test]
    fn memory_outside_maps_has_no_file() {
        assert!(region_of(&Bytes::from(vec![1u8; 4096])).is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 4096]).unwrap();
        let map = map(&path, 4096).unwrap();
        let addr = map.as_ptr() as usize;
        drop(map);
        // A dropped map is forgotten (its address may be reused by anything).
        assert!(!lock().contains_key(&addr));
    }
}
