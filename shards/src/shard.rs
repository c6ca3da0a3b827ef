//! One shard: the queues a core owns and the operations on them.
//!
//! A produce validates the batch, checks the producer's sequence, gives the
//! batch the queue's next offset (written into the batch's base-offset field,
//! outside its CRC), appends it to the commit log and indexes it — all
//! without awaiting, so batches are ordered as they arrived. Only then does
//! the caller await durability (sync flush). A fetch looks the offset up in
//! the queue's consume-queue index and returns the stored batches as `Bytes`
//! over the log's memory. Retention deletes whole sealed segments once no
//! queue still needs them.

use crate::batch::{self, BatchHeader};
use crate::batch_buf::BatchBuf;
use crate::commit_log::{CommitLog, LogConfig, Recovery};
use crate::consume_queue::{ConsumeQueue, IndexEntry};
use crate::copy_slab::CopySlab;
use crate::delay_queue::{DelayQueue, DelayedRef};
use crate::delivery::Subscription;
use crate::durable_file;
use crate::error::{Result, ShardError};
use crate::group_offsets::GroupOffsets;
use crate::index_spill::IndexSpill;
use crate::notify::Notify;
use crate::producer_state::{ProducerTable, SequenceCheck};
use crate::segment::{EntryKind, EntryMeta, ENTRY_HEADER_BYTES, PRIORITY_MAX};
use crate::segment_shares::SegmentShares;
use crate::time_wheel::TimeWheel;
use crate::{QueueKey, QueueMap};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Writer backlog beyond which async-flush produces wait for their write:
/// back-pressure, so memory stays bounded when the disk is slower than producers.
/// Unwritten batches stay in the tail cache, and each connection's requests
/// in flight come on top: at 64 MiB the cache of the 10,000-topic run held
/// only unwritten batches and consumers fell back to the map (broker RSS
/// 591-675 MiB; 367-374 at 32 MiB, same msg/s; 16 MiB cost ~7% of it).
pub const UNWRITTEN_BYTES_MAX: u64 = 32 << 20;

/// Smallest shared batch (`BatchBuf::Shared`) a produce stores in its own
/// buffer, when nothing else holds it, instead of copying it. A `Bytes`'
/// capacity counts only from the batch's first byte, so a small batch at
/// the end of a large buffer looks "about its own size" and would keep the
/// whole buffer alive in the tail cache (the last batch of every 1 MiB
/// ProduceMany frame did, ~1 MiB each, before frames were cut into owned
/// pieces). A batch this large comes from a frame read into a buffer of its
/// own (the connection does that from 16 KiB); copying smaller ones costs
/// little.
pub const IN_PLACE_MIN_BYTES: usize = 16 << 10;

/// The leader epoch stamped into stored batches: a single node is always epoch 0.
pub const LEADER_EPOCH: i32 = 0;

/// Format version of the queue checkpoint file.
const CHECKPOINT_VERSION: u8 = 1;

pub struct ShardConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub flush_interval: Duration,
    pub flush_bytes: u64,
    pub tail_cache_bytes: usize,
    /// Largest record batch accepted (Kafka's message.max.bytes).
    pub max_message_bytes: usize,
    /// Tick of the shard's time wheel (delayed messages, ack timeouts, retention).
    pub tick_ms: u64,
    /// Period of the retention check.
    pub retention_check_ms: u64,
}

/// What the shard's time wheel holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// The DELAYED entry at this log position is due.
    Delayed(u64),
    /// A pushed message's ack deadline.
    AckTimeout {
        group: std::rc::Rc<str>,
        key: QueueKey,
        offset: i64,
        attempt: u32,
    },
    /// Time to run retention (re-armed every `retention_check_ms`).
    Retention,
}

/// What a tick of the wheel did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickOutcome {
    pub delayed_delivered: usize,
    pub ack_timeouts: usize,
    pub retention_due: bool,
}

/// Per-produce options beyond the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProduceOptions {
    /// 0 (lowest, default) to `PRIORITY_MAX`.
    pub priority: u8,
    /// Milliseconds until the batch becomes visible; 0 = at once.
    pub delay_ms: i64,
}

/// Longest delay a message may ask for: 90 days.
pub const DELAY_MS_MAX: i64 = 90 * 24 * 3600 * 1000;

/// Wall-clock milliseconds since the UNIX epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How a queue's topic wants its data kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    pub sync_flush: bool,
    /// Segment roll size for this topic's data (0 = the shard's default).
    pub segment_bytes: u64,
    /// 0 = forever.
    pub retention_ms: u64,
    /// 0 = unlimited; per queue.
    pub retention_bytes: u64,
}

pub(crate) struct QueueState {
    pub(crate) index: ConsumeQueue,
    producers: ProducerTable,
    /// Wakes this queue's parked fetches when a batch becomes visible. Per
    /// queue: with thousands of queues on a shard, a shard-wide signal woke
    /// every parked fetch on every append.
    pub(crate) arrived: Rc<Notify>,
    /// What the queue holds in each segment, for retention.
    segments: SegmentShares,
}

impl QueueState {
    fn new(spill: &Arc<IndexSpill>) -> Self {
        QueueState {
            index: ConsumeQueue::spilling(0, spill.clone()),
            producers: ProducerTable::default(),
            arrived: Rc::default(),
            segments: SegmentShares::default(),
        }
    }
}

/// `key`'s state in `queues`, created (empty, spilling to `spill`) if new.
#[inline]
pub(crate) fn queue_state<'a>(
    queues: &'a mut QueueMap<QueueState>,
    key: QueueKey,
    spill: &Arc<IndexSpill>,
) -> &'a mut QueueState {
    queues.entry(key).or_insert_with(|| QueueState::new(spill))
}

