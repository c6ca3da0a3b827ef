//! Queue → connection routing for shard-aware clients.
//!
//! Every shard of a broker listens on the shared port and on its own port
//! (docs/architecture.md, "The shape"); `DescribeTopic` reports, per queue,
//! the port of the shard that owns it (`shard_port`, 0 when unknown). A
//! request sent to that port is served by the owning shard directly instead
//! of being forwarded between cores. A [`ShardRouter`] keeps one connection
//! per distinct shard port, on the host of the configured broker address,
//! opened lazily. A queue whose port is 0, or whose port cannot be reached
//! (the attempt is logged at debug and not repeated for
//! [`SHARD_RETRY_AFTER`]), has no route: the caller uses its connection to
//! the shared address. Control requests always use the shared address.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::TopicInfo;

use super::connection::{ClientError, Connection, Timeouts};

/// After a failed connect to a shard port, requests use the shared address
/// for this long before the port is tried again.
pub(crate) const SHARD_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The host part of a `host:port` address (`[::1]:9000` → `[::1]`).
pub(crate) fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => host,
        _ => addr,
    }
}

/// Which connection reaches the shard owning each queue.
#[derive(Debug)]
pub(crate) struct ShardRouter {
    host: String,
    timeouts: Timeouts,
    enabled: bool,
    /// Per queue (by index): the owning shard's port, 0 if unknown.
    ports: Vec<u16>,
    conns: HashMap<u16, Arc<Connection>>,
    /// Ports whose last connect failed: not tried again before the instant.
    retry_at: HashMap<u16, Instant>,
}

impl ShardRouter {
    /// A router for the broker at `addr`; when `enabled` is false it never
    /// routes (every request uses the shared address).
    pub fn new(addr: &str, timeouts: Timeouts, enabled: bool) -> ShardRouter {
        ShardRouter {
            host: host_of(addr).to_string(),
            timeouts,
            enabled,
            ports: Vec::new(),
            conns: HashMap::new(),
            retry_at: HashMap::new(),
        }
    }

    /// A router that never routes.
    pub fn disabled() -> ShardRouter {
        ShardRouter::new("", Timeouts::default(), false)
    }

    /// Takes the queues' shard ports from a topic description.
    pub fn set_topic(&mut self, info: &TopicInfo) {
        let mut ports = vec![0u16; info.queues.len()];
        for q in &info.queues {
            if let Some(p) = ports.get_mut(q.queue as usize) {
                *p = q.shard_port;
            }
        }
        self.ports = ports;
    }

    /// The port queue `queue` should be reached on (0: the shared address).
    pub fn port_of(&self, queue: u32) -> u16 {
        if !self.enabled {
            return 0;
        }
        self.ports.get(queue as usize).copied().unwrap_or(0)
    }

    /// The address of shard port `port`.
    pub fn addr_of(&self, port: u16) -> String {
        format!("{}:{port}", self.host)
    }

    /// The connection to `port`, even a broken one (a send on it fails).
    pub fn conn(&self, port: u16) -> Option<Arc<Connection>> {
        self.conns.get(&port).map(Arc::clone)
    }

    /// The open connection to `port`, if any.
    pub fn open(&self, port: u16) -> Option<Arc<Connection>> {
        self.conns
            .get(&port)
            .filter(|c| !c.is_closed())
            .map(Arc::clone)
    }

    /// Whether a connect to `port` should be attempted now: it has no open
    /// connection and no recent failure.
    pub fn wants(&self, port: u16, now: Instant) -> bool {
        port != 0 && self.open(port).is_none() && self.retry_at.get(&port).is_none_or(|t| *t <= now)
    }

    /// Records the outcome of a connect to `port`.
    pub fn install(&mut self, port: u16, result: Result<Connection, ClientError>, now: Instant) {
        match result {
            Ok(c) => {
                self.retry_at.remove(&port);
                self.conns.insert(port, Arc::new(c));
            }
            Err(e) => {
                tracing::debug!(
                    port,
                    "cannot reach shard port, using the shared address: {e}"
                );
                self.retry_at.insert(port, now + SHARD_RETRY_AFTER);
            }
        }
    }

