//! Which broker a run drives, and what the peer drivers share.
//!
//! `coremq` (the default) is `run.rs` with `producer.rs` and `consumer.rs`.
//! `nats` and `rabbitmq` drive NATS JetStream and RabbitMQ streams through
//! their Rust clients (async-nats, rabbitmq-stream-client). Those clients
//! need tokio, so each peer run builds a small multi-threaded runtime for
//! the clients' connection tasks, the consumers and the ack handling. The
//! producers stay OS threads that follow the same open-loop schedule as
//! coremq's (a thread's sleep is finer than tokio's millisecond timer, which
//! would add up to a millisecond to every publish latency) and hand each
//! message to the client through the runtime's handle.
//!
//! A peer producer hands every message to its client, round robin over the
//! topic's partitions; the client may batch them (RabbitMQ's publish frames
//! hold many messages, and the driver seals them by `batchBytes` and
//! `lingerMs` like coremq's producer; JetStream publishes one message at a
//! time). Each ack records that message's latency from its intended send
//! time. The in-flight window counts messages: in open loop
//! the same byte cap as coremq's producers, in closed loop `--window` times
//! the messages one `batchBytes` batch holds, so every driver allows the
//! same number of unacknowledged messages.

pub mod nats;
pub mod rabbitmq;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::PerfError;
use crate::payload::Payloads;
use crate::producer::{
    ProducerShared, Window, ACK_WAIT_MAX, OPEN_LOOP_IN_FLIGHT_BYTES_MAX, RECORD_OVERHEAD_BYTES,
};
use crate::run::{join_all, pacing, Workers};
use crate::schedule::{Clock, EndTime, Pacing};
use crate::workload::{Codec, Workload, THREADS_MAX};

/// coremq's default listen address.
pub const COREMQ_BROKER_DEFAULT: &str = "127.0.0.1:9700";
/// nats-server's default client port.
pub const NATS_BROKER_DEFAULT: &str = "127.0.0.1:4222";
/// The RabbitMQ stream plugin's default port.
pub const RABBITMQ_BROKER_DEFAULT: &str = "127.0.0.1:5552";
/// Tokio worker threads of a peer run: one per core of the 2-core machine
/// the benchmarks run on (the producers are threads of their own).
pub const RUNTIME_WORKERS: usize = 2;
/// Longest wait for a peer run's tasks when its runtime shuts down.
pub const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);
/// Pause after a failed send or receive before the next one, so a broken
/// client does not spin.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The broker a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Driver {
    /// coremq, through its own client library.
    #[default]
    Coremq,
    /// NATS JetStream (file storage), through async-nats.
    Nats,
    /// RabbitMQ streams (stream protocol), through rabbitmq-stream-client.
    Rabbitmq,
}

impl Driver {
    /// Where the broker listens when `--broker` is not given.
    pub fn default_broker(self) -> &'static str {
        match self {
            Driver::Coremq => COREMQ_BROKER_DEFAULT,
            Driver::Nats => NATS_BROKER_DEFAULT,
            Driver::Rabbitmq => RABBITMQ_BROKER_DEFAULT,
        }
    }
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Coremq => "coremq",
            Driver::Nats => "nats",
            Driver::Rabbitmq => "rabbitmq",
        })
    }
}

/// Refuses what a driver cannot do: batch compression and backlog runs
/// are coremq's alone (NATS has no batch compression; RabbitMQ streams'
/// sub-entry compression and pausing the peers' consumers are not wired up
/// here).
pub fn check_supported(driver: Driver, w: &Workload) -> Result<(), PerfError> {
    if driver == Driver::Coremq {
        return Ok(());
    }
    if w.total_producers() > u64::from(THREADS_MAX) || w.total_consumers() > u64::from(THREADS_MAX)
    {
        return Err(PerfError::Invalid(format!(
            "the {driver} driver runs a thread per producer and a task per consumer: at most \
             {THREADS_MAX} of each"
        )));
    }
    if w.compression != Codec::None {
        return Err(PerfError::Invalid(format!(
            "--compression {} (workload field compression) is supported by --driver coremq only, \
             not {driver}",
            w.compression
        )));
    }
    if w.backlog_bytes() > 0 {
        return Err(PerfError::Invalid(format!(
            "--backlog-gb (workload field consumerBacklogSizeGB) is supported by --driver coremq \
             only, not {driver}"
        )));
    }
    Ok(())
}

/// The runtime a peer run's clients live on.
pub fn runtime() -> Result<tokio::runtime::Runtime, PerfError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("perf-rt")
        .enable_all()
        .build()
        .map_err(|e| PerfError::io("cannot start the tokio runtime", e))
}

