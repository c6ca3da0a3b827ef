//! A tiny in-memory broker for the client's tests (compiled only under
//! `cfg(test)`): one thread per connection, requests answered in order, the
//! idempotent-producer sequence check, committed offsets, topic growth,
//! consumer groups (the broker's own `GroupCoordinator`, expiring sessions
//! on every request), produce options (priority, delay: a delayed batch is
//! held and stored when due, checked on every request), push delivery (the
//! broker's own `delivery::Subscription` per group and queue, ack timeouts
//! checked on every request, dead letters recorded rather than produced),
//! and knobs to inject faults (drop a connection after storing a batch,
//! reject a queue's produces, move a queue's log start, forget every group
//! member).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use coremq_shards::batch::{set_base_offset, split_batches, BatchHeader};
use coremq_shards::consume_queue::{ConsumeQueue, IndexEntry};
use coremq_shards::delivery::{Dead, DeliveryConfig, Subscription};
use coremq_shards::segment::PRIORITY_MAX;
use coremq_shards::shard::{ProduceOptions, DELAY_MS_MAX};

use crate::protocol::frame::{parse_request, put_response_header};
use crate::protocol::messages::{encode_error, encode_reply};
use crate::protocol::{
    Assignment, ErrorCode, ErrorReply, Flush, GroupInfo, GroupOffset, MemberInfo, QueueInfo, Reply,
    Request, TopicInfo, TopicSpec,
};
use coremq_shards::group_coordinator::GroupCoordinator;

/// Poll interval of a fetch or receive waiting for data.
const FETCH_WAIT_STEP: Duration = Duration::from_millis(2);

/// The response frame answering request `request_id` with `resp`.
pub(crate) fn reply_frame(request_id: u32, resp: &Result<Reply, ErrorReply>) -> BytesMut {
    let mut body = BytesMut::new();
    let code = match resp {
        Ok(r) => {
            for extra in encode_reply(r, &mut body) {
                body.extend_from_slice(&extra);
            }
            0
        }
        Err(e) => {
            encode_error(e, &mut body);
            e.code as u16
        }
    };
    let mut out = BytesMut::new();
    put_response_header(&mut out, request_id, code, body.len());
    out.extend_from_slice(&body);
    out
}

#[derive(Default)]
struct Queue {
    /// (base offset, stored bytes)
    batches: Vec<(i64, Bytes)>,
    /// The same batches as the broker indexes them (position = batch number).
    index: ConsumeQueue,
    next_offset: i64,
    log_start: i64,
    /// (producer id) -> (next expected sequence, base offsets by base sequence)
    producers: HashMap<i64, (i32, HashMap<i32, i64>)>,
    /// Delayed batches not due yet: (due, priority, batch).
    delayed: Vec<(Instant, u8, Bytes)>,
}

impl Queue {
    /// Stores a batch at the end of the queue; returns its base offset.
    fn store(&mut self, batch: &[u8], priority: u8) -> i64 {
        let h = BatchHeader::parse(batch).expect("validated before");
        let base = self.next_offset;
        let mut raw = batch.to_vec();
        set_base_offset(&mut raw, base);
        self.index.push(IndexEntry {
            base_offset: base,
            batch_pos: self.batches.len() as u64,
            batch_len: 1,
            record_count: h.records_count as u32,
            priority,
        });
        self.batches.push((base, Bytes::from(raw)));
        self.next_offset += i64::from(h.records_count);
        base
    }
}

/// A group's push-delivery state on one queue.
struct PushSub {
    sub: Subscription,
    /// Ack deadlines: (deadline ms, offset, attempt).
    timers: Vec<(i64, i64, u32)>,
}

/// A message that used up its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub group: String,
    pub queue: u32,
    pub offset: i64,
    pub attempts: u32,
}

fn wall_ms() -> i64 {
    coremq_shards::shard::now_ms()
}

#[derive(Default)]
pub(crate) struct State {
    topic: Option<TopicSpec>,
    queues: Vec<Queue>,
    offsets: HashMap<(String, u32), i64>,
    /// Store the next N produce requests, then close the connection unanswered.
    pub drop_after_store: u32,
    /// Store the next N produce requests and never answer them (connection stays open).
    pub swallow_after_store: u32,
    /// Reject every produce to this queue with MESSAGE_TOO_LARGE.
    pub reject_queue: Option<u32>,
    pub produce_requests: u64,
    /// Per produce request: its queue, and its options (`None`: a plain Produce).
    pub produce_options: Vec<(u32, Option<ProduceOptions>)>,
    /// Messages dead-lettered by push delivery.
    pub dead_letters: Vec<DeadLetter>,
    subs: HashMap<(String, u32), PushSub>,
    /// Set by a produce that is to be swallowed, read by its connection.
    swallow_now: bool,
    groups: GroupCoordinator,
}

