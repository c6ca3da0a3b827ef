//! The NATS JetStream driver (`--driver nats`), through async-nats.
//!
//! Mapping of the workload:
//! - each topic is a stream of the same name (file storage, one replica,
//!   limits retention), deleted at the end of the run; its partitions are
//!   the subjects `<topic>.<p>` (the stream captures `<topic>.*`);
//! - each producer has its own connection and publishes every message with
//!   an ack (`publish` returns a `PublishAckFuture`): the ack futures are
//!   awaited together by one task per producer on the runtime, so
//!   publishes are pipelined, and each message's latency is its intended
//!   send time to its ack;
//! - each subscription is one durable pull consumer (`sub-<s>`) on the
//!   stream, from the first message; each of the subscription's consumers
//!   pulls from it on its own connection. nats-server 2.9 requires acks on a
//!   pull consumer, so the policy is "ack all" and a consumer acks the last
//!   message it received every [`ACK_EVERY_MESSAGES`] messages and when it
//!   goes idle (like coremq consumers committing offsets now and then).
//!
//! Durability: nats-server writes each message to its block file (the OS
//! page cache) before it acks and fsyncs in the background (every two
//! minutes by default). `--flush sync` needs `jetstream { sync_interval:
//! always }`, which came with nats-server 2.10; 2.9 (Debian bookworm's
//! 2.9.10) rejects the option, so there a sync run says so and is the same
//! as an async one. See [`durability_note`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{ContextBuilder, PublishAckFuture, PublishError};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;

use crate::consumer::{ConsumerShared, POLL_TIMEOUT};
use crate::drivers::{
    max_in_flight_messages, peer_window, runtime, PeerSend, PeerWorkers, ERROR_BACKOFF,
    RUNTIME_SHUTDOWN,
};
use crate::error::PerfError;
use crate::producer::{ProducerShared, ACK_WAIT_MAX};
use crate::run::{supervise, to_ns, topic_names, Launched, RunOptions, START_DELAY};
use crate::schedule::{Clock, EndTime};
use crate::stats::Report;
use crate::workload::FlushMode;

/// A consumer acks (cumulatively) after this many messages.
pub const ACK_EVERY_MESSAGES: usize = 256;
/// Unacknowledged messages a subscription's consumer may have out, far
/// above what [`ACK_EVERY_MESSAGES`] leaves pending, so it never throttles.
pub const MAX_ACK_PENDING: i64 = 1 << 20;
/// Messages a pull consumer asks for at once.
pub const PULL_BATCH_MESSAGES: usize = 1000;
/// First nats-server version with `jetstream { sync_interval: always }`.
pub const SYNC_ALWAYS_SINCE: (u32, u32) = (2, 10);

/// The subject of partition `p` of stream `stream`.
pub fn subject(stream: &str, p: u32) -> String {
    format!("{stream}.{p}")
}

/// The stream for `topic`: file storage, one replica, every partition's subject.
pub fn stream_config(topic: &str) -> stream::Config {
    stream::Config {
        name: topic.to_string(),
        subjects: vec![format!("{topic}.*")],
        storage: StorageType::File,
        num_replicas: 1,
        retention: RetentionPolicy::Limits,
        ..Default::default()
    }
}

/// The durable consumer of subscription `s`.
pub fn durable_name(s: u32) -> String {
    format!("sub-{s}")
}

