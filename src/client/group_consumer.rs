//! [`GroupConsumer`]: a member of a consumer group. The broker's group
//! coordinator decides which queues each member reads; this wraps a
//! [`Consumer`] and keeps its queue set in step with the member's
//! assignment.
//!
//! The rebalance protocol. A member joins (`JoinGroup`: group, topic,
//! strategy, mode, session timeout) and gets an assignment: a generation
//! number, its queues, the member count, and the name it commits offsets
//! under (`offsets_group`: the group itself in clustering mode, where each
//! queue has one owner; `group/member` in broadcast mode, where every member
//! reads every queue with progress of its own). The coordinator bumps the
//! generation whenever a member joins, leaves or misses its session, and when
//! the topic grows (`topic alter`). Members are not pushed the change: each
//! learns the new assignment from its next heartbeat, sent every
//! `session_timeout / 3` ([`HEARTBEATS_PER_SESSION`]) from inside
//! [`GroupConsumer::poll`] (which never blocks past the next heartbeat is
//! due). On a new generation the member commits the positions of the queues
//! it is losing (best effort), drops them, and starts the queues it gained at
//! the group's committed offset (else at their start or end, per
//! [`ConsumerConfig::from`]). A heartbeat answered `UNKNOWN_MEMBER` (the
//! session expired, or the broker restarted and forgot its members) makes
//! the member join again under the same member id, so a broadcast member
//! keeps its own offsets.
//!
//! Delivery is at least once, and a rebalance is where duplicates come from.
//! A queue's new owner starts at the last committed offset as soon as it
//! learns of the queue, while the old owner keeps reading the queue until
//! its own next heartbeat: what the old owner read after its last commit —
//! up to one heartbeat interval plus one poll of records, or a whole session
//! timeout if it died — is read again by the new owner. Commit often (after
//! every processed poll, as `coremq consume` does) to keep that window
//! small, and use [`crate::client::dedup::Deduplicator`] where processing
//! must be idempotent. A member that stops polling for longer than its
//! session timeout is dropped from the group and its queues move on;
//! it rejoins on its next poll.

use std::time::{Duration, Instant};

use crate::protocol::messages::GROUP_NAME_BYTES_MAX;
use crate::protocol::{Assignment, ErrorCode, JoinGroup, Strategy};

use super::admin::{describe_topic, heartbeat, join_group, leave_group};
use super::connection::{ClientError, Connection, Timeouts};
use super::consumer::{ConsumedRecord, Consumer, ConsumerConfig};

/// Default session timeout: a member silent this long is dropped.
pub const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Heartbeats sent per session timeout (the heartbeat interval is the
/// session timeout divided by this).
pub const HEARTBEATS_PER_SESSION: u32 = 3;

/// How a member joins its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The fetch settings; `consumer.group` is the group's name and
    /// `consumer.queues` is ignored (the coordinator assigns the queues).
    pub consumer: ConsumerConfig,
    /// How a clustering group spreads queues (the group's first member sets it).
    pub strategy: Strategy,
    /// Every member reads every queue, with offsets of its own.
    pub broadcast: bool,
    /// A stable member id (static membership); the broker names the member when `None`.
    pub member_id: Option<String>,
    /// Dropped from the group after this long without a heartbeat.
    pub session_timeout: Duration,
}

impl GroupConfig {
    pub fn new(group: impl Into<String>) -> GroupConfig {
        GroupConfig {
            consumer: ConsumerConfig::new(group),
            ..GroupConfig::default()
        }
    }

    /// The time between heartbeats.
    pub fn heartbeat_interval(&self) -> Duration {
        self.session_timeout / HEARTBEATS_PER_SESSION
    }

    fn validate(&self) -> Result<(), ClientError> {
        let group = &self.consumer.group;
        if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
            return Err(ClientError::Config(format!(
                "group name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
            )));
        }
        if self.session_timeout.is_zero() || self.session_timeout.as_millis() > u128::from(u32::MAX)
        {
            return Err(ClientError::Config(
                "session timeout must be positive and under 2^32 ms".into(),
            ));
        }
        if self.member_id.as_deref() == Some("") {
            return Err(ClientError::Config("member id must not be empty".into()));
        }
        Ok(())
    }
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            consumer: ConsumerConfig::default(),
            strategy: Strategy::default(),
            broadcast: false,
            member_id: None,
            session_timeout: SESSION_TIMEOUT_DEFAULT,
        }
    }
}

