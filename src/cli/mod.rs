//! The client side of the `coremq` command line: `topic`, `produce`,
//! `consume` and `group`, thin wrappers over [`crate::client`].
//!
//! Every command takes `--broker ADDR` (env `COREMQ_BROKER`, default
//! 127.0.0.1:9700). Results go to stdout, progress and errors to stderr; a
//! failed command prints `error: ...` and exits with status 1. Broker error
//! codes a user can act on (unknown topic, topic exists, unknown group, a
//! join that does not match the group, broker unreachable) are turned into
//! plain sentences by [`CliError`].

mod consume;
mod group;
mod produce;
mod topic;

use std::process::ExitCode;

use crate::client::producer::MessageError;
use crate::client::ClientError;
use crate::protocol::ErrorCode;

pub use consume::{ConsumeArgs, OutputFormat, StartArg, StrategyArg};
pub use group::{GroupAction, GroupArgs};
pub use produce::ProduceArgs;
pub use topic::{AlterArgs, CreateArgs, TopicAction, TopicArgs};

/// Broker a client command talks to when neither `--broker` nor `COREMQ_BROKER` is set.
pub const BROKER_ADDR_DEFAULT: &str = "127.0.0.1:9700";

/// The broker address option shared by every client command.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BrokerArg {
    /// Broker address (host:port)
    #[arg(
        long = "broker",
        value_name = "ADDR",
        env = "COREMQ_BROKER",
        default_value = BROKER_ADDR_DEFAULT,
        global = true
    )]
    pub broker: String,
}

/// Client commands of the `coremq` binary.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Create, alter, list, describe and delete topics
    Topic(TopicArgs),
    /// Send stdin to a topic, one message per line
    Produce(ProduceArgs),
    /// Print a topic's messages as a consumer-group member, one per line
    Consume(ConsumeArgs),
    /// Describe and list consumer groups
    Group(GroupArgs),
}

/// Why a client command failed, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("group {0} does not exist (no live members and no committed offsets)")]
    UnknownGroup(String),
    #[error("cannot join group {group}: {detail}")]
    InconsistentGroup { group: String, detail: String },
    #[error("cannot connect to broker {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("only {acked} of {sent} messages were acknowledged")]
    Unacknowledged { acked: u64, sent: u64 },
    #[error("cannot read stdin: {0}")]
    Stdin(std::io::Error),
    #[error("cannot write stdout: {0}")]
    Stdout(std::io::Error),
    /// A command-line value out of range (the option, then why).
    #[error("{option}: {source}")]
    InvalidOption {
        option: &'static str,
        source: MessageError,
    },
    #[error(transparent)]
    Client(ClientError),
}

impl CliError {
    /// Explains a client error met while talking about `topic`.
    fn from_client(e: ClientError, topic: &str) -> CliError {
        match e.broker_code() {
            Some(ErrorCode::UnknownTopic) => CliError::UnknownTopic(topic.to_string()),
            Some(ErrorCode::TopicExists) => CliError::TopicExists(topic.to_string()),
            _ => CliError::Client(e),
        }
    }

    /// Explains a client error met while talking about `group` (of `topic`).
    fn from_group_client(e: ClientError, topic: &str, group: &str) -> CliError {
        match e {
            ClientError::Broker(r) if r.code == ErrorCode::UnknownMember => {
                CliError::UnknownGroup(group.to_string())
            }
            ClientError::Broker(r) if r.code == ErrorCode::InconsistentGroup => {
                CliError::InconsistentGroup {
                    group: group.to_string(),
                    detail: r.message,
                }
            }
            e => CliError::from_client(e, topic),
        }
    }

    /// Explains a failure to connect (or the first request after it).
    fn connecting(e: ClientError, addr: &str, topic: &str) -> CliError {
        match e {
            ClientError::Io(source) => CliError::Unreachable {
                addr: addr.to_string(),
                source,
            },
            e => CliError::from_client(e, topic),
        }
    }
}

