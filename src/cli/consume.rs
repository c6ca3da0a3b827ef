//! `coremq consume TOPIC --group G`: joins the group as a member and prints
//! the messages of the queues the group assigns it, one per line, until
//! `--count` messages were printed, `--timeout-ms` passes with nothing new,
//! or SIGINT/SIGTERM; then commits and leaves the group. With `--queue N`
//! it reads that one queue for the group without joining (no membership,
//! no rebalancing).
//!
//! Every assignment change is reported on stderr (`member M generation G:
//! queues [..] of N members`, and `member M has no queues (..): idling` when
//! there are none for it), so a user sees rebalances happen.
//!
//! Invariant: the committed offset of each queue is the offset after the
//! last record *printed* from it. Offsets are committed after every poll
//! whose records were printed (so a queue moving to another member, or a
//! crash, repeats at most one poll). A poll can return more records than
//! `--count` still allows; the consumer is rewound (`seek`) to the first
//! unprinted record of each queue before committing, so the next run
//! starts exactly there.
//!
//! With `--push` the broker pushes the group's messages instead
//! ([`PushConsumer`]: no membership, any number of processes share the
//! work). Each message is printed (json adds its `attempt`), then
//! acknowledged — unless `--no-ack`, which leaves it to come back after
//! `--ack-timeout-ms`; `--nack-every K` rejects every K-th message received
//! in this run instead (it goes out again at once, and to `<group>-dlq`
//! after `--max-attempts` deliveries). Messages received but not printed
//! (past `--count`) are rejected so they go out again at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::group_consumer::SESSION_TIMEOUT_DEFAULT;
use crate::client::push_consumer::{
    ACK_TIMEOUT_DEFAULT, MAX_ATTEMPTS_DEFAULT, RECEIVE_MESSAGES_DEFAULT,
};
use crate::client::{
    AssignmentChange, ClientError, ConsumedRecord, Consumer, ConsumerConfig, GroupConfig,
    GroupConsumer, PushConfig, PushConsumer, PushedRecord, StartFrom, Strategy,
};

use super::group::format_queues;
use super::{BrokerArg, CliError};

/// Default `--timeout-ms`: stop after this long without a new message.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 5000;
/// Default `--session-timeout-ms`.
pub const SESSION_TIMEOUT_MS_DEFAULT: u64 = SESSION_TIMEOUT_DEFAULT.as_millis() as u64;
/// Default `--ack-timeout-ms`.
pub const ACK_TIMEOUT_MS_DEFAULT: u64 = ACK_TIMEOUT_DEFAULT.as_millis() as u64;
/// Longest single poll, so a stop signal is noticed promptly.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartArg {
    /// Everything still stored
    Earliest,
    /// Only messages produced from now on
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// The value as text
    Value,
    /// One JSON object per line: queue, offset, timestamp, key, value (and attempt with --push)
    Json,
}

