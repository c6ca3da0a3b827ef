//! Sends a reply — its header and the stored batches after it — to a
//! client socket.
//!
//! Bytes in memory (the header, batches still in the log's tail cache) go
//! out gathered in one `writev`, so a reply of several batches costs one
//! system call and one wakeup of the reader, not one per batch. A batch read
//! from a segment's map goes out with `sendfile` from the segment file: the
//! socket takes the page-cache pages themselves, where a write from the map
//! would copy every byte (and fault in every page of a lagging reader) on
//! the shard's thread.

use bytes::Bytes;
use coremq_shards::file_map;
use futures::io::WriteHalf;
use futures::AsyncWriteExt;
use glommio::net::TcpStream;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// Smaller batches are copied: one syscall per small batch would cost more
/// than the copy it saves.
pub const SENDFILE_BYTES_MIN: usize = 16 << 10;
/// Bytes copied through glommio's write when the socket is full, which
/// waits until the socket can take more (glommio has no readiness wait of
/// its own to call).
const WAIT_WRITE_BYTES: usize = 4 << 10;
/// Pieces per `writev` (the kernel's IOV_MAX).
const IOVECS_MAX: usize = 1024;

/// Makes `sock` non-blocking, so `sendfile` and `writev` return at once
/// when it is full. glommio's own socket calls are non-blocking already
/// (MSG_DONTWAIT after a readiness poll), so they are unaffected.
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

/// Writes `head` and then `batches` to `sock` (the descriptor behind
/// `writer`).
pub async fn send_reply(
    writer: &mut WriteHalf<TcpStream>,
    sock: RawFd,
    head: &[u8],
    batches: &[Bytes],
) -> io::Result<()> {
    let mut pieces: Vec<&[u8]> = Vec::with_capacity(1 + batches.len());
    pieces.push(head);
    for batch in batches {
        let region = if batch.len() >= SENDFILE_BYTES_MIN {
            file_map::region_of(batch)
        } else {
            None
        };
        match region {
            Some((file, offset)) => {
                write_gathered(writer, sock, &pieces).await?;
                pieces.clear();
                send_file(writer, sock, file, offset, batch).await?;
            }
            None => pieces.push(batch),
        }
    }
    write_gathered(writer, sock, &pieces).await
}

/// Writes `pieces` back to back, gathered in as few `writev` calls as the
/// socket allows.
async fn write_gathered(
    writer: &mut WriteHalf<TcpStream>,
    sock: RawFd,
    pieces: &[&[u8]],
) -> io::Result<()> {
    // Progress: the first piece not fully sent, and the bytes sent from its
    // start (counting on into the next pieces until the loop moves on).
    let (mut first, mut done) = (0, 0);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(pieces.len().min(IOVECS_MAX));
    loop {
        while first < pieces.len() && done >= pieces[first].len() {
            done -= pieces[first].len();
            first += 1;
        }
        if first == pieces.len() {
            return Ok(());
        }
        iov.clear();
        iov.extend(
            pieces[first..]
                .iter()
                .take(IOVECS_MAX)
                .enumerate()
                .map(|(i, p)| {
                    let p = if i == 0 { &p[done..] } else { p };
                    libc::iovec {
                        iov_base: p.as_ptr() as *mut libc::c_void,
                        iov_len: p.len(),
                    }
                }),
        );
        // SAFETY: every iovec points into a slice borrowed for this call.
        let n = unsafe { libc::writev(sock, iov.as_ptr(), iov.len() as libc::c_int) };
        done += if n >= 0 {
            n as usize
        } else {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => {
                    let rest = &pieces[first][done..];
                    wait_write(writer, &rest[..rest.len().min(WAIT_WRITE_BYTES)]).await?
                }
                io::ErrorKind::Interrupted => 0,
                _ => return Err(err),
            }
        };
    }
}

/// Sends `batch`, whose bytes are `file` from `offset`, with `sendfile`.
async fn send_file(
    writer: &mut WriteHalf<TcpStream>,
    sock: RawFd,
    file: BorrowedFd<'_>,
    offset: u64,
    batch: &Bytes,
) -> io::Result<()> {
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
                        sent += wait_write(writer, &batch[sent..end]).await?;
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(())
}

/// Writes some of `bytes` through glommio, which first waits until the
/// full socket can take more; returns how many went.
async fn wait_write(writer: &mut WriteHalf<TcpStream>, bytes: &[u8]) -> io::Result<usize> {
    match writer.write(bytes).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}