/// Subscription `s`'s pull consumer: from the first message, cumulative acks.
pub fn consumer_config(s: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(durable_name(s)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::All,
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// `(major, minor)` of a version such as `2.9.10` or `v2.10.0-beta`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// What `--flush` means against a server of `version`, when it is not what
/// the flag says.
pub fn durability_note(flush: FlushMode, version: &str) -> Option<String> {
    if flush != FlushMode::Sync {
        return None;
    }
    match parse_version(version) {
        Some(v) if v >= SYNC_ALWAYS_SINCE => Some(format!(
            "nats-server {version} fsyncs every write only with `jetstream {{ sync_interval: always }}` \
             (perf/peers/nats.sh start --sync sets it); this driver cannot check"
        )),
        _ => Some(format!(
            "nats-server {version} cannot fsync every write (`sync_interval: always` came with 2.10): \
             --flush sync has no equivalent, and this run acks after the write to the OS like --flush async"
        )),
    }
}

async fn connect(addr: &str) -> Result<Client, PerfError> {
    async_nats::connect(addr)
        .await
        .map_err(|e| PerfError::peer(format!("cannot connect to nats-server at {addr}"), e))
}

/// The run's streams; deleted when dropped (best effort, reported on stderr).
struct Streams<'a> {
    rt: &'a Runtime,
    js: Context,
    names: Vec<String>,
}

impl Drop for Streams<'_> {
    fn drop(&mut self) {
        for name in self.names.drain(..) {
            if let Err(e) = self.rt.block_on(self.js.delete_stream(&name)) {
                eprintln!("warning: cannot delete stream {name}: {e}");
            }
        }
    }
}

/// Runs the benchmark against nats-server.
pub fn run(opts: &RunOptions, clock: Clock) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let rt = runtime()?;
    let result = (|| {
        // The JetStream context spawns its acker task where it is built.
        let _in_runtime = rt.enter();
        let admin = rt.block_on(connect(&opts.broker))?;
        let info = admin.server_info();
        if w.message_size > info.max_payload {
            return Err(PerfError::Invalid(format!(
                "messageSize {} is over nats-server's max_payload of {} bytes",
                w.message_size, info.max_payload
            )));
        }
        if let Some(note) = durability_note(w.flush, &info.version) {
            eprintln!("note: {note}");
        }
        eprintln!(
            "note: nats: every message is its own publish (batchBytes and lingerMs do not apply)"
        );
        let js = jetstream::new(admin);
        let mut streams = Streams {
            rt: &rt,
            js: js.clone(),
            names: Vec::new(),
        };
        for name in topic_names(opts, &clock) {
            rt.block_on(js.create_stream(stream_config(&name)))
                .map_err(|e| PerfError::peer(format!("cannot create stream {name}"), e))?;
            streams.names.push(name);
        }
        run_on_streams(opts, clock, &rt, &js, &streams.names)
    })();
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// A publish whose ack is awaited, with the message's intended send time.
type PendingAck = (PublishAckFuture, u64);

/// One producer's client: its own connection and JetStream context, and
/// the channel to the task that awaits its acks.
struct NatsSink {
    handle: Handle,
    js: Context,
    /// Subject of each partition.
    subjects: Vec<Subject>,
    acks: mpsc::UnboundedSender<PendingAck>,
}

impl NatsSink {
    fn new(
        handle: Handle,
        js: Context,
        subjects: Vec<Subject>,
        clock: Clock,
        shared: Arc<ProducerShared>,
        message_size: usize,
    ) -> NatsSink {
        let (acks, pending) = mpsc::unbounded_channel();
        handle.spawn(collect_acks(pending, clock, shared, message_size));
        NatsSink {
            handle,
            js,
            subjects,
            acks,
        }
    }
}

/// Awaits a producer's acks, all of them at once, and records each as it
/// comes. One task per producer rather than one per message: a task per
/// message cost as much CPU as nats-server itself on this machine.
async fn collect_acks(
    mut incoming: mpsc::UnboundedReceiver<PendingAck>,
    clock: Clock,
    shared: Arc<ProducerShared>,
    size: usize,
) {
    let mut pending = FuturesUnordered::new();
    let record = |(outcome, intended): (Result<_, PublishError>, u64)| {
        let ack_ns = clock.now_ns();
        match outcome {
            Ok(_) => shared.acked(&[intended], ack_ns, size as u64, size),
            Err(e) => shared.failed(1, size, format!("publish failed: {e}")),
        }
    };
    loop {
        tokio::select! {
            next = incoming.recv() => match next {
                Some((ack, intended)) => {
                    pending.push(async move { (ack.await, intended) });
                }
                None => break,
            },
            Some(done) = pending.next(), if !pending.is_empty() => record(done),
        }
    }
    while let Some(done) = pending.next().await {
        record(done);
    }
}

