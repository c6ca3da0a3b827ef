//! `coremq produce TOPIC`: every stdin line becomes one message (trailing
//! `\n` or `\r\n` stripped), batched through [`Producer`]. Success means the
//! broker acknowledged every line read; anything less is an error.
//!
//! `--priority P` (0..=3) and `--delay-ms MS` (0..=90 days) apply to every
//! line; they are checked before anything is sent (a value out of range is
//! an error naming the option, exit status 1). A delayed message is stored
//! at once and becomes visible `MS` after it is sent.

use std::io::BufRead;
use std::time::Duration;

use bytes::Bytes;
use coremq_shards::batch::Compression;

use crate::client::producer::{
    check_priority, delay_from_ms, Delay, BATCH_BYTES_MAX_DEFAULT, LINGER_DEFAULT,
};
use crate::client::{Message, Producer, ProducerConfig};

use super::{BrokerArg, CliError};

#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Topic to write to
    pub topic: String,
    /// Key of every message (messages with one key share a queue)
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Send every message to this queue
    #[arg(long, value_name = "N")]
    pub queue: Option<u32>,
    /// Batch compression: none, gzip, snappy, lz4 or zstd
    #[arg(long, value_name = "CODEC", default_value = "none")]
    pub compression: Compression,
    /// Send a batch once it holds this many bytes
    #[arg(long, value_name = "B", default_value_t = BATCH_BYTES_MAX_DEFAULT)]
    pub batch_bytes: usize,
    /// Send a batch at the latest this many ms after its first message
    #[arg(long, value_name = "MS", default_value_t = LINGER_DEFAULT.as_millis() as u64)]
    pub linger_ms: u64,
    /// Deliver every message this many ms after it is sent (0 = at once, at most 90 days)
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub delay_ms: i64,
    /// Priority of every message, 0 (lowest) to 3: push consumers get higher ones first
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i64,
    #[command(flatten)]
    pub broker: BrokerArg,
}

pub(super) fn run(args: &ProduceArgs) -> Result<(), CliError> {
    let n = produce(args, std::io::stdin().lock())?;
    eprintln!("produced {n} messages");
    Ok(())
}

/// Produces every line of `input`; returns how many were acknowledged.
pub(super) fn produce(args: &ProduceArgs, mut input: impl BufRead) -> Result<u64, CliError> {
    let (priority, delay) = options(args)?;
    let addr = &args.broker.broker;
    let config = ProducerConfig {
        batch_bytes_max: args.batch_bytes.max(1),
        linger: Duration::from_millis(args.linger_ms),
        compression: args.compression,
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(addr, &args.topic, config)
        .map_err(|e| CliError::connecting(e, addr, &args.topic))?;
    let explain = |e| CliError::from_client(e, &args.topic);
    let key = args
        .key
        .as_ref()
        .map(|k| Bytes::copy_from_slice(k.as_bytes()));
    let mut sent = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .map_err(CliError::Stdin)?
            == 0
        {
            break;
        }
        strip_newline(&mut line);
        producer
            .send(Message {
                key: key.clone(),
                value: Bytes::copy_from_slice(&line),
                queue: args.queue,
                timestamp_ms: None,
                headers: Vec::new(),
                priority,
                delay,
            })
            .map_err(explain)?;
        sent += 1;
    }
    let summary = producer.close().map_err(explain)?;
    if summary.acked_messages != sent {
        return Err(CliError::Unacknowledged {
            acked: summary.acked_messages,
            sent,
        });
    }
    Ok(sent)
}

/// The checked `--priority` and `--delay-ms`.
pub(super) fn options(args: &ProduceArgs) -> Result<(u8, Option<Delay>), CliError> {
    let priority = check_priority(args.priority).map_err(|source| CliError::InvalidOption {
        option: "--priority",
        source,
    })?;
    let delay = delay_from_ms(args.delay_ms).map_err(|source| CliError::InvalidOption {
        option: "--delay-ms",
        source,
    })?;
    Ok((priority, delay))
}

/// Drops a trailing `\n` (and the `\r` of a `\r\n`).
fn strip_newline(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake_broker::FakeBroker;

    fn args(addr: &str, topic: &str) -> ProduceArgs {
        ProduceArgs {
            topic: topic.into(),
            key: None,
            queue: None,
            compression: Compression::Lz4,
            batch_bytes: 100,
            linger_ms: 1,
            delay_ms: 0,
            priority: 0,
            broker: BrokerArg {
                broker: addr.into(),
            },
        }
    }

    #[test]
    fn newline_is_stripped_once() {
        let mut l = b"a\r\n".to_vec();
        strip_newline(&mut l);
        assert_eq!(l, b"a");
        let mut l = b"a\n\n".to_vec();
        strip_newline(&mut l);
        assert_eq!(l, b"a\n");
        let mut l = b"last".to_vec();
        strip_newline(&mut l);
        assert_eq!(l, b"last");
    }

    #[test]
    fn every_line_is_one_message() {
        let b = FakeBroker::start("t", 2);
        let input = "one\ntwo\r\n\nfour";
        let n = produce(&args(&b.addr, "t"), input.as_bytes()).unwrap();
        assert_eq!(n, 4);
        let mut values: Vec<Bytes> = (0..2)
            .flat_map(|q| b.values(q).into_iter().map(|v| v.1))
            .collect();
        values.sort();
        assert_eq!(values, vec!["", "four", "one", "two"]);
    }

    #[test]
    fn queue_option_pins_the_queue() {
        let b = FakeBroker::start("t", 3);
        let mut a = args(&b.addr, "t");
        a.queue = Some(2);
        produce(&a, "x\ny\n".as_bytes()).unwrap();
        assert_eq!(b.values(2).len(), 2);
    }

    #[test]
    fn unknown_topic_and_unreachable_broker_are_explained() {
        let b = FakeBroker::start("t", 1);
        let e = produce(&args(&b.addr, "nope"), "x".as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "topic nope does not exist");
        // A port nobody listens on (bound, then released).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let e = produce(&args(&addr, "t"), "x".as_bytes()).unwrap_err();
        assert!(matches!(e, CliError::Unreachable { .. }), "{e}");
    }
}
