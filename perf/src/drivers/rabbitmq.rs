//! The RabbitMQ streams driver (`--driver rabbitmq`), through
//! rabbitmq-stream-client on the stream protocol (port 5552).
//!
//! Mapping of the workload:
//! - each partition of a topic is a stream `<topic>-<p>`, deleted at the
//!   end of the run (a super stream would add routing the benchmark does
//!   not need);
//! - each producer has one client producer (one connection) per partition.
//!   It batches like coremq's producer, one open batch per partition: a
//!   batch is published as one frame (`batch_send`) when it holds
//!   [`producer_batch_messages`] messages (what a `batchBytes` batch holds)
//!   or has waited `lingerMs`; with `lingerMs` 0 every message is its own
//!   frame. The confirmation callback of each message records its latency
//!   from its intended send time (read back from the payload). The
//!   client's own accumulating `send` is not used: its message counter
//!   races with its flush timer and overflows;
//! - each consumer of a subscription reads the partitions `p` with
//!   `p % consumers == c`, one client consumer per stream, from the first
//!   offset. Stream consumers keep no server-side state unless they store
//!   offsets, which the run does not need, so subscriptions are independent
//!   readers.
//!
//! The client is rabbitmq-stream-client 0.4.4: later versions open every
//! connection with a command (ExchangeCommandVersions) that RabbitMQ 3.10,
//! Debian bookworm's, does not know.
//!
//! Durability: RabbitMQ streams never fsync. osiris (the stream log, 1.3.1
//! in RabbitMQ 3.10.8) writes segments with `file:write` and calls neither
//! `file:sync` nor `file:datasync`, and the publisher is confirmed once the
//! chunk is written (and, in a cluster, replicated); data safety comes from
//! replication. So `--flush async` is roughly coremq's async (minus its
//! periodic fdatasync), and `--flush sync` has no equivalent: such a run
//! says so and is the same as an async one. See [`durability_note`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::{Consumer, Environment, NoDedup, Producer};
use tokio::runtime::{Handle, Runtime};

use crate::consumer::{ConsumerShared, POLL_TIMEOUT};
use crate::drivers::{
    messages_per_batch, peer_window, runtime, split_host_port, PeerSend, PeerWorkers,
    ERROR_BACKOFF, RUNTIME_SHUTDOWN,
};
use crate::error::PerfError;
use crate::producer::{payload_timestamp, ProducerShared};
use crate::run::{supervise, to_ns, topic_names, Launched, RunOptions, START_DELAY};
use crate::schedule::{Clock, EndTime};
use crate::stats::Report;
use crate::workload::{FlushMode, Workload};

/// The stream of partition `p` of `topic`.
pub fn stream_name(topic: &str, p: u32) -> String {
    format!("{topic}-{p}")
}

/// Most messages in one publish frame: what one `batchBytes` batch of the
/// workload holds, or 1 without linger (every message sent at once).
pub fn producer_batch_messages(w: &Workload) -> usize {
    if w.linger().is_zero() {
        1
    } else {
        messages_per_batch(w)
    }
}

/// The partitions consumer `c` of `consumers` reads.
pub fn partitions_of(c: u32, consumers: u32, partitions: u32) -> Vec<u32> {
    (0..partitions)
        .filter(|p| p % consumers.max(1) == c)
        .collect()
}

/// What `--flush` means here, when it is not what the flag says.
pub fn durability_note(flush: FlushMode) -> Option<String> {
    match flush {
        FlushMode::Async => None,
        FlushMode::Sync => Some(
            "RabbitMQ streams never fsync (osiris writes segments to the OS and confirms; \
             durability comes from replication): --flush sync has no equivalent, and this run \
             is the same as --flush async"
                .to_string(),
        ),
    }
}

/// The run's streams; deleted when dropped (best effort, reported on stderr).
struct Streams<'a> {
    rt: &'a Runtime,
    env: Environment,
    /// Each topic, with the stream of each of its partitions.
    topics: Vec<(String, Vec<String>)>,
}

impl Drop for Streams<'_> {
    fn drop(&mut self) {
        for name in self.topics.drain(..).flat_map(|(_, streams)| streams) {
            if let Err(e) = self.rt.block_on(self.env.delete_stream(&name)) {
                eprintln!("warning: cannot delete stream {name}: {e}");
            }
        }
    }
}

