//! `coremq-perf run`: one benchmark run from start to report.
//!
//! The run creates its own topics (named `PREFIX-<unix ms>-<pid>-<n>`, so
//! runs never share data), connects every consumer and producer first (a
//! broker that refuses shows up before anything is sent), then starts the
//! consumer threads and the producer threads with a common start time a
//! little in the future. While producers work, the main thread prints a
//! progress line to stderr every [`PROGRESS_INTERVAL`]. When the measured
//! window ends it takes the counts for the rates, lets producers collect
//! their outstanding acks, gives consumers up to the drain time to catch up
//! with everything acked, stops them, deletes the topics (also on error)
//! and builds the [`Report`].
//!
//! Threads do not grow with topics: the workload's producers are spread
//! over at most `--producer-threads` threads (default: one per producer up
//! to twice the CPUs), each carrying the routes of its producers (see
//! `producer.rs`), and the consumers are one fetcher thread per shard
//! reading every queue of that shard for every subscription (see
//! `consumer.rs`). Topics are created and deleted with pipelined requests.
//!
//! With shard-direct connections (the default) each producer thread opens
//! one connection per shard it writes to, on that shard's own port, and
//! each fetcher its connections to its shard's port, so no request crosses
//! cores inside the broker; `--no-shard-direct` sends everything through
//! the shared port, as a shard-unaware client would.
//!
//! That is the coremq driver. The peer drivers (`--driver nats|rabbitmq`,
//! in `drivers/`) set up their own brokers' topics and clients and hand
//! their started producers and consumers to the same [`supervise`], so
//! every driver shares the schedule, the progress lines, the drain and the
//! report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use coremq::client::{Admin, ClientError, Connection, PendingReply, Timeouts};
use coremq::protocol::{QueueInfo, Reply, Request, TopicInfo, TopicSpec};
use coremq_shards::batch::BATCH_HEADER_BYTES;

use crate::backlog::{caught_up_messages, Action, Backlog, Progress};
use crate::consumer::{ConsumerShared, CursorSpec, Fetcher};
use crate::cpu::CpuSampler;
use crate::drivers::{self, Driver};
use crate::error::PerfError;
use crate::payload::Payloads;
use crate::producer::{
    interleave_routes, use_produce_many, Producer, ProducerShared, ProducerSpec, Window,
    OPEN_LOOP_IN_FLIGHT_BYTES_MAX, RECORD_OVERHEAD_BYTES,
};
use crate::rss::RssSampler;
use crate::schedule::{Clock, EndTime, Pacing, Schedule};
use crate::stats::{check, merge_all, rates, Latency, Report, Tally, BYTES_PER_MB};
use crate::workload::Workload;

/// Time from spawning the producers to the first intended send, so every
/// thread is up and waiting when the schedule starts.
pub const START_DELAY: Duration = Duration::from_millis(200);
/// Time between two progress lines.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Default time consumers get to catch up after the producers stop.
pub const DRAIN_S_DEFAULT: f64 = 10.0;
/// How often the drain checks whether consumers have caught up.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often a backlog run checks the backlog and the catch-up.
const BACKLOG_POLL: Duration = Duration::from_millis(20);
/// A backlog run's producers' end until the catch-up sets it: far away.
const END_UNTIL_CAUGHT_UP_NS: u64 = u64::MAX / 2;
/// Nanoseconds per second.
const NANOS_PER_SEC: f64 = 1e9;

/// How to run, besides the workload itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Which broker (client) the run drives.
    pub driver: Driver,
    pub broker: String,
    pub workload: Workload,
    pub topic_prefix: String,
    pub broker_pid: Option<u32>,
    /// Longest wait for consumers after the producers stop.
    pub drain: Duration,
    /// Closed loop: unacknowledged batches per producer.
    pub window: usize,
    /// Closed loop: unacknowledged bytes per producer thread (`None`: what
    /// one producer's window of full batches holds).
    pub window_bytes: Option<usize>,
    /// Connect to each queue's shard port rather than the shared one.
    pub shard_direct: bool,
    /// One Produce / Fetch per queue even when a connection carries many
    /// queues (else ProduceMany / FetchMany there).
    pub single_queue_requests: bool,
    /// Batch bytes a FetchMany gathers before it answers.
    pub fetch_min_bytes: u32,
    /// Retention of the run's topics, bytes per queue (0 = keep all).
    pub retention_bytes: u64,
    /// coremq: most producer threads (`None`: [`producer_threads_default`]).
    pub producer_threads: Option<usize>,
}

/// Producer threads when `--producer-threads` is not given: one per
/// producer, but at most two per CPU.
pub fn producer_threads_default(total_producers: u64, cpus: usize) -> usize {
    usize::try_from(total_producers)
        .unwrap_or(usize::MAX)
        .min(2 * cpus.max(1))
        .max(1)
}

pub(crate) fn to_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The address of a shard's own port: the broker's host with `port`.
pub fn shard_addr(broker: &str, port: u16) -> Option<String> {
    let (host, _) = broker.rsplit_once(':')?;
    Some(format!("{host}:{port}"))
}

/// Where to reach `q`: its shard's port if shard-direct and advertised.
fn queue_addr(opts: &RunOptions, q: &QueueInfo) -> String {
    if opts.shard_direct && q.shard_port != 0 {
        if let Some(a) = shard_addr(&opts.broker, q.shard_port) {
            return a;
        }
    }
    opts.broker.clone()
}

/// Checks that the largest batch the workload builds fits the broker.
pub fn check_fits(w: &Workload, max_message_bytes: u64) -> Result<(), PerfError> {
    let one_message = (BATCH_HEADER_BYTES + w.message_size + RECORD_OVERHEAD_BYTES) as u64;
    if one_message > max_message_bytes {
        return Err(PerfError::Invalid(format!(
            "a {}-byte message makes a {one_message}-byte batch, over the broker's \
             max message size of {max_message_bytes} bytes",
            w.message_size
        )));
    }
    if w.batch_bytes as u64 > max_message_bytes {
        return Err(PerfError::Invalid(format!(
            "batchBytes {} is over the broker's max message size of {max_message_bytes} bytes",
            w.batch_bytes
        )));
    }
    Ok(())
}

