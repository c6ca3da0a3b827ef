//! What the network layer of one shard knows: its storage (`Shard`), the
//! node's metadata, and the channels to the other shards. `dispatch` is the
//! one entry point for a decoded request: it routes it to the owning shard
//! (here, or across a channel) and runs its ordered first phase before it
//! returns, so the caller can read the next frame and still keep produce
//! order per connection; the returned future is the rest (durability, long
//! poll) and resolves to the reply.

use super::router::ShardMsg;
use crate::config::Config;
use crate::metadata::{MetaStore, Metadata, TopicMeta};
use crate::protocol::{
    ErrorCode, ErrorReply, JoinGroup, MemberRef, NodeInfo, QueueInfo, Reply, Request, Response,
    TopicInfo,
};
use coremq_shards::delivery::DeliveryConfig;
use coremq_shards::group_coordinator::GroupCoordinator;
use coremq_shards::shard::{QueuePolicy, Shard};
use coremq_shards::{QueueKey, ShardError};
use futures::channel::oneshot;
use futures::future::{ready, FutureExt, LocalBoxFuture};
use glommio::channels::shared_channel::ConnectedSender;
use std::cell::RefCell;
use std::rc::Rc;
use std::rc::Weak;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Longest long-poll a fetch may ask for.
pub const FETCH_WAIT_MS_MAX: u32 = 30_000;
/// Most messages one push-delivery receive hands out.
pub const RECEIVE_MESSAGES_MAX: usize = 10_000;

pub struct ShardCtx {
    pub id: u32,
    pub shard: Rc<Shard>,
    pub meta: Arc<MetaStore>,
    pub config: Arc<Config>,
    pub peers: Vec<Option<ConnectedSender<ShardMsg>>>,
    /// Every shard's own port, known once all shards have bound.
    pub shard_ports: Arc<OnceLock<Vec<u16>>>,
    /// Membership of the consumer groups this shard coordinates (`groups.rs`).
    pub groups: RefCell<GroupCoordinator>,
    /// This context itself, for `on_shard` calls that land here.
    pub this: RefCell<Weak<ShardCtx>>,
    /// Recent FetchMany lists, resolved (`fetch_lists.rs`).
    pub fetch_lists: RefCell<super::fetch_lists::FetchLists>,
}

pub fn shard_error(e: ShardError) -> ErrorReply {
    let code = match &e {
        ShardError::Io(_) | ShardError::LogFailed(_) | ShardError::CorruptFile { .. } => {
            ErrorCode::StorageError
        }
        ShardError::Batch(_) => ErrorCode::CorruptBatch,
        ShardError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        ShardError::InvalidBatch(_) | ShardError::InvalidOption(_) => ErrorCode::InvalidRequest,
        ShardError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        ShardError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        ShardError::InvalidProducerEpoch { .. } => ErrorCode::InvalidProducerEpoch,
        ShardError::DuplicateSequence { .. } => ErrorCode::DuplicateSequence,
        ShardError::ShuttingDown => ErrorCode::ShuttingDown,
    };
    let mut reply = ErrorReply::new(code, e.to_string());
    if let ShardError::OffsetOutOfRange { start, next, .. } = e {
        reply.offsets = Some((start, next));
    }
    reply
}

pub(super) fn shutting_down() -> ErrorReply {
    ErrorReply::new(ErrorCode::ShuttingDown, "the broker is shutting down")
}

/// The queue a request addresses, checked against the metadata.
pub(super) fn queue_of(
    meta: &Metadata,
    topic: &str,
    queue: u32,
) -> Result<(QueueKey, u32, QueuePolicy), ErrorReply> {
    let t = meta.route(topic)?;
    let owner = t.owner(queue).ok_or_else(|| {
        ErrorReply::new(
            ErrorCode::UnknownQueue,
            format!("topic {topic:?} has queues 0..{}, not {queue}", t.queues()),
        )
    })?;
    Ok((
        QueueKey {
            topic_id: t.id,
            queue,
        },
        owner,
        t.policy,
    ))
}

