//! One pipelined connection to a broker.
//!
//! Writers share the socket through a mutex: a request frame is encoded in
//! memory and written whole, so frames of concurrent callers never
//! interleave. A reader thread owns the read half; it reads response frames
//! and hands each to whoever registered its request id — a [`PendingReply`]
//! (blocking callers) or a callback ([`Connection::send_with`], used by the
//! producer and consumer to wait on many requests at once).
//!
//! Invariants: a request's waiter is registered *before* its frame is
//! written, so a fast reply always finds it; every registered waiter is
//! completed exactly once — by its reply, or with
//! [`ClientError::Disconnected`] when the reader thread stops (EOF, read
//! error, malformed frame, [`Connection::close`]); after the reader stops
//! no new waiter can register, so nothing waits forever on a dead socket.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use coremq_shards::batch::BatchError;

use crate::protocol::frame::{
    self, peek_frame_len, put_request_header, RequestHeader, FRAME_LEN_BYTES, REQUEST_HEADER_BYTES,
};
use crate::protocol::messages::decode_response;
use crate::protocol::splice::{write_all_slices, Splices};
use crate::protocol::{ApiKey, DecodeError, ErrorCode, ErrorReply, Reply, Request};

/// Largest response frame the reader accepts (after the length prefix). A
/// fetch reply is bounded by the request's `max_bytes`, so anything larger
/// is a broken peer; the connection is closed rather than buffering it.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 64 << 20;
/// Default time allowed to establish the TCP connection.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default time a request may wait for its reply (and a frame write may block).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Bytes of a request frame before its body: length prefix and header.
const HEADER_BYTES: usize = FRAME_LEN_BYTES + REQUEST_HEADER_BYTES;
/// Read buffer of the reader thread, in bytes.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Everything that can go wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The broker answered with an error code.
    #[error("broker error: {0}")]
    Broker(ErrorReply),
    #[error("timed out waiting for the broker")]
    Timeout,
    #[error("the connection to the broker is closed")]
    Disconnected,
    #[error("cannot decode the broker's reply: {0}")]
    Decode(#[from] DecodeError),
    #[error("bad record batch: {0}")]
    Batch(#[from] BatchError),
    /// A bad argument or setting (the text says which).
    #[error("{0}")]
    Config(String),
    /// A message's options are out of range (priority, delay).
    #[error("invalid message: {0}")]
    InvalidMessage(#[from] super::producer::MessageError),
    /// The reply decoded, but is not the kind the request asks for.
    #[error("unexpected reply to a {0:?} request")]
    UnexpectedReply(ApiKey),
}

impl ClientError {
    /// Whether sending the same request again may succeed: transport
    /// failures and a broker that is shutting down.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Timeout | ClientError::Disconnected => true,
            ClientError::Broker(e) => e.code.is_retriable(),
            _ => false,
        }
    }

    /// The broker's error code, if this is a broker error.
    pub fn broker_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Time limits of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect: Duration,
    /// Waiting for a reply in [`Connection::call`]; also bounds a blocked frame write.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: CONNECT_TIMEOUT_DEFAULT,
            request: REQUEST_TIMEOUT_DEFAULT,
        }
    }
}

/// A raw response (or the reason there is none) for one request.
#[derive(Debug)]
pub struct Completion {
    request_id: u32,
    api: ApiKey,
    result: Result<(u16, Bytes), ClientError>,
}

impl Completion {
    /// The id the request was sent with.
    pub fn request_id(&self) -> u32 {
        self.request_id
    }

    /// Decodes the response; a broker error becomes [`ClientError::Broker`].
    pub fn into_reply(self) -> Result<Reply, ClientError> {
        let (code, body) = self.result?;
        decode_response(self.api, code, body)?.map_err(ClientError::Broker)
    }
}

type Callback = Box<dyn FnOnce(Completion) + Send + 'static>;

struct Waiter {
    api: ApiKey,
    on_reply: Callback,
}

/// State shared between callers and the reader thread.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u32, Waiter>,
    /// Set by the reader thread when it stops; no waiter registers afterwards.
    closed: bool,
}

struct Shared {
    waiters: Mutex<Waiters>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panicking callback cannot leave the map inconsistent: recover it.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, id: u32) -> Option<Waiter> {
        self.lock().by_id.remove(&id)
    }
}