/// The names of the run's topics: `PREFIX-<unix ms>-<pid>-<n>`.
pub(crate) fn topic_names(opts: &RunOptions, clock: &Clock) -> Vec<String> {
    let stamp_ms = clock.now_ns() / 1_000_000;
    let pid = std::process::id();
    (0..opts.workload.topics)
        .map(|t| format!("{}-{stamp_ms}-{pid}-{t}", opts.topic_prefix))
        .collect()
}

/// When producers stop, as set before they start: after the workload's
/// duration; in a backlog run not before the catch-up is over, which
/// `supervise` then decides.
pub(crate) fn scheduled_end(w: &Workload, start_ns: u64) -> u64 {
    if w.backlog_bytes() > 0 {
        END_UNTIL_CAUGHT_UP_NS
    } else {
        start_ns + to_ns(w.duration())
    }
}

/// Producer `index`'s pacing: its staggered share of the aggregate rate
/// (open loop), or as fast as its window allows (closed loop).
pub(crate) fn pacing(w: &Workload, start_ns: u64, index: usize) -> Pacing {
    if w.open_loop() {
        Pacing::Open(Schedule::staggered(
            start_ns,
            w.producer_rate,
            index as u64,
            w.total_producers(),
        ))
    } else {
        Pacing::Closed
    }
}

/// Pacing of producer thread `index` carrying `producers` of the run's
/// producers: their share of the aggregate rate, offset by `index / rate`
/// so that the threads' sends interleave (with one producer per thread,
/// the same as [`pacing`]).
pub(crate) fn thread_pacing(w: &Workload, start_ns: u64, index: usize, producers: usize) -> Pacing {
    if w.open_loop() {
        let offset_ns = (index as f64 * NANOS_PER_SEC / w.producer_rate).round() as u64;
        let rate = w.producer_rate * producers as f64 / w.total_producers() as f64;
        Pacing::Open(Schedule::new(start_ns + offset_ns, rate))
    } else {
        Pacing::Closed
    }
}

/// Requests the admin connection has in flight when creating or deleting
/// many topics.
const ADMIN_PIPELINE: usize = 64;
/// Topic counts from which creation and deletion report their time.
const MANY_TOPICS: usize = 100;

/// Sends `requests` over `admin`'s connection, at most [`ADMIN_PIPELINE`]
/// in flight, and hands each reply to `done` in order (with its request's
/// key). Every request is answered (or fails) before this returns.
fn pipelined<K>(
    admin: &Admin,
    requests: impl IntoIterator<Item = (K, Request)>,
    mut done: impl FnMut(K, Result<Reply, ClientError>),
) {
    let conn = admin.connection();
    let wait = conn.timeouts().request;
    let mut in_flight: VecDeque<(K, Result<PendingReply, ClientError>)> = VecDeque::new();
    let mut requests = requests.into_iter();
    loop {
        while in_flight.len() < ADMIN_PIPELINE {
            let Some((key, req)) = requests.next() else {
                break;
            };
            in_flight.push_back((key, conn.send(&req)));
        }
        let Some((key, pending)) = in_flight.pop_front() else {
            return;
        };
        done(key, pending.and_then(|p| p.wait(wait)));
    }
}

/// The run's topics; deleted when dropped (best effort, reported on stderr).
struct Topics<'a> {
    admin: &'a Admin,
    infos: Vec<TopicInfo>,
}