#[derive(Clone)]
pub(crate) struct FakeBroker {
    pub addr: String,
    state: Arc<Mutex<State>>,
}

impl FakeBroker {
    /// Starts a broker with one topic of `queues` queues.
    pub fn start(topic: &str, queues: u32) -> FakeBroker {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State {
            topic: Some(TopicSpec {
                name: topic.into(),
                queues,
                flush: Flush::Async,
                segment_bytes: 0,
                retention_ms: 0,
                retention_bytes: 0,
            }),
            queues: (0..queues).map(|_| Queue::default()).collect(),
            ..State::default()
        }));
        let s = Arc::clone(&state);
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                let s = Arc::clone(&s);
                thread::spawn(move || serve(conn, s));
            }
        });
        FakeBroker { addr, state }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Every stored record value of a queue, in offset order.
    pub fn values(&self, queue: u32) -> Vec<(i64, Bytes)> {
        let st = self.state();
        let mut out = Vec::new();
        for (_, b) in &st.queues[queue as usize].batches {
            let (_, recs) = coremq_shards::batch::decode_records(b).unwrap();
            out.extend(recs.into_iter().map(|r| (r.offset, r.value.unwrap())));
        }
        out
    }

    pub fn set_log_start(&self, queue: u32, start: i64) {
        self.state().queues[queue as usize].log_start = start;
    }

    /// Forgets every group member, as a broker restart does.
    pub fn forget_members(&self) {
        self.state().groups = GroupCoordinator::default();
    }
}

/// Answers the group apis (sessions are expired first).
fn answer_group(st: &mut State, req: Request) -> Result<Reply, ErrorReply> {
    let now = Instant::now();
    st.groups.expire(now);
    let queues = st.queues.len() as u32;
    match req {
        Request::JoinGroup(j) => {
            if st.topic.as_ref().is_none_or(|t| t.name != j.topic) {
                return Err(ErrorReply::new(ErrorCode::UnknownTopic, "no such topic"));
            }
            let a = st
                .groups
                .join(j.to_join(queues), now)
                .map_err(ErrorReply::from)?;
            Ok(Reply::Assignment(Assignment::of(&j.group, a)))
        }
        Request::Heartbeat(m) => {
            let a = st
                .groups
                .heartbeat(&m.group, &m.member_id, queues, now)
                .map_err(ErrorReply::from)?;
            Ok(Reply::Assignment(Assignment::of(&m.group, a)))
        }
        Request::LeaveGroup(m) => {
            st.groups
                .leave(&m.group, &m.member_id)
                .map_err(ErrorReply::from)?;
            Ok(Reply::Done)
        }
        Request::DescribeGroup { group } => {
            let Some(v) = st.groups.describe(&group, now) else {
                return Err(ErrorReply::new(ErrorCode::UnknownMember, "no such group"));
            };
            let offsets = (0..queues)
                .map(|q| {
                    let committed = st.offsets.get(&(group.clone(), q)).copied().unwrap_or(-1);
                    let end = st.queues[q as usize].next_offset;
                    GroupOffset {
                        member_id: String::new(),
                        queue: q,
                        committed,
                        end_offset: end,
                        lag: end - committed.max(st.queues[q as usize].log_start),
                    }
                })
                .collect();
            Ok(Reply::Group(GroupInfo {
                group,
                topic: v.topic,
                strategy: v.strategy,
                broadcast: v.broadcast,
                generation: v.generation,
                members: v
                    .members
                    .into_iter()
                    .map(|(member_id, queues, ago)| MemberInfo {
                        member_id,
                        queues,
                        last_heartbeat_ms_ago: ago.as_millis() as u64,
                    })
                    .collect(),
                offsets,
            }))
        }
        Request::ListGroups => {
            let mut names = st.groups.groups();
            names.extend(st.offsets.keys().map(|(g, _)| g.clone()));
            names.sort();
            names.dedup();
            Ok(Reply::Groups(names))
        }
        other => Err(ErrorReply::new(
            ErrorCode::Internal,
            format!("{:?} is not a group request", other.api()),
        )),
    }
}

