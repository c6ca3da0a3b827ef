//! Consumer-group membership for the groups this shard coordinates.
//!
//! A group's coordinator is one shard (chosen by hashing the group name in
//! `src/`). Members join with a session timeout and keep the session alive
//! with heartbeats; the coordinator hands out assignments and bumps the
//! group's generation whenever membership or the topic's queue count
//! changes (a rebalance). Members learn the new assignment on their next
//! heartbeat, so a queue moves from one member to another within one
//! heartbeat interval; the new owner starts from the group's committed
//! offset (at-least-once: what the old owner read after its last commit is
//! delivered again).
//!
//! Membership is in memory only: after a broker restart members rejoin
//! (their heartbeat gets UNKNOWN_MEMBER). Committed offsets are durable and
//! live with the queues (`group_offsets`).

use crate::assignment::{allocate, Strategy};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Shortest and longest session timeout a member may ask for.
pub const SESSION_TIMEOUT_MS_MIN: u32 = 100;
pub const SESSION_TIMEOUT_MS_MAX: u32 = 300_000;
/// Members one group may have.
pub const MEMBERS_PER_GROUP_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("group {group:?} has no member {member:?} (its session may have expired): join again")]
    UnknownMember { group: String, member: String },
    #[error("group {group:?} {what}")]
    Inconsistent { group: String, what: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
struct Member {
    session_timeout: Duration,
    last_seen: Instant,
}

#[derive(Debug, Clone)]
struct Group {
    topic: String,
    strategy: Strategy,
    broadcast: bool,
    generation: u32,
    queues: u32,
    /// Sorted by id: the allocation order.
    members: BTreeMap<String, Member>,
}

/// What one member reads in the current generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAssignment {
    pub member_id: String,
    pub broadcast: bool,
    pub generation: u32,
    pub queues: Vec<u32>,
    pub members: u32,
}

/// A group as `group describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub topic: String,
    pub strategy: Strategy,
    pub broadcast: bool,
    pub generation: u32,
    /// (member, queues, time since its last heartbeat)
    pub members: Vec<(String, Vec<u32>, Duration)>,
}

/// A join request, as the coordinator needs it.
#[derive(Debug, Clone)]
pub struct Join<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    /// Empty: the coordinator names the member.
    pub member_id: &'a str,
    pub strategy: Strategy,
    pub broadcast: bool,
    pub session_timeout: Duration,
    /// The topic's queue count now.
    pub queues: u32,
}

#[derive(Debug)]
pub struct GroupCoordinator {
    groups: HashMap<String, Group>,
    next_member: u64,
    /// Differs per coordinator instance, so generated member ids never
    /// repeat across broker restarts.
    boot: u64,
}

impl Default for GroupCoordinator {
    fn default() -> Self {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        GroupCoordinator {
            groups: HashMap::new(),
            next_member: 0,
            boot,
        }
    }
}