    /// The connection for `queue`, connecting lazily; `None`: use the
    /// shared address. Returns the port with it.
    pub fn route(&mut self, queue: u32, now: Instant) -> Option<(u16, Arc<Connection>)> {
        let port = self.port_of(queue);
        if self.wants(port, now) {
            let result = Connection::connect(&self.addr_of(port), self.timeouts);
            self.install(port, result, now);
        }
        self.open(port).map(|c| (port, c))
    }

    /// Removes the connections that broke; returns their ports.
    pub fn take_closed(&mut self) -> Vec<u16> {
        let dead: Vec<u16> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_closed())
            .map(|(p, _)| *p)
            .collect();
        for p in &dead {
            self.conns.remove(p);
        }
        dead
    }

    /// Removes the connection to `port` (to be closed by the caller).
    pub fn take(&mut self, port: u16) -> Option<Arc<Connection>> {
        self.conns.remove(&port)
    }

    /// Removes every connection (to be closed by the caller, or dropped).
    pub fn take_all(&mut self) -> Vec<Arc<Connection>> {
        self.conns.drain().map(|(_, c)| c).collect()
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        for c in self.take_all() {
            c.close();
        }
    }

    /// The shard ports with an open connection, ascending.
    pub fn ports_in_use(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.is_closed())
            .map(|(p, _)| *p)
            .collect();
        ports.sort_unstable();
        ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Flush, QueueInfo, TopicSpec};
    use std::net::TcpListener;

    fn info(ports: &[u16]) -> TopicInfo {
        TopicInfo {
            spec: TopicSpec {
                name: "t".into(),
                queues: ports.len() as u32,
                flush: Flush::Async,
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: 0,
            },
            id: 1,
            queues: ports
                .iter()
                .enumerate()
                .map(|(i, p)| QueueInfo {
                    queue: i as u32,
                    shard: i as u32 % 2,
                    shard_port: *p,
                    start_offset: 0,
                    end_offset: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn host_of_keeps_the_host() {
        assert_eq!(host_of("127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9000"), "[::1]");
        assert_eq!(host_of("broker.local:1"), "broker.local");
        assert_eq!(host_of("[::1]"), "[::1]");
    }

    #[test]
    fn unknown_port_and_disabled_router_fall_back() {
        let now = Instant::now();
        let mut r = ShardRouter::new("127.0.0.1:1", Timeouts::default(), true);
        r.set_topic(&info(&[0, 0]));
        assert!(r.route(0, now).is_none());
        assert!(r.route(7, now).is_none());
        let mut off = ShardRouter::new("127.0.0.1:1", Timeouts::default(), false);
        off.set_topic(&info(&[9, 9]));
        assert_eq!(off.port_of(0), 0);
        assert!(off.route(0, now).is_none());
    }

    #[test]
    fn unreachable_port_falls_back_and_backs_off() {
        // A port nobody listens on: bind, note it, close.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let now = Instant::now();
        let mut r = ShardRouter::new("127.0.0.1:1", Timeouts::default(), true);
        r.set_topic(&info(&[port]));
        assert!(r.route(0, now).is_none());
        assert!(!r.wants(port, now));
        assert!(r.wants(port, now + SHARD_RETRY_AFTER));
        assert!(r.ports_in_use().is_empty());
    }

    #[test]
    fn reachable_port_gets_one_shared_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let now = Instant::now();
        let mut r = ShardRouter::new("127.0.0.1:1", Timeouts::default(), true);
        r.set_topic(&info(&[port, port, 0]));
        let (p0, c0) = r.route(0, now).unwrap();
        let (p1, c1) = r.route(1, now).unwrap();
        assert_eq!((p0, p1), (port, port));
        assert!(Arc::ptr_eq(&c0, &c1));
        assert!(r.route(2, now).is_none());
        assert_eq!(r.ports_in_use(), vec![port]);
        c0.close();
        // The reader notices the shutdown.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c0.is_closed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r.take_closed(), vec![port]);
        assert!(r.ports_in_use().is_empty());
    }
}
