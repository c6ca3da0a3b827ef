//! The control-plane client: topics, node metadata, consumer-group offsets
//! and consumer-group membership (join, heartbeat, leave, describe, list).
//!
//! Every method is one blocking round trip on a [`Connection`]; `&self`
//! methods can be called from several threads at once and are pipelined.
//! A reply of the wrong kind (which `decode_response` rules out for a
//! correct broker) is reported as [`ClientError::UnexpectedReply`], never a panic.

use crate::protocol::{
    AlterTopic, ApiKey, Assignment, GroupInfo, JoinGroup, MemberRef, NodeInfo, Reply, Request,
    TopicInfo, TopicSpec,
};

use super::connection::{ClientError, Connection, Timeouts};

/// Committed offset on the wire when a group has none for the queue.
pub const NO_COMMITTED_OFFSET: i64 = -1;

/// Administrative requests to one broker.
#[derive(Debug)]
pub struct Admin {
    conn: Connection,
}

impl Admin {
    /// Connects with the default timeouts.
    pub fn connect(addr: &str) -> Result<Admin, ClientError> {
        Self::connect_with(addr, Timeouts::default())
    }

    pub fn connect_with(addr: &str, timeouts: Timeouts) -> Result<Admin, ClientError> {
        Ok(Admin {
            conn: Connection::connect(addr, timeouts)?,
        })
    }

    /// Wraps an existing connection.
    pub fn from_connection(conn: Connection) -> Admin {
        Admin { conn }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn create_topic(&self, spec: TopicSpec) -> Result<TopicInfo, ClientError> {
        match self.conn.call(&Request::CreateTopic(spec))? {
            Reply::Topic(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply(ApiKey::CreateTopic)),
        }
    }

    pub fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        match self.conn.call(&Request::DeleteTopic {
            name: name.to_string(),
        })? {
            Reply::Done => Ok(()),
            _ => Err(ClientError::UnexpectedReply(ApiKey::DeleteTopic)),
        }
    }

    pub fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.conn.call(&Request::ListTopics)? {
            Reply::Topics(list) => Ok(list),
            _ => Err(ClientError::UnexpectedReply(ApiKey::ListTopics)),
        }
    }

    pub fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        describe_topic(&self.conn, name)
    }

    /// Grows a live topic to `queues` queues (more than it has today).
    pub fn alter_topic(&self, name: &str, queues: u32) -> Result<TopicInfo, ClientError> {
        match self.conn.call(&Request::AlterTopic(AlterTopic {
            name: name.to_string(),
            queues,
        }))? {
            Reply::Topic(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply(ApiKey::AlterTopic)),
        }
    }

    /// Joins (or rejoins) a consumer group; returns this member's assignment.
    pub fn join_group(&self, join: JoinGroup) -> Result<Assignment, ClientError> {
        join_group(&self.conn, join)
    }

    /// Keeps a member's session alive; returns its current assignment
    /// (a new generation when the group rebalanced).
    pub fn heartbeat(&self, group: &str, member_id: &str) -> Result<Assignment, ClientError> {
        heartbeat(&self.conn, group, member_id)
    }

    /// Leaves a group; its queues go to the other members.
    pub fn leave_group(&self, group: &str, member_id: &str) -> Result<(), ClientError> {
        leave_group(&self.conn, group, member_id)
    }

    /// Members, assignments and committed offsets with lag of a group.
    /// A group with neither members nor offsets is `UNKNOWN_MEMBER`.
    pub fn describe_group(&self, group: &str) -> Result<GroupInfo, ClientError> {
        match self.conn.call(&Request::DescribeGroup {
            group: group.to_string(),
        })? {
            Reply::Group(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply(ApiKey::DescribeGroup)),
        }
    }

    /// Every group the broker knows (live members or committed offsets), sorted.
    pub fn list_groups(&self) -> Result<Vec<String>, ClientError> {
        match self.conn.call(&Request::ListGroups)? {
            Reply::Groups(list) => Ok(list),
            _ => Err(ClientError::UnexpectedReply(ApiKey::ListGroups)),
        }
    }

    pub fn metadata(&self) -> Result<NodeInfo, ClientError> {
        match self.conn.call(&Request::Metadata)? {
            Reply::Metadata(info) => Ok(info),
            _ => Err(ClientError::UnexpectedReply(ApiKey::Metadata)),
        }
    }

    /// Stores `offset` (the next offset the group will read) for one queue.
    pub fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: i64,
    ) -> Result<(), ClientError> {
        match self
            .conn
            .call(&commit_request(group, topic, queue, offset))?
        {
            Reply::Done => Ok(()),
            _ => Err(ClientError::UnexpectedReply(ApiKey::CommitOffset)),
        }
    }

    /// The group's committed offset for one queue, `None` if it has none.
    pub fn fetch_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
    ) -> Result<Option<i64>, ClientError> {
        offset_reply(self.conn.call(&fetch_offset_request(group, topic, queue))?)
    }
}

