//! One client connection on one shard.
//!
//! The read loop buffers bytes until a whole frame is there (refusing one
//! over `max_frame_bytes` from its length prefix alone), decodes it, and
//! hands it to `ShardCtx::dispatch`, awaiting only the ordered first phase.
//! The rest of each request runs as its own task, so a pipelining client
//! gets replies as they complete, matched by request id. A writer task owns
//! the socket's write half and sends replies; fetched batches go to the
//! socket straight from the log (no copy into a reply buffer; from the
//! page cache with `sendfile` when they are read from a segment file).
//! A malformed frame gets an error reply and the connection is closed:
//! after garbage, frame boundaries cannot be trusted.

use super::read_buffer::ReadBuffer;
use super::shard_context::ShardCtx;
use super::socket_send;
use crate::protocol::frame::{self, FrameError, FRAME_LEN_BYTES, REQUEST_HEADER_BYTES};
use crate::protocol::messages::{encode_error, encode_reply};
use crate::protocol::{DecodeError, ErrorCode, ErrorReply, Request, Response};
use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use glommio::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;

/// Requests one connection may have in progress; reading pauses beyond it.
pub const IN_FLIGHT_PER_CONNECTION_MAX: u64 = 1024;
/// Request bytes one connection may have in progress (at least one frame):
/// bounds what a saturated broker holds per client (a producer with 16
/// unacknowledged 64 KiB batches holds 1 MiB).
pub const IN_FLIGHT_BYTES_PER_CONNECTION_MIN: u64 = 16 << 20;
/// Reply bytes gathered before they are sent (replies ready at once share one send).
const REPLY_COALESCE_BYTES_MAX: usize = 64 << 10;
/// Bytes read from the socket per read call (more when a frame needs it).
const READ_CHUNK_BYTES: usize = 64 << 10;
/// A frame at least this long is read into a buffer of its own, and no read
/// runs past its end: its batch then owns its memory and is stored without
/// a copy. Smaller frames share read buffers and are copied once.
const OWN_BUFFER_FRAME_MIN_BYTES: usize = 16 << 10;

struct Outgoing {
    request_id: u32,
    response: Response,
    /// Units of the connection's in-flight byte limit it holds (0 for
    /// refusals, which hold no request slot either).
    bytes: u64,
}