/// How a clustering group spreads its topic's queues over its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// Contiguous ranges: 4 queues over 2 members = [0, 1] and [2, 3]
    Averagely,
    /// Round robin: 4 queues over 2 members = [0, 2] and [1, 3]
    AveragelyByCircle,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::Averagely => Strategy::Averagely,
            StrategyArg::AveragelyByCircle => Strategy::AveragelyByCircle,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Topic to read
    pub topic: String,
    /// Consumer group to join (offsets are read and committed for it)
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Where a group with no committed offset starts
    #[arg(long, value_enum, default_value = "earliest")]
    pub from: StartArg,
    /// Stop after this many messages
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Read only this queue, without joining the group as a member
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["strategy", "broadcast", "member", "session_timeout_ms"]
    )]
    pub queue: Option<u32>,
    /// Push delivery: the broker hands out the group's messages to whoever
    /// asks, with acknowledgements, redelivery and a dead-letter topic
    #[arg(
        long,
        conflicts_with_all = ["broadcast", "strategy", "queue", "member", "session_timeout_ms", "from"]
    )]
    pub push: bool,
    /// With --push: a message not acknowledged this many ms after delivery goes out again
    #[arg(long, value_name = "MS", default_value_t = ACK_TIMEOUT_MS_DEFAULT, requires = "push")]
    pub ack_timeout_ms: u64,
    /// With --push: deliveries of a message before it goes to <group>-dlq
    #[arg(long, value_name = "N", default_value_t = MAX_ATTEMPTS_DEFAULT, requires = "push")]
    pub max_attempts: u32,
    /// With --push: print without acknowledging (messages come back after the ack timeout)
    #[arg(long, requires = "push")]
    pub no_ack: bool,
    /// With --push: reject every K-th message received instead of acknowledging it
    #[arg(
        long,
        value_name = "K",
        requires = "push",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub nack_every: Option<u64>,
    /// How the group spreads queues over members (set by its first member)
    #[arg(long, value_enum, default_value = "averagely")]
    pub strategy: StrategyArg,
    /// Every member reads every queue, with offsets of its own
    #[arg(long)]
    pub broadcast: bool,
    /// Stable member id ([A-Za-z0-9._-]); the broker names the member otherwise
    /// (use one in broadcast mode to resume the member's own offsets)
    #[arg(long, value_name = "ID")]
    pub member: Option<String>,
    /// Leave the group after this many ms without a heartbeat (one is sent every third of it)
    #[arg(long, value_name = "MS", default_value_t = SESSION_TIMEOUT_MS_DEFAULT)]
    pub session_timeout_ms: u64,
    /// Stop after this many ms without a new message
    #[arg(long, value_name = "MS", default_value_t = IDLE_TIMEOUT_MS_DEFAULT)]
    pub timeout_ms: u64,
    /// Output format
    #[arg(long, value_enum, default_value = "value")]
    pub format: OutputFormat,
    #[command(flatten)]
    pub broker: BrokerArg,
}

pub(super) fn run(args: &ConsumeArgs) -> Result<(), CliError> {
    // The first SIGINT/SIGTERM stops the loop (commit, leave); a second one exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered =
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)));
        if let Err(e) = registered {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let n = if args.push {
        consume_push(args, &mut std::io::stdout().lock(), &stop)?
    } else {
        consume(
            args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr(),
            &stop,
        )?
    };
    eprintln!("consumed {n} messages");
    Ok(())
}

/// Reads as a group member, or one queue without membership (`--queue`).
enum Reader {
    Queue(Box<Consumer>),
    Member(Box<GroupConsumer>),
}

impl Reader {
    fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumedRecord>, ClientError> {
        match self {
            Reader::Queue(c) => c.poll(timeout),
            Reader::Member(m) => m.poll(timeout),
        }
    }

    fn seek(&mut self, queue: u32, offset: i64) -> Result<(), ClientError> {
        match self {
            Reader::Queue(c) => c.seek(queue, offset),
            Reader::Member(m) => m.seek(queue, offset),
        }
    }

    fn commit(&mut self) -> Result<(), ClientError> {
        match self {
            Reader::Queue(c) => c.commit(),
            Reader::Member(m) => m.commit(),
        }
    }

    fn changes(&mut self) -> Vec<AssignmentChange> {
        match self {
            Reader::Queue(_) => Vec::new(),
            Reader::Member(m) => m.take_assignment_changes(),
        }
    }

    /// Commits; a member also leaves its group.
    fn close(self) -> Result<(), ClientError> {
        match self {
            Reader::Queue(mut c) => c.commit(),
            Reader::Member(m) => m.close(),
        }
    }
}

/// The stderr lines reporting one assignment change.
pub(super) fn describe_change(c: &AssignmentChange) -> Vec<String> {
    let mut lines = vec![format!(
        "member {} generation {}: queues {} of {} members",
        c.member_id,
        c.generation,
        format_queues(&c.queues),
        c.members
    )];
    if c.queues.is_empty() {
        lines.push(format!(
            "member {} has no queues ({} members, {} queues): idling",
            c.member_id, c.members, c.topic_queues
        ));
    }
    lines
}

fn report(reader: &mut Reader, notes: &mut impl Write) {
    for change in reader.changes() {
        for line in describe_change(&change) {
            // Progress output only: a closed stderr must not stop consuming.
            let _ = writeln!(notes, "{line}");
        }
    }
    let _ = notes.flush();
}

