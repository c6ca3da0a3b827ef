//! Push delivery on a shard: receive, acknowledge, and keep the state of
//! every (group, queue) subscription durable.
//!
//! `receive` hands out messages of one queue to a member of a group
//! (`delivery::Subscription` decides which: retries first, then by
//! priority) and arms an ack timeout for each on the shard's time wheel;
//! the reply carries the stored batches holding them, as stored (no copy),
//! plus the list of offsets and attempt numbers the member is to process.
//! `ack`/`nack` settle them. Messages out of attempts come back as
//! `DeadLetter`s for the node to move to the group's dead-letter topic.
//!
//! `save` writes every subscription (ack level, lane positions, settled
//! offsets, attempt counts) to `deliveries` atomically and commits each ack
//! level as the group's offset; the node calls it periodically and at
//! shutdown. After a crash, what was in flight is delivered again with its
//! attempt count — nothing is silently lost or stuck; acknowledgements after
//! the last save may be repeated (at-least-once).

use crate::delivery::{DeliveryConfig, Handout, Nacked, Subscription, SubscriptionSnapshot, LANES};
use crate::durable_file;
use crate::error::{Result, ShardError};
use crate::shard::{now_ms, Shard, Timer};
use crate::QueueKey;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Format version of the `deliveries` file.
const DELIVERIES_FILE_VERSION: u8 = 1;
/// Longest ack timeout a group may ask for: 1 hour.
pub const ACK_TIMEOUT_MS_MAX: i64 = 3_600_000;
/// Most deliveries a group may allow a message.
pub const MAX_ATTEMPTS_MAX: u32 = 1000;

/// What a receive hands out.
#[derive(Debug, Default)]
pub struct Received {
    pub handouts: Vec<Handout>,
    /// The stored batches holding the handed-out offsets, each once.
    pub batches: Vec<Bytes>,
    pub dead: Vec<DeadLetter>,
}

/// A message that used up its attempts, with the stored batch holding it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: QueueKey,
    pub offset: i64,
    pub attempts: u32,
    pub batch: Bytes,
}

fn check(cfg: DeliveryConfig) -> Result<()> {
    if !(1..=ACK_TIMEOUT_MS_MAX).contains(&cfg.ack_timeout_ms) {
        return Err(ShardError::InvalidOption(format!(
            "ack timeout must be 1..={ACK_TIMEOUT_MS_MAX} ms, not {}",
            cfg.ack_timeout_ms
        )));
    }
    if !(1..=MAX_ATTEMPTS_MAX).contains(&cfg.max_attempts) {
        return Err(ShardError::InvalidOption(format!(
            "max attempts must be 1..={MAX_ATTEMPTS_MAX}, not {}",
            cfg.max_attempts
        )));
    }
    Ok(())
}

impl Shard {
    /// Hands out up to `max` messages of `key` to a member of `group`.
    pub fn receive(
        &self,
        group: &str,
        key: QueueKey,
        max: usize,
        cfg: DeliveryConfig,
    ) -> Result<Received> {
        check(cfg)?;
        let now = now_ms();
        let group: Rc<str> = Rc::from(group);
        let queues = self.queues.borrow();
        let Some(q) = queues.get(&key) else {
            return Ok(Received::default());
        };
        let mut subs = self.subscriptions.borrow_mut();
        let sub = subs.entry((group.clone(), key)).or_insert_with(|| {
            let committed = self.offsets.borrow().get(&group, key);
            Subscription::new(
                committed
                    .unwrap_or(q.index.start_offset())
                    .max(q.index.start_offset()),
            )
        });
        let (handouts, dead) = sub.take(&q.index, self.log.end(), max, cfg, now);
        if handouts.is_empty() && dead.is_empty() {
            return Ok(Received::default());
        }
        self.subscriptions_dirty.set(true);
        let mut timers = self.timers.borrow_mut();
        for h in &handouts {
            let timer = Timer::AckTimeout {
                group: group.clone(),
                key,
                offset: h.offset,
                attempt: h.attempt,
            };
            timers.insert(h.deadline_ms.max(0) as u64, timer);
        }
        let mut seen = HashSet::new();
        let mut batches = Vec::new();
        for h in &handouts {
            if let Some(e) = q.index.entries_from(h.offset).next() {
                if seen.insert(e.batch_pos) {
                    if let Some(b) = self.log.read(e.batch_pos, e.batch_len as usize) {
                        batches.push(b);
                    }
                }
            }
        }
        let dead = self.dead_letters(&q.index, key, dead);
        Ok(Received {
            handouts,
            batches,
            dead,
        })
    }

