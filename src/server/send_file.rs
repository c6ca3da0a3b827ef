//! Sends a stored batch to a client socket.
//!
//! A batch still in the log's tail cache is in memory and is written as it
//! is. A batch read from a segment's map goes out with `sendfile` from the
//! segment file: the socket takes the page-cache pages themselves, where a
//! `write` from the map would copy every byte (and fault in every page of a
//! lagging reader) on the shard's thread.

use bytes::Bytes;
use coremq_shards::file_map;
use futures::io::WriteHalf;
use futures::AsyncWriteExt;
use glommio::net::TcpStream;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Smaller batches are copied: one syscall per small batch would cost more
/// than the copy it saves.
pub const SENDFILE_BYTES_MIN: usize = 16 << 10;
/// Bytes copied through glommio's write when the socket is full, which
/// waits until the socket can take more (glommio has no readiness wait of
/// its own to call).
const WAIT_WRITE_BYTES: usize = 4 << 10;

/// Makes `sock` non-blocking, so `sendfile` returns at once when it is
/// full. glommio's own socket calls are non-blocking already (MSG_DONTWAIT
/// after a readiness poll), so they are unaffected.
pub fn prepare(sock: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(sock, libc::F_GETFL);
        if flags < 0 || libc::fcntl(sock, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `batch` to the socket `sock` (the descriptor behind `writer`).
pub async fn send_batch(
    writer: &mut WriteHalf<TcpStream>,
    sock: RawFd,
    batch: &Bytes,
) -> io::Result<()> {
    let region = if batch.len() >= SENDFILE_BYTES_MIN {
        file_map::region_of(batch)
    } else {
        None
    };
    let Some((file, offset)) = region else {
        return writer.write_all(batch).await;
    };
    let mut sent = 0;
    while sent < batch.len() {
        let mut at = (offset + sent as u64) as libc::off_t;
        // SAFETY: both descriptors are open (`file` borrows `batch`, which
        // keeps its map and file alive); `at` is a valid out-pointer.
        let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut at, batch.len() - sent) };
        match n {
            n if n > 0 => sent += n as usize,
            // The file ends before the batch does: it was cut under us.
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "segment file shorter than the batch read from it",
                ))
            }
            _ => {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {
                        let end = batch.len().min(sent + WAIT_WRITE_BYTES);
                        match writer.write(&batch[sent..end]).await? {
                            0 => return Err(io::ErrorKind::WriteZero.into()),
                            n => sent += n,
                        }
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(())
}
