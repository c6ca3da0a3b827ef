//! Small files replaced atomically: write a temporary file through io_uring,
//! `fdatasync` it, rename it over the old one, sync the directory. A crash
//! leaves either the old file or the new one, never a torn mix. Every such
//! file ends with a CRC-32 of its contents so a damaged one is reported.

use crate::error::{Result, ShardError};
use std::path::Path;

/// Bytes of the trailing checksum.
const CHECKSUM_BYTES: usize = 4;

/// Replaces `path` with `contents` (+ checksum) durably.
pub async fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let mut data = Vec::with_capacity(contents.len() + CHECKSUM_BYTES);
    data.extend_from_slice(contents);
    data.extend_from_slice(&crc32fast::hash(contents).to_be_bytes());
    let tmp = path.with_extension("tmp");
    let file = glommio::io::BufferedFile::create(&tmp).await?;
    file.write_at(data, 0).await?;
    file.fdatasync().await?;
    file.close().await?;
    glommio::io::rename(&tmp, path).await?;
    if let Some(dir) = path.parent() {
        let d = glommio::io::Directory::open(dir).await?;
        d.sync().await?;
        d.close().await?;
    }
    Ok(())
}

/// Reads a file written by `write_atomic`; `None` if it does not exist.
/// Read at start-up only, before the shard serves.
pub fn read_checked(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let corrupt = |reason: &str| ShardError::CorruptFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if data.len() < CHECKSUM_BYTES {
        return Err(corrupt("shorter than its checksum"));
    }
    let body_len = data.len() - CHECKSUM_BYTES;
    let stored = u32::from_be_bytes(data[body_len..].try_into().expect("4 bytes"));
    if crc32fast::hash(&data[..body_len]) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    data.truncate(body_len);
    Ok(Some(data))
}