impl GroupCoordinator {
    /// Adds (or renews) a member and returns its assignment.
    pub fn join(&mut self, j: Join<'_>, now: Instant) -> Result<MemberAssignment, GroupError> {
        let ms = j.session_timeout.as_millis();
        if ms < u128::from(SESSION_TIMEOUT_MS_MIN) || ms > u128::from(SESSION_TIMEOUT_MS_MAX) {
            return Err(GroupError::Invalid(format!(
                "session timeout must be {SESSION_TIMEOUT_MS_MIN}..={SESSION_TIMEOUT_MS_MAX} ms, not {ms}"
            )));
        }
        let group = self
            .groups
            .entry(j.group.to_string())
            .or_insert_with(|| Group {
                topic: j.topic.to_string(),
                strategy: j.strategy,
                broadcast: j.broadcast,
                generation: 0,
                queues: j.queues,
                members: BTreeMap::new(),
            });
        let mismatch = if group.topic != j.topic {
            Some(format!("reads topic {:?}, not {:?}", group.topic, j.topic))
        } else if group.strategy != j.strategy && !group.broadcast {
            Some(format!(
                "uses strategy {}, not {}",
                group.strategy, j.strategy
            ))
        } else if group.broadcast != j.broadcast {
            Some(format!(
                "is in {} mode",
                if group.broadcast {
                    "broadcast"
                } else {
                    "clustering"
                }
            ))
        } else {
            None
        };
        if let Some(what) = mismatch {
            let empty = group.members.is_empty();
            if empty {
                self.groups.remove(j.group);
            }
            return Err(GroupError::Inconsistent {
                group: j.group.to_string(),
                what,
            });
        }
        let member_id = if j.member_id.is_empty() {
            self.next_member += 1;
            format!("member-{:x}-{}", self.boot, self.next_member)
        } else {
            j.member_id.to_string()
        };
        let group = self.groups.get_mut(j.group).expect("inserted above");
        if !group.members.contains_key(&member_id) && group.members.len() >= MEMBERS_PER_GROUP_MAX {
            return Err(GroupError::Invalid(format!(
                "group {:?} already has {MEMBERS_PER_GROUP_MAX} members",
                j.group
            )));
        }
        let member = Member {
            session_timeout: j.session_timeout,
            last_seen: now,
        };
        if group.members.insert(member_id.clone(), member).is_none() || group.queues != j.queues {
            group.queues = j.queues;
            group.generation += 1;
        }
        Ok(assignment(group, &member_id))
    }

    /// Renews a member's session; `queues` is the topic's queue count now
    /// (a grown topic rebalances).
    pub fn heartbeat(
        &mut self,
        group: &str,
        member_id: &str,
        queues: u32,
        now: Instant,
    ) -> Result<MemberAssignment, GroupError> {
        let unknown = || GroupError::UnknownMember {
            group: group.to_string(),
            member: member_id.to_string(),
        };
        let g = self.groups.get_mut(group).ok_or_else(unknown)?;
        let m = g.members.get_mut(member_id).ok_or_else(unknown)?;
        m.last_seen = now;
        if g.queues != queues {
            g.queues = queues;
            g.generation += 1;
        }
        Ok(assignment(g, member_id))
    }

    pub fn leave(&mut self, group: &str, member_id: &str) -> Result<(), GroupError> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member: member_id.to_string(),
            })?;
        if g.members.remove(member_id).is_none() {
            return Err(GroupError::UnknownMember {
                group: group.to_string(),
                member: member_id.to_string(),
            });
        }
        g.generation += 1;
        if g.members.is_empty() {
            self.groups.remove(group);
        }
        Ok(())
    }

    /// Drops members whose session timed out; returns (group, member) of each.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        for (name, g) in self.groups.iter_mut() {
            let before = g.members.len();
            g.members.retain(|id, m| {
                let alive = now.saturating_duration_since(m.last_seen) <= m.session_timeout;
                if !alive {
                    gone.push((name.clone(), id.clone()));
                }
                alive
            });
            if g.members.len() != before {
                g.generation += 1;
            }
        }
        self.groups.retain(|_, g| !g.members.is_empty());
        gone
    }

    pub fn describe(&self, group: &str, now: Instant) -> Option<GroupView> {
        let g = self.groups.get(group)?;
        Some(GroupView {
            topic: g.topic.clone(),
            strategy: g.strategy,
            broadcast: g.broadcast,
            generation: g.generation,
            members: g
                .members
                .iter()
                .map(|(id, m)| {
                    let queues = assignment(g, id).queues;
                    (
                        id.clone(),
                        queues,
                        now.saturating_duration_since(m.last_seen),
                    )
                })
                .collect(),
        })
    }

    /// The topic a live group reads.
    pub fn topic(&self, group: &str) -> Option<&str> {
        self.groups.get(group).map(|g| g.topic.as_str())
    }

    /// Groups with live members.
    pub fn groups(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }
}