    /// `receive`, waiting up to `wait` for something to hand out.
    pub async fn receive_wait(
        &self,
        group: &str,
        key: QueueKey,
        max: usize,
        cfg: DeliveryConfig,
        wait: Duration,
    ) -> Result<Received> {
        let deadline = Instant::now() + wait;
        loop {
            let r = self.receive(group, key, max, cfg)?;
            let now = Instant::now();
            if !r.handouts.is_empty() || !r.dead.is_empty() || now >= deadline {
                return Ok(r);
            }
            // New data wakes us; redeliveries show up within a tick.
            let nap = (deadline - now).min(Duration::from_millis(self.cfg.tick_ms.max(1)));
            let arrived = self.queue_arrived(key);
            let moved = arrived.notified();
            let _ = glommio::timer::timeout(nap, async {
                moved.await;
                Ok(())
            })
            .await;
        }
    }

    /// Settles offsets handed out to `group`: acknowledged, or rejected
    /// (`nack`: delivered again, or dead once out of attempts). Returns how
    /// many were still outstanding, and the dead letters.
    pub fn ack(
        &self,
        group: &str,
        key: QueueKey,
        offsets: &[i64],
        nack: bool,
        cfg: DeliveryConfig,
    ) -> Result<(usize, Vec<DeadLetter>)> {
        check(cfg)?;
        let mut subs = self.subscriptions.borrow_mut();
        let Some(sub) = subs.get_mut(&(Rc::from(group), key)) else {
            return Ok((0, Vec::new()));
        };
        let mut settled = 0;
        let mut dead = Vec::new();
        for &o in offsets {
            if nack {
                match sub.nack(o, cfg) {
                    Nacked::Dead(d) => {
                        settled += 1;
                        dead.push(d);
                    }
                    Nacked::Retry => settled += 1,
                    Nacked::NotOut => {}
                }
            } else if sub.ack(o) {
                settled += 1;
            }
        }
        self.subscriptions_dirty.set(true);
        drop(subs);
        let queues = self.queues.borrow();
        let dead = match queues.get(&key) {
            Some(q) => self.dead_letters(&q.index, key, dead),
            None => Vec::new(),
        };
        Ok((settled, dead))
    }

    fn dead_letters(
        &self,
        index: &crate::consume_queue::ConsumeQueue,
        key: QueueKey,
        dead: Vec<crate::delivery::Dead>,
    ) -> Vec<DeadLetter> {
        dead.into_iter()
            .filter_map(|d| {
                let e = index.entries_from(d.offset).next()?;
                let batch = self.log.read(e.batch_pos, e.batch_len as usize)?;
                Some(DeadLetter {
                    key,
                    offset: d.offset,
                    attempts: d.attempts,
                    batch,
                })
            })
            .collect()
    }

