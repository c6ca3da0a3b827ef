//! `coremq topic create|alter|list|describe|delete`: one admin request each, the
//! result printed as readable text (aligned columns, no header on `list` so
//! each line is one topic).

use std::fmt::Write as _;

use crate::client::Admin;
use crate::protocol::{Flush, TopicInfo, TopicSpec};

use super::{BrokerArg, CliError};

#[derive(Debug, clap::Args)]
pub struct TopicArgs {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[command(subcommand)]
    pub action: TopicAction,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum TopicAction {
    /// Create a topic
    Create(CreateArgs),
    /// Add queues to a live topic (producers and group members pick them up)
    Alter(AlterArgs),
    /// List every topic: name, queues, flush policy
    List,
    /// Show a topic's configuration and each queue's shard and offsets
    Describe {
        /// Topic name
        name: String,
    },
    /// Delete a topic and its data
    Delete {
        /// Topic name
        name: String,
    },
}

#[derive(Debug, PartialEq, Eq, clap::Args)]
pub struct CreateArgs {
    /// Topic name
    pub name: String,
    /// Number of queues (partitions)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: u32,
    /// sync: ack after fdatasync; async: ack once buffered
    #[arg(long, value_name = "sync|async", default_value = "async")]
    pub flush: Flush,
    /// Log segment size in bytes (0 = node default)
    #[arg(long, value_name = "B", default_value_t = 0)]
    pub segment_bytes: u64,
    /// Delete data older than this many ms (0 = keep forever)
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub retention_ms: u64,
    /// Keep at most about this many bytes per queue (0 = unlimited)
    #[arg(long, value_name = "B", default_value_t = 0)]
    pub retention_bytes: u64,
}

#[derive(Debug, PartialEq, Eq, clap::Args)]
pub struct AlterArgs {
    /// Topic name
    pub name: String,
    /// The new number of queues: more than the topic has now
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: u32,
}

pub(super) fn run(args: &TopicArgs) -> Result<(), CliError> {
    let addr = &args.broker.broker;
    let topic_of = match &args.action {
        TopicAction::Create(c) => c.name.as_str(),
        TopicAction::Alter(a) => a.name.as_str(),
        TopicAction::Describe { name } | TopicAction::Delete { name } => name.as_str(),
        TopicAction::List => "",
    };
    let admin = Admin::connect(addr).map_err(|e| CliError::connecting(e, addr, topic_of))?;
    let explain = |e| CliError::from_client(e, topic_of);
    match &args.action {
        TopicAction::Create(c) => {
            let info = admin
                .create_topic(TopicSpec {
                    name: c.name.clone(),
                    queues: c.queues,
                    flush: c.flush,
                    segment_bytes: c.segment_bytes,
                    retention_ms: c.retention_ms,
                    retention_bytes: c.retention_bytes,
                })
                .map_err(explain)?;
            print!("{}", format_describe(&info));
        }
        TopicAction::Alter(a) => {
            let info = admin.alter_topic(&a.name, a.queues).map_err(explain)?;
            print!("{}", format_describe(&info));
        }
        TopicAction::List => {
            let topics = admin.list_topics().map_err(explain)?;
            print!("{}", format_list(&topics));
        }
        TopicAction::Describe { name } => {
            let info = admin.describe_topic(name).map_err(explain)?;
            print!("{}", format_describe(&info));
        }
        TopicAction::Delete { name } => {
            admin.delete_topic(name).map_err(explain)?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

/// One line per topic: name, queue count, flush policy.
pub(super) fn format_list(topics: &[TopicInfo]) -> String {
    let width = topics.iter().map(|t| t.spec.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for t in topics {
        let _ = writeln!(
            out,
            "{:<width$}  queues={}  flush={}",
            t.spec.name, t.spec.queues, t.spec.flush
        );
    }
    out
}

fn or_word(v: u64, zero: &str, unit: &str) -> String {
    if v == 0 {
        zero.to_string()
    } else {
        format!("{v} {unit}")
    }
}

/// The topic's configuration, then a table of its queues.
pub(super) fn format_describe(t: &TopicInfo) -> String {
    let mut out = String::new();
    let s = &t.spec;
    let rows = [
        ("topic", s.name.clone()),
        ("id", t.id.to_string()),
        ("queues", s.queues.to_string()),
        ("flush", s.flush.to_string()),
        ("segment", or_word(s.segment_bytes, "node default", "bytes")),
        ("retention time", or_word(s.retention_ms, "forever", "ms")),
        (
            "retention size",
            or_word(s.retention_bytes, "unlimited", "bytes per queue"),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{:<16}{v}", format!("{k}:"));
    }
    let mut queues = t.queues.clone();
    queues.sort_by_key(|q| q.queue);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>5}  {:>5}  {:>10}  {:>14}  {:>14}",
        "QUEUE", "SHARD", "SHARD PORT", "START OFFSET", "END OFFSET"
    );
    for q in &queues {
        let port = if q.shard_port == 0 {
            "-".to_string()
        } else {
            q.shard_port.to_string()
        };
        let _ = writeln!(
            out,
            "{:>5}  {:>5}  {:>10}  {:>14}  {:>14}",
            q.queue, q.shard, port, q.start_offset, q.end_offset
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QueueInfo;

    fn info() -> TopicInfo {
        TopicInfo {
            spec: TopicSpec {
                name: "orders".into(),
                queues: 2,
                flush: Flush::Sync,
                segment_bytes: 0,
                retention_ms: 3_600_000,
                retention_bytes: 0,
            },
            id: 7,
            queues: vec![
                QueueInfo {
                    queue: 1,
                    shard: 1,
                    shard_port: 0,
                    start_offset: 0,
                    end_offset: 3,
                },
                QueueInfo {
                    queue: 0,
                    shard: 0,
                    shard_port: 9711,
                    start_offset: 10,
                    end_offset: 120,
                },
            ],
        }
    }

    #[test]
    fn describe_shows_config_and_sorted_queue_table() {
        let text = format_describe(&info());
        assert!(text.contains("topic:          orders\n"), "{text}");
        assert!(text.contains("flush:          sync\n"));
        assert!(text.contains("segment:        node default\n"));
        assert!(text.contains("retention time: 3600000 ms\n"));
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.contains("QUEUE")).unwrap();
        let row0: Vec<&str> = lines[header + 1].split_whitespace().collect();
        let row1: Vec<&str> = lines[header + 2].split_whitespace().collect();
        assert_eq!(row0, vec!["0", "0", "9711", "10", "120"]);
        assert_eq!(row1, vec!["1", "1", "-", "0", "3"]);
    }

    #[test]
    fn list_is_one_line_per_topic() {
        let mut b = info();
        b.spec.name = "a".into();
        b.spec.flush = Flush::Async;
        let text = format_list(&[info(), b]);
        assert_eq!(
            text,
            "orders  queues=2  flush=sync\na       queues=2  flush=async\n"
        );
    }
}