fn connect(args: &ConsumeArgs) -> Result<Reader, CliError> {
    let addr = &args.broker.broker;
    let config = ConsumerConfig {
        from: match args.from {
            StartArg::Earliest => StartFrom::Earliest,
            StartArg::Latest => StartFrom::Latest,
        },
        queues: args.queue.map(|q| vec![q]),
        ..ConsumerConfig::new(args.group.clone())
    };
    if args.queue.is_some() {
        let c = Consumer::connect(addr, &args.topic, config)
            .map_err(|e| CliError::connecting(e, addr, &args.topic))?;
        return Ok(Reader::Queue(Box::new(c)));
    }
    let group = GroupConfig {
        consumer: config,
        strategy: args.strategy.into(),
        broadcast: args.broadcast,
        member_id: args.member.clone(),
        session_timeout: Duration::from_millis(args.session_timeout_ms),
    };
    let m = GroupConsumer::connect(addr, &args.topic, group).map_err(|e| match e {
        ClientError::Io(_) => CliError::connecting(e, addr, &args.topic),
        e => CliError::from_group_client(e, &args.topic, &args.group),
    })?;
    Ok(Reader::Member(Box::new(m)))
}

/// Consumes into `out`, reporting assignment changes to `notes`, until the
/// count, the idle timeout or `stop`; returns how many messages were printed.
pub(super) fn consume(
    args: &ConsumeArgs,
    out: &mut impl Write,
    notes: &mut impl Write,
    stop: &AtomicBool,
) -> Result<u64, CliError> {
    let mut reader = connect(args)?;
    let explain = |e| CliError::from_group_client(e, &args.topic, &args.group);
    let mut budget = Budget::new(args);
    let mut line = String::new();
    loop {
        report(&mut reader, notes);
        let Some(wait) = budget.next_wait(stop) else {
            break;
        };
        let records = reader.poll(wait).map_err(explain)?;
        if records.is_empty() {
            continue;
        }
        let take = budget.take(records.len());
        write_lines(out, &records[..take], &mut line, |r, l| {
            format_record(r, args.format, l)
        })?;
        for (queue, offset) in first_unprinted(&records[take..]) {
            reader.seek(queue, offset).map_err(explain)?;
        }
        reader.commit().map_err(explain)?;
    }
    report(&mut reader, notes);
    reader.close().map_err(explain)?;
    Ok(budget.printed)
}

/// When a consume loop stops: after `--count` messages printed, after
/// `--timeout-ms` without a new one, or on a stop signal.
struct Budget {
    idle: Duration,
    count: Option<u64>,
    printed: u64,
    last_new: Instant,
}

impl Budget {
    fn new(args: &ConsumeArgs) -> Budget {
        Budget {
            idle: Duration::from_millis(args.timeout_ms),
            count: args.count,
            printed: 0,
            last_new: Instant::now(),
        }
    }

    /// How long the next poll may wait; `None` when the loop is done.
    fn next_wait(&self, stop: &AtomicBool) -> Option<Duration> {
        if stop.load(Ordering::Relaxed) || self.left() == Some(0) {
            return None;
        }
        let wait = self.idle.saturating_sub(self.last_new.elapsed());
        (!wait.is_zero()).then(|| wait.min(STOP_CHECK_INTERVAL))
    }

    fn left(&self) -> Option<u64> {
        self.count.map(|n| n.saturating_sub(self.printed))
    }

    /// Notes a poll that returned `n` records: how many of them to print
    /// (they count as printed).
    fn take(&mut self, n: usize) -> usize {
        self.last_new = Instant::now();
        let take = self.left().map_or(n, |left| n.min(left as usize));
        self.printed += take as u64;
        take
    }
}

/// Writes `records` into `out` one per line (formatted by `format`), then flushes.
fn write_lines<R>(
    out: &mut impl Write,
    records: &[R],
    line: &mut String,
    format: impl Fn(&R, &mut String),
) -> Result<(), CliError> {
    for r in records {
        line.clear();
        format(r, line);
        line.push('\n');
        out.write_all(line.as_bytes()).map_err(CliError::Stdout)?;
    }
    out.flush().map_err(CliError::Stdout)
}

/// What to do with a printed pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Nack,
    /// `--no-ack`: leave it out until its ack timeout.
    Leave,
}

/// The fate of the `received`-th (1-based) message of a `--push` run.
pub(super) fn settle_for(args: &ConsumeArgs, received: u64) -> Settle {
    if args.nack_every.is_some_and(|k| received.is_multiple_of(k)) {
        Settle::Nack
    } else if args.no_ack {
        Settle::Leave
    } else {
        Settle::Ack
    }
}

