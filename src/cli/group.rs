//! `coremq group describe|list`: consumer groups as the broker sees them.
//! `describe` shows the group's topic, mode and generation, each live
//! member with its queues and last heartbeat, then each queue's committed
//! offset, end offset and lag (per member in broadcast mode); `list`
//! prints one group per line. A group the broker does not know is an error.

use std::fmt::Write as _;

use crate::client::Admin;
use crate::protocol::GroupInfo;

use super::{BrokerArg, CliError};

#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[command(subcommand)]
    pub action: GroupAction,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum GroupAction {
    /// Show a group's members, their queues, and committed offsets with lag
    Describe {
        /// Group name
        group: String,
    },
    /// List every group with live members or committed offsets
    List,
}

pub(super) fn run(args: &GroupArgs) -> Result<(), CliError> {
    let addr = &args.broker.broker;
    let admin = Admin::connect(addr).map_err(|e| CliError::connecting(e, addr, ""))?;
    match &args.action {
        GroupAction::Describe { group } => {
            let info = admin
                .describe_group(group)
                .map_err(|e| CliError::from_group_client(e, "", group))?;
            print!("{}", format_describe(&info));
        }
        GroupAction::List => {
            let groups = admin.list_groups().map_err(CliError::Client)?;
            for g in groups {
                println!("{g}");
            }
        }
    }
    Ok(())
}

/// `[0, 1]`
pub(super) fn format_queues(queues: &[u32]) -> String {
    format!("{queues:?}")
}

/// The group's summary, its members, then its offsets table.
pub(super) fn format_describe(g: &GroupInfo) -> String {
    let mut out = String::new();
    let mode = if g.broadcast {
        "broadcast".to_string()
    } else {
        format!("clustering, strategy {}", g.strategy)
    };
    let topic = if g.topic.is_empty() { "-" } else { &g.topic };
    let rows = [
        ("group", g.group.clone()),
        ("topic", topic.to_string()),
        ("mode", mode),
        ("generation", g.generation.to_string()),
        ("members", g.members.len().to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{:<12}{v}", format!("{k}:"));
    }

    let mut members = g.members.clone();
    members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    if !members.is_empty() {
        let queues: Vec<String> = members.iter().map(|m| format_queues(&m.queues)).collect();
        let mw = members
            .iter()
            .map(|m| m.member_id.len())
            .chain(["MEMBER".len()])
            .max()
            .unwrap_or(0);
        let qw = queues
            .iter()
            .map(String::len)
            .chain(["QUEUES".len()])
            .max()
            .unwrap_or(0);
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<mw$}  {:<qw$}  LAST HEARTBEAT", "MEMBER", "QUEUES");
        for (m, q) in members.iter().zip(&queues) {
            let _ = writeln!(
                out,
                "{:<mw$}  {:<qw$}  {} ms ago",
                m.member_id, q, m.last_heartbeat_ms_ago
            );
        }
    }

    let mut offsets = g.offsets.clone();
    offsets.sort_by(|a, b| (&a.member_id, a.queue).cmp(&(&b.member_id, b.queue)));
    if !offsets.is_empty() {
        let _ = writeln!(out);
        let committed = |c: i64| {
            if c < 0 {
                "-".to_string()
            } else {
                c.to_string()
            }
        };
        if g.broadcast {
            let mw = offsets
                .iter()
                .map(|o| o.member_id.len())
                .chain(["MEMBER".len()])
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "{:<mw$}  {:>5}  {:>14}  {:>14}  {:>10}",
                "MEMBER", "QUEUE", "COMMITTED", "END OFFSET", "LAG"
            );
            for o in &offsets {
                let _ = writeln!(
                    out,
                    "{:<mw$}  {:>5}  {:>14}  {:>14}  {:>10}",
                    o.member_id,
                    o.queue,
                    committed(o.committed),
                    o.end_offset,
                    o.lag
                );
            }
        } else {
            let _ = writeln!(
                out,
                "{:>5}  {:>14}  {:>14}  {:>10}",
                "QUEUE", "COMMITTED", "END OFFSET", "LAG"
            );
            for o in &offsets {
                let _ = writeln!(
                    out,
                    "{:>5}  {:>14}  {:>14}  {:>10}",
                    o.queue,
                    committed(o.committed),
                    o.end_offset,
                    o.lag
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{GroupOffset, MemberInfo, Strategy};

    fn offset(member: &str, queue: u32, committed: i64, end: i64) -> GroupOffset {
        GroupOffset {
            member_id: member.into(),
            queue,
            committed,
            end_offset: end,
            lag: end - committed.max(0),
        }
    }

    fn member(id: &str, queues: Vec<u32>, ago: u64) -> MemberInfo {
        MemberInfo {
            member_id: id.into(),
            queues,
            last_heartbeat_ms_ago: ago,
        }
    }

    #[test]
    fn clustering_group_shows_members_and_per_queue_lag() {
        let g = GroupInfo {
            group: "g".into(),
            topic: "events".into(),
            strategy: Strategy::AveragelyByCircle,
            broadcast: false,
            generation: 4,
            members: vec![
                member("member-2", vec![1, 3], 80),
                member("member-1", vec![0, 2], 120),
            ],
            offsets: vec![offset("", 1, -1, 7), offset("", 0, 5, 9)],
        };
        let text = format_describe(&g);
        assert!(text.contains("group:      g\n"), "{text}");
        assert!(text.contains("topic:      events\n"), "{text}");
        assert!(
            text.contains("mode:       clustering, strategy averagely-by-circle\n"),
            "{text}"
        );
        assert!(text.contains("generation: 4\n"), "{text}");
        assert!(text.contains("members:    2\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let h = lines.iter().position(|l| l.starts_with("MEMBER")).unwrap();
        assert_eq!(lines[h + 1], "member-1  [0, 2]  120 ms ago");
        assert_eq!(lines[h + 2], "member-2  [1, 3]  80 ms ago");
        let h = lines.iter().position(|l| l.contains("COMMITTED")).unwrap();
        let row = |i: usize| lines[h + i].split_whitespace().collect::<Vec<_>>();
        assert_eq!(row(1), vec!["0", "5", "9", "4"]);
        assert_eq!(row(2), vec!["1", "-", "7", "7"]);
    }

    #[test]
    fn broadcast_group_shows_offsets_per_member() {
        let g = GroupInfo {
            group: "b".into(),
            topic: "t".into(),
            strategy: Strategy::Averagely,
            broadcast: true,
            generation: 2,
            members: vec![member("x", vec![0], 5), member("y", vec![0], 6)],
            offsets: vec![offset("y", 0, 3, 3), offset("x", 0, 1, 3)],
        };
        let text = format_describe(&g);
        assert!(text.contains("mode:       broadcast\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let h = lines.iter().position(|l| l.contains("COMMITTED")).unwrap();
        assert!(lines[h].starts_with("MEMBER"), "{text}");
        let row = |i: usize| lines[h + i].split_whitespace().collect::<Vec<_>>();
        assert_eq!(row(1), vec!["x", "0", "1", "3", "2"]);
        assert_eq!(row(2), vec!["y", "0", "3", "3", "0"]);
    }

    #[test]
    fn group_without_members_has_no_member_table() {
        let g = GroupInfo {
            group: "old".into(),
            topic: String::new(),
            strategy: Strategy::Averagely,
            broadcast: false,
            generation: 0,
            members: Vec::new(),
            offsets: Vec::new(),
        };
        let text = format_describe(&g);
        assert!(text.contains("topic:      -\n"), "{text}");
        assert!(!text.contains("MEMBER"), "{text}");
    }
}