/// A new generation as this member saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentChange {
    pub member_id: String,
    pub generation: u32,
    /// The member's queues from now on, ascending.
    pub queues: Vec<u32>,
    /// Members of the group in this generation.
    pub members: u32,
    /// The topic's queue count when the change was applied.
    pub topic_queues: u32,
    /// Queues this member reads from now on and did not before.
    pub added: Vec<u32>,
    /// Queues this member no longer reads (their positions were committed).
    pub revoked: Vec<u32>,
}

/// A consumer-group member. Not `Sync`: one thread polls.
pub struct GroupConsumer {
    addr: String,
    topic: String,
    config: GroupConfig,
    /// Join, heartbeat and leave go here; fetches go on the consumer's own connection.
    coordinator: Option<Connection>,
    consumer: Consumer,
    assignment: Assignment,
    topic_queues: u32,
    next_heartbeat: Instant,
    changes: Vec<AssignmentChange>,
    left: bool,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("addr", &self.addr)
            .field("topic", &self.topic)
            .field("group", &self.config.consumer.group)
            .field("assignment", &self.assignment)
            .finish()
    }
}

impl GroupConsumer {
    /// Joins the group and starts reading the queues assigned. The first
    /// assignment is also the first [`AssignmentChange`].
    pub fn connect(
        addr: &str,
        topic: &str,
        config: GroupConfig,
    ) -> Result<GroupConsumer, ClientError> {
        config.validate()?;
        let coordinator = Connection::connect(addr, coordinator_timeouts(&config))?;
        let assignment = join_group(
            &coordinator,
            join_request(topic, &config, config.member_id.as_deref().unwrap_or("")),
        )?;
        let started = describe_topic(&coordinator, topic).and_then(|info| {
            let consumer = Consumer::connect(addr, topic, consumer_config(&config, &assignment))?;
            Ok((info.queues.len() as u32, consumer))
        });
        let (topic_queues, consumer) = match started {
            Ok(s) => s,
            Err(e) => {
                // Do not hold queues nobody reads until the session expires.
                let _ = leave_group(&coordinator, &config.consumer.group, &assignment.member_id);
                return Err(e);
            }
        };
        let change = AssignmentChange {
            member_id: assignment.member_id.clone(),
            generation: assignment.generation,
            queues: assignment.queues.clone(),
            members: assignment.members,
            topic_queues,
            added: assignment.queues.clone(),
            revoked: Vec::new(),
        };
        tracing::debug!(?change, "joined the group");
        Ok(GroupConsumer {
            addr: addr.to_string(),
            topic: topic.to_string(),
            next_heartbeat: Instant::now() + config.heartbeat_interval(),
            config,
            coordinator: Some(coordinator),
            consumer,
            assignment,
            topic_queues,
            changes: vec![change],
            left: false,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.config.consumer.group
    }

    pub fn member_id(&self) -> &str {
        &self.assignment.member_id
    }

    pub fn generation(&self) -> u32 {
        self.assignment.generation
    }

    /// The queues this member reads, ascending.
    pub fn assignment(&self) -> &[u32] {
        &self.assignment.queues
    }

    /// Members of the group in the current generation.
    pub fn members(&self) -> u32 {
        self.assignment.members
    }

    /// The topic's queue count at the last assignment change.
    pub fn topic_queues(&self) -> u32 {
        self.topic_queues
    }

    /// The name this member commits offsets under.
    pub fn offsets_group(&self) -> &str {
        &self.assignment.offsets_group
    }

    /// Every assigned queue with its position (the next offset to read).
    pub fn positions(&self) -> Vec<(u32, i64)> {
        self.consumer.positions()
    }

    /// Assignment changes since the last call, oldest first (the first
    /// call returns the join's assignment).
    pub fn take_assignment_changes(&mut self) -> Vec<AssignmentChange> {
        std::mem::take(&mut self.changes)
    }

    /// Moves an assigned queue's position (e.g. back to the first record
    /// not processed, before [`GroupConsumer::commit`]).
    pub fn seek(&mut self, queue: u32, offset: i64) -> Result<(), ClientError> {
        self.consumer.seek(queue, offset)
    }

    /// Waits up to `timeout` for records of the assigned queues. Heartbeats
    /// when one is due (before fetching, and never waits past the next
    /// one), applying a new assignment it brings.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumedRecord>, ClientError> {
        if self.left {
            return Err(ClientError::Config("the member has left its group".into()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.heartbeat_if_due()?;
            let now = Instant::now();
            let slice = deadline
                .min(self.next_heartbeat)
                .saturating_duration_since(now);
            let records = self.consumer.poll(slice)?;
            if !records.is_empty() {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                return Ok(records);
            }
        }
    }

    /// Commits the position of every assigned queue under the member's
    /// offsets group.
    pub fn commit(&mut self) -> Result<(), ClientError> {
        self.consumer.commit()
    }

    /// Commits, then leaves the group so its queues move on at once
    /// (rather than after the session timeout). Leaves even when the commit
    /// fails; returns the first error.
    pub fn close(mut self) -> Result<(), ClientError> {
        let committed = self.consumer.commit();
        let left = self.leave();
        committed.and(left)
    }

    /// Sends a heartbeat now, whether or not one is due, and applies the
    /// assignment it brings.
    pub fn heartbeat(&mut self) -> Result<(), ClientError> {
        let sent_at = Instant::now();
        let result = self.heartbeat_and_apply();
        // After a failure the next poll tries again at once.
        self.next_heartbeat = match result {
            Ok(()) => sent_at + self.config.heartbeat_interval(),
            Err(_) => Instant::now(),
        };
        result
    }

    fn heartbeat_and_apply(&mut self) -> Result<(), ClientError> {
        let group = self.config.consumer.group.clone();
        let member = self.assignment.member_id.clone();
        let result = self.with_coordinator(|c| heartbeat(c, &group, &member));
        match result {
            Ok(a) => self.apply(a),
            Err(e) if e.broker_code() == Some(ErrorCode::UnknownMember) => {
                tracing::info!(
                    group = %group,
                    member = %member,
                    "the group no longer knows this member (session expired?): joining again"
                );
                let join = join_request(&self.topic, &self.config, &self.rejoin_id());
                let a = self.with_coordinator(|c| join_group(c, join.clone()))?;
                self.apply(a)
            }
            Err(e) => Err(e),
        }
    }

    /// The member id to rejoin with: the configured one; else, in broadcast
    /// mode, the one the broker gave (the member's offsets are kept under
    /// it); else none (a clustering member's offsets are the group's, and
    /// a fresh id cannot collide with one a restarted broker gave another
    /// member).
    fn rejoin_id(&self) -> String {
        match (&self.config.member_id, self.config.broadcast) {
            (Some(id), _) => id.clone(),
            (None, true) => self.assignment.member_id.clone(),
            (None, false) => String::new(),
        }
    }

    fn heartbeat_if_due(&mut self) -> Result<(), ClientError> {
        if Instant::now() < self.next_heartbeat {
            return Ok(());
        }
        self.heartbeat()
    }

    /// Runs `f` on the coordinator connection, reconnecting once if the
    /// connection is (or turns out to be) broken.
    fn with_coordinator<T>(
        &mut self,
        f: impl Fn(&Connection) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        for attempt in 0..2 {
            if self.coordinator.as_ref().is_none_or(Connection::is_closed) {
                self.coordinator = Some(Connection::connect(
                    &self.addr,
                    coordinator_timeouts(&self.config),
                )?);
            }
            let Some(conn) = &self.coordinator else {
                return Err(ClientError::Disconnected);
            };
            match f(conn) {
                Err(e) if e.is_retriable() && e.broker_code().is_none() && attempt == 0 => {
                    tracing::debug!("group coordinator connection failed, reconnecting: {e}");
                    if let Some(c) = self.coordinator.take() {
                        c.close();
                    }
                }
                other => return other,
            }
        }
        Err(ClientError::Disconnected)
    }

    /// Applies an assignment from a heartbeat or join: on a new generation,
    /// commits the queues being lost, then reads the new set.
    fn apply(&mut self, a: Assignment) -> Result<(), ClientError> {
        let same = a.generation == self.assignment.generation
            && a.queues == self.assignment.queues
            && a.member_id == self.assignment.member_id
            && a.offsets_group == self.assignment.offsets_group;
        if same {
            self.assignment.members = a.members;
            return Ok(());
        }
        let old = self.consumer.queues();
        let revoked: Vec<u32> = old
            .iter()
            .copied()
            .filter(|q| !a.queues.contains(q))
            .collect();
        let added: Vec<u32> = a
            .queues
            .iter()
            .copied()
            .filter(|q| !old.contains(q))
            .collect();
        let topic = self.topic.clone();
        let topic_queues = self
            .with_coordinator(|c| describe_topic(c, &topic))
            .map(|info| info.queues.len() as u32)?;
        if a.offsets_group != self.assignment.offsets_group {
            // Progress is kept under another name now: start over under it.
            if let Err(e) = self.consumer.commit() {
                tracing::warn!("commit before changing offsets group failed: {e}");
            }
            self.consumer =
                Consumer::connect(&self.addr, &self.topic, consumer_config(&self.config, &a))?;
        } else {
            if !revoked.is_empty() {
                // Best effort: the new owner may already be reading from the
                // previous commit (at least once either way).
                if let Err(e) = self.consumer.commit_queues(&revoked) {
                    tracing::warn!(queues = ?revoked, "commit of revoked queues failed: {e}");
                }
            }
            self.consumer.assign(a.queues.clone())?;
        }
        let change = AssignmentChange {
            member_id: a.member_id.clone(),
            generation: a.generation,
            queues: a.queues.clone(),
            members: a.members,
            topic_queues,
            added,
            revoked,
        };
        tracing::debug!(?change, "new assignment");
        self.changes.push(change);
        self.topic_queues = topic_queues;
        self.assignment = a;
        Ok(())
    }

    fn leave(&mut self) -> Result<(), ClientError> {
        if std::mem::replace(&mut self.left, true) {
            return Ok(());
        }
        let group = self.config.consumer.group.clone();
        let member = self.assignment.member_id.clone();
        match self.with_coordinator(|c| leave_group(c, &group, &member)) {
            // Already gone (expired): nothing to leave.
            Err(e) if e.broker_code() == Some(ErrorCode::UnknownMember) => Ok(()),
            other => other,
        }
    }
}

impl Drop for GroupConsumer {
    /// Leaves the group (best effort, without committing, and without
    /// reconnecting) if `close` was not called, so the queues move on now
    /// rather than after the session timeout.
    fn drop(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        if let Some(c) = self.coordinator.as_ref().filter(|c| !c.is_closed()) {
            let group = &self.config.consumer.group;
            if let Err(e) = leave_group(c, group, &self.assignment.member_id) {
                tracing::debug!("leaving the group on drop failed: {e}");
            }
        }
    }
}

fn join_request(topic: &str, config: &GroupConfig, member_id: &str) -> JoinGroup {
    JoinGroup {
        group: config.consumer.group.clone(),
        topic: topic.to_string(),
        member_id: member_id.to_string(),
        strategy: config.strategy,
        broadcast: config.broadcast,
        session_timeout_ms: config.session_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
    }
}

/// The inner consumer's settings: the member's queues, committed under its offsets group.
fn consumer_config(config: &GroupConfig, a: &Assignment) -> ConsumerConfig {
    ConsumerConfig {
        group: a.offsets_group.clone(),
        queues: Some(a.queues.clone()),
        ..config.consumer.clone()
    }
}

fn coordinator_timeouts(config: &GroupConfig) -> Timeouts {
    Timeouts {
        request: config.consumer.request_timeout,
        ..Timeouts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_heartbeat_interval() {
        let c = GroupConfig::new("g");
        assert_eq!(c.consumer.group, "g");
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.strategy, Strategy::Averagely);
        assert!(!c.broadcast);
        assert_eq!(c.member_id, None);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(10) / 3);
        let fast = GroupConfig {
            session_timeout: Duration::from_millis(900),
            ..GroupConfig::new("g")
        };
        assert_eq!(fast.heartbeat_interval(), Duration::from_millis(300));
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(GroupConfig::new("").validate().is_err());
        assert!(GroupConfig::new("x".repeat(256)).validate().is_err());
        let zero = GroupConfig {
            session_timeout: Duration::ZERO,
            ..GroupConfig::new("g")
        };
        assert!(zero.validate().is_err());
        let empty_member = GroupConfig {
            member_id: Some(String::new()),
            ..GroupConfig::new("g")
        };
        assert!(empty_member.validate().is_err());
        assert!(GroupConfig::new("g").validate().is_ok());
    }

    #[test]
    fn join_request_and_consumer_config_follow_the_assignment() {
        let cfg = GroupConfig {
            broadcast: true,
            strategy: Strategy::AveragelyByCircle,
            session_timeout: Duration::from_millis(1500),
            ..GroupConfig::new("g")
        };
        let j = join_request("t", &cfg, "m1");
        assert_eq!(
            (j.group.as_str(), j.topic.as_str(), j.member_id.as_str()),
            ("g", "t", "m1")
        );
        assert!(j.broadcast);
        assert_eq!(j.strategy, Strategy::AveragelyByCircle);
        assert_eq!(j.session_timeout_ms, 1500);
        let a = Assignment {
            member_id: "m1".into(),
            generation: 3,
            queues: vec![0, 1, 2],
            members: 2,
            offsets_group: "g/m1".into(),
        };
        let c = consumer_config(&cfg, &a);
        assert_eq!(c.group, "g/m1");
        assert_eq!(c.queues, Some(vec![0, 1, 2]));
        assert_eq!(c.max_wait_ms, cfg.consumer.max_wait_ms);
    }
}