/// Runs the benchmark against RabbitMQ's stream plugin.
pub fn run(opts: &RunOptions, clock: Clock) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let (host, port) = split_host_port(&opts.broker)?;
    let rt = runtime()?;
    let result = (|| {
        let env = rt
            .block_on(Environment::builder().host(&host).port(port).build())
            .map_err(|e| {
                PerfError::peer(
                    format!("cannot connect to RabbitMQ streams at {}", opts.broker),
                    e,
                )
            })?;
        if let Some(note) = durability_note(w.flush) {
            eprintln!("note: {note}");
        }
        match producer_batch_messages(w) {
            1 => eprintln!("note: rabbitmq: every message is published at once on its own"),
            n => eprintln!(
                "note: rabbitmq: publish frames of up to {n} messages (batchBytes) or {:?} (lingerMs)",
                w.linger()
            ),
        }
        let mut streams = Streams {
            rt: &rt,
            env: env.clone(),
            topics: Vec::new(),
        };
        for topic in topic_names(opts, &clock) {
            streams.topics.push((topic.clone(), Vec::new()));
            for p in 0..w.partitions_per_topic {
                let name = stream_name(&topic, p);
                rt.block_on(env.stream_creator().create(&name))
                    .map_err(|e| PerfError::peer(format!("cannot create stream {name}"), e))?;
                if let Some((_, created)) = streams.topics.last_mut() {
                    created.push(name);
                }
            }
        }
        run_on_streams(opts, clock, &rt, &env, &streams.topics)
    })();
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// A partition's batch not yet published.
#[derive(Default)]
struct OpenBatch {
    messages: Vec<Message>,
    opened_ns: u64,
}

/// One producer's clients (one per partition) and open batches.
struct RabbitSink {
    handle: Handle,
    producers: Vec<Producer<NoDedup>>,
    open: Vec<OpenBatch>,
    batch_messages: usize,
    linger_ns: u64,
    message_size: usize,
    clock: Clock,
    shared: Arc<ProducerShared>,
}

impl RabbitSink {
    /// Publishes partition `p`'s open batch as one frame.
    fn publish(&mut self, p: usize) {
        let messages = std::mem::take(&mut self.open[p].messages);
        if messages.is_empty() {
            return;
        }
        let n = messages.len();
        let (shared, clock, size) = (Arc::clone(&self.shared), self.clock, self.message_size);
        // Called once per message, with its confirmation or failure.
        let sent = self
            .handle
            .block_on(self.producers[p].batch_send(messages, move |outcome| {
                let ack_ns = clock.now_ns();
                match outcome {
                    Ok(status) if status.confirmed() => {
                        match payload_timestamp(status.message().data().unwrap_or(&[])) {
                            Some(intended) => shared.acked(&[intended], ack_ns, size as u64, size),
                            None => {
                                shared.failed(1, size, "a confirmed message lost its timestamp")
                            }
                        }
                    }
                    Ok(status) => {
                        shared.failed(1, size, format!("not confirmed: {:?}", status.status()))
                    }
                    Err(e) => shared.failed(1, size, format!("publish failed: {e}")),
                }
                std::future::ready(())
            }));
        if let Err(e) = sent {
            // No callback will run for these.
            self.shared.uncount_sent(n as u64);
            for _ in 0..n {
                self.shared.failed(1, size, format!("publish failed: {e}"));
            }
        }
    }
}

impl PeerSend for RabbitSink {
    fn send(
        &mut self,
        partition: usize,
        payload: &[u8],
        _intended_ns: u64,
        now_ns: u64,
    ) -> Result<(), String> {
        let batch = &mut self.open[partition];
        if batch.messages.is_empty() {
            batch.opened_ns = now_ns;
        }
        batch
            .messages
            .push(Message::builder().body(payload.to_vec()).build());
        if batch.messages.len() >= self.batch_messages {
            self.publish(partition);
        }
        Ok(())
    }

    fn linger_deadline(&self) -> Option<u64> {
        self.open
            .iter()
            .filter(|b| !b.messages.is_empty())
            .map(|b| b.opened_ns.saturating_add(self.linger_ns))
            .min()
    }

    fn flush(&mut self, now_ns: u64) {
        for p in 0..self.open.len() {
            let b = &self.open[p];
            if !b.messages.is_empty() && b.opened_ns.saturating_add(self.linger_ns) <= now_ns {
                self.publish(p);
            }
        }
    }

    fn close(&mut self) {
        for p in self.producers.drain(..) {
            if let Err(e) = self.handle.block_on(p.close()) {
                self.shared
                    .tally
                    .note_error(format!("cannot close a producer: {e}"));
            }
        }
    }
}

/// One consumer of one stream: reads until `stop` is raised.
async fn consume(
    mut consumer: Consumer,
    clock: Clock,
    shared: Arc<ConsumerShared>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(POLL_TIMEOUT, consumer.next()).await {
            Err(_idle) => {}
            Ok(None) => {
                shared.tally.fail(1, "the stream consumer closed");
                return;
            }
            Ok(Some(Err(e))) => {
                shared.tally.fail(1, format!("delivery failed: {e}"));
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
            Ok(Some(Ok(d))) => {
                let data = d.message().data().unwrap_or(&[]);
                shared.record_payloads([data], clock.now_ns());
            }
        }
    }
    // Best effort: the server drops the subscription with the connection anyway.
    let _ = consumer.handle().close().await;
}