    /// Writes the subscriptions if they changed, and commits each ack level
    /// as its group's offset.
    pub async fn save_subscriptions(&self) -> Result<()> {
        if !self.subscriptions_dirty.replace(false) {
            return Ok(());
        }
        let _permit = self.offsets_lock.acquire_permit(1).await;
        let (file, updates) = {
            let subs = self.subscriptions.borrow();
            let offsets = self.offsets.borrow();
            let updates: Vec<(String, QueueKey, i64)> = subs
                .iter()
                .filter(|((g, k), s)| offsets.get(g, *k) != Some(s.ack_level()))
                .map(|((g, k), s)| (g.to_string(), *k, s.ack_level()))
                .collect();
            (encode(&subs), updates)
        };
        let result = async {
            durable_file::write_atomic(&self.cfg.dir.join("deliveries"), &file).await?;
            if !updates.is_empty() {
                let (path, snapshot) = self.offsets.borrow().preview_all(&updates);
                durable_file::write_atomic(&path, &snapshot).await?;
                // Visible to FetchOffset only once durable.
                let mut offsets = self.offsets.borrow_mut();
                for (g, k, o) in &updates {
                    offsets.set(g, *k, *o);
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // Try again at the next save.
            self.subscriptions_dirty.set(true);
        }
        result
    }

    /// Push-delivery state of `group` on `key`: (ack level, messages in flight).
    pub fn subscription_state(&self, group: &str, key: QueueKey) -> Option<(i64, usize)> {
        self.subscriptions
            .borrow()
            .get(&(Rc::from(group), key))
            .map(|s| (s.ack_level(), s.in_flight()))
    }
}

type Subscriptions = HashMap<(Rc<str>, QueueKey), Subscription>;

fn encode(subs: &Subscriptions) -> Vec<u8> {
    let mut out = vec![DELIVERIES_FILE_VERSION];
    out.extend_from_slice(&(subs.len() as u32).to_be_bytes());
    for ((group, key), sub) in subs {
        let s = sub.snapshot();
        out.extend_from_slice(&(group.len() as u16).to_be_bytes());
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&key.topic_id.to_be_bytes());
        out.extend_from_slice(&key.queue.to_be_bytes());
        out.extend_from_slice(&s.ack_level.to_be_bytes());
        for l in s.lane_next {
            out.extend_from_slice(&l.to_be_bytes());
        }
        out.extend_from_slice(&(s.done_above.len() as u32).to_be_bytes());
        for d in &s.done_above {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(&(s.attempts.len() as u32).to_be_bytes());
        for (o, a) in &s.attempts {
            out.extend_from_slice(&o.to_be_bytes());
            out.extend_from_slice(&a.to_be_bytes());
        }
    }
    out
}

/// Loads the `deliveries` file of a shard directory (absent = none).
pub(crate) fn load(dir: &Path) -> Result<Subscriptions> {
    let path = dir.join("deliveries");
    let Some(data) = durable_file::read_checked(&path)? else {
        return Ok(HashMap::new());
    };
    decode(&data).ok_or_else(|| ShardError::CorruptFile {
        path: path.display().to_string(),
        reason: "undecodable push-delivery state".into(),
    })
}

fn decode(data: &[u8]) -> Option<Subscriptions> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let u32_of = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let i64_of = |b: &[u8]| i64::from_be_bytes(b.try_into().expect("8 bytes"));
    if take(1)?[0] != DELIVERIES_FILE_VERSION {
        return None;
    }
    let count = u32_of(take(4)?);
    let mut subs = HashMap::new();
    for _ in 0..count {
        let glen = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
        let group: Rc<str> = Rc::from(std::str::from_utf8(take(glen)?).ok()?);
        let key = QueueKey {
            topic_id: u32_of(take(4)?),
            queue: u32_of(take(4)?),
        };
        let ack_level = i64_of(take(8)?);
        let mut lane_next = [0i64; LANES];
        for l in &mut lane_next {
            *l = i64_of(take(8)?);
        }
        let n = u32_of(take(4)?) as usize;
        let mut done_above = Vec::with_capacity(n.min(data.len() / 8));
        for _ in 0..n {
            done_above.push(i64_of(take(8)?));
        }
        let n = u32_of(take(4)?) as usize;
        let mut attempts = Vec::with_capacity(n.min(data.len() / 12));
        for _ in 0..n {
            attempts.push((i64_of(take(8)?), u32_of(take(4)?)));
        }
        let snap = SubscriptionSnapshot {
            ack_level,
            lane_next,
            done_above,
            attempts,
        };
        subs.insert((group, key), Subscription::restore(&snap));
    }
    Some(subs)
}
