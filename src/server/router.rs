//! Cross-shard messages. A request for a queue another core owns crosses
//! to that core as a `ShardMsg` over a glommio shared channel (one channel
//! per ordered pair of shards, so requests from one connection stay in
//! order); the reply comes back on a oneshot. Nothing else crosses cores.

use super::shard_context::ShardCtx;
use crate::protocol::{Request, Response};
use futures::channel::oneshot;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use std::rc::Rc;

/// Messages queued per shard pair before a sender waits (back-pressure).
pub const SHARD_CHANNEL_MESSAGES_MAX: usize = 4096;

/// Work run on another shard with that shard's context.
pub type ShardTask = Box<dyn FnOnce(&Rc<ShardCtx>) + Send>;

pub enum ShardMsg {
    /// A client request for a queue the receiving shard owns.
    Request {
        req: Request,
        reply: oneshot::Sender<Response>,
    },
    /// A FetchMany's share for the receiving shard, from a gatherer that
    /// also waits on other shards: `hurry` fires (or is dropped) when it
    /// has data from elsewhere, and this shard then answers at once.
    FetchMany {
        req: crate::protocol::FetchMany,
        hurry: oneshot::Receiver<()>,
        reply: oneshot::Sender<Response>,
    },
    /// Runs on the receiving shard with its context: control-plane
    /// questions (queue offsets, group listings) whose answer the closure
    /// sends back on a channel of its own.
    Run(ShardTask),
}

/// One shard's ends of the mesh before its executor connects them.
pub struct MeshEnds {
    /// Index = destination shard; `None` for itself.
    pub senders: Vec<Option<SharedSender<ShardMsg>>>,
    /// Channels from every other shard.
    pub receivers: Vec<SharedReceiver<ShardMsg>>,
}

/// Builds a full mesh of channels between `shards` shards.
pub fn mesh(shards: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = (0..shards)
        .map(|_| MeshEnds {
            senders: (0..shards).map(|_| None).collect(),
            receivers: Vec::new(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(SHARD_CHANNEL_MESSAGES_MAX);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers.push(rx);
            }
        }
    }
    ends
}

/// Connected ends, usable from the shard's executor.
pub struct Connected {
    pub senders: Vec<Option<ConnectedSender<ShardMsg>>>,
    pub receivers: Vec<ConnectedReceiver<ShardMsg>>,
}

impl MeshEnds {
    /// Connects every end at once: a connect completes only when the other
    /// side connects too, so one at a time would deadlock the shards.
    pub async fn connect(self) -> Connected {
        let senders = futures::future::join_all(self.senders.into_iter().map(|s| async move {
            match s {
                Some(s) => Some(s.connect().await),
                None => None,
            }
        }));
        let receivers = futures::future::join_all(self.receivers.into_iter().map(|r| r.connect()));
        let (senders, receivers) = futures::future::join(senders, receivers).await;
        Connected { senders, receivers }
    }
}