/// Messages one producer batch of the workload holds (at least 1).
pub fn messages_per_batch(w: &Workload) -> usize {
    (w.batch_bytes / (w.message_size + RECORD_OVERHEAD_BYTES)).max(1)
}

/// A peer producer's in-flight window, each message counted as a batch:
/// coremq's byte cap in open loop; in closed loop `closed_loop_batches`
/// batches' worth of messages.
pub fn peer_window(w: &Workload, closed_loop_batches: usize) -> Window {
    if w.open_loop() {
        Window::bytes(OPEN_LOOP_IN_FLIGHT_BYTES_MAX)
    } else {
        Window::batches(closed_loop_batches.saturating_mul(messages_per_batch(w)))
    }
}

/// Most messages `window` lets through at once (for a client's own cap,
/// which must never be the tighter one).
pub fn max_in_flight_messages(window: Window, message_size: usize) -> usize {
    let by_bytes = (window.bytes / message_size.max(1)).saturating_add(1);
    window.batches.max(1).min(by_bytes)
}

/// A port out of `HOST:PORT`, for clients that take them apart.
pub fn split_host_port(addr: &str) -> Result<(String, u16), PerfError> {
    let bad = || PerfError::Invalid(format!("--broker {addr:?} is not HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port.parse().map_err(|_| bad())?))
}

/// How a peer client takes messages.
pub trait PeerSend {
    /// Hands one message for `partition` to the client (or to a batch of
    /// the sink's) without waiting for its ack; the ack (or its failure) is
    /// recorded in the producer's [`ProducerShared`] when it comes. An error
    /// means the message never left, and no ack will come for it.
    fn send(
        &mut self,
        partition: usize,
        payload: &[u8],
        intended_ns: u64,
        now_ns: u64,
    ) -> Result<(), String>;
    /// Earliest time a batch the sink holds must go out (`None`: it holds
    /// nothing).
    fn linger_deadline(&self) -> Option<u64> {
        None
    }
    /// Sends the batches whose linger is up at `now_ns` (`u64::MAX`: all).
    /// A batch that fails is counted by the sink (taken back from `sent`,
    /// its messages counted as errors).
    fn flush(&mut self, _now_ns: u64) {}
    /// Closes the client once the acks are in (or given up on).
    fn close(&mut self);
}

/// One peer producer thread: the schedule, the window and the accounting;
/// the client behind `sink`.
pub struct PeerProducer<S> {
    pub sink: S,
    /// Partitions of the topic (messages go round robin over them).
    pub partitions: usize,
    pub pacing: Pacing,
    /// No message is sent before this time (ns since the epoch).
    pub start_ns: u64,
    /// No message intended at or after this time is sent.
    pub end: EndTime,
    pub message_size: usize,
    /// The payloads to send (timestamped as they go).
    pub payloads: Payloads,
    pub window: Window,
    pub clock: Clock,
    /// Set by the main thread to end the run early.
    pub abort: Arc<AtomicBool>,
    pub shared: Arc<ProducerShared>,
}

impl<S: PeerSend> PeerProducer<S> {
    /// Sends until the end of the schedule, then waits for the acks.
    pub fn run(mut self) {
        let clock = self.clock;
        clock.sleep_until(self.start_ns);
        let mut partition = 0usize;
        while !self.abort.load(Ordering::Relaxed) {
            let now = clock.now_ns();
            self.sink.flush(now);
            let due = self.pacing.next_due(now);
            if due >= self.end.get() {
                break;
            }
            if due > now {
                let wake = self.sink.linger_deadline().map_or(due, |d| d.min(due));
                clock.sleep_until(wake);
                continue;
            }
            let intended = self.pacing.take(now);
            let payload = self.payloads.next(intended);
            self.shared.acquire(self.window, self.message_size);
            // Counted before sending: the ack may beat `send`'s return.
            self.shared.count_sent(1);
            if let Err(e) = self.sink.send(partition, payload, intended, now) {
                self.shared.uncount_sent(1);
                self.shared
                    .failed(1, self.message_size, format!("send failed: {e}"));
                thread::sleep(ERROR_BACKOFF);
            }
            partition = (partition + 1) % self.partitions.max(1);
        }
        self.sink.flush(u64::MAX);
        if !self.shared.wait_idle(ACK_WAIT_MAX) {
            self.shared.tally.note_error(format!(
                "{} messages unanswered {ACK_WAIT_MAX:?} after the last send",
                self.shared.in_flight()
            ));
        }
        self.sink.close();
    }
}

/// A peer run's producer threads and consumer tasks.
pub struct PeerWorkers {
    handle: tokio::runtime::Handle,
    abort: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    producers: Vec<JoinHandle<()>>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
}

impl PeerWorkers {
    pub fn new(handle: tokio::runtime::Handle) -> PeerWorkers {
        PeerWorkers {
            handle,
            abort: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            producers: Vec::new(),
            consumers: Vec::new(),
        }
    }

    /// The flag that ends the producers early.
    pub fn abort_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.abort)
    }

    /// The flag that stops the consumers (each checks it between receives).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Starts producer `index` of the run: `sink` is its connection to the
    /// peer; the schedule, payloads and end come from the workload.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_producer<S: PeerSend + Send + 'static>(
        &mut self,
        w: &Workload,
        index: usize,
        sink: S,
        start_ns: u64,
        end: &EndTime,
        window: Window,
        clock: Clock,
        shared: &Arc<ProducerShared>,
    ) -> Result<(), PerfError> {
        let p = PeerProducer {
            sink,
            partitions: w.partitions_per_topic as usize,
            pacing: pacing(w, start_ns, index),
            start_ns,
            end: end.clone(),
            message_size: w.message_size,
            payloads: Payloads::for_producer(w, index),
            window,
            clock,
            abort: self.abort_flag(),
            shared: Arc::clone(shared),
        };
        let h = thread::Builder::new()
            .name(format!("perf-p{index}"))
            .spawn(move || p.run())
            .map_err(|e| PerfError::io("cannot start a producer thread", e))?;
        self.producers.push(h);
        Ok(())
    }

    pub fn spawn_consumer(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.consumers.push(self.handle.spawn(task));
    }

    fn join_consumers(&mut self) -> Result<(), PerfError> {
        let mut panicked = 0;
        for h in self.consumers.drain(..) {
            if self.handle.block_on(h).is_err() {
                panicked += 1;
            }
        }
        if panicked > 0 {
            return Err(PerfError::Thread(format!(
                "{panicked} consumer tasks panicked"
            )));
        }
        Ok(())
    }
}