/// Runs a client command; prints `error: ...` and returns 1 on failure.
pub fn run_client(cmd: ClientCommand) -> ExitCode {
    let result = match cmd {
        ClientCommand::Topic(args) => topic::run(&args),
        ClientCommand::Produce(args) => produce::run(&args),
        ClientCommand::Consume(args) => consume::run(&args),
        ClientCommand::Group(args) => group::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorReply;
    use clap::Parser;
    use coremq_shards::batch::Compression;

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(subcommand)]
        c: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        T::try_parse_from(std::iter::once("coremq").chain(args.iter().copied())).map(|t| t.c)
    }

    #[test]
    fn topic_create_parses_every_option() {
        let c = parse(&[
            "topic",
            "create",
            "orders",
            "--queues",
            "8",
            "--flush",
            "sync",
            "--segment-bytes",
            "1048576",
            "--retention-ms",
            "60000",
            "--retention-bytes",
            "0",
            "--broker",
            "10.0.0.1:9000",
        ])
        .unwrap();
        let ClientCommand::Topic(t) = c else { panic!() };
        assert_eq!(t.broker.broker, "10.0.0.1:9000");
        let TopicAction::Create(a) = t.action else {
            panic!()
        };
        assert_eq!(a.name, "orders");
        assert_eq!(a.queues, 8);
        assert_eq!(a.flush, crate::protocol::Flush::Sync);
        assert_eq!(a.segment_bytes, 1 << 20);
        assert_eq!(a.retention_ms, 60_000);
        assert_eq!(a.retention_bytes, 0);
    }

    #[test]
    fn topic_defaults_and_required_arguments() {
        let ClientCommand::Topic(t) = parse(&["topic", "create", "t", "--queues", "2"]).unwrap()
        else {
            panic!()
        };
        let TopicAction::Create(a) = t.action else {
            panic!()
        };
        assert_eq!(a.flush, crate::protocol::Flush::Async);
        assert_eq!(
            (a.segment_bytes, a.retention_ms, a.retention_bytes),
            (0, 0, 0)
        );
        assert!(
            parse(&["topic", "create", "t"]).is_err(),
            "--queues is required"
        );
        assert!(parse(&["topic", "create", "t", "--queues", "0"]).is_err());
        assert!(parse(&[
            "topic",
            "create",
            "t",
            "--queues",
            "1",
            "--flush",
            "sometimes"
        ])
        .is_err());
        assert!(parse(&["topic", "describe"]).is_err());
        assert!(matches!(
            parse(&["topic", "list"]).unwrap(),
            ClientCommand::Topic(TopicArgs {
                action: TopicAction::List,
                ..
            })
        ));
        let ClientCommand::Topic(t) = parse(&["topic", "--broker", "h:1", "delete", "x"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.broker.broker, "h:1");
        assert_eq!(t.action, TopicAction::Delete { name: "x".into() });
    }

    #[test]
    fn produce_parses() {
        let ClientCommand::Produce(p) = parse(&[
            "produce",
            "t",
            "--key",
            "k1",
            "--queue",
            "3",
            "--compression",
            "zstd",
            "--batch-bytes",
            "1000",
            "--linger-ms",
            "0",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(p.topic, "t");
        assert_eq!(p.key.as_deref(), Some("k1"));
        assert_eq!(p.queue, Some(3));
        assert_eq!(p.compression, Compression::Zstd);
        assert_eq!((p.batch_bytes, p.linger_ms), (1000, 0));

        let ClientCommand::Produce(p) = parse(&["produce", "t"]).unwrap() else {
            panic!()
        };
        assert_eq!(p.compression, Compression::None);
        assert_eq!(p.key, None);
        assert!(parse(&["produce", "t", "--compression", "brotli"]).is_err());
        assert!(parse(&["produce"]).is_err());
    }

    #[test]
    fn consume_parses() {
        let ClientCommand::Consume(c) = parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--from",
            "latest",
            "--count",
            "10",
            "--queue",
            "1",
            "--timeout-ms",
            "100",
            "--format",
            "json",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!((c.topic.as_str(), c.group.as_str()), ("t", "g"));
        assert_eq!(c.from, StartArg::Latest);
        assert_eq!((c.count, c.queue, c.timeout_ms), (Some(10), Some(1), 100));
        assert_eq!(c.format, OutputFormat::Json);

        let ClientCommand::Consume(c) = parse(&["consume", "t", "--group", "g"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.from, StartArg::Earliest);
        assert_eq!((c.count, c.queue, c.timeout_ms), (None, None, 5000));
        assert_eq!(c.format, OutputFormat::Value);
        assert!(parse(&["consume", "t"]).is_err(), "--group is required");
        assert!(parse(&["consume", "t", "--group", "g", "--from", "middle"]).is_err());
    }

    #[test]
    fn consume_group_options_parse() {
        let ClientCommand::Consume(c) = parse(&["consume", "t", "--group", "g"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.strategy, StrategyArg::Averagely);
        assert!(!c.broadcast);
        assert_eq!((c.member, c.session_timeout_ms), (None, 10_000));

        let ClientCommand::Consume(c) = parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--strategy",
            "averagely-by-circle",
            "--broadcast",
            "--member",
            "m-1",
            "--session-timeout-ms",
            "1000",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.strategy, StrategyArg::AveragelyByCircle);
        assert!(c.broadcast);
        assert_eq!(
            (c.member.as_deref(), c.session_timeout_ms),
            (Some("m-1"), 1000)
        );

        let e = parse(&["consume", "t", "--group", "g", "--strategy", "random"]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("random") && text.contains("averagely-by-circle"),
            "{text}"
        );
        // --queue reads without membership: membership options make no sense with it.
        assert!(parse(&["consume", "t", "--group", "g", "--queue", "1"]).is_ok());
        assert!(parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--queue",
            "1",
            "--broadcast"
        ])
        .is_err());
        assert!(parse(&["consume", "t", "--group", "g", "--queue", "1", "--member", "x"]).is_err());
    }

    #[test]
    fn push_consume_parses_and_conflicts_with_membership_options() {
        let ClientCommand::Consume(c) = parse(&["consume", "t", "--group", "g", "--push"]).unwrap()
        else {
            panic!()
        };
        assert!(c.push);
        assert_eq!(
            (c.ack_timeout_ms, c.max_attempts, c.no_ack, c.nack_every),
            (30_000, 16, false, None)
        );
        let ClientCommand::Consume(c) = parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--push",
            "--ack-timeout-ms",
            "500",
            "--max-attempts",
            "3",
            "--no-ack",
            "--nack-every",
            "2",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.ack_timeout_ms, c.max_attempts, c.no_ack, c.nack_every),
            (500, 3, true, Some(2))
        );
        for extra in [
            &["--broadcast"][..],
            &["--strategy", "averagely"],
            &["--queue", "1"],
            &["--from", "latest"],
        ] {
            let mut args = vec!["consume", "t", "--group", "g", "--push"];
            args.extend_from_slice(extra);
            let e = parse(&args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{extra:?}: {e}"
            );
        }
        // Push-only options need --push.
        for extra in [
            &["--no-ack"][..],
            &["--nack-every", "2"],
            &["--ack-timeout-ms", "10"],
            &["--max-attempts", "2"],
        ] {
            let mut args = vec!["consume", "t", "--group", "g"];
            args.extend_from_slice(extra);
            assert!(parse(&args).is_err(), "{extra:?}");
        }
        assert!(parse(&[
            "consume",
            "t",
            "--group",
            "g",
            "--push",
            "--nack-every",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn produce_options_parse_and_are_checked() {
        let ClientCommand::Produce(p) =
            parse(&["produce", "t", "--delay-ms", "2000", "--priority", "3"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((p.delay_ms, p.priority), (2000, 3));
        let (priority, delay) = produce::options(&p).unwrap();
        assert_eq!(priority, 3);
        assert_eq!(
            delay,
            Some(crate::client::Delay::After(std::time::Duration::from_secs(
                2
            )))
        );
        let ClientCommand::Produce(p) = parse(&["produce", "t"]).unwrap() else {
            panic!()
        };
        assert_eq!(produce::options(&p).unwrap(), (0, None));
        // Out-of-range values parse, then are refused with the option named.
        let ClientCommand::Produce(p) = parse(&["produce", "t", "--delay-ms", "-5"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            produce::options(&p).unwrap_err().to_string(),
            "--delay-ms: delay must not be negative, not -5 ms"
        );
        let ClientCommand::Produce(p) = parse(&["produce", "t", "--priority", "4"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            produce::options(&p).unwrap_err().to_string(),
            "--priority: priority must be 0..=3 (0 the lowest), not 4"
        );
        let ninety_one_days = (91i64 * 24 * 3600 * 1000).to_string();
        let ClientCommand::Produce(p) =
            parse(&["produce", "t", "--delay-ms", &ninety_one_days]).unwrap()
        else {
            panic!()
        };
        assert!(produce::options(&p)
            .unwrap_err()
            .to_string()
            .contains("at most 7776000000 ms (90 days)"));
    }

    #[test]
    fn topic_alter_and_group_commands_parse() {
        let ClientCommand::Topic(t) =
            parse(&["topic", "alter", "orders", "--queues", "8"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            t.action,
            TopicAction::Alter(AlterArgs {
                name: "orders".into(),
                queues: 8
            })
        );
        assert!(
            parse(&["topic", "alter", "orders"]).is_err(),
            "--queues is required"
        );
        let ClientCommand::Group(g) = parse(&["group", "describe", "g1"]).unwrap() else {
            panic!()
        };
        assert_eq!(g.action, GroupAction::Describe { group: "g1".into() });
        let ClientCommand::Group(g) = parse(&["group", "list", "--broker", "h:1"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (g.action, g.broker.broker.as_str()),
            (GroupAction::List, "h:1")
        );
        assert!(parse(&["group", "describe"]).is_err());
    }

    #[test]
    fn group_errors_say_what_to_do() {
        let e = ClientError::Broker(ErrorReply::new(ErrorCode::UnknownMember, "x"));
        assert_eq!(
            CliError::from_group_client(e, "t", "g1").to_string(),
            "group g1 does not exist (no live members and no committed offsets)"
        );
        let e = ClientError::Broker(ErrorReply::new(
            ErrorCode::InconsistentGroup,
            "group \"g1\" uses strategy averagely, not averagely-by-circle",
        ));
        assert_eq!(
            CliError::from_group_client(e, "t", "g1").to_string(),
            "cannot join group g1: group \"g1\" uses strategy averagely, not averagely-by-circle"
        );
        let e = ClientError::Broker(ErrorReply::new(ErrorCode::UnknownTopic, "x"));
        assert_eq!(
            CliError::from_group_client(e, "t", "g1").to_string(),
            "topic t does not exist"
        );
    }

    #[test]
    fn broker_defaults_to_local() {
        // Only meaningful when the environment does not override it.
        if std::env::var_os("COREMQ_BROKER").is_none() {
            let ClientCommand::Consume(c) = parse(&["consume", "t", "--group", "g"]).unwrap()
            else {
                panic!()
            };
            assert_eq!(c.broker.broker, BROKER_ADDR_DEFAULT);
        }
    }

    #[test]
    fn unknown_topic_error_says_so() {
        let e = ClientError::Broker(ErrorReply::new(ErrorCode::UnknownTopic, "x"));
        assert_eq!(
            CliError::from_client(e, "orders").to_string(),
            "topic orders does not exist"
        );
        let e = ClientError::Io(std::io::ErrorKind::ConnectionRefused.into());
        let msg = CliError::connecting(e, "127.0.0.1:1", "t").to_string();
        assert!(
            msg.starts_with("cannot connect to broker 127.0.0.1:1"),
            "{msg}"
        );
    }
}