fn connect_push(args: &ConsumeArgs) -> Result<PushConsumer, CliError> {
    let addr = &args.broker.broker;
    let config = PushConfig {
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        max_attempts: args.max_attempts,
        // No point in taking out many more than will be printed.
        max_messages: args.count.map_or(RECEIVE_MESSAGES_DEFAULT, |n| {
            n.clamp(1, u64::from(RECEIVE_MESSAGES_DEFAULT)) as u32
        }),
        ..PushConfig::new(args.group.clone())
    };
    PushConsumer::connect(addr, &args.topic, config)
        .map_err(|e| CliError::connecting(e, addr, &args.topic))
}

/// `--push`: prints pushed messages into `out` and settles each after
/// printing, until the count, the idle timeout or `stop`; returns how many
/// were printed.
pub(super) fn consume_push(
    args: &ConsumeArgs,
    out: &mut impl Write,
    stop: &AtomicBool,
) -> Result<u64, CliError> {
    let mut push = connect_push(args)?;
    let explain = |e| CliError::from_client(e, &args.topic);
    let mut budget = Budget::new(args);
    let mut line = String::new();
    while let Some(wait) = budget.next_wait(stop) {
        let records = push.poll(wait).map_err(explain)?;
        if records.is_empty() {
            continue;
        }
        let before = budget.printed;
        let take = budget.take(records.len());
        write_lines(out, &records[..take], &mut line, |r, l| {
            format_pushed(r, args.format, l)
        })?;
        let (mut acks, mut nacks) = (Vec::new(), Vec::new());
        for (r, received) in records[..take].iter().zip(before + 1..) {
            match settle_for(args, received) {
                Settle::Ack => acks.push(r.position()),
                Settle::Nack => nacks.push(r.position()),
                Settle::Leave => {}
            }
        }
        // Not printed: back to the broker at once.
        nacks.extend(records[take..].iter().map(PushedRecord::position));
        push.ack(&acks).map_err(explain)?;
        push.nack(&nacks).map_err(explain)?;
    }
    push.close().map_err(explain)?;
    Ok(budget.printed)
}

/// Appends one pushed message in `format` (no newline); json has its attempt.
pub(super) fn format_pushed(r: &PushedRecord, format: OutputFormat, out: &mut String) {
    let m = Shown {
        queue: r.queue,
        offset: r.offset,
        attempt: Some(r.attempt),
        timestamp: r.timestamp,
        key: &r.key,
        value: &r.value,
    };
    m.format(format, out);
}

/// Per queue, the lowest offset among records that were not printed.
pub(super) fn first_unprinted(rest: &[ConsumedRecord]) -> BTreeMap<u32, i64> {
    let mut first = BTreeMap::new();
    for r in rest {
        first
            .entry(r.queue)
            .and_modify(|o: &mut i64| *o = (*o).min(r.offset))
            .or_insert(r.offset);
    }
    first
}

/// Appends one record in `format` (no newline).
pub(super) fn format_record(r: &ConsumedRecord, format: OutputFormat, out: &mut String) {
    let m = Shown {
        queue: r.queue,
        offset: r.offset,
        attempt: None,
        timestamp: r.timestamp,
        key: &r.key,
        value: &r.value,
    };
    m.format(format, out);
}

/// What a printed line shows of a record or a pushed message.
struct Shown<'a> {
    queue: u32,
    offset: i64,
    /// Pushed messages only.
    attempt: Option<u32>,
    timestamp: i64,
    key: &'a Option<bytes::Bytes>,
    value: &'a Option<bytes::Bytes>,
}