/// A pipelined connection to one broker. `Send + Sync`: share it between
/// threads behind an `Arc`, requests from all of them are pipelined.
pub struct Connection {
    addr: String,
    timeouts: Timeouts,
    writer: Mutex<TcpStream>,
    /// A handle used only to shut the socket down, so `close` never waits
    /// behind a writer blocked on a full socket.
    control: TcpStream,
    next_id: AtomicU32,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// Connects to `addr` (`host:port`), trying every address it resolves to.
    pub fn connect(addr: &str, timeouts: Timeouts) -> Result<Connection, ClientError> {
        let mut last_err = None;
        let mut stream = None;
        for sa in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sa, timeouts.connect) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let stream = match (stream, last_err) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(ClientError::Io(e)),
            (None, None) => {
                return Err(ClientError::Config(format!(
                    "broker address {addr:?} resolves to nothing"
                )))
            }
        };
        Self::from_stream(addr, stream, timeouts)
    }

    fn from_stream(
        addr: &str,
        stream: TcpStream,
        timeouts: Timeouts,
    ) -> Result<Connection, ClientError> {
        // Requests are small and latency matters more than packet count.
        stream.set_nodelay(true)?;
        // A broker that stops reading must not block a writer forever.
        stream.set_write_timeout(Some(timeouts.request))?;
        let read_half = stream.try_clone()?;
        let control = stream.try_clone()?;
        let shared = Arc::new(Shared {
            waiters: Mutex::new(Waiters::default()),
        });
        let reader_shared = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name(format!("coremq-conn-{addr}"))
            .spawn(move || read_loop(read_half, reader_shared))?;
        Ok(Connection {
            addr: addr.to_string(),
            timeouts,
            writer: Mutex::new(stream),
            control,
            next_id: AtomicU32::new(1),
            shared,
            reader: Some(reader),
        })
    }

    /// The address this connection was opened with.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Whether the reader thread has stopped (the connection is unusable).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Shuts the socket down: the reader thread stops and every waiter
    /// completes with [`ClientError::Disconnected`].
    pub fn close(&self) {
        let _ = self.control.shutdown(Shutdown::Both);
    }

    /// Sends a request; `on_reply` runs exactly once, on the reader thread,
    /// with the response — unless this returns `Err`, in which case it never
    /// runs. Keep the callback short (hand the completion to a channel): the
    /// reader reads nothing else while it runs. Returns the request id.
    pub fn send_with<F>(&self, req: &Request, on_reply: F) -> Result<u32, ClientError>
    where
        F: FnOnce(Completion) + Send + 'static,
    {
        let api = req.api();
        // The body is encoded once, after room for the header, which is
        // filled in when the request id is known (no second copy of a batch).
        // Large batches are not copied at all: they go out from the
        // caller's buffers, between the frame's small fields.
        let mut splices = Splices::new();
        let mut frame = BytesMut::with_capacity(HEADER_BYTES + req.body_bytes_hint(&splices));
        frame.resize(HEADER_BYTES, 0);
        req.encode_body_splicing(&mut frame, &mut splices);
        let body_len = frame.len() - HEADER_BYTES + splices.bytes();

        let id = {
            let mut waiters = self.shared.lock();
            if waiters.closed {
                return Err(ClientError::Disconnected);
            }
            // Ids wrap after 2^32 requests; skip any still waiting.
            let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
            while waiters.by_id.contains_key(&id) {
                id = self.next_id.fetch_add(1, Ordering::Relaxed);
            }
            waiters.by_id.insert(
                id,
                Waiter {
                    api,
                    on_reply: Box::new(on_reply),
                },
            );
            id
        };

        let mut header = BytesMut::with_capacity(HEADER_BYTES);
        put_request_header(
            &mut header,
            RequestHeader {
                api: api as u16,
                api_version: req.api_version(),
                request_id: id,
            },
            body_len,
        );
        frame[..HEADER_BYTES].copy_from_slice(&header);

        let written = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let r = write_all_slices(&mut *w, &mut splices.io_slices(&frame));
            if r.is_err() {
                // A partial frame leaves the stream unframed: the connection is done.
                let _ = w.shutdown(Shutdown::Both);
            }
            r
        };
        if let Err(e) = written {
            // If the reader already failed the waiter, its callback has run:
            // report success so the caller sees exactly one outcome.
            if self.shared.remove(id).is_some() {
                return Err(ClientError::Io(e));
            }
        }
        Ok(id)
    }

    /// Sends a request without waiting for the reply.
    pub fn send(&self, req: &Request) -> Result<PendingReply, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let request_id = self.send_with(req, move |c| {
            // The receiver may have given up (timeout, dropped); nothing to do then.
            let _ = tx.send(c);
        })?;
        Ok(PendingReply {
            request_id,
            rx,
            shared: Arc::clone(&self.shared),
        })
    }

    /// Sends a request and waits up to the request timeout for its reply.
    pub fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?.wait(self.timeouts.request)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
        if let Some(h) = self.reader.take() {
            // Never join ourselves (a callback could drop the last handle).
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// A request that has been sent and whose reply has not been collected yet.
/// Dropping it abandons the reply.
pub struct PendingReply {
    request_id: u32,
    rx: mpsc::Receiver<Completion>,
    shared: Arc<Shared>,
}

impl PendingReply {
    pub fn request_id(&self) -> u32 {
        self.request_id
    }

    /// Waits up to `timeout` for the reply. On timeout the request is
    /// abandoned: a late reply is dropped by the reader.
    pub fn wait(self, timeout: Duration) -> Result<Reply, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(c) => c.into_reply(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.shared.remove(self.request_id);
                // The reply may have landed between the timeout and the removal.
                match self.rx.try_recv() {
                    Ok(c) => c.into_reply(),
                    Err(_) => Err(ClientError::Timeout),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        // Free the slot now rather than when (if ever) the reply arrives.
        self.shared.remove(self.request_id);
    }
}

/// Why the reader thread stopped.
#[derive(Debug)]
enum ReadStop {
    Eof,
    Io(std::io::Error),
    Frame(frame::FrameError),
}

fn read_loop(stream: TcpStream, shared: Arc<Shared>) {
    let stop = read_frames(&stream, &shared);
    match &stop {
        ReadStop::Eof => tracing::debug!("broker closed the connection"),
        ReadStop::Io(e) => tracing::debug!("connection read failed: {e}"),
        ReadStop::Frame(e) => tracing::warn!("broker sent a bad frame, closing: {e}"),
    }
    let _ = stream.shutdown(Shutdown::Both);
    let orphans: Vec<(u32, Waiter)> = {
        let mut waiters = shared.lock();
        waiters.closed = true;
        waiters.by_id.drain().collect()
    };
    for (request_id, w) in orphans {
        (w.on_reply)(Completion {
            request_id,
            api: w.api,
            result: Err(ClientError::Disconnected),
        });
    }
}

fn read_frames(stream: &TcpStream, shared: &Shared) -> ReadStop {
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    loop {
        let mut len_buf = [0u8; FRAME_LEN_BYTES];
        match read_exact_or_eof(&mut r, &mut len_buf) {
            Ok(true) => {}
            Ok(false) => return ReadStop::Eof,
            Err(e) => return ReadStop::Io(e),
        }
        let len = match peek_frame_len(&len_buf, RESPONSE_FRAME_BYTES_MAX) {
            Ok(Some(len)) => len,
            Ok(None) => return ReadStop::Eof, // unreachable: four bytes were read
            Err(e) => return ReadStop::Frame(e),
        };
        // Read into spare capacity (`Take` and the socket read into memory
        // not yet initialized), not a zeroed buffer: zeroing was a second
        // pass over every consumed byte.
        let mut body = Vec::with_capacity(len);
        match (&mut r).take(len as u64).read_to_end(&mut body) {
            Ok(n) if n == len => {}
            Ok(_) => return ReadStop::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return ReadStop::Io(e),
        }
        let (request_id, code, body) = match frame::parse_response(Bytes::from(body)) {
            Ok(parts) => parts,
            Err(e) => return ReadStop::Frame(e),
        };
        match shared.remove(request_id) {
            Some(w) => (w.on_reply)(Completion {
                request_id,
                api: w.api,
                result: Ok((code, body)),
            }),
            // Abandoned after a timeout, or a broker bug: either way nobody waits.
            None => tracing::debug!("dropping reply to unknown request {request_id}"),
        }
    }
}

/// Like `read_exact`, but a clean EOF before the first byte is `Ok(false)`.
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::fake_broker::reply_frame;
    use super::*;
    use crate::protocol::frame::parse_request;
    use std::io::Write;
    use std::net::TcpListener;

    /// Reads one request frame from a fake broker's socket.
    fn read_request(s: &mut TcpStream) -> Option<(RequestHeader, Request)> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).ok()?;
        let (h, body) = parse_request(Bytes::from(body)).ok()?;
        let req = Request::decode(h.api, body).ok()?;
        Some((h, req))
    }

    fn write_reply(s: &mut TcpStream, id: u32, resp: Result<Reply, ErrorReply>) {
        let out = reply_frame(id, &resp);
        s.write_all(&out).unwrap();
    }

    /// A fake broker: runs `serve` on the first accepted connection.
    fn fake_broker<F>(serve: F) -> (String, JoinHandle<()>)
    where
        F: FnOnce(TcpStream) + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve(s);
        });
        (addr, h)
    }

    fn produce(queue: u32) -> Request {
        Request::Produce {
            topic: "t".into(),
            queue,
            batch: Bytes::from_static(b"batch"),
        }
    }

    #[test]
    fn call_gets_canned_produce_reply() {
        let (addr, h) = fake_broker(|mut s| {
            let (hdr, req) = read_request(&mut s).unwrap();
            assert_eq!(hdr.api, ApiKey::Produce as u16);
            assert_eq!(hdr.api_version, crate::protocol::API_VERSION);
            assert_eq!(req, produce(2));
            write_reply(
                &mut s,
                hdr.request_id,
                Ok(Reply::Produce {
                    base_offset: 42,
                    duplicate: false,
                }),
            );
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let reply = c.call(&produce(2)).unwrap();
        assert_eq!(
            reply,
            Reply::Produce {
                base_offset: 42,
                duplicate: false
            }
        );
        h.join().unwrap();
    }

    #[test]
    fn pipelined_replies_out_of_order_reach_their_callers() {
        const N: u32 = 8;
        let (addr, h) = fake_broker(|mut s| {
            let mut got = Vec::new();
            for _ in 0..N {
                let (hdr, req) = read_request(&mut s).unwrap();
                let Request::Produce { queue, .. } = req else {
                    panic!("not a produce")
                };
                got.push((hdr.request_id, queue));
            }
            // Answer in reverse order; base_offset tells which request it was.
            for (id, queue) in got.into_iter().rev() {
                write_reply(
                    &mut s,
                    id,
                    Ok(Reply::Produce {
                        base_offset: i64::from(queue) * 100,
                        duplicate: false,
                    }),
                );
            }
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let pending: Vec<_> = (0..N).map(|q| (q, c.send(&produce(q)).unwrap())).collect();
        for (q, p) in pending {
            let reply = p.wait(Duration::from_secs(5)).unwrap();
            assert_eq!(
                reply,
                Reply::Produce {
                    base_offset: i64::from(q) * 100,
                    duplicate: false
                }
            );
        }
        h.join().unwrap();
    }

    #[test]
    fn broker_error_becomes_client_error() {
        let (addr, h) = fake_broker(|mut s| {
            let (hdr, _) = read_request(&mut s).unwrap();
            let mut e = ErrorReply::new(ErrorCode::OffsetOutOfRange, "too old");
            e.offsets = Some((5, 9));
            write_reply(&mut s, hdr.request_id, Err(e));
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let err = c
            .call(&Request::Fetch {
                topic: "t".into(),
                queue: 0,
                offset: 0,
                max_bytes: 10,
                max_wait_ms: 0,
            })
            .unwrap_err();
        match err {
            ClientError::Broker(e) => {
                assert_eq!(e.code, ErrorCode::OffsetOutOfRange);
                assert_eq!(e.offsets, Some((5, 9)));
            }
            other => panic!("unexpected {other:?}"),
        }
        h.join().unwrap();
    }

    #[test]
    fn eof_fails_every_waiter_and_later_sends() {
        let (addr, h) = fake_broker(|mut s| {
            read_request(&mut s).unwrap();
            read_request(&mut s).unwrap();
            // Close without answering.
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let a = c.send(&produce(0)).unwrap();
        let b = c.send(&produce(1)).unwrap();
        assert!(matches!(
            a.wait(Duration::from_secs(5)),
            Err(ClientError::Disconnected)
        ));
        assert!(matches!(
            b.wait(Duration::from_secs(5)),
            Err(ClientError::Disconnected)
        ));
        h.join().unwrap();
        assert!(c.is_closed());
        assert!(matches!(
            c.send(&produce(0)),
            Err(ClientError::Disconnected)
        ));
    }

    #[test]
    fn oversized_response_frame_closes_the_connection() {
        let (addr, h) = fake_broker(|mut s| {
            read_request(&mut s).unwrap();
            let len = (RESPONSE_FRAME_BYTES_MAX + 1) as u32;
            s.write_all(&len.to_be_bytes()).unwrap();
            let mut sink = [0u8; 16];
            let _ = s.read(&mut sink);
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let p = c.send(&produce(0)).unwrap();
        assert!(matches!(
            p.wait(Duration::from_secs(5)),
            Err(ClientError::Disconnected)
        ));
        h.join().unwrap();
    }

    #[test]
    fn wait_times_out_and_late_reply_is_dropped() {
        let (addr, h) = fake_broker(|mut s| {
            let (h1, _) = read_request(&mut s).unwrap();
            let (h2, _) = read_request(&mut s).unwrap();
            // The first reply comes after its caller gave up.
            write_reply(
                &mut s,
                h1.request_id,
                Ok(Reply::Produce {
                    base_offset: 1,
                    duplicate: false,
                }),
            );
            write_reply(
                &mut s,
                h2.request_id,
                Ok(Reply::Produce {
                    base_offset: 2,
                    duplicate: true,
                }),
            );
        });
        let c = Connection::connect(&addr, Timeouts::default()).unwrap();
        let p1 = c.send(&produce(0)).unwrap();
        assert!(matches!(
            p1.wait(Duration::from_millis(1)),
            Err(ClientError::Timeout) | Ok(_)
        ));
        let r = c.call(&produce(1)).unwrap();
        assert_eq!(
            r,
            Reply::Produce {
                base_offset: 2,
                duplicate: true
            }
        );
        h.join().unwrap();
    }
}