fn serve(mut s: TcpStream, state: Arc<Mutex<State>>) {
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        let Ok((h, body)) = parse_request(Bytes::from(body)) else {
            return;
        };
        let Ok(req) = Request::decode_versioned(h.api, h.api_version, body) else {
            return;
        };
        let (resp, hang_up) = answer(&state, req);
        if hang_up {
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        if resp.is_ok() && std::mem::take(&mut state.lock().unwrap().swallow_now) {
            continue;
        }
        let out = reply_frame(h.request_id, &resp);
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

fn err(code: ErrorCode, msg: &str) -> Result<Reply, ErrorReply> {
    Err(ErrorReply::new(code, msg))
}

fn topic_info(st: &State) -> TopicInfo {
    let spec = st.topic.clone().unwrap();
    TopicInfo {
        queues: st
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueInfo {
                queue: i as u32,
                shard: i as u32 % 2,
                shard_port: 0,
                start_offset: q.log_start,
                end_offset: q.next_offset,
            })
            .collect(),
        spec,
        id: 1,
    }
}

/// Returns the response, and whether to close the connection instead of answering.
fn answer(state: &Mutex<State>, req: Request) -> (Result<Reply, ErrorReply>, bool) {
    let topic_ok = |st: &State, t: &str| st.topic.as_ref().is_some_and(|s| s.name == t);
    state.lock().unwrap().tick();
    let (req, options) = match req {
        Request::ProduceWith {
            topic,
            queue,
            options,
            batch,
        } => (
            Request::Produce {
                topic,
                queue,
                batch,
            },
            Some(options),
        ),
        other => (other, None),
    };
    match req {
        Request::DescribeTopic { name } => {
            let st = state.lock().unwrap();
            if !topic_ok(&st, &name) {
                return (err(ErrorCode::UnknownTopic, "no such topic"), false);
            }
            (Ok(Reply::Topic(topic_info(&st))), false)
        }
        Request::ListTopics => {
            let st = state.lock().unwrap();
            (Ok(Reply::Topics(vec![topic_info(&st)])), false)
        }
        Request::CreateTopic(spec) => {
            let mut st = state.lock().unwrap();
            st.queues = (0..spec.queues).map(|_| Queue::default()).collect();
            st.topic = Some(spec);
            (Ok(Reply::Topic(topic_info(&st))), false)
        }
        Request::DeleteTopic { name } => {
            let mut st = state.lock().unwrap();
            if !topic_ok(&st, &name) {
                return (err(ErrorCode::UnknownTopic, "no such topic"), false);
            }
            st.topic = None;
            (Ok(Reply::Done), false)
        }
        Request::JoinGroup(_)
        | Request::Heartbeat(_)
        | Request::LeaveGroup(_)
        | Request::DescribeGroup { .. }
        | Request::ListGroups => (answer_group(&mut state.lock().unwrap(), req), false),
        Request::AlterTopic(a) => {
            let mut st = state.lock().unwrap();
            if !topic_ok(&st, &a.name) {
                return (err(ErrorCode::UnknownTopic, "no such topic"), false);
            }
            if a.queues as usize <= st.queues.len() {
                return (err(ErrorCode::InvalidRequest, "topics only grow"), false);
            }
            st.queues.resize_with(a.queues as usize, Queue::default);
            if let Some(spec) = st.topic.as_mut() {
                spec.queues = a.queues;
            }
            (Ok(Reply::Topic(topic_info(&st))), false)
        }
        Request::Produce {
            topic,
            queue,
            batch,
        } => {
            let mut st = state.lock().unwrap();
            st.produce_requests += 1;
            st.produce_options.push((queue, options));
            if !topic_ok(&st, &topic) {
                return (err(ErrorCode::UnknownTopic, "no such topic"), false);
            }
            let opts = options.unwrap_or_default();
            if opts.priority > PRIORITY_MAX || !(0..=DELAY_MS_MAX).contains(&opts.delay_ms) {
                return (err(ErrorCode::InvalidRequest, "bad produce options"), false);
            }
            if st.reject_queue == Some(queue) {
                return (err(ErrorCode::MessageTooLarge, "rejected"), false);
            }
            let hang_up = if st.drop_after_store > 0 {
                st.drop_after_store -= 1;
                true
            } else {
                false
            };
            if st.swallow_after_store > 0 {
                st.swallow_after_store -= 1;
                st.swallow_now = true;
            }
            let Some(q) = st.queues.get_mut(queue as usize) else {
                return (err(ErrorCode::UnknownQueue, "no such queue"), false);
            };
            let Ok(h) = BatchHeader::parse(&batch) else {
                return (err(ErrorCode::CorruptBatch, "bad batch"), false);
            };
            if h.producer_id >= 0 {
                let (expected, seen) = q.producers.entry(h.producer_id).or_default();
                if h.base_sequence < *expected {
                    let base = seen.get(&h.base_sequence).copied().unwrap_or(-1);
                    return (
                        Ok(Reply::Produce {
                            base_offset: base,
                            duplicate: true,
                        }),
                        hang_up,
                    );
                }
                if h.base_sequence > *expected {
                    return (err(ErrorCode::OutOfOrderSequence, "gap"), hang_up);
                }
                *expected += h.records_count;
                let base = if opts.delay_ms > 0 { -1 } else { q.next_offset };
                seen.insert(h.base_sequence, base);
            }
            if opts.delay_ms > 0 {
                let due = Instant::now() + Duration::from_millis(opts.delay_ms as u64);
                q.delayed.push((due, opts.priority, batch));
                return (
                    Ok(Reply::Produce {
                        base_offset: -1,
                        duplicate: false,
                    }),
                    hang_up,
                );
            }
            let base = q.store(&batch, opts.priority);
            (
                Ok(Reply::Produce {
                    base_offset: base,
                    duplicate: false,
                }),
                hang_up,
            )
        }
        Request::Fetch {
            topic,
            queue,
            offset,
            max_bytes,
            max_wait_ms,
        } => {
            let until = Instant::now() + Duration::from_millis(u64::from(max_wait_ms));
            loop {
                {
                    let st = state.lock().unwrap();
                    if !topic_ok(&st, &topic) {
                        return (err(ErrorCode::UnknownTopic, "no such topic"), false);
                    }
                    let Some(q) = st.queues.get(queue as usize) else {
                        return (err(ErrorCode::UnknownQueue, "no such queue"), false);
                    };
                    if offset < q.log_start || offset > q.next_offset {
                        let mut e = ErrorReply::new(ErrorCode::OffsetOutOfRange, "out of range");
                        e.offsets = Some((q.log_start, q.next_offset));
                        return (Err(e), false);
                    }
                    let mut data = BytesMut::new();
                    for (base, b) in &q.batches {
                        let h = BatchHeader::parse(b).unwrap();
                        if *base + i64::from(h.last_offset_delta) < offset {
                            continue;
                        }
                        if !data.is_empty() && data.len() + b.len() > max_bytes as usize {
                            break;
                        }
                        data.extend_from_slice(b);
                    }
                    if !data.is_empty() || Instant::now() >= until {
                        debug_assert!(split_batches(&data).all(|b| b.is_ok()));
                        return (
                            Ok(Reply::Fetch {
                                log_start: q.log_start,
                                next_offset: q.next_offset,
                                batches: vec![data.freeze()],
                            }),
                            false,
                        );
                    }
                }
                thread::sleep(FETCH_WAIT_STEP);
            }
        }
        Request::CommitOffset {
            group,
            queue,
            offset,
            ..
        } => {
            state.lock().unwrap().offsets.insert((group, queue), offset);
            (Ok(Reply::Done), false)
        }
        Request::FetchOffset { group, queue, .. } => {
            let st = state.lock().unwrap();
            let o = st.offsets.get(&(group, queue)).copied().unwrap_or(-1);
            (Ok(Reply::Offset(o)), false)
        }
        Request::Metadata => (
            Ok(Reply::Metadata(crate::protocol::NodeInfo {
                shards: 2,
                shard_ports: vec![0, 0],
                max_message_bytes: 1 << 20,
                max_frame_bytes: 16 << 20,
            })),
            false,
        ),
        Request::Receive(r) => {
            let until = Instant::now() + Duration::from_millis(u64::from(r.max_wait_ms));
            let cfg = DeliveryConfig {
                ack_timeout_ms: i64::from(r.ack_timeout_ms),
                max_attempts: r.max_attempts,
            };
            loop {
                {
                    let mut st = state.lock().unwrap();
                    st.tick();
                    if !topic_ok(&st, &r.topic) {
                        return (err(ErrorCode::UnknownTopic, "no such topic"), false);
                    }
                    if r.queue as usize >= st.queues.len() {
                        return (err(ErrorCode::UnknownQueue, "no such queue"), false);
                    }
                    let st = &mut *st;
                    let q = &st.queues[r.queue as usize];
                    let committed = st.offsets.get(&(r.group.clone(), r.queue)).copied();
                    let ps = st
                        .subs
                        .entry((r.group.clone(), r.queue))
                        .or_insert_with(|| PushSub {
                            sub: Subscription::new(committed.unwrap_or(q.log_start)),
                            timers: Vec::new(),
                        });
                    let now = wall_ms();
                    let (handouts, dead) =
                        ps.sub
                            .take(&q.index, u64::MAX, r.max_messages.max(1) as usize, cfg, now);
                    for h in &handouts {
                        ps.timers.push((h.deadline_ms, h.offset, h.attempt));
                    }
                    let ack_level = ps.sub.ack_level();
                    st.offsets.insert((r.group.clone(), r.queue), ack_level);
                    st.bury(&r.group, r.queue, dead);
                    if !handouts.is_empty() || Instant::now() >= until {
                        let q = &st.queues[r.queue as usize];
                        let mut data = BytesMut::new();
                        let mut taken = Vec::new();
                        for h in &handouts {
                            let i = q.index.entries_from(h.offset).next().map(|e| e.batch_pos);
                            if let Some(i) = i.filter(|i| !taken.contains(i)) {
                                taken.push(i);
                                data.extend_from_slice(&q.batches[i as usize].1);
                            }
                        }
                        return (
                            Ok(Reply::Delivery {
                                messages: handouts.iter().map(|h| (h.offset, h.attempt)).collect(),
                                batches: vec![data.freeze()],
                            }),
                            false,
                        );
                    }
                }
                thread::sleep(FETCH_WAIT_STEP);
            }
        }
        Request::Ack(a) => {
            let mut st = state.lock().unwrap();
            let cfg = DeliveryConfig {
                ack_timeout_ms: i64::from(a.ack_timeout_ms),
                max_attempts: a.max_attempts,
            };
            let Some(ps) = st.subs.get_mut(&(a.group.clone(), a.queue)) else {
                return (Ok(Reply::Settled(0)), false);
            };
            let mut settled = 0;
            let mut dead = Vec::new();
            for &o in &a.offsets {
                if a.nack {
                    match ps.sub.nack(o, cfg) {
                        coremq_shards::delivery::Nacked::Dead(d) => {
                            dead.push(d);
                            settled += 1;
                        }
                        coremq_shards::delivery::Nacked::Retry => settled += 1,
                        coremq_shards::delivery::Nacked::NotOut => {}
                    }
                } else if ps.sub.ack(o) {
                    settled += 1;
                }
            }
            let ack_level = ps.sub.ack_level();
            st.offsets.insert((a.group.clone(), a.queue), ack_level);
            st.bury(&a.group, a.queue, dead);
            (Ok(Reply::Settled(settled)), false)
        }
        // Apis the client tests do not use.
        #[allow(unreachable_patterns)]
        other => (
            err(
                ErrorCode::UnknownApi,
                &format!("the fake broker does not serve {:?}", other.api()),
            ),
            false,
        ),
    }
}

impl State {
    pub fn committed(&self, group: &str, queue: u32) -> Option<i64> {
        self.offsets.get(&(group.to_string(), queue)).copied()
    }

    /// Stores delayed batches that came due and expires ack timeouts.
    fn tick(&mut self) {
        let now = Instant::now();
        for q in &mut self.queues {
            let (due, waiting): (Vec<_>, Vec<_>) =
                q.delayed.drain(..).partition(|(at, _, _)| *at <= now);
            q.delayed = waiting;
            for (_, priority, batch) in due {
                q.store(&batch, priority);
            }
        }
        let now_ms = wall_ms();
        for ps in self.subs.values_mut() {
            let (fired, waiting): (Vec<_>, Vec<_>) = ps
                .timers
                .drain(..)
                .partition(|(deadline, _, _)| *deadline <= now_ms);
            ps.timers = waiting;
            for (_, offset, attempt) in fired {
                ps.sub.expire(offset, attempt);
            }
        }
    }

    fn bury(&mut self, group: &str, queue: u32, dead: Vec<Dead>) {
        self.dead_letters
            .extend(dead.into_iter().map(|d| DeadLetter {
                group: group.to_string(),
                queue,
                offset: d.offset,
                attempts: d.attempts,
            }));
    }

    /// Delayed batches of `queue` not due yet.
    pub fn delayed(&self, queue: u32) -> usize {
        self.queues[queue as usize].delayed.len()
    }
}