/// A produce that is stored (or known duplicate) and may still await durability.
pub struct Produced {
    /// The batch's first offset; -1 for a delayed batch (it gets its offset when due).
    pub base_offset: i64,
    pub duplicate: bool,
    wait: Wait,
}

/// What the acknowledgement of a produce waits for.
enum Wait {
    Nothing,
    /// Back-pressure: the log position must be written.
    Written(u64),
    /// Sync flush: the log position must be written and synced.
    Synced(u64),
}

/// Result of a fetch.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub log_start: i64,
    pub next_offset: i64,
    pub batches: Vec<Bytes>,
}

/// What retention did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub log_start: u64,
}

pub struct Shard {
    pub(crate) cfg: ShardConfig,
    pub(crate) log: Rc<CommitLog>,
    pub(crate) queues: RefCell<QueueMap<QueueState>>,
    /// Where the queues' older index chunks go (`index_spill.rs`).
    pub(crate) spill: Arc<IndexSpill>,
    pub(crate) offsets: RefCell<GroupOffsets>,
    /// A commit writes the offsets file; one at a time keeps writes ordered.
    pub(crate) offsets_lock: glommio::sync::Semaphore,
    recovery: Recovery,
    delayed: RefCell<DelayQueue>,
    /// Delayed messages, ack deadlines and the retention period, all on one wheel.
    pub(crate) timers: RefCell<TimeWheel<Timer>>,
    /// Push-delivery state per (group, queue) (`push_delivery.rs`).
    pub(crate) subscriptions: RefCell<HashMap<(std::rc::Rc<str>, QueueKey), Subscription>>,
    /// Subscriptions changed since they were last saved.
    pub(crate) subscriptions_dirty: Cell<bool>,
    /// Where stored batches that need a copy are copied (`copy_slab.rs`).
    copies: RefCell<CopySlab>,
}

impl Shard {
    /// Opens the shard's files, recovers the log and rebuilds every index.
    /// The caller must spawn `writer()` on the shard's executor.
    pub async fn open(cfg: ShardConfig) -> Result<Rc<Shard>> {
        std::fs::create_dir_all(&cfg.dir)?;
        let (log, recovery) = CommitLog::open(LogConfig {
            dir: cfg.dir.join("log"),
            segment_bytes: cfg.segment_bytes,
            flush_interval: cfg.flush_interval,
            flush_bytes: cfg.flush_bytes,
            tail_cache_bytes: cfg.tail_cache_bytes,
            // Any entry that fits a segment is plausible: lowering
            // --max-message-bytes must not turn old entries into "damage".
            batch_bytes_max: cfg.segment_bytes as usize,
        })
        .await?;
        let spill = IndexSpill::open(&cfg.dir.join("index-spill"))?;
        let mut queues: QueueMap<QueueState> = QueueMap::default();
        let mut delayed = DelayQueue::default();
        for e in &recovery.entries {
            let q = queue_state(&mut queues, e.key, &spill);
            q.segments.add(
                e.segment_base,
                e.header.total_bytes() as u64,
                e.header.max_timestamp,
            );
            match e.meta.kind {
                EntryKind::Delayed { deliver_at_ms } => {
                    q.producers.record(&e.header, -1);
                    delayed.add(
                        e.entry_pos,
                        DelayedRef {
                            key: e.key,
                            batch_pos: e.batch_pos,
                            batch_len: e.header.total_bytes() as u32,
                            priority: e.meta.priority,
                            deliver_at_ms,
                        },
                    );
                    continue;
                }
                EntryKind::FromDelay { origin_pos } => {
                    delayed.take(origin_pos);
                }
                EntryKind::Normal => {}
            }
            let base = e.header.base_offset;
            if base < q.index.next_offset() {
                // Cannot happen for a log this code wrote; never index backwards.
                tracing::warn!(?e.key, base, "skipping a batch below the queue's next offset");
                continue;
            }
            q.index
                .push(index_entry(&e.header, e.batch_pos, e.meta.priority));
            if e.meta.kind == EntryKind::Normal {
                q.producers.record(&e.header, base);
            }
        }
        // Queues emptied by retention continue from their checkpointed offset.
        for (key, _start, next) in read_checkpoint(&cfg.dir.join("queues.checkpoint"))? {
            queue_state(&mut queues, key, &spill).index.advance_to(next);
        }
        let offsets = GroupOffsets::open(cfg.dir.join("offsets"))?;
        let now = now_ms().max(0) as u64;
        let mut timers = TimeWheel::new(cfg.tick_ms.max(1), now);
        for (pos, r) in delayed.iter() {
            timers.insert(r.deliver_at_ms.max(0) as u64, Timer::Delayed(pos));
        }
        timers.insert(now + cfg.retention_check_ms, Timer::Retention);
        let subscriptions = crate::push_delivery::load(&cfg.dir)?;
        let shard = Shard {
            cfg,
            log,
            queues: RefCell::new(queues),
            spill,
            offsets: RefCell::new(offsets),
            offsets_lock: glommio::sync::Semaphore::new(1),
            recovery,
            delayed: RefCell::new(delayed),
            timers: RefCell::new(timers),
            subscriptions: RefCell::new(subscriptions),
            subscriptions_dirty: Cell::new(false),
            copies: RefCell::default(),
        };
        Ok(Rc::new(shard))
    }

    /// The log's group-commit writer; spawn it once on the shard's executor.
    pub fn writer(&self) -> impl std::future::Future<Output = ()> {
        self.log.clone().run_writer()
    }

