//! ProduceMany and FetchMany on the broker: a request's entries are split
//! by owning shard, each share runs where its queues live (here, or across
//! the shard mesh like any queue request), and the replies are gathered
//! back into request order. This is the same on the shared port and on a
//! shard's own port: an entry for another shard's queue is forwarded, never
//! refused, so a client that groups by shard saves the hop and one that
//! does not still gets every entry served.
//!
//! Produce: every share's ordered phase (validation, sequence check, log
//! append) runs before the read loop takes the next frame (a forward awaits
//! its channel send, which is FIFO per pair of shards), so batches of one
//! queue keep their connection's order, as single Produces do.
//!
//! Fetch: each share long-polls on its own shard. When shares are on
//! several shards, the first share to answer makes the gatherer *hurry*
//! the others (a oneshot each): they pass over their queues once more and
//! answer at once, so the request still completes when ANY listed queue
//! has data. The reply's total byte limit is applied again while gathering.

use super::fetch_lists::SessionSlot;
use super::router::ShardMsg;
use super::shard_context::{queue_of, shard_error, shutting_down, ShardCtx, FETCH_WAIT_MS_MAX};
use crate::protocol::{
    ErrorCode, ErrorReply, FetchEntry, FetchMany, FetchPart, FetchedQueue, ProduceAck,
    ProduceEntry, ProduceResult, Reply, Request, Response,
};
use coremq_shards::fetch_many::FetchWant;
use coremq_shards::shard::QueuePolicy;
use coremq_shards::QueueKey;
use futures::channel::oneshot;
use futures::future::{ready, FutureExt, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// Entries grouped by owning shard, each with its position in the request.
type Shares<T> = BTreeMap<u32, (Vec<usize>, Vec<T>)>;

fn internal(message: &str) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, message)
}

fn empty_request(api: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::InvalidRequest,
        format!("a {api} needs at least one entry"),
    )
}