fn run_on_streams(
    opts: &RunOptions,
    clock: Clock,
    rt: &Runtime,
    env: &Environment,
    topics: &[(String, Vec<String>)],
) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let mut workers = PeerWorkers::new(rt.handle().clone());

    // Connect everything before anything starts.
    let mut consumer_jobs = Vec::new();
    for (t, (_, partitions)) in topics.iter().enumerate() {
        for s in 0..w.subscriptions_per_topic {
            for c in 0..w.consumer_per_subscription {
                let shared = Arc::new(ConsumerShared::new(t, s as usize));
                for p in partitions_of(c, w.consumer_per_subscription, w.partitions_per_topic) {
                    let name = &partitions[p as usize];
                    let consumer = rt
                        .block_on(
                            env.consumer()
                                .offset(OffsetSpecification::First)
                                .build(name),
                        )
                        .map_err(|e| PerfError::peer(format!("cannot consume {name}"), e))?;
                    consumer_jobs.push((consumer, Arc::clone(&shared)));
                }
            }
        }
    }
    let mut producer_jobs = Vec::new();
    for (t, (_, partitions)) in topics.iter().enumerate() {
        for _ in 0..w.producers_per_topic {
            let mut clients = Vec::new();
            for name in partitions {
                let p = rt
                    .block_on(env.producer().build(name))
                    .map_err(|e| PerfError::peer(format!("cannot produce to {name}"), e))?;
                clients.push(p);
            }
            producer_jobs.push((t, clients));
        }
    }

    // Consumers first, so they are reading when the first message lands.
    // Several consumer tasks of one subscription consumer share its tally.
    let mut consumers: Vec<Arc<ConsumerShared>> = Vec::new();
    for (consumer, shared) in consumer_jobs {
        if !consumers.iter().any(|c| Arc::ptr_eq(c, &shared)) {
            consumers.push(Arc::clone(&shared));
        }
        workers.spawn_consumer(consume(consumer, clock, shared, workers.stop_flag()));
    }

    let window = peer_window(w, opts.window);
    let start_ns = clock.now_ns() + to_ns(START_DELAY);
    let end = EndTime::new(start_ns + to_ns(w.duration()));
    let mut producers = Vec::new();
    for (i, (t, clients)) in producer_jobs.into_iter().enumerate() {
        let shared = Arc::new(ProducerShared::new(t));
        let sink = RabbitSink {
            handle: rt.handle().clone(),
            open: clients.iter().map(|_| OpenBatch::default()).collect(),
            producers: clients,
            batch_messages: producer_batch_messages(w),
            linger_ns: to_ns(w.linger()),
            message_size: w.message_size,
            clock,
            shared: Arc::clone(&shared),
        };
        workers.spawn_producer(w, i, sink, start_ns, &end, window, clock, &shared)?;
        producers.push(shared);
    }
    let launched = Launched {
        names: topics.iter().map(|(topic, _)| topic.clone()).collect(),
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
    use crate::workload::Overrides;

    #[test]
    fn one_stream_per_partition() {
        assert_eq!(stream_name("perf-1-2-0", 0), "perf-1-2-0-0");
        assert_eq!(stream_name("perf-1-2-0", 11), "perf-1-2-0-11");
    }

    #[test]
    fn consumers_split_the_partitions() {
        assert_eq!(partitions_of(0, 1, 3), [0, 1, 2]);
        assert_eq!(partitions_of(0, 2, 5), [0, 2, 4]);
        assert_eq!(partitions_of(1, 2, 5), [1, 3]);
        assert!(partitions_of(3, 4, 2).is_empty());
    }

    #[test]
    fn batch_bytes_become_a_frame_size_in_messages() {
        let w = |batch_bytes| {
            Workload::resolve(
                None,
                &Overrides {
                    message_size: Some(1024),
                    batch_bytes: Some(batch_bytes),
                    ..Overrides::default()
                },
            )
            .unwrap()
        };
        assert_eq!(producer_batch_messages(&w(65536)), 62);
        assert_eq!(producer_batch_messages(&w(1)), 1);
        let no_linger = Workload::resolve(
            None,
            &Overrides {
                linger_ms: Some(0.0),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(producer_batch_messages(&no_linger), 1);
    }

    #[test]
    fn sync_has_no_equivalent() {
        assert!(durability_note(FlushMode::Async).is_none());
        assert!(durability_note(FlushMode::Sync)
            .unwrap()
            .contains("no equivalent"));
    }
}