    /// What start-up recovery found: entries indexed, tails dropped.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Stores a batch (phase one, ordered, no await). Await `durable` next.
    pub fn produce(&self, key: QueueKey, batch: Bytes, policy: QueuePolicy) -> Result<Produced> {
        self.produce_with(key, batch, policy, ProduceOptions::default())
    }

    /// `produce` with a priority and a delay.
    pub fn produce_with(
        &self,
        key: QueueKey,
        batch: impl Into<BatchBuf>,
        policy: QueuePolicy,
        opts: ProduceOptions,
    ) -> Result<Produced> {
        let batch = batch.into();
        if opts.priority > PRIORITY_MAX {
            return Err(ShardError::InvalidOption(format!(
                "priority must be 0..={PRIORITY_MAX}, not {}",
                opts.priority
            )));
        }
        if !(0..=DELAY_MS_MAX).contains(&opts.delay_ms) {
            return Err(ShardError::InvalidOption(format!(
                "delay must be 0..={DELAY_MS_MAX} ms, not {}",
                opts.delay_ms
            )));
        }
        if batch.len() > self.cfg.max_message_bytes {
            return Err(ShardError::TooLarge {
                len: batch.len(),
                max: self.cfg.max_message_bytes,
            });
        }
        let header = batch::validate(&batch)?;
        if header.total_bytes() != batch.len() {
            return Err(ShardError::InvalidBatch("trailing bytes after the batch"));
        }
        if header.records_count <= 0 {
            return Err(ShardError::InvalidBatch(
                "a batch needs at least one record",
            ));
        }
        if header.is_transactional() || header.is_control() {
            return Err(ShardError::InvalidBatch(
                "transactional batches are not supported yet",
            ));
        }
        let mut queues = self.queues.borrow_mut();
        let q = queue_state(&mut queues, key, &self.spill);
        if let SequenceCheck::Duplicate { base_offset } = q.producers.check(&header)? {
            return Ok(Produced {
                base_offset,
                duplicate: true,
                // The original may still be in flight: wait until all written so far is durable.
                wait: if policy.sync_flush {
                    Wait::Synced(self.log.end())
                } else {
                    Wait::Nothing
                },
            });
        }
        let delayed = opts.delay_ms > 0;
        // A delayed batch gets its offset when it comes due.
        let base_offset = if delayed { -1 } else { q.index.next_offset() };
        let mut owned = match batch {
            // A piece of memory given to this batch alone: patched in place.
            BatchBuf::Owned(m) => m,
            BatchBuf::Shared(b) => match b.try_into_mut() {
                // Large, unique and about its own size: patched in place.
                Ok(m) if m.len() >= IN_PLACE_MIN_BYTES && m.capacity() <= 2 * m.len() => m,
                // Anything else may be cut from a larger buffer (a read
                // buffer) that the tail cache would pin: keep a copy.
                Ok(m) => self.copies.borrow_mut().copy(&m),
                Err(shared) => self.copies.borrow_mut().copy(&shared),
            },
        };
        batch::set_base_offset(&mut owned, base_offset.max(0));
        batch::set_leader_epoch(&mut owned, LEADER_EPOCH);
        let stored = owned.freeze();
        let len = stored.len();
        let deliver_at_ms = now_ms() + opts.delay_ms;
        let meta = EntryMeta {
            priority: opts.priority,
            kind: if delayed {
                EntryKind::Delayed { deliver_at_ms }
            } else {
                EntryKind::Normal
            },
        };
        let appended = self.log.append(key, meta, stored, policy.segment_bytes)?;
        let batch_pos = appended.batch_pos;
        q.segments
            .add(appended.segment_base, len as u64, header.max_timestamp);
        let mut h = header;
        h.base_offset = base_offset;
        if delayed {
            let entry_pos = batch_pos - ENTRY_HEADER_BYTES as u64;
            self.delayed.borrow_mut().add(
                entry_pos,
                DelayedRef {
                    key,
                    batch_pos,
                    batch_len: len as u32,
                    priority: opts.priority,
                    deliver_at_ms,
                },
            );
            self.timers
                .borrow_mut()
                .insert(deliver_at_ms.max(0) as u64, Timer::Delayed(entry_pos));
        } else {
            q.index.push(index_entry(&h, batch_pos, opts.priority));
            q.arrived.notify_all();
        }
        q.producers.record(&h, base_offset);
        Ok(Produced {
            base_offset,
            duplicate: false,
            wait: if policy.sync_flush {
                Wait::Synced(batch_pos + len as u64)
            } else if self.log.unwritten_bytes() > UNWRITTEN_BYTES_MAX {
                Wait::Written(batch_pos + len as u64)
            } else {
                Wait::Nothing
            },
        })
    }

    /// Phase two of a produce: completes when the batch is as durable as its topic asks.
    pub async fn durable(&self, produced: &Produced) -> Result<()> {
        match produced.wait {
            Wait::Synced(end) => self.log.wait_durable(end).await,
            Wait::Written(end) => self.log.wait_written(end).await,
            Wait::Nothing => Ok(()),
        }
    }

    /// Delayed batches waiting on the wheel.
    pub fn delayed_len(&self) -> usize {
        self.delayed.borrow().len()
    }