fn assignment(g: &Group, member_id: &str) -> MemberAssignment {
    let members = g.members.len() as u32;
    let queues = if g.broadcast {
        (0..g.queues).collect()
    } else {
        let index = g.members.keys().position(|k| k == member_id).unwrap_or(0) as u32;
        allocate(g.strategy, g.queues, members, index)
    };
    MemberAssignment {
        member_id: member_id.to_string(),
        broadcast: g.broadcast,
        generation: g.generation,
        queues,
        members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join<'a>(group: &'a str, member: &'a str, queues: u32) -> Join<'a> {
        Join {
            group,
            topic: "t",
            member_id: member,
            strategy: Strategy::Averagely,
            broadcast: false,
            session_timeout: Duration::from_secs(1),
            queues,
        }
    }

    #[test]
    fn join_rebalance_leave_and_expire() {
        let mut c = GroupCoordinator::default();
        let t0 = Instant::now();
        let a = c.join(join("g", "a", 4), t0).unwrap();
        assert_eq!((a.generation, a.queues.clone()), (1, vec![0, 1, 2, 3]));
        let b = c.join(join("g", "b", 4), t0).unwrap();
        assert_eq!((b.generation, b.queues), (2, vec![2, 3]));
        // a learns on its heartbeat that it lost queues 2 and 3.
        let a = c.heartbeat("g", "a", 4, t0).unwrap();
        assert_eq!((a.generation, a.queues), (2, vec![0, 1]));
        // The topic grows to 6 queues: a rebalance.
        let a = c.heartbeat("g", "a", 6, t0).unwrap();
        assert_eq!((a.generation, a.queues), (3, vec![0, 1, 2]));
        // b stops heartbeating: after its session it is gone and a has everything.
        let later = t0 + Duration::from_millis(1500);
        c.heartbeat("g", "a", 6, t0 + Duration::from_millis(900))
            .unwrap();
        assert_eq!(c.expire(later), vec![("g".to_string(), "b".to_string())]);
        let a = c.heartbeat("g", "a", 6, later).unwrap();
        assert_eq!(a.queues, vec![0, 1, 2, 3, 4, 5]);
        assert!(matches!(
            c.heartbeat("g", "b", 6, later),
            Err(GroupError::UnknownMember { .. })
        ));
        c.leave("g", "a").unwrap();
        assert!(c.groups().is_empty());
    }

    #[test]
    fn inconsistent_joins_and_bad_timeouts_are_refused() {
        let mut c = GroupCoordinator::default();
        let now = Instant::now();
        c.join(join("g", "a", 2), now).unwrap();
        let mut other = join("g", "b", 2);
        other.topic = "u";
        assert!(matches!(
            c.join(other, now),
            Err(GroupError::Inconsistent { .. })
        ));
        let mut circle = join("g", "b", 2);
        circle.strategy = Strategy::AveragelyByCircle;
        assert!(matches!(
            c.join(circle, now),
            Err(GroupError::Inconsistent { .. })
        ));
        let mut fast = join("h", "a", 2);
        fast.session_timeout = Duration::from_millis(1);
        assert!(matches!(c.join(fast, now), Err(GroupError::Invalid(_))));
    }

    #[test]
    fn broadcast_gives_everyone_everything_and_extra_members_idle() {
        let mut c = GroupCoordinator::default();
        let now = Instant::now();
        let mut j = join("b", "x", 3);
        j.broadcast = true;
        c.join(j.clone(), now).unwrap();
        j.member_id = "y";
        assert_eq!(c.join(j, now).unwrap().queues, vec![0, 1, 2]);
        for m in ["m1", "m2", "m3"] {
            c.join(join("small", m, 2), now).unwrap();
        }
        let view = c.describe("small", now).unwrap();
        let idle = view.members.iter().filter(|(_, q, _)| q.is_empty()).count();
        assert_eq!(idle, 1);
        // Generated member ids are unique.
        let a = c.join(join("gen", "", 1), now).unwrap();
        let b = c.join(join("gen", "", 1), now).unwrap();
        assert_ne!(a.member_id, b.member_id);
    }
}
