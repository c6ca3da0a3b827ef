//! Consumer-group requests on the group's coordinator shard: join,
//! heartbeat, leave, describe, and the node-wide group list.
//!
//! `dispatch` routes a group request to `coordinator_of(group)`; membership
//! lives there (`GroupCoordinator`), committed offsets live with each queue's
//! owner, so `describe` gathers those across shards. Broadcast members
//! commit under `group/member`, so each member's progress is its own.

use super::shard_context::{validate_group, ShardCtx};
use crate::metadata::Metadata;
use crate::protocol::messages::GROUP_NAME_BYTES_MAX;
use crate::protocol::{
    Assignment, ErrorCode, ErrorReply, GroupInfo, GroupOffset, JoinGroup, MemberInfo, MemberRef,
    Reply, Response,
};
use coremq_shards::group_coordinator::GroupError;
use coremq_shards::QueueKey;
use std::time::Instant;

/// Longest member id the coordinator generates ("member-" + 16 hex + "-" + counter).
const GENERATED_MEMBER_ID_BYTES_MAX: usize = 48;

/// How often each shard drops members whose session expired.
pub const GROUP_EXPIRY_CHECK_MS: u64 = 100;

/// The shard that coordinates `group`. Membership is not durable, so a
/// hash is fine here (unlike queue placement).
pub fn coordinator_of(group: &str, shards: usize) -> u32 {
    crc32fast::hash(group.as_bytes()) % shards as u32
}

impl ShardCtx {
    pub fn join_group(&self, meta: &Metadata, j: JoinGroup) -> Response {
        if !j.member_id.is_empty() {
            validate_group(&j.member_id).map_err(|_| {
                ErrorReply::new(
                    ErrorCode::InvalidRequest,
                    format!("invalid member id {:?}: use [A-Za-z0-9._-]", j.member_id),
                )
            })?;
        }
        // A broadcast member commits under `group/member`, which must fit a group-name field.
        if j.broadcast
            && j.group.len() + 1 + j.member_id.len().max(GENERATED_MEMBER_ID_BYTES_MAX)
                > GROUP_NAME_BYTES_MAX
        {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("in broadcast mode, group and member names together must stay under {GROUP_NAME_BYTES_MAX} bytes"),
            ));
        }
        let t = meta.topic(&j.topic)?;
        let a = self
            .groups
            .borrow_mut()
            .join(j.to_join(t.placement.len() as u32), Instant::now())
            .map_err(ErrorReply::from)?;
        tracing::info!(group = %j.group, member = %a.member_id, generation = a.generation,
            queues = ?a.queues, "member joined; rebalancing");
        Ok(Reply::Assignment(Assignment::of(&j.group, a)))
    }

    pub fn heartbeat(&self, meta: &Metadata, m: MemberRef) -> Response {
        let mut groups = self.groups.borrow_mut();
        let Some(topic) = groups.topic(&m.group).map(str::to_string) else {
            return Err(ErrorReply::from(GroupError::UnknownMember {
                group: m.group,
                member: m.member_id,
            }));
        };
        // The topic's queue count now: a grown topic rebalances the group.
        let queues = meta.topic(&topic)?.placement.len() as u32;
        let a = groups
            .heartbeat(&m.group, &m.member_id, queues, Instant::now())
            .map_err(ErrorReply::from)?;
        Ok(Reply::Assignment(Assignment::of(&m.group, a)))
    }

    pub fn leave_group(&self, m: MemberRef) -> Response {
        self.groups
            .borrow_mut()
            .leave(&m.group, &m.member_id)
            .map_err(ErrorReply::from)?;
        tracing::info!(group = %m.group, member = %m.member_id, "member left; rebalancing");
        Ok(Reply::Done)
    }

    /// Drops members whose session expired (run on a timer).
    pub fn expire_members(&self) {
        for (group, member) in self.groups.borrow_mut().expire(Instant::now()) {
            tracing::info!(%group, %member, "member session expired; rebalancing");
        }
    }

    /// Every group with live members or committed offsets, on any shard.
    pub async fn list_groups(&self) -> Vec<String> {
        let mut names = Vec::new();
        for shard in 0..self.config.shards as u32 {
            let part = self
                .on_shard(shard, |ctx| {
                    let mut n = ctx.groups.borrow().groups();
                    n.extend(ctx.shard.offset_groups());
                    n
                })
                .await;
            names.extend(part.unwrap_or_default());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Members and assignments (from this coordinator) and committed
    /// offsets with lag (from every queue's owner).
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo, ErrorReply> {
        let view = self.groups.borrow().describe(group, Instant::now());
        let mut committed = Vec::new();
        for shard in 0..self.config.shards as u32 {
            let g = group.to_string();
            let part = self
                .on_shard(shard, move |ctx| ctx.shard.group_offsets(&g))
                .await;
            committed.extend(part.unwrap_or_default());
        }
        if view.is_none() && committed.is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::UnknownMember,
                format!("group {group:?} has no members and no committed offsets"),
            ));
        }
        let meta = self.meta.snapshot();
        let topic = match &view {
            Some(v) => v.topic.clone(),
            None => committed
                .iter()
                .find_map(|(_, k, _)| meta.topic_by_id(k.topic_id).map(|t| t.spec.name.clone()))
                .unwrap_or_default(),
        };
        let broadcast = match &view {
            Some(v) => v.broadcast,
            None => committed.iter().any(|(g, _, _)| g != group),
        };
        // One row per queue (clustering), or per member and queue (broadcast).
        let owners: Vec<String> = if broadcast {
            let prefix = format!("{group}/");
            let mut o: Vec<String> = committed
                .iter()
                .filter_map(|(g, _, _)| g.strip_prefix(&prefix).map(str::to_string))
                .chain(
                    view.iter()
                        .flat_map(|v| v.members.iter().map(|m| m.0.clone())),
                )
                .collect();
            o.sort();
            o.dedup();
            o
        } else {
            vec![String::new()]
        };
        let mut offsets = Vec::new();
        if let Ok(t) = meta.topic(&topic) {
            for (q, &owner) in t.placement.iter().enumerate() {
                let key = QueueKey {
                    topic_id: t.id,
                    queue: q as u32,
                };
                let (start, end) = self.queue_offsets(owner, key).await;
                for member in &owners {
                    let name =
                        crate::protocol::messages::offsets_group(group, member, !member.is_empty());
                    let c = committed
                        .iter()
                        .find(|(g, k, _)| *g == name && *k == key)
                        .map_or(-1, |(_, _, o)| *o);
                    offsets.push(GroupOffset {
                        member_id: member.clone(),
                        queue: q as u32,
                        committed: c,
                        end_offset: end,
                        lag: end - c.max(start),
                    });
                }
            }
        }
        Ok(GroupInfo {
            group: group.to_string(),
            topic,
            strategy: view.as_ref().map(|v| v.strategy).unwrap_or_default(),
            broadcast,
            generation: view.as_ref().map_or(0, |v| v.generation),
            members: view
                .map(|v| {
                    v.members
                        .into_iter()
                        .map(|(member_id, queues, ago)| MemberInfo {
                            member_id,
                            queues,
                            last_heartbeat_ms_ago: ago.as_millis() as u64,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            offsets,
        })
    }
}
