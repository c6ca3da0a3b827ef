//! The native wire protocol (docs/protocol.md): length-prefixed frames with a
//! request id for pipelining, typed error codes, and request/response bodies.
//! Shared by the server (`crate::server`) and the client (`crate::client`).

pub mod error_code;
pub mod frame;
pub mod many;
pub mod messages;
pub mod splice;

pub use error_code::ErrorCode;
pub use frame::{FrameError, RequestHeader, API_VERSION, FRAME_BYTES_MAX_DEFAULT};
pub use many::{
    FetchEntry, FetchMany, FetchPart, FetchedQueue, ProduceAck, ProduceEntry, ProduceResult,
    FETCH_MANY_QUEUES_MAX, PRODUCE_MANY_ENTRIES_MAX,
};
pub use messages::{
    Ack, AlterTopic, ApiKey, Assignment, DecodeError, ErrorReply, Flush, GroupInfo, GroupOffset,
    JoinGroup, MemberInfo, MemberRef, NodeInfo, QueueInfo, Receive, Reply, Request, Response,
    Strategy, TopicInfo, TopicSpec,
};