    /// Advances the shard's time wheel to `now`: delivers due delayed
    /// batches (a FROM_DELAY entry naming the DELAYED one; batches of deleted
    /// queues are dropped), returns expired pushed messages to their retry
    /// sets, and says when retention is due.
    pub fn tick(
        &self,
        now: i64,
        policy_of: impl Fn(QueueKey) -> Option<QueuePolicy>,
    ) -> TickOutcome {
        let fired = self.timers.borrow_mut().advance(now.max(0) as u64);
        let mut out = TickOutcome::default();
        for timer in fired {
            match timer {
                Timer::Delayed(entry_pos) => {
                    let Some(r) = self.delayed.borrow_mut().take(entry_pos) else {
                        continue;
                    };
                    match policy_of(r.key) {
                        None => {
                            tracing::info!(?r.key, "dropping a delayed batch of a deleted queue")
                        }
                        Some(policy) => {
                            if self.deliver_delayed(entry_pos, r, policy) {
                                out.delayed_delivered += 1;
                            } else {
                                // Retried at the next tick.
                                self.delayed.borrow_mut().add(entry_pos, r);
                                let next = now.max(0) as u64 + self.cfg.tick_ms;
                                self.timers
                                    .borrow_mut()
                                    .insert(next, Timer::Delayed(entry_pos));
                            }
                        }
                    }
                }
                Timer::AckTimeout {
                    group,
                    key,
                    offset,
                    attempt,
                } => {
                    let mut subs = self.subscriptions.borrow_mut();
                    if let Some(sub) = subs.get_mut(&(group, key)) {
                        if sub.expire(offset, attempt) {
                            out.ack_timeouts += 1;
                            self.subscriptions_dirty.set(true);
                        }
                    }
                }
                Timer::Retention => {
                    out.retention_due = true;
                    let next = now.max(0) as u64 + self.cfg.retention_check_ms;
                    self.timers.borrow_mut().insert(next, Timer::Retention);
                }
            }
        }
        out
    }