pub async fn serve(ctx: Rc<ShardCtx>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let sock = stream.as_raw_fd();
    if let Err(e) = socket_send::prepare(sock) {
        tracing::warn!(?peer, error = %e, "cannot make the socket non-blocking; closing it");
        return;
    }
    let (mut reader, mut writer) = stream.split();
    let (tx, mut rx) = mpsc::unbounded::<Outgoing>();
    let in_flight = Rc::new(glommio::sync::Semaphore::new(IN_FLIGHT_PER_CONNECTION_MAX));
    let bytes_limit = IN_FLIGHT_BYTES_PER_CONNECTION_MIN.max(ctx.config.max_frame_bytes as u64);
    let in_flight_bytes = Rc::new(glommio::sync::Semaphore::new(bytes_limit));
    let writer_permits = in_flight.clone();
    let writer_bytes = in_flight_bytes.clone();
    let writer_task = glommio::spawn_local(async move {
        // Replies ready together go out together: their headers and small
        // bodies are gathered into one buffer (one send for a burst of
        // produce acks); stored batches are written from the log as they are.
        let mut head = BytesMut::with_capacity(REPLY_COALESCE_BYTES_MAX);
        let mut ok = true;
        while let Some(first) = rx.next().await {
            let mut next = Some(first);
            while let Some(out) = next.take() {
                let batches = encode(&out, &mut head);
                if !batches.is_empty() {
                    ok = ok
                        && socket_send::send_reply(&mut writer, sock, &head, &batches)
                            .await
                            .is_ok();
                    head.clear();
                }
                if out.bytes > 0 {
                    writer_permits.signal(1);
                    writer_bytes.signal(out.bytes);
                }
                if head.len() < REPLY_COALESCE_BYTES_MAX {
                    next = rx.try_recv().ok();
                }
            }
            if !head.is_empty() {
                ok = ok && writer.write_all(&head).await.is_ok();
                head.clear();
            }
            if !ok {
                break;
            }
        }
        let _ = writer.close().await;
    });

    let mut buf = ReadBuffer::with_capacity(READ_CHUNK_BYTES);
    let max_frame = ctx.config.max_frame_bytes;
    // After a large frame the next one is likely large too (a batching
    // producer): at the boundary, read its length prefix alone first.
    let mut last_frame_large = false;
    // Whether frames were split off the front of `buf`'s memory, which the
    // next frame then shares with them.
    let mut shared = false;
    'conn: loop {
        // Parse every whole frame already buffered.
        loop {
            let len = match frame::peek_frame_len(&buf, max_frame) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    let id = request_id_of(&buf);
                    refuse(
                        &tx,
                        id,
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes is over the limit of {max} bytes"),
                    );
                    break 'conn;
                }
                Err(e) => {
                    refuse(&tx, 0, ErrorCode::Malformed, e.to_string());
                    break 'conn;
                }
            };
            if buf.len() < FRAME_LEN_BYTES + len {
                buf.reserve(FRAME_LEN_BYTES + len - buf.len());
                break;
            }
            // A frame that fills the buffer (and most of its capacity) takes the
            // buffer itself: its batch then owns its memory and is stored
            // without a copy (see OWN_BUFFER_FRAME_MIN_BYTES). Frames split off
            // a shared buffer are copied when stored, so the tail cache never
            // pins a mostly empty read buffer.
            let whole = FRAME_LEN_BYTES + len;
            last_frame_large = whole >= OWN_BUFFER_FRAME_MIN_BYTES;
            let mut frame_bytes = if buf.len() == whole && buf.capacity() <= 2 * whole {
                buf.take()
            } else {
                shared = true;
                buf.split_to(whole)
            };
            let _ = frame_bytes.split_to(FRAME_LEN_BYTES);
            let (header, body) = match frame::parse_request(frame_bytes.freeze()) {
                Ok(x) => x,
                Err(e) => {
                    refuse(&tx, 0, ErrorCode::Malformed, e.to_string());
                    break 'conn;
                }
            };
            let req = match Request::decode_versioned(header.api, header.api_version, body) {
                Ok(r) => r,
                // Well-formed frames we cannot serve: refuse the request, keep the connection.
                Err(DecodeError::UnknownApi(api)) => {
                    let msg = format!("unknown api {api}");
                    refuse(&tx, header.request_id, ErrorCode::UnknownApi, msg);
                    continue;
                }
                Err(DecodeError::UnsupportedVersion { api, version }) => {
                    let msg =
                        format!("api {api} version {version} is not supported by this broker");
                    refuse(&tx, header.request_id, ErrorCode::UnsupportedVersion, msg);
                    continue;
                }
                // Whole and well framed, only too long a list: refuse it, keep the connection.
                Err(e @ DecodeError::TooManyEntries { .. }) => {
                    refuse(
                        &tx,
                        header.request_id,
                        ErrorCode::InvalidRequest,
                        e.to_string(),
                    );
                    continue;
                }
                Err(e) => {
                    refuse(&tx, header.request_id, ErrorCode::Malformed, e.to_string());
                    break 'conn;
                }
            };
            // The writer gives both back once the reply is sent.
            let frame_units = (len as u64).max(1);
            if in_flight.acquire(1).await.is_err()
                || in_flight_bytes.acquire(frame_units).await.is_err()
            {
                break 'conn;
            }
            let pending = ctx.dispatch(req).await;
            let tx = tx.clone();
            let request_id = header.request_id;
            glommio::spawn_local(async move {
                let response = pending.await;
                let _ = tx.unbounded_send(Outgoing {
                    request_id,
                    response,
                    bytes: frame_units,
                });
            })
            .detach();
        }
        // Read more.
        let want = match frame::peek_frame_len(&buf, max_frame) {
            Ok(Some(len)) if FRAME_LEN_BYTES + len >= OWN_BUFFER_FRAME_MIN_BYTES => {
                let whole = FRAME_LEN_BYTES + len;
                // Exactly the rest of this frame, into a buffer of its size.
                if shared || buf.capacity() < whole {
                    let mut own = BytesMut::with_capacity(whole);
                    own.extend_from_slice(&buf);
                    buf.set(own);
                    shared = false;
                }
                whole - buf.len()
            }
            _ if buf.is_empty() => {
                buf.set(BytesMut::with_capacity(READ_CHUNK_BYTES));
                shared = false;
                if last_frame_large {
                    FRAME_LEN_BYTES
                } else {
                    READ_CHUNK_BYTES
                }
            }
            _ => READ_CHUNK_BYTES.max(buf.capacity() - buf.len()),
        };
        match buf.read_from(&mut reader, sock, want).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    tracing::debug!(?peer, bytes = buf.len(), "client left mid-frame");
                }
                break;
            }
            Ok(_) => {}
        }
    }
    drop(tx);
    // Replies still in progress finish and are sent before the socket closes.
    writer_task.await;
}

fn request_id_of(buf: &[u8]) -> u32 {
    if buf.len() >= FRAME_LEN_BYTES + REQUEST_HEADER_BYTES {
        u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"))
    } else {
        0
    }
}

fn refuse(tx: &mpsc::UnboundedSender<Outgoing>, request_id: u32, code: ErrorCode, message: String) {
    tracing::debug!(%code, %message, "refusing a request");
    let _ = tx.unbounded_send(Outgoing {
        request_id,
        response: Err(ErrorReply::new(code, message)),
        bytes: 0,
    });
}

/// Appends a reply's header and small body to `head` (no buffer of its own:
/// the length is patched in once the body is written); returns the batches
/// to send after it.
fn encode(out: &Outgoing, head: &mut BytesMut) -> Vec<Bytes> {
    let start = head.len();
    frame::put_response_header(head, out.request_id, 0, 0);
    let (code, batches) = match &out.response {
        Ok(reply) => (ErrorCode::None, encode_reply(reply, head)),
        Err(e) => {
            encode_error(e, head);
            (e.code, Vec::new())
        }
    };
    let body_len = head.len() - start - FRAME_LEN_BYTES - frame::RESPONSE_HEADER_BYTES;
    let batch_bytes: usize = batches.iter().map(Bytes::len).sum();
    // Patch frame length and error code (layout: frame::put_response_header).
    let frame_len = (frame::RESPONSE_HEADER_BYTES + body_len + batch_bytes) as u32;
    head[start..start + 4].copy_from_slice(&frame_len.to_be_bytes());
    head[start + 8..start + 10].copy_from_slice(&(code as u16).to_be_bytes());
    batches
}