/// Describes a topic on any connection (shared with producer and consumer).
pub(crate) fn describe_topic(conn: &Connection, name: &str) -> Result<TopicInfo, ClientError> {
    match conn.call(&Request::DescribeTopic {
        name: name.to_string(),
    })? {
        Reply::Topic(info) => Ok(info),
        _ => Err(ClientError::UnexpectedReply(ApiKey::DescribeTopic)),
    }
}

pub(crate) fn join_group(conn: &Connection, join: JoinGroup) -> Result<Assignment, ClientError> {
    match conn.call(&Request::JoinGroup(join))? {
        Reply::Assignment(a) => Ok(a),
        _ => Err(ClientError::UnexpectedReply(ApiKey::JoinGroup)),
    }
}

pub(crate) fn heartbeat(
    conn: &Connection,
    group: &str,
    member_id: &str,
) -> Result<Assignment, ClientError> {
    match conn.call(&Request::Heartbeat(member_ref(group, member_id)))? {
        Reply::Assignment(a) => Ok(a),
        _ => Err(ClientError::UnexpectedReply(ApiKey::Heartbeat)),
    }
}

pub(crate) fn leave_group(
    conn: &Connection,
    group: &str,
    member_id: &str,
) -> Result<(), ClientError> {
    match conn.call(&Request::LeaveGroup(member_ref(group, member_id)))? {
        Reply::Done => Ok(()),
        _ => Err(ClientError::UnexpectedReply(ApiKey::LeaveGroup)),
    }
}

fn member_ref(group: &str, member_id: &str) -> MemberRef {
    MemberRef {
        group: group.to_string(),
        member_id: member_id.to_string(),
    }
}

pub(crate) fn commit_request(group: &str, topic: &str, queue: u32, offset: i64) -> Request {
    Request::CommitOffset {
        group: group.to_string(),
        topic: topic.to_string(),
        queue,
        offset,
    }
}

pub(crate) fn fetch_offset_request(group: &str, topic: &str, queue: u32) -> Request {
    Request::FetchOffset {
        group: group.to_string(),
        topic: topic.to_string(),
        queue,
    }
}

/// Maps a FetchOffset reply: the wire's -1 (or any negative) means "none".
pub(crate) fn offset_reply(reply: Reply) -> Result<Option<i64>, ClientError> {
    match reply {
        Reply::Offset(o) if o <= NO_COMMITTED_OFFSET => Ok(None),
        Reply::Offset(o) => Ok(Some(o)),
        _ => Err(ClientError::UnexpectedReply(ApiKey::FetchOffset)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_one_is_no_offset() {
        assert_eq!(offset_reply(Reply::Offset(-1)).unwrap(), None);
        assert_eq!(offset_reply(Reply::Offset(0)).unwrap(), Some(0));
        assert_eq!(offset_reply(Reply::Offset(17)).unwrap(), Some(17));
        assert!(matches!(
            offset_reply(Reply::Done),
            Err(ClientError::UnexpectedReply(ApiKey::FetchOffset))
        ));
    }
}
