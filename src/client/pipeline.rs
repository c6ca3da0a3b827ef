//! The pipelined per-queue long-poll loop shared by [`super::Consumer`]
//! (fetches) and [`super::PushConsumer`] (receives).
//!
//! A [`Pipeline`] owns one connection and a slot per queue; each slot has at
//! most one request in flight, and requests of all queues are pipelined on
//! the connection and handled in the order they complete, so a busy queue
//! cannot starve a quiet one. Each round starts sending at the next queue
//! (the write order rotates). A request carries a token (never reused);
//! when its reply comes back the caller learns whether it answers the
//! slot's current request, so replies to requests issued before a seek,
//! reconnect or reassignment can be told apart. A request unanswered for
//! `max_wait_ms` plus the request timeout means the broker is not answering:
//! the connection is dropped and the poll fails with
//! [`ClientError::Timeout`]. A poll reconnects at most once; an error met
//! while records were being returned is kept and reported by the next poll.
//!
//! Shard-aware: a slot's requests go over the [`ShardRouter`]'s connection
//! to the port of the shard owning its queue when there is one, else over
//! the shared connection; a slot changes connection only when it has no
//! request in flight. A broken shard connection abandons the requests in
//! flight on it and is reopened lazily (its queues fall back to the shared
//! connection while it cannot be reached); control requests
//! ([`Pipeline::connection`]) always use the shared connection.
//!
//! The caller states only what differs: which request to send for a slot
//! and how to apply a reply to it.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::protocol::{Reply, Request};

use super::connection::{ClientError, Completion, Connection, Timeouts};
use super::shard_router::ShardRouter;

#[derive(Debug, Clone, Copy)]
struct InFlight {
    token: u64,
    sent_at: Instant,
}

/// One queue of a pipeline, with the caller's state `S` for it.
#[derive(Debug)]
pub(crate) struct Slot<S> {
    pub queue: u32,
    in_flight: Option<InFlight>,
    /// The shard port the request in flight went to (0: the shared connection).
    route: u16,
    /// No request before this instant (after an early empty reply).
    pub not_before: Option<Instant>,
    pub state: S,
}

impl<S> Slot<S> {
    pub fn new(queue: u32, state: S) -> Slot<S> {
        Slot {
            queue,
            in_flight: None,
            route: 0,
            not_before: None,
            state,
        }
    }

    /// Abandons the request in flight (its reply will not be current) and
    /// any pause: the next round sends a new one.
    pub fn restart(&mut self) {
        self.in_flight = None;
        self.not_before = None;
    }
}

struct Event {
    queue: u32,
    token: u64,
    result: Result<Reply, ClientError>,
}

/// A reply as handed to the caller's apply function.
pub(crate) struct Answer {
    /// When the request was sent, if the reply answers the slot's current
    /// request (`None`: a stale reply; the slot is unchanged).
    pub sent_at: Option<Instant>,
    pub result: Result<Reply, ClientError>,
}

/// One connection with one request in flight per queue.
pub(crate) struct Pipeline<S> {
    addr: String,
    timeouts: Timeouts,
    conn: Option<Connection>,
    /// Connections to the shards' own ports.
    router: ShardRouter,
    /// What the requests are, for logs ("fetch", "receive").
    kind: &'static str,
    /// How long the broker may hold a request open.
    max_wait: Duration,
    pub slots: Vec<Slot<S>>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    next_token: u64,
    /// An error met while records were being returned; reported next poll.
    pending_error: Option<ClientError>,
    /// Slot index the next round of requests starts at (rotates the write order).
    next_first: usize,
}

/// Timeouts of a consumer's connection: the defaults with `request`.
pub(crate) fn timeouts(request: Duration) -> Timeouts {
    Timeouts {
        request,
        ..Timeouts::default()
    }
}