impl PeerSend for NatsSink {
    fn send(
        &mut self,
        partition: usize,
        payload: &[u8],
        intended_ns: u64,
        _now_ns: u64,
    ) -> Result<(), String> {
        let subject = self.subjects[partition].clone();
        let body = Bytes::copy_from_slice(payload);
        let ack = self
            .handle
            .block_on(self.js.publish(subject, body))
            .map_err(|e| e.to_string())?;
        self.acks
            .send((ack, intended_ns))
            .map_err(|_| "the ack collector is gone".to_string())
    }

    fn close(&mut self) {
        // Every ack is in (or given up on); the collector ends with the
        // sink's channel.
    }
}

/// Acks (cumulatively) the last message received, if any.
async fn ack_pending(last: &mut Option<jetstream::Message>, shared: &ConsumerShared) {
    if let Some(m) = last.take() {
        if let Err(e) = m.ack().await {
            shared.tally.fail(1, format!("ack failed: {e}"));
        }
    }
}

/// One consumer: pulls until `stop` is raised.
async fn consume(
    mut messages: pull::Stream,
    clock: Clock,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
) {
    let mut last = None;
    let mut since_ack = 0usize;
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(POLL_TIMEOUT, messages.next()).await {
            Err(_idle) => ack_pending(&mut last, &shared).await,
            Ok(None) => {
                shared.tally.fail(1, "the pull subscription ended");
                return;
            }
            Ok(Some(Err(e))) => {
                shared.tally.fail(1, format!("pull failed: {e}"));
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
            Ok(Some(Ok(m))) => {
                shared.record_payloads([&m.payload[..]], clock.now_ns());
                last = Some(m);
                since_ack += 1;
                if since_ack >= ACK_EVERY_MESSAGES {
                    since_ack = 0;
                    ack_pending(&mut last, &shared).await;
                }
            }
        }
    }
    ack_pending(&mut last, &shared).await;
}

/// A consumer's own connection to subscription `s` of stream `name`.
async fn open_consumer(addr: &str, name: &str, s: u32) -> Result<pull::Stream, PerfError> {
    let js = jetstream::new(connect(addr).await?);
    let stream = js
        .get_stream(name)
        .await
        .map_err(|e| PerfError::peer(format!("cannot find stream {name}"), e))?;
    let consumer: PullConsumer = stream
        .get_consumer(&durable_name(s))
        .await
        .map_err(|e| PerfError::peer(format!("cannot find consumer {name}/sub-{s}"), e))?;
    consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH_MESSAGES)
        .messages()
        .await
        .map_err(|e| PerfError::peer(format!("cannot pull from {name}/sub-{s}"), e))
}

/// A producer's own connection, with an ack window never tighter than the
/// run's own.
async fn open_producer(addr: &str, window_msgs: usize) -> Result<Context, PerfError> {
    let client = connect(addr).await?;
    Ok(ContextBuilder::new()
        .timeout(ACK_WAIT_MAX)
        .max_ack_inflight(window_msgs)
        .build(client))
}