impl ShardCtx {
    /// Routes a ProduceMany or FetchMany (see the module comment).
    pub(super) async fn dispatch_many(
        self: &Rc<Self>,
        req: Request,
    ) -> LocalBoxFuture<'static, Response> {
        match req {
            Request::ProduceMany(entries) => self.dispatch_produce_many(entries).await,
            Request::FetchMany(f) => self.dispatch_fetch_many(f).await,
            other => ready(Err(internal(&format!(
                "{:?} is not a multi-queue request",
                other.api()
            ))))
            .boxed_local(),
        }
    }

    async fn dispatch_produce_many(
        self: &Rc<Self>,
        entries: Vec<ProduceEntry>,
    ) -> LocalBoxFuture<'static, Response> {
        if entries.is_empty() {
            return ready(Err(empty_request("ProduceMany"))).boxed_local();
        }
        let meta = self.meta.snapshot();
        let mut results: Vec<Option<ProduceResult>> = entries.iter().map(|_| None).collect();
        let mut shares: Shares<(ProduceEntry, QueueKey, QueuePolicy)> = BTreeMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            match queue_of(&meta, &e.topic, e.queue) {
                Ok((key, owner, policy)) => {
                    let share = shares.entry(owner).or_default();
                    share.0.push(i);
                    share.1.push((e, key, policy));
                }
                Err(err) => results[i] = Some(Err(err)),
            }
        }
        let mut pending = Vec::with_capacity(shares.len());
        for (owner, (positions, share)) in shares {
            let fut = if owner == self.id {
                self.store_many(share.into_iter().map(Ok).collect())
            } else {
                let share = share.into_iter().map(|(e, ..)| e).collect();
                self.forward(owner, Request::ProduceMany(share)).await
            };
            pending.push((positions, fut));
        }
        async move {
            let replies = futures::future::join_all(
                pending
                    .into_iter()
                    .map(|(positions, fut)| fut.map(move |r| (positions, r))),
            )
            .await;
            for (positions, reply) in replies {
                match reply {
                    Ok(Reply::ProduceMany(rs)) if rs.len() == positions.len() => {
                        for (i, r) in positions.into_iter().zip(rs) {
                            results[i] = Some(r);
                        }
                    }
                    Ok(_) => {
                        for i in positions {
                            results[i] = Some(Err(internal("a shard answered another request")));
                        }
                    }
                    Err(e) => {
                        for i in positions {
                            results[i] = Some(Err(e.clone()));
                        }
                    }
                }
            }
            let results = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(internal("an entry got no result"))))
                .collect();
            Ok(Reply::ProduceMany(results))
        }
        .boxed_local()
    }

    /// A ProduceMany share forwarded to this shard, which owns its queues.
    pub(super) fn produce_many_local(
        self: &Rc<Self>,
        entries: Vec<ProduceEntry>,
    ) -> LocalBoxFuture<'static, Response> {
        let meta = self.meta.snapshot();
        let resolved = entries
            .into_iter()
            .map(|e| queue_of(&meta, &e.topic, e.queue).map(|(key, _, policy)| (e, key, policy)))
            .collect();
        self.store_many(resolved)
    }

    /// Entries whose queues this shard owns, already looked up: every
    /// batch stored now (phase one, in order), the durability waits in the
    /// future.
    fn store_many(
        self: &Rc<Self>,
        entries: Vec<Result<(ProduceEntry, QueueKey, QueuePolicy), ErrorReply>>,
    ) -> LocalBoxFuture<'static, Response> {
        let shard = self.shard.clone();
        let stored: Vec<_> = entries
            .into_iter()
            .map(|r| {
                r.and_then(|(e, key, policy)| {
                    shard
                        .produce_with(key, e.batch, policy, e.options)
                        .map_err(shard_error)
                })
            })
            .collect();
        async move {
            let mut results = Vec::with_capacity(stored.len());
            for s in stored {
                results.push(match s {
                    Ok(p) => shard
                        .durable(&p)
                        .await
                        .map(|_| ProduceAck {
                            base_offset: p.base_offset,
                            duplicate: p.duplicate,
                        })
                        .map_err(shard_error),
                    Err(e) => Err(e),
                });
            }
            Ok(Reply::ProduceMany(results))
        }
        .boxed_local()
    }

    async fn dispatch_fetch_many(
        self: &Rc<Self>,
        req: FetchMany,
    ) -> LocalBoxFuture<'static, Response> {
        if req.entries.is_empty() {
            return ready(Err(empty_request("FetchMany"))).boxed_local();
        }
        let meta = self.meta.snapshot();
        let max_bytes = self.reply_bytes(req.max_bytes);
        let mut failed = Vec::new();
        let mut shares: Shares<(FetchEntry, QueueKey)> = BTreeMap::new();
        let (resolved, session) = self.fetch_lists.borrow_mut().resolve(&meta, &req.entries);
        for ((i, e), r) in req.entries.into_iter().enumerate().zip(resolved.iter()) {
            match r {
                Ok((key, owner)) => {
                    let share = shares.entry(*owner).or_default();
                    share.0.push(i);
                    share.1.push((e, *key));
                }
                Err(err) => failed.push(FetchPart {
                    index: i as u32,
                    result: Err(err.clone()),
                }),
            }
        }
        // An error is an answer: the other queues get one look, no wait.
        let max_wait_ms = if failed.is_empty() {
            req.max_wait_ms
        } else {
            0
        };
        let several = shares.len() > 1;
        let mut hurries = Vec::new();
        let mut pending = Vec::with_capacity(shares.len());
        for (owner, (positions, entries)) in shares {
            // A local share keeps its lookups; across the mesh the owner looks its
            // share up again (in its own cache of repeated lists).
            let (entries, keys): (Vec<_>, Vec<_>) =
                entries.into_iter().map(|(e, key)| (e, Ok(key))).unzip();
            let share = FetchMany {
                max_wait_ms,
                min_bytes: req.min_bytes,
                max_bytes: req.max_bytes,
                entries,
            };
            let local = owner == self.id;
            let fut = if !several {
                if local {
                    self.fetch_resolved(share, keys, session.clone(), futures::future::pending())
                } else {
                    self.forward(owner, Request::FetchMany(share)).await
                }
            } else {
                let (hurry_tx, hurry_rx) = oneshot::channel::<()>();
                hurries.push(hurry_tx);
                if local {
                    self.fetch_resolved(share, keys, session.clone(), hurry_rx.map(|_| ()))
                } else {
                    self.forward_fetch_many(owner, share, hurry_rx).await
                }
            };
            pending.push(fut.map(move |r| (positions, r)));
        }
        async move {
            let mut pending: FuturesUnordered<_> = pending.into_iter().collect();
            let mut parts = failed;
            while let Some((positions, reply)) = pending.next().await {
                // The first answer settles it: the others answer now.
                hurries.clear();
                match reply {
                    Ok(Reply::FetchMany(got)) => {
                        for mut p in got {
                            match positions.get(p.index as usize) {
                                Some(&i) => {
                                    p.index = i as u32;
                                    parts.push(p);
                                }
                                None => return Err(internal("a shard answered another request")),
                            }
                        }
                    }
                    Ok(_) => return Err(internal("a shard answered another request")),
                    Err(e) => parts.extend(positions.into_iter().map(|i| FetchPart {
                        index: i as u32,
                        result: Err(e.clone()),
                    })),
                }
            }
            parts.sort_by_key(|p| p.index);
            Ok(Reply::FetchMany(trim_to(parts, max_bytes)))
        }
        .boxed_local()
    }

    /// A byte limit as asked, clamped to what one reply frame may carry.
    fn reply_bytes(&self, asked: u32) -> usize {
        (asked as usize).min(self.config.max_frame_bytes / 2).max(1)
    }

    async fn forward_fetch_many(
        &self,
        owner: u32,
        req: FetchMany,
        hurry: oneshot::Receiver<()>,
    ) -> LocalBoxFuture<'static, Response> {
        let Some(Some(peer)) = self.peers.get(owner as usize) else {
            return ready(Err(internal(&format!("no shard {owner}")))).boxed_local();
        };
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::FetchMany {
            req,
            hurry,
            reply: tx,
        };
        if peer.send(msg).await.is_err() {
            return ready(Err(shutting_down())).boxed_local();
        }
        async move { rx.await.unwrap_or_else(|_| Err(shutting_down())) }.boxed_local()
    }

    /// A FetchMany share for queues this shard owns.
    pub(super) fn fetch_many_local(
        self: &Rc<Self>,
        req: FetchMany,
        hurry: impl Future<Output = ()> + 'static,
    ) -> LocalBoxFuture<'static, Response> {
        // A forwarded share repeats as its request does: the same cache.
        let meta = self.meta.snapshot();
        let (resolved, session) = self.fetch_lists.borrow_mut().resolve(&meta, &req.entries);
        let keys = resolved
            .iter()
            .map(|r| r.clone().map(|(key, _)| key))
            .collect();
        self.fetch_resolved(req, keys, session, hurry)
    }

    /// A FetchMany share for queues this shard owns, with each entry's
    /// queue already looked up (`keys`, in entry order) and its list's
    /// fetch session.
    fn fetch_resolved(
        self: &Rc<Self>,
        req: FetchMany,
        keys: Vec<Result<QueueKey, ErrorReply>>,
        session: SessionSlot,
        hurry: impl Future<Output = ()> + 'static,
    ) -> LocalBoxFuture<'static, Response> {
        let shard = self.shard.clone();
        let max_bytes = self.reply_bytes(req.max_bytes);
        let per_queue: Vec<usize> = req
            .entries
            .iter()
            .map(|e| self.reply_bytes(e.max_bytes))
            .collect();
        async move {
            let mut parts = Vec::new();
            let mut wants = Vec::with_capacity(req.entries.len());
            let mut positions = Vec::with_capacity(req.entries.len());
            for (i, (e, key)) in req.entries.iter().zip(keys).enumerate() {
                match key {
                    Ok(key) => {
                        wants.push(FetchWant {
                            key,
                            offset: e.offset,
                            max_bytes: per_queue[i],
                        });
                        positions.push(i);
                    }
                    Err(err) => parts.push(FetchPart {
                        index: i as u32,
                        result: Err(err),
                    }),
                }
            }
            let wait = if parts.is_empty() {
                Duration::from_millis(u64::from(req.max_wait_ms.min(FETCH_WAIT_MS_MAX)))
            } else {
                Duration::ZERO
            };
            let min_bytes = (req.min_bytes as usize).min(max_bytes);
            let mut mine = session.take().unwrap_or_default();
            let found = shard
                .fetch_many(&mut mine, &wants, min_bytes, max_bytes, wait, hurry)
                .await;
            session.set(Some(mine));
            for (k, r) in found {
                parts.push(FetchPart {
                    index: positions[k] as u32,
                    result: r
                        .map(|f| FetchedQueue {
                            log_start: f.log_start,
                            next_offset: f.next_offset,
                            batches: f.batches,
                        })
                        .map_err(shard_error),
                });
            }
            parts.sort_by_key(|p| p.index);
            Ok(Reply::FetchMany(parts))
        }
        .boxed_local()
    }
}