impl<S> Pipeline<S> {
    /// A pipeline over `conn` (connected to `addr`; reconnects use its
    /// timeouts), sending queue requests through `router` where it has a route.
    pub fn new(
        addr: &str,
        conn: Connection,
        router: ShardRouter,
        kind: &'static str,
        max_wait_ms: u32,
        slots: Vec<Slot<S>>,
    ) -> Pipeline<S> {
        let (tx, rx) = mpsc::channel();
        Pipeline {
            addr: addr.to_string(),
            timeouts: conn.timeouts(),
            conn: Some(conn),
            router,
            kind,
            max_wait: Duration::from_millis(u64::from(max_wait_ms)),
            slots,
            tx,
            rx,
            next_token: 0,
            pending_error: None,
            next_first: 0,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The shard ports with an open connection, ascending.
    pub fn shard_ports_in_use(&self) -> Vec<u16> {
        self.router.ports_in_use()
    }

    /// The connection to the shard owning `queue` (connecting lazily), or
    /// `None`: use [`Pipeline::connection`].
    pub fn shard_connection(&mut self, queue: u32, now: Instant) -> Option<Arc<Connection>> {
        self.router.route(queue, now).map(|(_, c)| c)
    }

    /// The router, to update the queues' shard ports after a describe.
    pub fn router_mut(&mut self) -> &mut ShardRouter {
        &mut self.router
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    pub fn slot_mut(&mut self, queue: u32) -> Option<&mut Slot<S>> {
        self.slots.iter_mut().find(|s| s.queue == queue)
    }

    /// Time a request may take before the connection is presumed dead.
    pub fn reply_allowance(&self) -> Duration {
        self.max_wait + self.timeouts.request
    }

    fn is_down(&self) -> bool {
        self.conn.as_ref().is_none_or(Connection::is_closed)
    }

    /// The connection, reconnecting first if it is gone.
    pub fn connection(&mut self) -> Result<&Connection, ClientError> {
        if self.is_down() {
            self.reconnect()?;
        }
        self.conn.as_ref().ok_or(ClientError::Disconnected)
    }

    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.drop_connection();
        self.conn = Some(Connection::connect(&self.addr, self.timeouts)?);
        Ok(())
    }

    /// Closes the connections (shared and shards); requests in flight on
    /// them are forgotten.
    pub fn drop_connection(&mut self) {
        if let Some(c) = self.conn.take() {
            c.close();
        }
        self.router.close_all();
        for s in &mut self.slots {
            s.in_flight = None;
        }
    }

    /// Forgets the requests in flight on shard connections that broke (their
    /// late `Disconnected` replies are stale); the next round resends them.
    fn forget_broken_shards(&mut self) {
        let dead = self.router.take_closed();
        if dead.is_empty() {
            return;
        }
        tracing::debug!(ports = ?dead, "shard connection closed; resending its {}es", self.kind);
        for s in &mut self.slots {
            if s.in_flight.is_some() && dead.contains(&s.route) {
                s.in_flight = None;
            }
        }
    }

    /// Waits up to `timeout` for replies, sending `request(slot)` for every
    /// slot with none in flight, and applies each reply with `apply`, which
    /// returns an error to report (after the records it produced). Returns
    /// as soon as anything was produced (empty on timeout).
    pub fn poll<T>(
        &mut self,
        timeout: Duration,
        mut request: impl FnMut(&Slot<S>) -> Request,
        mut apply: impl FnMut(&mut Slot<S>, Answer, &mut Vec<T>) -> Option<ClientError>,
    ) -> Result<Vec<T>, ClientError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut reconnected = false;
        loop {
            if self.is_down() {
                // One reconnect per poll: a broker that keeps dropping us is an error.
                if reconnected {
                    return Err(ClientError::Disconnected);
                }
                self.reconnect()?;
                reconnected = true;
            }
            self.forget_broken_shards();
            let now = Instant::now();
            self.issue(now, &mut request);
            if self.is_down() {
                continue; // broke while sending: reconnect (once) at the top
            }

            let mut wake = deadline;
            let allowance = self.reply_allowance();
            for s in &self.slots {
                match (s.in_flight, s.not_before) {
                    (Some(f), _) => wake = wake.min(f.sent_at + allowance),
                    (None, Some(t)) => wake = wake.min(t),
                    (None, None) => {}
                }
            }
            let overdue = self
                .slots
                .iter()
                .any(|s| s.in_flight.is_some_and(|f| f.sent_at + allowance <= now));
            if overdue {
                // The broker is not answering: drop the connection.
                self.drop_connection();
                return Err(ClientError::Timeout);
            }

            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(ev) => {
                    self.handle(ev, &mut apply, &mut out);
                    while let Ok(ev) = self.rx.try_recv() {
                        self.handle(ev, &mut apply, &mut out);
                    }
                    if !out.is_empty() {
                        return Ok(out);
                    }
                    if let Some(e) = self.pending_error.take() {
                        return Err(e);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Unreachable: `self.tx` keeps the channel open.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ClientError::Disconnected),
            }
            if Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    /// Waits (until `deadline`) for the requests still in flight and applies
    /// their replies; errors are dropped.
    pub fn drain<T>(
        &mut self,
        deadline: Instant,
        mut apply: impl FnMut(&mut Slot<S>, Answer, &mut Vec<T>) -> Option<ClientError>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        while self.slots.iter().any(|s| s.in_flight.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.handle(ev, &mut apply, &mut out),
                Err(_) => break,
            }
        }
        out
    }

    /// Sends a request for every slot that has none in flight.
    fn issue(&mut self, now: Instant, request: &mut impl FnMut(&Slot<S>) -> Request) {
        let Some(shared) = &self.conn else { return };
        let n = self.slots.len();
        let first = self.next_first % n.max(1);
        self.next_first = self.next_first.wrapping_add(1);
        for k in 0..n {
            let s = &mut self.slots[(first + k) % n];
            if s.in_flight.is_some() || s.not_before.is_some_and(|t| t > now) {
                continue;
            }
            s.not_before = None;
            let token = self.next_token;
            self.next_token += 1;
            let req = request(s);
            let queue = s.queue;
            let on_reply = |tx: mpsc::Sender<Event>| {
                move |comp: Completion| {
                    let _ = tx.send(Event {
                        queue,
                        token,
                        result: comp.into_reply(),
                    });
                }
            };
            let routed = self.router.route(queue, now);
            s.route = routed.as_ref().map_or(0, |(p, _)| *p);
            let mut sent = match &routed {
                Some((_, c)) => c.send_with(&req, on_reply(self.tx.clone())),
                None => shared.send_with(&req, on_reply(self.tx.clone())),
            };
            if let (Err(e), Some((port, c))) = (&sent, &routed) {
                // The shard connection broke: use the shared one this time.
                tracing::debug!(queue, port, "{} not sent to the shard port: {e}", self.kind);
                c.close();
                s.route = 0;
                sent = shared.send_with(&req, on_reply(self.tx.clone()));
            }
            match sent {
                Ok(_) => {
                    s.in_flight = Some(InFlight {
                        token,
                        sent_at: now,
                    })
                }
                // The connection broke; the next round reconnects.
                Err(e) => {
                    tracing::debug!(queue = s.queue, "{} not sent: {e}", self.kind);
                    return;
                }
            }
        }
    }

    /// Hands one reply to `apply`: its slot's current request is over if
    /// the tokens match.
    fn handle<T>(
        &mut self,
        ev: Event,
        apply: &mut impl FnMut(&mut Slot<S>, Answer, &mut Vec<T>) -> Option<ClientError>,
        out: &mut Vec<T>,
    ) {
        let Some(s) = self.slots.iter_mut().find(|s| s.queue == ev.queue) else {
            return; // the queue was unassigned while its request was in flight
        };
        let sent_at = match s.in_flight {
            Some(f) if f.token == ev.token => {
                s.in_flight = None;
                Some(f.sent_at)
            }
            _ => None,
        };
        let answer = Answer {
            sent_at,
            result: ev.result,
        };
        if let Some(e) = apply(s, answer, out) {
            self.pending_error.get_or_insert(e);
        }
    }
}