fn run_on_streams(
    opts: &RunOptions,
    clock: Clock,
    rt: &Runtime,
    js: &Context,
    names: &[String],
) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let mut workers = PeerWorkers::new(rt.handle().clone());

    // Connect everything before anything starts.
    let mut consumer_jobs = Vec::new();
    for (t, name) in names.iter().enumerate() {
        let stream = rt
            .block_on(js.get_stream(name))
            .map_err(|e| PerfError::peer(format!("cannot find stream {name}"), e))?;
        for s in 0..w.subscriptions_per_topic {
            rt.block_on(stream.create_consumer(consumer_config(s)))
                .map_err(|e| {
                    PerfError::peer(format!("cannot create consumer {name}/sub-{s}"), e)
                })?;
            for _ in 0..w.consumer_per_subscription {
                let messages = rt.block_on(open_consumer(&opts.broker, name, s))?;
                let shared = Arc::new(ConsumerShared::new(t, s as usize));
                consumer_jobs.push((messages, shared));
            }
        }
    }
    let window = peer_window(w, opts.window);
    let window_msgs = max_in_flight_messages(window, w.message_size);
    let mut producer_jobs = Vec::new();
    for (t, name) in names.iter().enumerate() {
        for _ in 0..w.producers_per_topic {
            let ctx = rt.block_on(open_producer(&opts.broker, window_msgs))?;
            let subjects = (0..w.partitions_per_topic)
                .map(|p| Subject::from(subject(name, p)))
                .collect();
            producer_jobs.push((t, ctx, subjects));
        }
    }

    // Consumers first, so they are pulling when the first message lands.
    let consumers: Vec<Arc<ConsumerShared>> =
        consumer_jobs.iter().map(|(_, s)| Arc::clone(s)).collect();
    for (messages, shared) in consumer_jobs {
        workers.spawn_consumer(consume(messages, clock, shared, workers.stop_flag()));
    }

    let start_ns = clock.now_ns() + to_ns(START_DELAY);
    let end = EndTime::new(start_ns + to_ns(w.duration()));
    let mut producers = Vec::new();
    for (i, (t, js, subjects)) in producer_jobs.into_iter().enumerate() {
        let shared = Arc::new(ProducerShared::new(t));
        let sink = NatsSink::new(
            rt.handle().clone(),
            js,
            subjects,
            clock,
            Arc::clone(&shared),
            w.message_size,
        );
        workers.spawn_producer(w, i, sink, start_ns, &end, window, clock, &shared)?;
        producers.push(shared);
    }
    let launched = Launched {
        names: names.to_vec(),
        producers,
        consumers,
        start_ns,
        end,
    };
    supervise(opts, clock, &launched, &mut workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stream_per_topic_one_subject_per_partition() {
        let c = stream_config("perf-1700000000000-42-0");
        assert_eq!(c.name, "perf-1700000000000-42-0");
        assert_eq!(c.subjects, ["perf-1700000000000-42-0.*"]);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.num_replicas, 1);
        assert_eq!(subject("perf-1-2-0", 1), "perf-1-2-0.1");
        // Stream names may not hold '.', '*', '>' or whitespace: topic names don't.
        assert!(!c.name.contains(['.', '*', '>', ' ']));
    }

    #[test]
    fn subscriptions_are_durable_pull_consumers_from_the_start() {
        let c = consumer_config(3);
        assert_eq!(c.durable_name.as_deref(), Some("sub-3"));
        assert_eq!(c.deliver_policy, DeliverPolicy::All);
        assert_eq!(c.ack_policy, AckPolicy::All);
        assert!(c.max_ack_pending > ACK_EVERY_MESSAGES as i64);
    }

    #[test]
    fn versions_and_what_sync_means() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("v2.10.0-beta.1"), Some((2, 10)));
        assert_eq!(parse_version("junk"), None);
        assert!(durability_note(FlushMode::Async, "2.9.10").is_none());
        let old = durability_note(FlushMode::Sync, "2.9.10").unwrap();
        assert!(old.contains("no equivalent"), "{old}");
        let new = durability_note(FlushMode::Sync, "2.10.4").unwrap();
        assert!(new.contains("sync_interval: always"), "{new}");
        assert!(durability_note(FlushMode::Sync, "")
            .unwrap()
            .contains("no equivalent"));
    }
}