impl ShardCtx {
    /// Routes a request and runs its ordered phase; the future is the rest.
    pub async fn dispatch(self: &Rc<Self>, req: Request) -> LocalBoxFuture<'static, Response> {
        let target = match &req {
            Request::Produce { topic, queue, .. }
            | Request::ProduceWith { topic, queue, .. }
            | Request::Fetch { topic, queue, .. }
            | Request::CommitOffset { topic, queue, .. }
            | Request::FetchOffset { topic, queue, .. }
            | Request::Receive(crate::protocol::Receive { topic, queue, .. })
            | Request::Ack(crate::protocol::Ack { topic, queue, .. }) => {
                match queue_of(&self.meta.snapshot(), topic, *queue) {
                    Ok((_, owner, _)) => Some(owner),
                    Err(e) => return ready(Err(e)).boxed_local(),
                }
            }
            Request::JoinGroup(JoinGroup { group, .. })
            | Request::Heartbeat(MemberRef { group, .. })
            | Request::LeaveGroup(MemberRef { group, .. })
            | Request::DescribeGroup { group } => {
                if let Err(e) = validate_group(group) {
                    return ready(Err(e)).boxed_local();
                }
                Some(super::groups::coordinator_of(group, self.config.shards))
            }
            Request::ProduceMany(_) | Request::FetchMany(_) => {
                return self.dispatch_many(req).await;
            }
            _ => None,
        };
        match target {
            Some(owner) if owner != self.id => self.forward(owner, req).await,
            Some(_) => self.handle_local(req),
            None => self.clone().handle_control(req).boxed_local(),
        }
    }

    pub(super) async fn forward(
        &self,
        owner: u32,
        req: Request,
    ) -> LocalBoxFuture<'static, Response> {
        let Some(Some(peer)) = self.peers.get(owner as usize) else {
            return ready(Err(ErrorReply::new(
                ErrorCode::Internal,
                format!("no shard {owner}"),
            )))
            .boxed_local();
        };
        let (tx, rx) = oneshot::channel();
        if peer
            .send(ShardMsg::Request { req, reply: tx })
            .await
            .is_err()
        {
            return ready(Err(shutting_down())).boxed_local();
        }
        async move { rx.await.unwrap_or_else(|_| Err(shutting_down())) }.boxed_local()
    }

    /// Serves a message another shard sent here.
    pub fn handle_peer(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Request { req, reply } => {
                let fut = self.handle_local(req);
                glommio::spawn_local(async move {
                    let _ = reply.send(fut.await);
                })
                .detach();
            }
            ShardMsg::FetchMany { req, hurry, reply } => {
                let fut = self.fetch_many_local(req, hurry.map(|_| ()));
                glommio::spawn_local(async move {
                    let _ = reply.send(fut.await);
                })
                .detach();
            }
            ShardMsg::Run(f) => f(self),
        }
    }

    /// A queue request for a queue this shard owns: phase one now, the rest in the future.
    pub fn handle_local(self: &Rc<Self>, req: Request) -> LocalBoxFuture<'static, Response> {
        let meta = self.meta.snapshot();
        let shard = self.shard.clone();
        match req {
            Request::Produce {
                topic,
                queue,
                batch,
            } => self.handle_local(Request::ProduceWith {
                topic,
                queue,
                options: Default::default(),
                batch,
            }),
            Request::ProduceWith {
                topic,
                queue,
                options,
                batch,
            } => {
                let produced = queue_of(&meta, &topic, queue).and_then(|(key, _, policy)| {
                    shard
                        .produce_with(key, batch, policy, options)
                        .map_err(shard_error)
                });
                match produced {
                    Err(e) => ready(Err(e)).boxed_local(),
                    Ok(p) => async move {
                        shard.durable(&p).await.map_err(shard_error)?;
                        Ok(Reply::Produce {
                            base_offset: p.base_offset,
                            duplicate: p.duplicate,
                        })
                    }
                    .boxed_local(),
                }
            }
            Request::Fetch {
                topic,
                queue,
                offset,
                max_bytes,
                max_wait_ms,
            } => {
                let max_bytes = (max_bytes as usize)
                    .min(self.config.max_frame_bytes / 2)
                    .max(1);
                let wait = Duration::from_millis(u64::from(max_wait_ms.min(FETCH_WAIT_MS_MAX)));
                async move {
                    let (key, _, _) = queue_of(&meta, &topic, queue)?;
                    let f = shard
                        .fetch(key, offset, max_bytes, wait)
                        .await
                        .map_err(shard_error)?;
                    Ok(Reply::Fetch {
                        log_start: f.log_start,
                        next_offset: f.next_offset,
                        batches: f.batches,
                    })
                }
                .boxed_local()
            }
            Request::CommitOffset {
                group,
                topic,
                queue,
                offset,
            } => async move {
                validate_offsets_group(&group)?;
                let (key, _, _) = queue_of(&meta, &topic, queue)?;
                let (start, next) = shard.queue_offsets(key);
                if offset < 0 || offset > next {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "cannot commit offset {offset}: queue {queue} holds [{start}, {next})"
                        ),
                    ));
                }
                shard
                    .commit_offset(&group, key, offset)
                    .await
                    .map_err(shard_error)?;
                Ok(Reply::Done)
            }
            .boxed_local(),
            Request::FetchOffset {
                group,
                topic,
                queue,
            } => {
                let r = validate_offsets_group(&group)
                    .and_then(|_| queue_of(&meta, &topic, queue))
                    .map(|(key, _, _)| {
                        Reply::Offset(shard.committed_offset(&group, key).unwrap_or(-1))
                    });
                ready(r).boxed_local()
            }
            Request::Receive(r) => {
                let ctx = self.clone();
                async move {
                    validate_group(&r.group)?;
                    let (key, _, _) = queue_of(&meta, &r.topic, r.queue)?;
                    let cfg = DeliveryConfig {
                        ack_timeout_ms: i64::from(r.ack_timeout_ms),
                        max_attempts: r.max_attempts,
                    };
                    let max = (r.max_messages as usize).clamp(1, RECEIVE_MESSAGES_MAX);
                    let wait =
                        Duration::from_millis(u64::from(r.max_wait_ms.min(FETCH_WAIT_MS_MAX)));
                    let got = shard
                        .receive_wait(&r.group, key, max, cfg, wait)
                        .await
                        .map_err(shard_error)?;
                    ctx.dead_letter(&r.group, &r.topic, got.dead).await;
                    Ok(Reply::Delivery {
                        messages: got.handouts.iter().map(|h| (h.offset, h.attempt)).collect(),
                        batches: got.batches,
                    })
                }
                .boxed_local()
            }
            Request::Ack(a) => {
                let ctx = self.clone();
                async move {
                    validate_group(&a.group)?;
                    let (key, _, _) = queue_of(&meta, &a.topic, a.queue)?;
                    let cfg = DeliveryConfig {
                        ack_timeout_ms: i64::from(a.ack_timeout_ms),
                        max_attempts: a.max_attempts,
                    };
                    let (settled, dead) = shard
                        .ack(&a.group, key, &a.offsets, a.nack, cfg)
                        .map_err(shard_error)?;
                    ctx.dead_letter(&a.group, &a.topic, dead).await;
                    Ok(Reply::Settled(settled as u32))
                }
                .boxed_local()
            }
            Request::ProduceMany(entries) => self.produce_many_local(entries),
            Request::FetchMany(req) => self.fetch_many_local(req, futures::future::pending()),
            Request::JoinGroup(j) => ready(self.join_group(&meta, j)).boxed_local(),
            Request::Heartbeat(m) => ready(self.heartbeat(&meta, m)).boxed_local(),
            Request::LeaveGroup(m) => ready(self.leave_group(m)).boxed_local(),
            Request::DescribeGroup { group } => {
                let ctx = self.clone();
                async move { ctx.describe_group(&group).await.map(Reply::Group) }.boxed_local()
            }
            other => self.clone().handle_control(other).boxed_local(),
        }
    }

    async fn handle_control(self: Rc<Self>, req: Request) -> Response {
        match req {
            Request::CreateTopic(spec) => {
                let t = self.meta.create_topic(spec).await?;
                tracing::info!(topic = %t.spec.name, queues = t.spec.queues, flush = %t.spec.flush, "topic created");
                Ok(Reply::Topic(self.topic_info(&t).await))
            }
            Request::DeleteTopic { name } => {
                self.meta.delete_topic(&name).await?;
                tracing::info!(topic = %name, "topic deleted");
                Ok(Reply::Done)
            }
            Request::DescribeTopic { name } => {
                let meta = self.meta.snapshot();
                let t = meta.topic(&name)?;
                Ok(Reply::Topic(self.topic_info(t).await))
            }
            Request::ListTopics => {
                let meta = self.meta.snapshot();
                let mut out = Vec::with_capacity(meta.topic_count());
                for t in meta.topics() {
                    out.push(self.topic_info(t).await);
                }
                Ok(Reply::Topics(out))
            }
            Request::AlterTopic(a) => {
                let t = self.meta.alter_topic(&a.name, a.queues).await?;
                tracing::info!(topic = %a.name, queues = a.queues, "topic grown");
                Ok(Reply::Topic(self.topic_info(&t).await))
            }
            Request::ListGroups => Ok(Reply::Groups(self.list_groups().await)),
            Request::Metadata => Ok(Reply::Metadata(NodeInfo {
                shards: self.config.shards as u32,
                shard_ports: self.ports(),
                max_message_bytes: self.config.max_message_bytes as u64,
                max_frame_bytes: self.config.max_frame_bytes as u64,
            })),
            // Queue requests never reach here: dispatch routes them.
            other => Err(ErrorReply::new(
                ErrorCode::Internal,
                format!("{:?} is not a control request", other.api()),
            )),
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.shard_ports.get().cloned().unwrap_or_default()
    }

    async fn topic_info(&self, t: &TopicMeta) -> TopicInfo {
        let ports = self.ports();
        let mut queues = Vec::with_capacity(t.placement.len());
        for (q, &owner) in t.placement.iter().enumerate() {
            let key = QueueKey {
                topic_id: t.id,
                queue: q as u32,
            };
            let (start, end) = self.queue_offsets(owner, key).await;
            queues.push(QueueInfo {
                queue: q as u32,
                shard: owner,
                shard_port: ports.get(owner as usize).copied().unwrap_or(0),
                start_offset: start,
                end_offset: end,
            });
        }
        TopicInfo {
            spec: t.spec.clone(),
            id: t.id,
            queues,
        }
    }

    pub async fn queue_offsets(&self, owner: u32, key: QueueKey) -> (i64, i64) {
        self.on_shard(owner, move |ctx| ctx.shard.queue_offsets(key))
            .await
            .unwrap_or((0, 0))
    }

    /// Runs `f` on shard `shard` (here, or across its channel) and returns
    /// its answer; `None` when that shard is gone.
    pub async fn on_shard<T: Send + 'static>(
        &self,
        shard: u32,
        f: impl FnOnce(&Rc<ShardCtx>) -> T + Send + 'static,
    ) -> Option<T> {
        if shard == self.id {
            let me = self.this.borrow().upgrade()?;
            return Some(f(&me));
        }
        let peer = self.peers.get(shard as usize)?.as_ref()?;
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::Run(Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        }));
        peer.send(msg).await.ok()?;
        rx.await.ok()
    }
}

/// Group names follow topic names' rules: 1 to 249 of [A-Za-z0-9._-].
pub fn validate_group(group: &str) -> Result<(), ErrorReply> {
    crate::metadata::validate_topic_name(group).map_err(|_| {
        ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!("invalid group name {group:?}: use 1 to 249 of [A-Za-z0-9._-]"),
        )
    })
}

/// Offsets are committed under a group, or `group/member` for a broadcast member.
fn validate_offsets_group(name: &str) -> Result<(), ErrorReply> {
    match name.split_once('/') {
        Some((g, m)) => validate_group(g).and_then(|_| validate_group(m)),
        None => validate_group(name),
    }
}
