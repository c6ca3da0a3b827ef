//! `coremq consume TOPIC --group G`: prints messages one per line until
//! `--count` messages were printed or `--timeout-ms` passes with nothing
//! new, then commits the group's offsets.
//!
//! Invariant: the committed offset of each queue is the offset after the
//! last record *printed* from it. A poll can return more records than
//! `--count` still allows; the consumer is rewound (`seek`) to the first
//! unprinted record of each queue before committing, so the next run
//! starts exactly there.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::client::{ConsumedRecord, Consumer, ConsumerConfig, StartFrom};

use super::{BrokerArg, CliError};

/// Default `--timeout-ms`: stop after this long without a new message.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 5000;

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
    /// One JSON object per line: queue, offset, timestamp, key, value
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Topic to read
    pub topic: String,
    /// Consumer group whose offsets are read and committed
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Where a group with no committed offset starts
    #[arg(long, value_enum, default_value = "earliest")]
    pub from: StartArg,
    /// Stop after this many messages
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Read only this queue
    #[arg(long, value_name = "N")]
    pub queue: Option<u32>,
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
    let n = consume(args, &mut std::io::stdout().lock())?;
    eprintln!("consumed {n} messages");
    Ok(())
}

/// Consumes into `out`; returns how many messages were printed.
pub(super) fn consume(args: &ConsumeArgs, out: &mut impl Write) -> Result<u64, CliError> {
    let addr = &args.broker.broker;
    let config = ConsumerConfig {
        from: match args.from {
            StartArg::Earliest => StartFrom::Earliest,
            StartArg::Latest => StartFrom::Latest,
        },
        queues: args.queue.map(|q| vec![q]),
        ..ConsumerConfig::new(args.group.clone())
    };
    let mut consumer = Consumer::connect(addr, &args.topic, config)
        .map_err(|e| CliError::connecting(e, addr, &args.topic))?;
    let explain = |e| CliError::from_client(e, &args.topic);
    let idle = Duration::from_millis(args.timeout_ms);
    let mut printed = 0u64;
    let mut last_new = Instant::now();
    let mut line = String::new();
    loop {
        let left = args.count.map(|n| n.saturating_sub(printed));
        if left == Some(0) {
            break;
        }
        let wait = idle.saturating_sub(last_new.elapsed());
        if wait.is_zero() {
            break;
        }
        let records = consumer.poll(wait).map_err(explain)?;
        if records.is_empty() {
            continue;
        }
        last_new = Instant::now();
        let take = left.map_or(records.len(), |n| records.len().min(n as usize));
        for r in &records[..take] {
            line.clear();
            format_record(r, args.format, &mut line);
            line.push('\n');
            out.write_all(line.as_bytes()).map_err(CliError::Stdout)?;
        }
        out.flush().map_err(CliError::Stdout)?;
        printed += take as u64;
        for (queue, offset) in first_unprinted(&records[take..]) {
            consumer.seek(queue, offset).map_err(explain)?;
        }
    }
    consumer.commit().map_err(explain)?;
    Ok(printed)
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
    let text =
        |b: &Option<bytes::Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    match format {
        OutputFormat::Value => {
            if let Some(v) = &r.value {
                out.push_str(&String::from_utf8_lossy(v));
            }
        }
        OutputFormat::Json => {
            let obj = serde_json::json!({
                "queue": r.queue,
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": text(&r.key),
                "value": text(&r.value),
            });
            out.push_str(&obj.to_string());
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

    fn args(addr: &str, count: Option<u64>) -> ConsumeArgs {
        ConsumeArgs {
            topic: "t".into(),
            group: "g".into(),
            from: StartArg::Earliest,
            count,
            queue: None,
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
        assert_eq!(consume(&args(&b.addr, Some(3)), &mut out).unwrap(), 3);
        assert_eq!(String::from_utf8(out).unwrap(), "m0\nm1\nm2\n");
        // The poll returned all ten; only three were printed and committed.
        assert_eq!(b.state().committed("g", 0), Some(3));

        let mut out = Vec::new();
        assert_eq!(consume(&args(&b.addr, None), &mut out).unwrap(), 7);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "m3\nm4\nm5\nm6\nm7\nm8\nm9\n"
        );
        assert_eq!(b.state().committed("g", 0), Some(10));

        // Nothing new: times out, prints nothing.
        let mut out = Vec::new();
        assert_eq!(consume(&args(&b.addr, None), &mut out).unwrap(), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_topic_is_explained() {
        let b = FakeBroker::start("t", 1);
        let mut a = args(&b.addr, None);
        a.topic = "nope".into();
        let e = consume(&a, &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "topic nope does not exist");
    }
}