    /// Re-appends one due delayed batch to its queue; false if that failed.
    fn deliver_delayed(&self, entry_pos: u64, r: DelayedRef, policy: QueuePolicy) -> bool {
        let Some(stored) = self.log.read(r.batch_pos, r.batch_len as usize) else {
            tracing::error!(?r.key, entry_pos, "a delayed batch is no longer in the log");
            return true;
        };
        let mut owned = bytes::BytesMut::from(&stored[..]);
        let mut queues = self.queues.borrow_mut();
        let q = queue_state(&mut queues, r.key, &self.spill);
        let base_offset = q.index.next_offset();
        batch::set_base_offset(&mut owned, base_offset);
        let Ok(mut h) = batch::validate(&owned) else {
            tracing::error!(?r.key, entry_pos, "a delayed batch no longer validates");
            return true;
        };
        let meta = EntryMeta {
            priority: r.priority,
            kind: EntryKind::FromDelay {
                origin_pos: entry_pos,
            },
        };
        match self
            .log
            .append(r.key, meta, owned.freeze(), policy.segment_bytes)
        {
            Ok(appended) => {
                q.segments.add(
                    appended.segment_base,
                    u64::from(r.batch_len),
                    h.max_timestamp,
                );
                h.base_offset = base_offset;
                q.index
                    .push(index_entry(&h, appended.batch_pos, r.priority));
                q.arrived.notify_all();
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "delivering a delayed batch failed; retrying");
                false
            }
        }
    }

    /// The queue's (first stored offset, next offset), as readers see them.
    pub fn queue_offsets(&self, key: QueueKey) -> (i64, i64) {
        let queues = self.queues.borrow();
        match queues.get(&key) {
            Some(q) => (
                q.index.start_offset(),
                q.index.visible_next_offset(self.log.end()),
            ),
            None => (0, 0),
        }
    }

    /// Reads from `offset`: whole batches, up to `max_bytes`; waits up to
    /// `max_wait` when the queue has nothing at `offset` yet.
    pub async fn fetch(
        &self,
        key: QueueKey,
        offset: i64,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched> {
        let deadline = std::time::Instant::now() + max_wait;
        loop {
            let visible = self.log.end();
            let (start, next, entries, arrived) = {
                let mut queues = self.queues.borrow_mut();
                let q = queue_state(&mut queues, key, &self.spill);
                (
                    q.index.start_offset(),
                    q.index.visible_next_offset(visible),
                    q.index.lookup(offset, visible, max_bytes),
                    q.arrived.clone(),
                )
            };
            // No await since the state was read: no append can slip between.
            let moved = arrived.notified();
            if offset < start || offset > next {
                return Err(ShardError::OffsetOutOfRange {
                    offset,
                    start,
                    next,
                });
            }
            if !entries.is_empty() {
                let mut batches = Vec::with_capacity(entries.len());
                for e in entries {
                    match self.log.read(e.batch_pos, e.batch_len as usize) {
                        Some(b) => batches.push(b),
                        None => break,
                    }
                }
                return Ok(Fetched {
                    log_start: start,
                    next_offset: next,
                    batches,
                });
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(Fetched {
                    log_start: start,
                    next_offset: next,
                    batches: Vec::new(),
                });
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                moved.await;
                Ok(())
            })
            .await;
        }
    }

    /// The signal `key`'s parked readers wait on: a batch became visible.
    pub(crate) fn queue_arrived(&self, key: QueueKey) -> Rc<Notify> {
        queue_state(&mut self.queues.borrow_mut(), key, &self.spill)
            .arrived
            .clone()
    }

    pub fn committed_offset(&self, group: &str, key: QueueKey) -> Option<i64> {
        self.offsets.borrow().get(group, key)
    }

    /// Commits a group's offset durably.
    pub async fn commit_offset(&self, group: &str, key: QueueKey, offset: i64) -> Result<()> {
        // One commit at a time, so the file is rewritten in commit order.
        let _permit = self.offsets_lock.acquire_permit(1).await;
        let (path, snapshot) = self.offsets.borrow().preview(group, key, offset);
        durable_file::write_atomic(&path, &snapshot).await?;
        // Visible to FetchOffset only once durable.
        self.offsets.borrow_mut().set(group, key, offset);
        Ok(())
    }

    /// Committed offsets of `group` and of its broadcast members (`group/member`).
    pub fn group_offsets(&self, group: &str) -> Vec<(String, QueueKey, i64)> {
        let prefix = format!("{group}/");
        self.offsets
            .borrow()
            .iter()
            .filter(|(g, _, _)| *g == group || g.starts_with(&prefix))
            .map(|(g, k, o)| (g.to_string(), k, o))
            .collect()
    }

    /// Names of the groups with committed offsets here (broadcast members folded into their group).
    pub fn offset_groups(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .offsets
            .borrow()
            .iter()
            .map(|(g, _, _)| g.split('/').next().unwrap_or(g).to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Forgets queues (and their committed offsets) that `keep` rejects.
    pub fn retain_queues(&self, keep: impl Fn(QueueKey) -> bool) {
        self.queues.borrow_mut().retain(|k, _| keep(*k));
        let mut subs = self.subscriptions.borrow_mut();
        let before = subs.len();
        subs.retain(|(_, k), _| keep(*k));
        if subs.len() != before {
            self.subscriptions_dirty.set(true);
        }
        self.offsets.borrow_mut().retain(keep);
    }

    /// Deletes sealed segments, oldest first, while every queue with data in
    /// them is past its retention. `policy_of` returns `None` for queues
    /// whose topic is gone (their data never holds a segment back).
    pub async fn enforce_retention(
        &self,
        now_ms: i64,
        policy_of: impl Fn(QueueKey) -> Option<QueuePolicy>,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport {
            segments_deleted: 0,
            log_start: self.log.start(),
        };
        let oldest_delayed = self.delayed.borrow().oldest_pos();
        while let Some(base) = self.log.oldest_sealed_segment() {
            // A segment holding a pending delayed batch stays until it is delivered.
            if oldest_delayed.is_some_and(|p| p < self.log.segment_end(base)) {
                break;
            }
            let expired = {
                let queues = self.queues.borrow();
                queues.iter().all(|(key, q)| {
                    let Some(s) = q.segments.oldest(base) else {
                        return true;
                    };
                    let Some(p) = policy_of(*key) else {
                        return true;
                    };
                    let by_time = p.retention_ms > 0
                        && now_ms.saturating_sub(s.max_timestamp) > p.retention_ms as i64;
                    let by_size = p.retention_bytes > 0
                        && q.index.bytes_from(base).saturating_sub(s.bytes) >= p.retention_bytes;
                    by_time || by_size
                })
            };
            if !expired {
                break;
            }
            // Remember every queue's offsets before its data goes, so a queue
            // emptied by retention keeps counting from where it was.
            self.save_checkpoint().await?;
            let start = self.log.delete_oldest(base).await?;
            if start <= base {
                // Not deleted (not the oldest file, or still being written).
                break;
            }
            for q in self.queues.borrow_mut().values_mut() {
                q.index.truncate_before(start);
                q.segments.forget_before(start);
            }
            self.spill.forget_before(start);
            report.segments_deleted += 1;
            report.log_start = start;
        }
        if report.segments_deleted > 0 {
            self.save_checkpoint().await?;
        }
        Ok(report)
    }

    async fn save_checkpoint(&self) -> Result<()> {
        let mut out = vec![CHECKPOINT_VERSION];
        {
            let queues = self.queues.borrow();
            out.extend_from_slice(&(queues.len() as u32).to_be_bytes());
            for (k, q) in queues.iter() {
                out.extend_from_slice(&k.topic_id.to_be_bytes());
                out.extend_from_slice(&k.queue.to_be_bytes());
                out.extend_from_slice(&q.index.start_offset().to_be_bytes());
                out.extend_from_slice(&q.index.next_offset().to_be_bytes());
            }
        }
        durable_file::write_atomic(&self.cfg.dir.join("queues.checkpoint"), &out).await
    }

    /// Flushes and syncs everything, then stops the writer.
    pub async fn stop(&self) {
        self.log.stop().await
    }
}

fn index_entry(h: &BatchHeader, batch_pos: u64, priority: u8) -> IndexEntry {
    IndexEntry {
        base_offset: h.base_offset,
        batch_pos,
        batch_len: h.total_bytes() as u32,
        record_count: h.records_count as u32,
        priority,
    }
}

fn read_checkpoint(path: &std::path::Path) -> Result<Vec<(QueueKey, i64, i64)>> {
    let Some(data) = durable_file::read_checked(path)? else {
        return Ok(Vec::new());
    };
    let bad = || ShardError::CorruptFile {
        path: path.display().to_string(),
        reason: "undecodable queue checkpoint".into(),
    };
    if data.first() != Some(&CHECKPOINT_VERSION) || data.len() < 5 {
        return Err(bad());
    }
    let n = u32::from_be_bytes(data[1..5].try_into().expect("4 bytes")) as usize;
    let rows = &data[5..];
    if rows.len() != n * 24 {
        return Err(bad());
    }
    Ok(rows
        .chunks_exact(24)
        .map(|r| {
            let u32_at = |i: usize| u32::from_be_bytes(r[i..i + 4].try_into().expect("4 bytes"));
            let i64_at = |i: usize| i64::from_be_bytes(r[i..i + 8].try_into().expect("8 bytes"));
            (
                QueueKey {
                    topic_id: u32_at(0),
                    queue: u32_at(4),
                },
                i64_at(8),
                i64_at(16),
            )
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, Compression};
    use crate::segment;
    use std::path::{Path, PathBuf};

    /// The segment files in a log directory, oldest first.
    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| segment::parse_file_name(&n.to_string_lossy()))
                    .is_some()
            })
            .collect();
        paths.sort();
        paths
    }

    fn segment_files(dir: &Path) -> usize {
        segment_paths(dir).len()
    }

    pub(crate) fn cfg(dir: &std::path::Path) -> ShardConfig {
        ShardConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 1 << 20,
            flush_interval: Duration::from_millis(5),
            flush_bytes: 1 << 20,
            tail_cache_bytes: 64 << 10,
            max_message_bytes: 1 << 20,
            tick_ms: 10,
            retention_check_ms: 60_000,
        }
    }

    pub(crate) fn batch(values: &[&str], ts: i64) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        for v in values {
            b.push(ts, None, Some(v.as_bytes()), &[]);
        }
        b.build()
    }

    const SYNC: QueuePolicy = QueuePolicy {
        sync_flush: true,
        segment_bytes: 0,
        retention_ms: 0,
        retention_bytes: 0,
    };
    pub(crate) const ASYNC: QueuePolicy = QueuePolicy {
        sync_flush: false,
        ..SYNC
    };
    pub(crate) const K: QueueKey = QueueKey {
        topic_id: 1,
        queue: 0,
    };

    pub(crate) fn run<F: std::future::Future<Output = ()> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) {
        glommio::LocalExecutorBuilder::default()
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    /// Runs `test` on a fresh shard with its log writer.
    pub(crate) fn with_shard<F: std::future::Future<Output = ()> + 'static>(
        test: impl FnOnce(Rc<Shard>) -> F + Send + 'static,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            test(shard).await;
        });
    }

    async fn values(shard: &Shard, key: QueueKey, from: i64) -> Vec<String> {
        let mut out = Vec::new();
        let mut offset = from;
        loop {
            let f = shard
                .fetch(key, offset, 1 << 20, Duration::ZERO)
                .await
                .unwrap();
            if f.batches.is_empty() {
                return out;
            }
            for b in &f.batches {
                let (_, recs) = batch::decode_records(b).unwrap();
                for r in recs {
                    if r.offset >= offset {
                        out.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
                        offset = r.offset + 1;
                    }
                }
            }
        }
    }

    /// Where the tail cache's copy of a stored batch lives.
    fn stored_at(shard: &Shard, offset: i64) -> std::ops::Range<usize> {
        let e = shard.queues.borrow()[&K]
            .index
            .entries_from(offset)
            .next()
            .unwrap();
        let b = shard.log.read(e.batch_pos, e.batch_len as usize).unwrap();
        b.as_ptr() as usize..b.as_ptr() as usize + b.len()
    }

    #[test]
    fn a_small_batch_never_keeps_its_frame_alive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            let policy = ASYNC;
            // The last small batch of a large frame, the frame's only owner:
            // unique, and its capacity (from its start) is its length.
            let small = batch(&["a"], 0);
            let mut frame = bytes::BytesMut::with_capacity((1 << 20) + small.len());
            frame.resize(1 << 20, 0);
            frame.extend_from_slice(&small);
            let frame = frame.freeze();
            let whole = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
            let tail = frame.slice(1 << 20..);
            drop(frame);
            shard.produce(K, tail, policy).unwrap();
            let at = stored_at(&shard, 0);
            assert!(!whole.contains(&at.start), "stored inside the 1 MiB frame");

            // A large batch alone in its buffer is stored where it is.
            let large = batch(&[&"x".repeat(IN_PLACE_MIN_BYTES)], 0);
            let own = large.as_ptr() as usize;
            shard.produce(K, large, policy).unwrap();
            assert_eq!(stored_at(&shard, 1).start, own);
        });
    }

    #[test]
    fn produce_fetch_and_recover_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let mut expected = Vec::new();
            // Small topic segments force many rolls.
            let policy = QueuePolicy {
                segment_bytes: 10_000,
                ..SYNC
            };
            for i in 0..200 {
                let v = format!("message-{i:04}-{}", "x".repeat(i % 300));
                let p = shard.produce(K, batch(&[&v], i as i64), policy).unwrap();
                assert_eq!(p.base_offset, i as i64);
                shard.durable(&p).await.unwrap();
                expected.push(v);
            }
            assert_eq!(values(&shard, K, 0).await, expected);
            assert_eq!(values(&shard, K, 150).await, expected[150..]);
            shard.stop().await;
            let segments = segment_files(&d.join("log"));
            assert!(segments > 3, "{segments} segments");

            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            assert!(shard.recovery().dropped.is_empty());
            assert_eq!(values(&shard, K, 0).await, expected);
            let p = shard.produce(K, batch(&["after"], 1), SYNC).unwrap();
            assert_eq!(p.base_offset, 200);
            shard.durable(&p).await.unwrap();
            shard.stop().await;
        });
    }

    #[test]
    fn torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let d2 = d.clone();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            for i in 0..10 {
                let p = shard
                    .produce(K, batch(&[&format!("m{i}")], 0), SYNC)
                    .unwrap();
                shard.durable(&p).await.unwrap();
            }
            shard.stop().await;
        });
        // Corrupt a byte inside the last entry.
        let seg = segment_paths(&d2.join("log")).pop().unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        let end = data.iter().rposition(|&b| b != 0).unwrap();
        data[end - 3] ^= 0xff;
        std::fs::write(&seg, data).unwrap();
        run(move || async move {
            let shard = Shard::open(cfg(&d2)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            assert_eq!(shard.recovery().dropped.len(), 1);
            let got = values(&shard, K, 0).await;
            assert_eq!(got, (0..9).map(|i| format!("m{i}")).collect::<Vec<_>>());
            // New data continues after the cut, and survives another restart.
            let p = shard.produce(K, batch(&["new"], 0), SYNC).unwrap();
            assert_eq!(p.base_offset, 9);
            shard.durable(&p).await.unwrap();
            shard.stop().await;
            let shard = Shard::open(cfg(&d2)).await.unwrap();
            assert!(shard.recovery().dropped.is_empty());
            assert_eq!(values(&shard, K, 9).await, vec!["new".to_string()]);
        });
    }

    #[test]
    fn retention_deletes_old_segments_and_moves_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let policy = QueuePolicy {
                sync_flush: true,
                segment_bytes: 4096,
                retention_ms: 0,
                retention_bytes: 8192,
            };
            for i in 0..100 {
                let p = shard
                    .produce(K, batch(&[&"y".repeat(500)], i), policy)
                    .unwrap();
                shard.durable(&p).await.unwrap();
            }
            let files = || segment_files(&d.join("log"));
            let files_before = files();
            let r = shard.enforce_retention(0, |_| Some(policy)).await.unwrap();
            assert!(r.segments_deleted > 5, "{r:?}");
            // The files are gone once retention returns.
            assert_eq!(files(), files_before - r.segments_deleted as usize);
            let (start, next) = shard.queue_offsets(K);
            assert!(start > 50, "start {start}");
            assert_eq!(next, 100);
            assert!(matches!(
                shard.fetch(K, 0, 1000, Duration::ZERO).await,
                Err(ShardError::OffsetOutOfRange { .. })
            ));
            assert_eq!(values(&shard, K, start).await.len() as i64, 100 - start);
            // Time retention: with 1 ms retention and a clock far ahead, every
            // sealed segment is past it.
            let by_time = QueuePolicy {
                retention_ms: 1,
                retention_bytes: 0,
                ..policy
            };
            for _ in 0..30 {
                let p = shard
                    .produce(K, batch(&[&"o".repeat(500)], 0), policy)
                    .unwrap();
                shard.durable(&p).await.unwrap();
            }
            let r = shard
                .enforce_retention(now_ms() + 60_000, |_| Some(by_time))
                .await
                .unwrap();
            assert!(r.segments_deleted > 0, "{r:?}");
            let p = shard
                .produce(K, batch(&["fresh"], now_ms()), policy)
                .unwrap();
            shard.durable(&p).await.unwrap();
            // ...but not while the data is younger than the retention time.
            let young = QueuePolicy {
                retention_ms: 3_600_000,
                ..by_time
            };
            let r = shard
                .enforce_retention(now_ms(), |_| Some(young))
                .await
                .unwrap();
            assert_eq!(r.segments_deleted, 0);
            // A deleted topic's data never holds a segment back.
            for _ in 0..30 {
                let p = shard
                    .produce(K, batch(&[&"d".repeat(500)], now_ms()), policy)
                    .unwrap();
                shard.durable(&p).await.unwrap();
            }
            let r = shard.enforce_retention(now_ms(), |_| None).await.unwrap();
            assert!(r.segments_deleted > 0);
            shard.stop().await;
            // Offsets keep counting after a restart even though the data is gone.
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let p = shard.produce(K, batch(&["z"], 0), policy).unwrap();
            assert_eq!(p.base_offset, 161);
            shard.durable(&p).await.unwrap();
            shard.stop().await;
        });
    }

    #[test]
    fn a_segment_goes_only_when_every_queue_with_data_in_it_allows() {
        with_shard(|shard| async move {
            const OTHER: QueueKey = QueueKey {
                topic_id: 2,
                queue: 0,
            };
            let small = QueuePolicy {
                sync_flush: true,
                segment_bytes: 4096,
                retention_ms: 0,
                retention_bytes: 4096,
            };
            let keep = QueuePolicy {
                retention_bytes: 0,
                ..small
            };
            let policy_of = |k: QueueKey| Some(if k == K { small } else { keep });
            let produce = |key: QueueKey, n: usize| {
                let shard = shard.clone();
                async move {
                    for i in 0..n {
                        let p = shard
                            .produce(key, batch(&[&"s".repeat(500)], i as i64), small)
                            .unwrap();
                        shard.durable(&p).await.unwrap();
                    }
                }
            };
            // OTHER's one batch, kept forever, sits in the first segment.
            produce(OTHER, 1).await;
            produce(K, 40).await;
            let r = shard.enforce_retention(0, policy_of).await.unwrap();
            assert_eq!(r.segments_deleted, 0, "OTHER holds the first segment");
            // Once OTHER's topic is gone, K's own retention decides; the
            // later segments hold nothing of OTHER's and never asked it.
            let r = shard
                .enforce_retention(0, |k| (k == K).then_some(small))
                .await
                .unwrap();
            assert!(r.segments_deleted > 3, "{r:?}");
            let (start, next) = shard.queue_offsets(K);
            assert!(start > 0 && next == 40, "{start} {next}");
            // Its shares of the deleted segments are forgotten with them.
            produce(OTHER, 1).await;
            let r = shard.enforce_retention(0, policy_of).await.unwrap();
            assert_eq!(r.segments_deleted, 0, "nothing more of K's to let go");
            shard.stop().await;
        });
    }

    #[test]
    fn idempotent_retry_is_stored_once_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let mut b = BatchBuilder::new(Compression::None).producer(99, 0, 0);
            b.push(0, None, Some(b"once"), &[]);
            let once = b.build();
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let p = shard.produce(K, once.clone(), SYNC).unwrap();
            shard.durable(&p).await.unwrap();
            let p2 = shard.produce(K, once.clone(), SYNC).unwrap();
            assert!(p2.duplicate);
            assert_eq!(p2.base_offset, 0);
            shard.stop().await;
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let p3 = shard.produce(K, once, SYNC).unwrap();
            assert!(p3.duplicate);
            assert_eq!(values(&shard, K, 0).await, vec!["once".to_string()]);
            shard.stop().await;
        });
    }

    #[test]
    fn async_produces_wait_when_the_writer_falls_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let shard = Shard::open(cfg(&d)).await.unwrap();
            let policy = ASYNC;
            let big = "b".repeat(1000 << 10);
            // No writer yet: everything stays queued.
            let mut last = None;
            for _ in 0..(UNWRITTEN_BYTES_MAX / (1000 << 10) + 2) {
                let p = shard.produce(K, batch(&[&big], 0), policy).unwrap();
                last = Some(p);
            }
            let last = last.unwrap();
            let waited = glommio::timer::timeout(Duration::from_millis(200), async {
                shard
                    .durable(&last)
                    .await
                    .map_err(|_| glommio::GlommioError::<()>::TimedOut(Duration::ZERO))
            })
            .await;
            assert!(waited.is_err(), "the ack did not wait for the backlog");
            glommio::spawn_local(shard.writer()).detach();
            shard.durable(&last).await.unwrap();
            shard.stop().await;
        });
    }

    #[test]
    fn delayed_batches_wait_for_their_time_and_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let keep = |_: QueueKey| Some(SYNC);
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let delay = |ms| ProduceOptions {
                priority: 2,
                delay_ms: ms,
            };
            let p = shard
                .produce_with(K, batch(&["late"], 0), SYNC, delay(400))
                .unwrap();
            assert_eq!(p.base_offset, -1);
            shard.durable(&p).await.unwrap();
            let p = shard.produce(K, batch(&["now"], 0), SYNC).unwrap();
            shard.durable(&p).await.unwrap();
            assert_eq!(shard.tick(now_ms(), keep).delayed_delivered, 0);
            assert_eq!(values(&shard, K, 0).await, vec!["now".to_string()]);
            // Restart before it is due: the timer comes back from the log.
            shard.stop().await;
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            assert_eq!(shard.delayed_len(), 1);
            assert_eq!(shard.tick(now_ms(), keep).delayed_delivered, 0);
            // Due 400 ms after the produce, which was before the restart; the
            // wheel rounds due times up to a tick, so allow one more.
            glommio::timer::sleep(Duration::from_millis(450)).await;
            assert_eq!(shard.tick(now_ms(), keep).delayed_delivered, 1);
            shard.stop().await;
            // Delivered once: after another restart it is in the queue, not on the wheel.
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            assert_eq!(shard.delayed_len(), 0);
            assert_eq!(
                values(&shard, K, 0).await,
                vec!["now".to_string(), "late".to_string()]
            );
            // Bad options are refused.
            assert!(shard
                .produce_with(K, batch(&["x"], 0), SYNC, delay(-1))
                .is_err());
            let high = ProduceOptions {
                priority: PRIORITY_MAX + 1,
                delay_ms: 0,
            };
            assert!(shard.produce_with(K, batch(&["x"], 0), SYNC, high).is_err());
            shard.stop().await;
        });
    }

    #[test]
    fn push_delivery_redelivers_dead_letters_and_survives_restart() {
        use crate::delivery::DeliveryConfig;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        run(move || async move {
            let cfg_push = DeliveryConfig {
                ack_timeout_ms: 100,
                max_attempts: 2,
            };
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            for (v, p) in [("low", 0u8), ("high", 3), ("mid", 1)] {
                let opts = ProduceOptions {
                    priority: p,
                    delay_ms: 0,
                };
                let p = shard.produce_with(K, batch(&[v], 0), SYNC, opts).unwrap();
                shard.durable(&p).await.unwrap();
            }
            let r = shard.receive("g", K, 10, cfg_push).unwrap();
            let order: Vec<i64> = r.handouts.iter().map(|h| h.offset).collect();
            assert_eq!(order, vec![1, 2, 0], "high, mid, low");
            assert_eq!(r.batches.len(), 3);
            // Ack "high"; leave the others: they time out and come back.
            assert_eq!(shard.ack("g", K, &[1], false, cfg_push).unwrap().0, 1);
            glommio::timer::sleep(Duration::from_millis(150)).await;
            let t = shard.tick(now_ms(), |_| Some(SYNC));
            assert_eq!(t.ack_timeouts, 2);
            let r = shard.receive("g", K, 10, cfg_push).unwrap();
            assert!(r.handouts.iter().all(|h| h.attempt == 2));
            // Reject "mid" on its last attempt: it is dead.
            let (_, dead) = shard.ack("g", K, &[2], true, cfg_push).unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].offset, 2);
            shard.save_subscriptions().await.unwrap();
            shard.stop().await;
            // After a restart, "low" (still in flight) comes back with its count.
            let shard = Shard::open(cfg(&d)).await.unwrap();
            glommio::spawn_local(shard.writer()).detach();
            let r = shard.receive("g", K, 10, cfg_push).unwrap();
            assert!(r.handouts.is_empty(), "low is out of attempts");
            assert_eq!(r.dead.len(), 1);
            assert_eq!(r.dead[0].offset, 0);
            assert_eq!(shard.subscription_state("g", K), Some((3, 0)));
            shard.save_subscriptions().await.unwrap();
            assert_eq!(shard.committed_offset("g", K), Some(3));
            shard.stop().await;
        });
    }
}