impl<'a> Topics<'a> {
    fn create(admin: &'a Admin, opts: &RunOptions, clock: &Clock) -> Result<Topics<'a>, PerfError> {
        let w = &opts.workload;
        let names = topic_names(opts, clock);
        let count = names.len();
        let mut topics = Topics {
            admin,
            infos: Vec::new(),
        };
        let started = clock.now_ns();
        let requests = names.into_iter().map(|name| {
            let spec = TopicSpec {
                name: name.clone(),
                queues: w.partitions_per_topic,
                flush: w.flush.into(),
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: opts.retention_bytes,
            };
            (name, Request::CreateTopic(spec))
        });
        // Every reply is collected, also after a failure, so that whatever
        // was created is deleted again.
        let mut first_error = None;
        pipelined(admin, requests, |name, reply| match reply {
            Ok(Reply::Topic(info)) => topics.infos.push(info),
            Ok(other) => {
                first_error.get_or_insert_with(|| {
                    PerfError::Thread(format!("unexpected reply to creating {name}: {other:?}"))
                });
            }
            Err(e) => {
                first_error.get_or_insert_with(|| {
                    PerfError::client(format!("cannot create topic {name}"), e)
                });
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        if count >= MANY_TOPICS {
            eprintln!(
                "created {count} topics in {:.1} s",
                (clock.now_ns() - started) as f64 / NANOS_PER_SEC
            );
        }
        Ok(topics)
    }

    fn names(&self) -> Vec<String> {
        self.infos.iter().map(|i| i.spec.name.clone()).collect()
    }
}

impl Drop for Topics<'_> {
    fn drop(&mut self) {
        let count = self.infos.len();
        let started = std::time::Instant::now();
        let requests = self.infos.drain(..).map(|info| {
            let name = info.spec.name;
            (name.clone(), Request::DeleteTopic { name })
        });
        let mut failed = 0usize;
        pipelined(self.admin, requests, |name, reply| {
            let why = match reply {
                Ok(Reply::Done) => return,
                Ok(other) => format!("unexpected reply {other:?}"),
                Err(e) => e.to_string(),
            };
            failed += 1;
            if failed <= 5 {
                eprintln!("warning: cannot delete topic {name}: {why}");
            }
        });
        if failed > 5 {
            eprintln!("warning: {failed} topics could not be deleted");
        }
        if count >= MANY_TOPICS {
            eprintln!(
                "deleted {count} topics in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// The run's threads; dropping stops and joins them all.
#[derive(Default)]
struct Threads {
    abort_producers: Arc<AtomicBool>,
    stop_consumers: Arc<AtomicBool>,
    /// Fetchers connected but not started yet (a backlog run).
    paused_consumers: Vec<(String, Fetcher)>,
    producers: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
}

pub(crate) fn join_all(handles: &mut Vec<JoinHandle<()>>, what: &str) -> Result<(), PerfError> {
    let mut panicked = 0;
    for h in handles.drain(..) {
        if h.join().is_err() {
            panicked += 1;
        }
    }
    if panicked > 0 {
        return Err(PerfError::Thread(format!(
            "{panicked} {what} threads panicked"
        )));
    }
    Ok(())
}

impl Threads {
    fn spawn_producer(&mut self, name: String, p: Producer) -> Result<(), PerfError> {
        let h = thread::Builder::new()
            .name(name)
            .spawn(move || p.run())
            .map_err(|e| PerfError::io("cannot start a producer thread", e))?;
        self.producers.push(h);
        Ok(())
    }

    fn spawn_consumer(&mut self, name: String, f: Fetcher) -> Result<(), PerfError> {
        let h = thread::Builder::new()
            .name(name)
            .spawn(move || f.run())
            .map_err(|e| PerfError::io("cannot start a consumer thread", e))?;
        self.consumers.push(h);
        Ok(())
    }

    fn join_producers(&mut self) -> Result<(), PerfError> {
        join_all(&mut self.producers, "producer")
    }

    fn start_paused_consumers(&mut self) -> Result<(), PerfError> {
        for (name, f) in std::mem::take(&mut self.paused_consumers) {
            self.spawn_consumer(name, f)?;
        }
        Ok(())
    }

    fn stop_consumers(&mut self) -> Result<(), PerfError> {
        self.stop_consumers.store(true, Ordering::Relaxed);
        join_all(&mut self.consumers, "consumer")
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.abort_producers.store(true, Ordering::Relaxed);
        self.stop_consumers.store(true, Ordering::Relaxed);
        let _ = join_all(&mut self.producers, "producer");
        let _ = join_all(&mut self.consumers, "consumer");
    }
}

/// What a driver started, as [`supervise`] needs to end it.
pub trait Workers {
    /// Waits for every producer to finish (each collects its outstanding
    /// acks, or gives up on them, before it returns).
    fn join_producers(&mut self) -> Result<(), PerfError>;
    /// Stops the consumers and waits for them.
    fn stop_consumers(&mut self) -> Result<(), PerfError>;
    /// Starts consumers that were set up paused (a backlog run; drivers
    /// that refuse backlogs start theirs at once and need nothing here).
    fn start_consumers(&mut self) -> Result<(), PerfError> {
        Ok(())
    }
}

impl Workers for Threads {
    fn join_producers(&mut self) -> Result<(), PerfError> {
        Threads::join_producers(self)
    }

    fn stop_consumers(&mut self) -> Result<(), PerfError> {
        Threads::stop_consumers(self)
    }

    fn start_consumers(&mut self) -> Result<(), PerfError> {
        Threads::start_paused_consumers(self)
    }
}

/// A run whose producers and consumers are started, as any driver hands it
/// to [`supervise`].
pub struct Launched {
    /// The topics, in the order of the `topic` indices of the shared state.
    pub names: Vec<String>,
    pub producers: Vec<Arc<ProducerShared>>,
    pub consumers: Vec<Arc<ConsumerShared>>,
    /// First intended send (ns since the epoch).
    pub start_ns: u64,
    /// End of the measured window, as the producers see it.
    pub end: EndTime,
}

/// Runs the benchmark and returns its report (also when its checks fail).
/// The broker's RSS and CPU time, and this process's CPU time, are sampled
/// whatever the driver.
pub fn run(opts: &RunOptions) -> Result<Report, PerfError> {
    let clock = Clock::new()?;
    let rss = match opts.broker_pid {
        Some(pid) => Some(RssSampler::start(pid)?),
        None => None,
    };
    let cpu = CpuSampler::start(opts.broker_pid, clock)?;
    let result = match opts.driver {
        Driver::Coremq => run_coremq(opts, clock),
        Driver::Nats => drivers::nats::run(opts, clock),
        Driver::Rabbitmq => drivers::rabbitmq::run(opts, clock),
    };
    let rss_max = rss.and_then(RssSampler::finish);
    let cpu = cpu.finish();
    let mut report = result?;
    report.broker_rss_mb_max = rss_max.map(|m| m.rss_mb);
    report.broker_rss_anon_mb_max = rss_max.and_then(|m| m.anon_mb);
    let (broker_cpu, perf_cpu) = cpu.window(report.window_ns.0, report.window_ns.1);
    report.broker_cpu_cores_avg = broker_cpu.map(|c| c.avg);
    report.broker_cpu_cores_max = broker_cpu.map(|c| c.max);
    report.perf_cpu_cores_avg = perf_cpu.map(|c| c.avg);
    report.perf_cpu_cores_max = perf_cpu.map(|c| c.max);
    Ok(report)
}

/// The coremq driver: topics through the admin API, producer threads that
/// batch themselves, a fetcher thread per shard.
fn run_coremq(opts: &RunOptions, clock: Clock) -> Result<Report, PerfError> {
    let admin = Admin::connect(&opts.broker).map_err(|e| {
        PerfError::client(
            format!("cannot connect to the broker at {}", opts.broker),
            e,
        )
    })?;
    let node = admin
        .metadata()
        .map_err(|e| PerfError::client("cannot read the broker's metadata", e))?;
    check_fits(&opts.workload, node.max_message_bytes)?;
    let topics = Topics::create(&admin, opts, &clock)?;
    let result = run_on_topics(opts, &topics, clock);
    drop(topics);
    result
}

/// A producer thread's share of the run, connected.
struct ProducerThread {
    /// Run-wide index of each topic slot, and its name.
    topics: Vec<usize>,
    names: Vec<String>,
    conns: Vec<Connection>,
    routes: Vec<crate::producer::Route>,
    /// The run's producers it carries.
    producers: usize,
}

/// Which topic each producer thread's producers write to: producer `g`
/// (of topic `g / producersPerTopic`) goes to thread `g % threads`, so
/// every thread gets a spread of the topics.
pub fn assign_producers(topics: usize, per_topic: usize, threads: usize) -> Vec<Vec<usize>> {
    let threads = threads.max(1);
    let mut out = vec![Vec::new(); threads];
    for g in 0..topics * per_topic {
        out[g % threads].push(g / per_topic.max(1));
    }
    out
}

/// Connects producer thread that carries producers of `topics` (one entry
/// per producer, run-wide topic indices): a connection per address its
/// queues are on, a route per (producer, queue).
fn connect_producer_thread(
    opts: &RunOptions,
    infos: &[TopicInfo],
    topics: &[usize],
) -> Result<ProducerThread, PerfError> {
    let mut by_addr: BTreeMap<String, usize> = BTreeMap::new();
    let mut conns = Vec::new();
    let mut slot_of: HashMap<usize, usize> = HashMap::new();
    let mut slots = Vec::new();
    let mut per_producer = Vec::with_capacity(topics.len());
    for &t in topics {
        let slot = *slot_of.entry(t).or_insert_with(|| {
            slots.push(t);
            slots.len() - 1
        });
        let mut queues = Vec::with_capacity(infos[t].queues.len());
        for q in &infos[t].queues {
            let addr = queue_addr(opts, q);
            let idx = match by_addr.get(&addr) {
                Some(&i) => i,
                None => {
                    let c = Connection::connect(&addr, Timeouts::default()).map_err(|e| {
                        PerfError::client(format!("producer cannot connect to {addr}"), e)
                    })?;
                    conns.push(c);
                    by_addr.insert(addr, conns.len() - 1);
                    conns.len() - 1
                }
            };
            queues.push((q.queue, idx));
        }
        per_producer.push((slot, queues));
    }
    Ok(ProducerThread {
        names: slots.iter().map(|&t| infos[t].spec.name.clone()).collect(),
        topics: slots,
        conns,
        routes: interleave_routes(&per_producer),
        producers: topics.len(),
    })
}

/// The fetchers' cursors: per shard, its address, the (topic,
/// subscription) slots and a cursor per (topic, subscription, queue).
type ShardCursors = BTreeMap<u32, (String, Vec<(usize, usize)>, Vec<CursorSpec>)>;

/// Every queue of every subscription, grouped by the shard that owns it.
fn cursors_by_shard(opts: &RunOptions, infos: &[TopicInfo]) -> ShardCursors {
    let mut by_shard = ShardCursors::new();
    for (t, info) in infos.iter().enumerate() {
        for s in 0..opts.workload.subscriptions_per_topic as usize {
            for q in &info.queues {
                let (_, slots, cursors) = by_shard
                    .entry(q.shard)
                    .or_insert_with(|| (queue_addr(opts, q), Vec::new(), Vec::new()));
                if slots.last() != Some(&(t, s)) {
                    slots.push((t, s));
                }
                cursors.push(CursorSpec {
                    slot: slots.len() - 1,
                    topic: info.spec.name.clone(),
                    queue: q.queue,
                    position: q.start_offset,
                });
            }
        }
    }
    by_shard
}

/// Sums of every thread's counts, taken by the main thread.
struct Counts {
    sent: u64,
    acked: u64,
    acked_bytes: u64,
    consumed: u64,
    consumed_bytes: u64,
}

fn counts(producers: &[Arc<ProducerShared>], consumers: &[Arc<ConsumerShared>]) -> Counts {
    let mut c = Counts {
        sent: 0,
        acked: 0,
        acked_bytes: 0,
        consumed: 0,
        consumed_bytes: 0,
    };
    for p in producers {
        c.sent += p.sent();
        let (m, b) = p.tally.counts();
        c.acked += m;
        c.acked_bytes += b;
    }
    for s in consumers {
        let (m, b) = s.tally.counts();
        c.consumed += m;
        c.consumed_bytes += b;
    }
    c
}

/// Per topic and subscription: (topic, subscription, consumed, acked on
/// the topic), in topic then subscription order.
fn subscription_progress(
    topics: usize,
    subscriptions: u32,
    producers: &[Arc<ProducerShared>],
    consumers: &[Arc<ConsumerShared>],
) -> Vec<(usize, usize, u64, u64)> {
    let subs = subscriptions as usize;
    let mut acked = vec![0u64; topics];
    for p in producers {
        for (t, n) in p.acked_by_topic() {
            acked[t] += n;
        }
    }
    let mut consumed = vec![0u64; topics * subs];
    for c in consumers {
        for ((t, s), n) in c.consumed_by_slot() {
            consumed[t * subs + s] += n;
        }
    }
    (0..topics)
        .flat_map(|t| (0..subs).map(move |s| (t, s)))
        .map(|(t, s)| (t, s, consumed[t * subs + s], acked[t]))
        .collect()
}

fn run_on_topics(
    opts: &RunOptions,
    topics: &Topics<'_>,
    clock: Clock,
) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let names = topics.names();
    let mut threads = Threads::default();

    // Connect everything before any thread starts: a fetcher per shard...
    let mut fetchers = Vec::new();
    let mut consumers: Vec<Arc<ConsumerShared>> = Vec::new();
    for (shard, (addr, slots, cursors)) in cursors_by_shard(opts, &topics.infos) {
        let shared = Arc::new(ConsumerShared::for_slots(slots));
        let f = Fetcher::connect(
            &addr,
            cursors,
            clock,
            Arc::clone(&shared),
            Arc::clone(&threads.stop_consumers),
            (!opts.single_queue_requests).then_some(opts.fetch_min_bytes),
        )
        .map_err(|e| PerfError::client(format!("consumer cannot connect to {addr}"), e))?;
        consumers.push(shared);
        fetchers.push((format!("perf-f{shard}"), f));
    }
    // ... and the producer threads.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let n_threads = opts
        .producer_threads
        .unwrap_or_else(|| producer_threads_default(w.total_producers(), cpus));
    let assignment = assign_producers(
        topics.infos.len(),
        w.producers_per_topic as usize,
        n_threads,
    );
    let mut producer_threads = Vec::new();
    for topics_of_thread in assignment.iter().filter(|a| !a.is_empty()) {
        producer_threads.push(connect_producer_thread(
            opts,
            &topics.infos,
            topics_of_thread,
        )?);
    }

    // Consumers first, so they are polling when the first message lands;
    // in a backlog run they wait for supervise to start them.
    for (name, f) in fetchers {
        if w.backlog_bytes() > 0 {
            threads.paused_consumers.push((name, f));
        } else {
            threads.spawn_consumer(name, f)?;
        }
    }

    let start_ns = clock.now_ns() + to_ns(START_DELAY);
    let end = EndTime::new(scheduled_end(w, start_ns));
    let mut producers: Vec<Arc<ProducerShared>> = Vec::new();
    for (i, pt) in producer_threads.into_iter().enumerate() {
        let window = if w.open_loop() {
            Window::bytes(OPEN_LOOP_IN_FLIGHT_BYTES_MAX)
        } else {
            closed_loop_window(opts, pt.producers)
        };
        let shared = Arc::new(ProducerShared::for_topics(pt.topics));
        let multi_queue =
            !opts.single_queue_requests && use_produce_many(pt.routes.len(), pt.conns.len());
        let spec = ProducerSpec {
            multi_queue,
            topics: pt.names.into_iter().map(Into::into).collect(),
            routes: pt.routes,
            conns: pt.conns,
            pacing: thread_pacing(w, start_ns, i, pt.producers),
            start_ns,
            end: end.clone(),
            message_size: w.message_size,
            batch_bytes: w.batch_bytes,
            compression: w.compression.compression(),
            payloads: Payloads::for_producer(w, i),
            linger: w.linger(),
            window,
            clock,
            abort: Arc::clone(&threads.abort_producers),
        };
        producers.push(Arc::clone(&shared));
        threads.spawn_producer(format!("perf-p{i}"), Producer::new(spec, shared))?;
    }
    let launched = Launched {
        names,
        producers,
        consumers,
        start_ns,
        end,
    };
    supervise(opts, clock, &launched, &mut threads)
}

/// The part of a run every driver shares, once its producers and consumers
/// are going: progress lines until the measured window ends, the rates
/// taken then, the producers' outstanding acks, the consumers' drain, and
/// the report.
pub fn supervise(
    opts: &RunOptions,
    clock: Clock,
    launched: &Launched,
    workers: &mut dyn Workers,
) -> Result<Report, PerfError> {
    let w = &opts.workload;
    let Launched {
        names,
        producers,
        consumers,
        start_ns,
        end,
    } = launched;
    let start_ns = *start_ns;
    let duration_ns = to_ns(w.duration());
    let mut backlog = (w.backlog_bytes() > 0).then(|| {
        Backlog::new(
            w.backlog_bytes(),
            w.subscriptions_per_topic,
            caught_up_messages(w.producer_rate, w.subscriptions_per_topic),
            start_ns,
            duration_ns,
        )
    });
    let since_start = |now: u64| now.saturating_sub(start_ns) as f64 / NANOS_PER_SEC;

    // Progress until the measured window ends; in a backlog run also the
    // phases (the producers' end moves to when the catch-up is over).
    let interval_ns = to_ns(PROGRESS_INTERVAL);
    let mut next_progress = start_ns + interval_ns;
    let mut last = (start_ns, 0u64, 0u64, 0u64);
    let mut last_latency = Latency::new();
    clock.sleep_until(start_ns);
    loop {
        let now = clock.now_ns();
        if let Some(b) = backlog.as_mut() {
            let c = counts(producers, consumers);
            let p = Progress {
                acked: c.acked,
                acked_bytes: c.acked_bytes,
                consumed: c.consumed,
                consumed_bytes: c.consumed_bytes,
            };
            match b.step(now, p) {
                Action::StartConsumers => {
                    let waiting = (p.acked_bytes * u64::from(w.subscriptions_per_topic))
                        .saturating_sub(p.consumed_bytes);
                    eprintln!(
                        "[{:6.1}s] backlog of {:.1} MiB built: consumers start",
                        since_start(now),
                        waiting as f64 / BYTES_PER_MB
                    );
                    workers.start_consumers()?;
                }
                Action::Finished => {
                    if let Some(r) = b.report() {
                        eprintln!(
                            "[{:6.1}s] catch-up {} after {:.1} s: {:.1} MB/s read",
                            since_start(now),
                            if r.catch_up_complete {
                                "done"
                            } else {
                                "given up"
                            },
                            r.catch_up_s,
                            r.catch_up_mb_per_s
                        );
                    }
                    end.set(now.max(start_ns + duration_ns));
                }
                Action::Nothing => {}
            }
        }
        let end_ns = end.get();
        if now >= end_ns {
            break;
        }
        if now >= next_progress {
            let c = counts(producers, consumers);
            let secs = (now - last.0) as f64 / NANOS_PER_SEC;
            let tally = merge_all(
                producers
                    .iter()
                    .map(|p| p.tally.snapshot())
                    .collect::<Vec<_>>()
                    .iter(),
            );
            let (pub_rate, pub_mb) = rates(c.acked - last.1, c.acked_bytes - last.2, secs);
            let (con_rate, _) = rates(c.consumed - last.3, 0, secs);
            // The interval's own tail shows when a stall happened; the run's hides it.
            let recent = tally.latency.since(&last_latency);
            eprintln!(
                "[{:6.1}s] publish {pub_rate:9.0} msg/s {pub_mb:7.1} MB/s | consume {con_rate:9.0} msg/s | \
                 publish p99 {} us, max {} us (run p99 {} us) | sent {} acked {} consumed {}",
                since_start(now),
                recent.quantile(0.99),
                recent.max(),
                tally.latency.quantile(0.99),
                c.sent,
                c.acked,
                c.consumed,
            );
            last = (now, c.acked, c.acked_bytes, c.consumed);
            last_latency = tally.latency;
            next_progress += interval_ns;
        }
        let mut wake = next_progress.min(end_ns);
        if backlog.as_ref().is_some_and(Backlog::holds_producers) {
            wake = wake.min(now + to_ns(BACKLOG_POLL));
        }
        clock.sleep_until(wake);
    }
    let window_counts = counts(producers, consumers);
    let window_end_ns = clock.now_ns();
    let measured_seconds = (window_end_ns - start_ns) as f64 / NANOS_PER_SEC;

    // Outstanding acks, then the consumers' drain.
    workers.join_producers()?;
    let drain_end = clock.now_ns() + to_ns(opts.drain);
    loop {
        let progress =
            subscription_progress(names.len(), w.subscriptions_per_topic, producers, consumers);
        let caught_up = progress
            .iter()
            .all(|(_, _, consumed, acked)| consumed >= acked);
        if caught_up || clock.now_ns() >= drain_end {
            break;
        }
        thread::sleep(DRAIN_POLL);
    }
    workers.stop_consumers()?;

    // The report.
    let final_counts = counts(producers, consumers);
    let publish: Tally = merge_all(
        producers
            .iter()
            .map(|p| p.tally.snapshot())
            .collect::<Vec<_>>()
            .iter(),
    );
    let consume: Tally = merge_all(
        consumers
            .iter()
            .map(|c| c.tally.snapshot())
            .collect::<Vec<_>>()
            .iter(),
    );
    for e in producers
        .iter()
        .filter_map(|p| p.tally.first_error())
        .chain(consumers.iter().filter_map(|c| c.tally.first_error()))
        .take(5)
    {
        eprintln!("error: {e}");
    }
    let progress: Vec<(String, u64, u64)> =
        subscription_progress(names.len(), w.subscriptions_per_topic, producers, consumers)
            .into_iter()
            .map(|(t, s, consumed, acked)| (format!("{}/sub-{s}", names[t]), consumed, acked))
            .collect();
    let errors = publish.errors + consume.errors;
    let failures = check(final_counts.sent, final_counts.acked, errors, &progress);
    let (publish_msgs_per_s, publish_mb_per_s) = rates(
        window_counts.acked,
        window_counts.acked_bytes,
        measured_seconds,
    );
    let (consume_msgs_per_s, consume_mb_per_s) = rates(
        window_counts.consumed,
        window_counts.consumed_bytes,
        measured_seconds,
    );
    Ok(Report {
        publish_msgs_per_s,
        publish_mb_per_s,
        consume_msgs_per_s,
        consume_mb_per_s,
        publish_latency_us: publish.latency.summary(),
        e2e_latency_us: consume.latency.summary(),
        sent: final_counts.sent,
        acked: final_counts.acked,
        consumed: final_counts.consumed,
        expected_consumed: final_counts.acked * u64::from(w.subscriptions_per_topic),
        errors,
        publish_errors: publish.errors,
        consume_errors: consume.errors,
        open_loop: w.open_loop(),
        measured_seconds,
        broker: opts.broker.clone(),
        topics: names.clone(),
        workload: w.clone(),
        broker_rss_mb_max: None,
        broker_rss_anon_mb_max: None,
        backlog: backlog.and_then(|b| b.report()),
        compression: w.compression.to_string(),
        batch_bytes_sent: (publish.stored_bytes > 0).then_some(publish.stored_bytes),
        compression_ratio: (publish.stored_bytes > 0)
            .then(|| publish.bytes as f64 / publish.stored_bytes as f64),
        broker_cpu_cores_avg: None,
        broker_cpu_cores_max: None,
        perf_cpu_cores_avg: None,
        perf_cpu_cores_max: None,
        cpus: thread::available_parallelism().map_or(1, |n| n.get()),
        window_ns: (start_ns, window_end_ns),
        passed: failures.is_empty(),
        failures,
    })
}

/// The human summary printed to stdout at the end of a run.
pub fn summary_text(r: &Report) -> String {
    let w = &r.workload;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "workload: {} | {} topic(s) x {} queue(s), {} B messages ({} payload), \
         {} producer(s)/topic, {} subscription(s) x {} consumer(s), flush {}, batch {} B, \
         linger {} ms, compression {}",
        w.name,
        w.topics,
        w.partitions_per_topic,
        w.message_size,
        w.payload,
        w.producers_per_topic,
        w.subscriptions_per_topic,
        w.consumer_per_subscription,
        w.flush,
        w.batch_bytes,
        w.linger_ms,
        w.compression,
    );
    if r.open_loop {
        let _ = writeln!(
            s,
            "rate: open loop, target {} msg/s ({:.0} per producer); latency from each \
             message's scheduled send time",
            w.producer_rate,
            w.rate_per_producer()
        );
    } else {
        let _ = writeln!(
            s,
            "rate: CLOSED LOOP (rate 0, as fast as possible with a pipelining window); \
             latency from message creation, so it hides queueing in the producer"
        );
    }
    let _ = writeln!(s, "measured: {:.1} s", r.measured_seconds);
    if let Some(b) = &r.backlog {
        let _ = writeln!(
            s,
            "backlog: {:.1} MiB (of {:.1} asked) built in {:.1} s; catch-up {} in {:.1} s: \
             consumers read {:.0} msg/s, {:.1} MB/s while producers went on; e2e latency \
             includes the wait in the backlog",
            b.backlog_bytes as f64 / BYTES_PER_MB,
            b.backlog_bytes_target as f64 / BYTES_PER_MB,
            b.backlog_build_s,
            if b.catch_up_complete {
                "done"
            } else {
                "NOT done"
            },
            b.catch_up_s,
            b.catch_up_msgs_per_s,
            b.catch_up_mb_per_s,
        );
    }
    let _ = writeln!(
        s,
        "publish: {:.0} msg/s, {:.2} MB/s | sent {} acked {} errors {}",
        r.publish_msgs_per_s, r.publish_mb_per_s, r.sent, r.acked, r.publish_errors
    );
    let _ = writeln!(
        s,
        "consume: {:.0} msg/s, {:.2} MB/s | consumed {} of {} errors {}",
        r.consume_msgs_per_s, r.consume_mb_per_s, r.consumed, r.expected_consumed, r.consume_errors
    );
    for (what, l) in [
        ("publish", &r.publish_latency_us),
        ("e2e", &r.e2e_latency_us),
    ] {
        let _ = writeln!(
            s,
            "{what} latency us: p50 {} p99 {} p99.9 {} p99.99 {} max {} (mean {:.0}, n {})",
            l.p50, l.p99, l.p999, l.p9999, l.max, l.mean, l.count
        );
    }
    if let (Some(stored), Some(ratio)) = (r.batch_bytes_sent, r.compression_ratio) {
        let _ = writeln!(
            s,
            "batches: {:.1} MiB stored (compression {}) for {:.1} MiB of payload: ratio {ratio:.2}",
            stored as f64 / BYTES_PER_MB,
            r.compression,
            r.payload_bytes_acked() as f64 / BYTES_PER_MB,
        );
    }
    if let Some(mb) = r.broker_rss_mb_max {
        let anon = r
            .broker_rss_anon_mb_max
            .map_or(String::new(), |a| format!(" (anonymous: {a:.1} MiB)"));
        let _ = writeln!(s, "broker RSS max: {mb:.1} MiB{anon}");
    }
    if let Some(line) = cpu_line(r) {
        let _ = writeln!(s, "{line}");
    }
    if r.passed {
        let _ = writeln!(s, "result: PASS");
    } else {
        let _ = writeln!(s, "result: FAIL: {}", r.failures.join("; "));
    }
    s
}

/// A closed-loop producer thread's window: `--window` batches for each
/// producer it carries, and at most the bytes of one producer's window of
/// full batches in all (or `--window-bytes`). Without the byte cap a
/// thread carrying 2,500 of 10,000 topics' producers had hundreds of MB
/// in flight: ~0.3 s publish latency and, with data that cold, ~10% more
/// CPU per message in both processes and 20-30% fewer messages a second
/// than with the 1 MiB a single-topic producer thread has
/// (docs/benchmarks.md); a Kafka producer's buffer.memory is per client,
/// not per partition, too.
fn closed_loop_window(opts: &RunOptions, producers: usize) -> Window {
    let w = &opts.workload;
    Window {
        batches: opts.window.saturating_mul(producers),
        bytes: opts
            .window_bytes
            .unwrap_or(opts.window.saturating_mul(w.batch_bytes)),
    }
}

/// The summary's CPU line: cores busy over the measured window (average
/// and busiest second) of the broker and of this tool, out of the CPUs.
fn cpu_line(r: &Report) -> Option<String> {
    let part = |who: &str, avg: Option<f64>, max: Option<f64>| {
        avg.map(|a| format!("{who} {a:.2} avg, {:.2} max", max.unwrap_or(a)))
    };
    let parts: Vec<String> = [
        part("broker", r.broker_cpu_cores_avg, r.broker_cpu_cores_max),
        part("coremq-perf", r.perf_cpu_cores_avg, r.perf_cpu_cores_max),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        return None;
    }
    Some(format!("CPU cores (of {}): {}", r.cpus, parts.join(" | ")))
}

/// Writes the report as pretty JSON.
pub fn write_json(report: &Report, path: &PathBuf) -> Result<(), PerfError> {
    let mut text = serde_json::to_string_pretty(report)?;
    text.push('\n');
    std::fs::write(path, text).map_err(|source| PerfError::WriteReport {
        path: path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Overrides;

    #[test]
    fn shard_addresses_keep_the_host() {
        assert_eq!(
            shard_addr("127.0.0.1:9700", 9711).as_deref(),
            Some("127.0.0.1:9711")
        );
        assert_eq!(shard_addr("[::1]:9700", 5).as_deref(), Some("[::1]:5"));
        assert_eq!(shard_addr("localhost", 5), None);
    }

    #[test]
    fn summary_shows_cpu_of_both_processes() {
        let r = crate::stats::test_report();
        let text = summary_text(&r);
        assert!(
            text.contains("CPU cores (of 2): coremq-perf 0.50 avg, 0.75 max\n"),
            "{text}"
        );
        let r = Report {
            broker_cpu_cores_avg: Some(1.6),
            broker_cpu_cores_max: Some(1.93),
            ..r
        };
        assert!(summary_text(&r)
            .contains("CPU cores (of 2): broker 1.60 avg, 1.93 max | coremq-perf 0.50 avg"));
        let r = Report {
            broker_cpu_cores_avg: None,
            perf_cpu_cores_avg: None,
            ..r
        };
        assert!(!summary_text(&r).contains("CPU"));
    }

    fn opts(over: Overrides) -> RunOptions {
        RunOptions {
            driver: Driver::Coremq,
            broker: "127.0.0.1:9700".into(),
            workload: Workload::resolve(None, &over).unwrap(),
            topic_prefix: "perf".into(),
            broker_pid: None,
            drain: Duration::from_secs(1),
            window: 16,
            window_bytes: None,
            shard_direct: true,
            single_queue_requests: false,
            fetch_min_bytes: 1,
            retention_bytes: 0,
            producer_threads: None,
        }
    }

    #[test]
    fn a_thread_of_many_producers_has_one_producers_bytes_in_flight() {
        let o = opts(Overrides {
            batch_bytes: Some(65536),
            ..Overrides::default()
        });
        // One producer: its 16 batches of 64 KiB, as before the byte cap.
        assert_eq!(
            closed_loop_window(&o, 1),
            Window {
                batches: 16,
                bytes: 1 << 20
            }
        );
        // 2,500 producers: a window of batches each, the same bytes in all.
        assert_eq!(closed_loop_window(&o, 2500).bytes, 1 << 20);
        assert_eq!(closed_loop_window(&o, 2500).batches, 40_000);
        let o = RunOptions {
            window_bytes: Some(4096),
            ..o
        };
        assert_eq!(closed_loop_window(&o, 2500).bytes, 4096);
    }

    fn topic(name: &str, id: u32, queues: u32, shards: u32) -> TopicInfo {
        TopicInfo {
            spec: TopicSpec {
                name: name.into(),
                queues,
                flush: coremq::protocol::Flush::Async,
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: 0,
            },
            id,
            queues: (0..queues)
                .map(|q| {
                    let shard = (id + q) % shards;
                    QueueInfo {
                        queue: q,
                        shard,
                        shard_port: 9710 + shard as u16,
                        start_offset: 0,
                        end_offset: 0,
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn producer_threads_do_not_grow_with_topics() {
        assert_eq!(producer_threads_default(2, 2), 2);
        assert_eq!(producer_threads_default(1, 2), 1);
        assert_eq!(producer_threads_default(10_000, 2), 4);
        assert_eq!(producer_threads_default(10_000, 0), 2);
        // Producer g of topic g / per_topic goes to thread g % threads.
        assert_eq!(assign_producers(5, 1, 2), [vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(
            assign_producers(2, 2, 4),
            [vec![0], vec![0], vec![1], vec![1]]
        );
        assert_eq!(
            assign_producers(1, 2, 4),
            [vec![0], vec![0], vec![], vec![]]
        );
        let big = assign_producers(10_000, 1, 4);
        assert!(big.iter().all(|t| t.len() == 2_500));
    }

    #[test]
    fn thread_pacing_splits_the_rate() {
        let w = opts(Overrides {
            rate: Some(4_000.0),
            topics: Some(4),
            ..Overrides::default()
        })
        .workload;
        // One producer per thread: the same as each producer's own schedule.
        for i in 0..4 {
            let (Pacing::Open(a), Pacing::Open(b)) = (thread_pacing(&w, 0, i, 1), pacing(&w, 0, i))
            else {
                panic!("open loop");
            };
            assert_eq!(
                (a.intended_ns(0), a.intended_ns(7)),
                (b.intended_ns(0), b.intended_ns(7))
            );
        }
        // Two threads of two producers: 2,000 msg/s each, 250 us apart.
        let mut all: Vec<u64> = (0..2)
            .flat_map(|i| {
                let Pacing::Open(s) = thread_pacing(&w, 0, i, 2) else {
                    panic!("open loop");
                };
                (0..4).map(move |k| s.intended_ns(k))
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all[..4], [0, 250_000, 500_000, 750_000]);
        let closed = opts(Overrides {
            rate: Some(0.0),
            ..Overrides::default()
        })
        .workload;
        assert!(matches!(thread_pacing(&closed, 0, 0, 3), Pacing::Closed));
    }

    #[test]
    fn fetchers_read_each_shard_for_every_subscription() {
        let o = opts(Overrides {
            subscriptions: Some(2),
            ..Overrides::default()
        });
        let infos = [
            topic("a", 0, 2, 2),
            topic("b", 1, 2, 2),
            topic("c", 2, 1, 2),
        ];
        let by_shard = cursors_by_shard(&o, &infos);
        assert_eq!(by_shard.len(), 2);
        let (addr, slots, cursors) = &by_shard[&0];
        assert_eq!(addr, "127.0.0.1:9710");
        // Shard 0 has a/0, b/1 and c/0; each read by both subscriptions.
        assert_eq!(slots, &[(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        let got: Vec<(usize, &str, u32)> = cursors
            .iter()
            .map(|c| (c.slot, c.topic.as_str(), c.queue))
            .collect();
        assert_eq!(
            got,
            [
                (0, "a", 0),
                (1, "a", 0),
                (2, "b", 1),
                (3, "b", 1),
                (4, "c", 0),
                (5, "c", 0)
            ]
        );
        let (addr, _, cursors) = &by_shard[&1];
        assert_eq!(addr, "127.0.0.1:9711");
        assert_eq!(cursors.len(), 4);
        // Through the shared port: the same split, one address.
        let shared = RunOptions {
            shard_direct: false,
            single_queue_requests: false,
            ..o
        };
        let by_shard = cursors_by_shard(&shared, &infos);
        assert!(by_shard.values().all(|(a, _, _)| a == "127.0.0.1:9700"));
    }

    #[test]
    fn batches_must_fit_the_broker() {
        let w = Workload::resolve(None, &Overrides::default()).unwrap();
        assert!(check_fits(&w, 1 << 20).is_ok());
        assert!(check_fits(&w, 32 << 10).unwrap_err().is_usage());
        let big = Workload::resolve(
            None,
            &Overrides {
                message_size: Some(2 << 20),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(check_fits(&big, 1 << 20).unwrap_err().is_usage());
    }
}