/// Keeps batches, in part order, while the total stays ≤ `max_bytes` (the
/// first batch always); parts left with no batch and no error are dropped.
pub fn trim_to(parts: Vec<FetchPart>, max_bytes: usize) -> Vec<FetchPart> {
    let mut total = 0usize;
    let mut out = Vec::with_capacity(parts.len());
    for mut p in parts {
        if let Ok(f) = &mut p.result {
            let mut keep = 0;
            for b in &f.batches {
                if total > 0 && total + b.len() > max_bytes {
                    break;
                }
                total += b.len();
                keep += 1;
            }
            f.batches.truncate(keep);
            if keep == 0 {
                continue;
            }
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn part(index: u32, sizes: &[usize]) -> FetchPart {
        FetchPart {
            index,
            result: Ok(FetchedQueue {
                log_start: 0,
                next_offset: 9,
                batches: sizes.iter().map(|&n| Bytes::from(vec![0u8; n])).collect(),
            }),
        }
    }

    #[test]
    fn trimming_keeps_whole_batches_within_the_total() {
        let err = FetchPart {
            index: 3,
            result: Err(ErrorReply::new(ErrorCode::UnknownTopic, "gone")),
        };
        let got = trim_to(
            vec![
                part(0, &[70, 20]),
                part(1, &[20, 5]),
                part(2, &[1]),
                err.clone(),
            ],
            100,
        );
        let sizes: Vec<Vec<usize>> = got
            .iter()
            .map(|p| match &p.result {
                Ok(f) => f.batches.iter().map(Bytes::len).collect(),
                Err(_) => vec![],
            })
            .collect();
        // 70 + 20 fit; 20 does not; the queue of 1 does; errors stay.
        assert_eq!(got.iter().map(|p| p.index).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(sizes, [vec![70, 20], vec![1], vec![]]);
        // The first batch is whole even over the limit.
        let got = trim_to(vec![part(0, &[500, 1]), part(1, &[1])], 100);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].batch_bytes(), 500);
    }
}