impl Shown<'_> {
    fn format(&self, format: OutputFormat, out: &mut String) {
        let text =
            |b: &Option<bytes::Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        match format {
            OutputFormat::Value => {
                if let Some(v) = self.value {
                    out.push_str(&String::from_utf8_lossy(v));
                }
            }
            OutputFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("queue".into(), self.queue.into());
                obj.insert("offset".into(), self.offset.into());
                if let Some(a) = self.attempt {
                    obj.insert("attempt".into(), a.into());
                }
                obj.insert("timestamp".into(), self.timestamp.into());
                obj.insert("key".into(), text(self.key).into());
                obj.insert("value".into(), text(self.value).into());
                out.push_str(&serde_json::Value::Object(obj).to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake_broker::FakeBroker;
    use crate::client::{Message, Producer, ProducerConfig};
    use bytes::Bytes;

    fn rec(
        queue: u32,
        offset: i64,
        key: Option<&'static [u8]>,
        value: Option<&'static [u8]>,
    ) -> ConsumedRecord {
        ConsumedRecord {
            queue,
            offset,
            timestamp: 1700,
            key: key.map(Bytes::from_static),
            value: value.map(Bytes::from_static),
            headers: Vec::new(),
        }
    }

    #[test]
    fn value_and_json_formats() {
        let mut s = String::new();
        format_record(
            &rec(1, 5, Some(b"k"), Some(b"v\xff")),
            OutputFormat::Value,
            &mut s,
        );
        assert_eq!(s, "v\u{fffd}");
        s.clear();
        format_record(
            &rec(1, 5, None, Some(b"hi \"x\"")),
            OutputFormat::Json,
            &mut s,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"queue": 1, "offset": 5, "timestamp": 1700, "key": null, "value": "hi \"x\""})
        );
        s.clear();
        format_record(&rec(0, 0, Some(b"k"), None), OutputFormat::Json, &mut s);
        assert!(
            s.contains("\"key\":\"k\"") && s.contains("\"value\":null"),
            "{s}"
        );
    }

    #[test]
    fn first_unprinted_is_per_queue_minimum() {
        let rest = [
            rec(0, 7, None, None),
            rec(0, 8, None, None),
            rec(2, 3, None, None),
        ];
        let m = first_unprinted(&rest);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(0, 7), (2, 3)]);
        assert!(first_unprinted(&[]).is_empty());
    }

    /// Consumes with stderr notes discarded and no stop signal.
    fn run_consume(args: &ConsumeArgs, out: &mut Vec<u8>) -> Result<u64, CliError> {
        consume(args, out, &mut std::io::sink(), &AtomicBool::new(false))
    }

    fn args(addr: &str, count: Option<u64>) -> ConsumeArgs {
        ConsumeArgs {
            topic: "t".into(),
            group: "g".into(),
            from: StartArg::Earliest,
            count,
            queue: None,
            strategy: StrategyArg::Averagely,
            broadcast: false,
            member: None,
            session_timeout_ms: 1000,
            push: false,
            ack_timeout_ms: ACK_TIMEOUT_MS_DEFAULT,
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            no_ack: false,
            nack_every: None,
            timeout_ms: 300,
            format: OutputFormat::Value,
            broker: BrokerArg {
                broker: addr.into(),
            },
        }
    }

    #[test]
    fn count_stops_and_second_run_continues_from_the_commit() {
        let b = FakeBroker::start("t", 1);
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
        for i in 0..10 {
            p.send(Message::new(format!("m{i}"))).unwrap();
        }
        p.flush().unwrap();

        let mut out = Vec::new();
        assert_eq!(run_consume(&args(&b.addr, Some(3)), &mut out).unwrap(), 3);
        assert_eq!(String::from_utf8(out).unwrap(), "m0\nm1\nm2\n");
        // The poll returned all ten; only three were printed and committed.
        assert_eq!(b.state().committed("g", 0), Some(3));

        let mut out = Vec::new();
        assert_eq!(run_consume(&args(&b.addr, None), &mut out).unwrap(), 7);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "m3\nm4\nm5\nm6\nm7\nm8\nm9\n"
        );
        assert_eq!(b.state().committed("g", 0), Some(10));

        // Nothing new: times out, prints nothing.
        let mut out = Vec::new();
        assert_eq!(run_consume(&args(&b.addr, None), &mut out).unwrap(), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn push_prints_attempts_nacks_every_kth_and_releases_the_rest() {
        let b = FakeBroker::start("t", 1);
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
        for i in 0..4 {
            p.send(Message::new(format!("m{i}"))).unwrap();
        }
        p.flush().unwrap();
        let mut a = args(&b.addr, Some(3));
        a.push = true;
        a.nack_every = Some(2);
        a.format = OutputFormat::Json;
        assert_eq!(settle_for(&a, 1), Settle::Ack);
        assert_eq!(settle_for(&a, 2), Settle::Nack);
        let mut out = Vec::new();
        let stop = AtomicBool::new(false);
        assert_eq!(consume_push(&a, &mut out, &stop).unwrap(), 3);
        let rows: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(&str, u64)> = rows
            .iter()
            .map(|v| (v["value"].as_str().unwrap(), v["attempt"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, vec![("m0", 1), ("m1", 1), ("m2", 1)]);
        // m0 and m2 acked; m1 nacked; m3 (not printed) released: both come back now.
        a.count = None;
        a.nack_every = None;
        let mut out = Vec::new();
        assert_eq!(consume_push(&a, &mut out, &stop).unwrap(), 2);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\"value\":\"m1\"") && text.contains("\"value\":\"m3\""),
            "{text}"
        );
        assert!(text.contains("\"attempt\":2"), "{text}");
        assert_eq!(b.state().committed("g", 0), Some(4));
        // --no-ack prints and leaves nothing settled.
        let mut a = args(&b.addr, None);
        a.push = true;
        a.no_ack = true;
        a.group = "h".into();
        let mut out = Vec::new();
        assert_eq!(consume_push(&a, &mut out, &stop).unwrap(), 4);
        assert_eq!(b.state().committed("h", 0), Some(0));
    }

    #[test]
    fn unknown_topic_is_explained() {
        let b = FakeBroker::start("t", 1);
        let mut a = args(&b.addr, None);
        a.topic = "nope".into();
        let e = run_consume(&a, &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "topic nope does not exist");
    }

    #[test]
    fn assignment_changes_are_described() {
        let mut c = AssignmentChange {
            member_id: "m1".into(),
            generation: 3,
            queues: vec![0, 1],
            members: 2,
            topic_queues: 4,
            added: vec![0, 1],
            revoked: Vec::new(),
        };
        assert_eq!(
            describe_change(&c),
            vec!["member m1 generation 3: queues [0, 1] of 2 members"]
        );
        c.queues.clear();
        c.members = 5;
        assert_eq!(
            describe_change(&c),
            vec![
                "member m1 generation 3: queues [] of 5 members",
                "member m1 has no queues (5 members, 4 queues): idling",
            ]
        );
    }

    #[test]
    fn extra_member_idles_and_says_so() {
        let b = FakeBroker::start("t", 1);
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
        p.send(Message::new("only")).unwrap();
        p.flush().unwrap();
        // "a" holds the only queue ("a" sorts before "b").
        let holder = crate::client::GroupConsumer::connect(
            &b.addr,
            "t",
            crate::client::GroupConfig {
                member_id: Some("a".into()),
                ..crate::client::GroupConfig::new("g")
            },
        )
        .unwrap();
        let mut a = args(&b.addr, None);
        a.member = Some("b".into());
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        let n = consume(&a, &mut out, &mut notes, &AtomicBool::new(false)).unwrap();
        assert_eq!(n, 0);
        let notes = String::from_utf8(notes).unwrap();
        assert!(
            notes.contains("member b generation 2: queues [] of 2 members\n")
                && notes.contains("member b has no queues (2 members, 1 queues): idling\n"),
            "{notes}"
        );
        drop(holder);
        // Alone now, "b" gets the queue and reads it; on exit it commits and leaves.
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        let n = consume(&a, &mut out, &mut notes, &AtomicBool::new(false)).unwrap();
        assert_eq!(n, 1);
        assert_eq!(out, b"only\n");
        let notes = String::from_utf8(notes).unwrap();
        assert!(notes.contains("queues [0] of 1 members"), "{notes}");
        assert_eq!(b.state().committed("g", 0), Some(1));
        let admin = crate::client::Admin::connect(&b.addr).unwrap();
        assert!(admin.describe_group("g").is_err(), "the member left");
    }

    #[test]
    fn stop_flag_ends_the_run_with_a_commit() {
        let b = FakeBroker::start("t", 2);
        let p = Producer::connect(&b.addr, "t", ProducerConfig::default()).unwrap();
        for i in 0..4 {
            p.send(Message::new(format!("m{i}"))).unwrap();
        }
        p.flush().unwrap();
        let mut a = args(&b.addr, None);
        a.timeout_ms = 60_000;
        let stop = AtomicBool::new(false);
        let mut out = Vec::new();
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                stop.store(true, Ordering::Relaxed);
            });
            let n = consume(&a, &mut out, &mut std::io::sink(), &stop).unwrap();
            assert_eq!(n, 4);
        });
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(b.state().committed("g", 0), Some(2));
        assert_eq!(b.state().committed("g", 1), Some(2));
    }
}