impl Workers for PeerWorkers {
    fn join_producers(&mut self) -> Result<(), PerfError> {
        join_all(&mut self.producers, "producer")
    }

    fn stop_consumers(&mut self) -> Result<(), PerfError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join_consumers()
    }
}

impl Drop for PeerWorkers {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let _ = Workers::join_producers(self);
        let _ = self.join_consumers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Overrides;

    fn workload(rate: f64, message_size: usize, batch_bytes: usize) -> Workload {
        Workload::resolve(
            None,
            &Overrides {
                rate: Some(rate),
                message_size: Some(message_size),
                batch_bytes: Some(batch_bytes),
                ..Overrides::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn default_brokers_per_driver() {
        assert_eq!(Driver::default(), Driver::Coremq);
        assert_eq!(Driver::Coremq.default_broker(), "127.0.0.1:9700");
        assert_eq!(Driver::Nats.default_broker(), "127.0.0.1:4222");
        assert_eq!(Driver::Rabbitmq.default_broker(), "127.0.0.1:5552");
        assert_eq!(Driver::Rabbitmq.to_string(), "rabbitmq");
    }

    #[test]
    fn peer_windows_match_coremq_in_messages() {
        // 1 KiB messages: a 64 KiB batch holds 62 of them (with record overhead).
        let closed = workload(0.0, 1024, 65536);
        assert_eq!(messages_per_batch(&closed), 62);
        assert_eq!(peer_window(&closed, 16), Window::batches(16 * 62));
        assert_eq!(max_in_flight_messages(peer_window(&closed, 16), 1024), 992);
        // Batches smaller than a message: one message each.
        let single = workload(0.0, 1024, 1);
        assert_eq!(messages_per_batch(&single), 1);
        assert_eq!(peer_window(&single, 16), Window::batches(16));
        // Open loop: coremq's byte cap, whatever the batch size.
        let open = workload(5000.0, 1024, 1);
        assert_eq!(
            peer_window(&open, 16),
            Window::bytes(OPEN_LOOP_IN_FLIGHT_BYTES_MAX)
        );
        assert_eq!(
            max_in_flight_messages(peer_window(&open, 16), 1024),
            OPEN_LOOP_IN_FLIGHT_BYTES_MAX / 1024 + 1
        );
    }

    #[test]
    fn host_and_port() {
        assert_eq!(
            split_host_port("127.0.0.1:5552").unwrap(),
            ("127.0.0.1".to_string(), 5552)
        );
        assert_eq!(
            split_host_port("[::1]:5552").unwrap(),
            ("::1".to_string(), 5552)
        );
        assert!(split_host_port("localhost").unwrap_err().is_usage());
        assert!(split_host_port(":5552").unwrap_err().is_usage());
        assert!(split_host_port("h:99999").unwrap_err().is_usage());
    }
}
