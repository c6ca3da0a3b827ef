//! Time: one clock for the whole run, and the open-loop send schedule.
//!
//! Latency is measured from when a message was *meant* to be sent, not from
//! when the producer got round to it (no coordinated omission): with a rate,
//! producer message `k` is due at `start + k / rate`, fixed before the run
//! begins. A producer that falls behind — the broker slowed down, the
//! connection's socket buffer filled — does not skip or re-base: it sends
//! every overdue message at once, and their latencies (counted from the
//! schedule) show the stall. With no rate (closed loop) a message's intended
//! time is simply when it is created, which hides such stalls; reports say
//! which mode a run used.
//!
//! [`Clock`] gives nanoseconds since the UNIX epoch that are monotonic
//! within the process (an `Instant` anchored once to the wall clock), so the
//! timestamp a producer writes into a payload and the time a consumer reads
//! it are on the same scale and never go backwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::PerfError;

/// Nanoseconds per second.
pub const NANOS_PER_SEC: f64 = 1e9;

/// Monotonic nanoseconds since the UNIX epoch, shared by every thread of a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

impl Clock {
    /// Anchors a monotonic clock to the current wall-clock time.
    pub fn new() -> Result<Clock, PerfError> {
        let base = Instant::now();
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| PerfError::Clock)?;
        Ok(Clock {
            base,
            base_unix_ns: u64::try_from(since_epoch.as_nanos()).map_err(|_| PerfError::Clock)?,
        })
    }

    /// Now, in nanoseconds since the UNIX epoch.
    pub fn now_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.base_unix_ns.saturating_add(elapsed)
    }

    /// Sleeps until `target_ns` (returns at once if it has passed).
    pub fn sleep_until(&self, target_ns: u64) {
        let now = self.now_ns();
        if target_ns > now {
            std::thread::sleep(Duration::from_nanos(target_ns - now));
        }
    }
}

/// When producers stop: no message intended at or after it is sent. Shared
/// by the producers and the main thread, which moves it when the run's
/// length depends on what happens (a backlog run lasts until consumers
/// have caught up).
#[derive(Debug, Clone)]
pub struct EndTime(Arc<AtomicU64>);

impl EndTime {
    pub fn new(end_ns: u64) -> EndTime {
        EndTime(Arc::new(AtomicU64::new(end_ns)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, end_ns: u64) {
        self.0.store(end_ns, Ordering::Relaxed);
    }
}

/// The intended send times of one producer: `start + k / rate`, `k = 0, 1, ...`.
#[derive(Debug, Clone)]
pub struct Schedule {
    start_ns: u64,
    interval_ns: f64,
    next: u64,
}

impl Schedule {
    /// A schedule of `rate_per_s` (> 0) messages per second from `start_ns`.
    pub fn new(start_ns: u64, rate_per_s: f64) -> Schedule {
        debug_assert!(rate_per_s > 0.0);
        Schedule {
            start_ns,
            interval_ns: NANOS_PER_SEC / rate_per_s,
            next: 0,
        }
    }

    /// The schedule of producer `index` of `count` sharing an aggregate rate:
    /// each sends `rate / count` per second, offset by `index / rate` so the
    /// producers' sends interleave evenly rather than arriving in bursts.
    pub fn staggered(start_ns: u64, aggregate_rate: f64, index: u64, count: u64) -> Schedule {
        let offset_ns = (index as f64 * NANOS_PER_SEC / aggregate_rate).round() as u64;
        Schedule::new(start_ns + offset_ns, aggregate_rate / count.max(1) as f64)
    }

    /// Intended send time of message `k`. Computed from `k`, not by adding
    /// intervals, so rounding never accumulates into drift.
    pub fn intended_ns(&self, k: u64) -> u64 {
        self.start_ns + (k as f64 * self.interval_ns).round() as u64
    }

    /// Intended send time of the next message.
    pub fn peek(&self) -> u64 {
        self.intended_ns(self.next)
    }

    /// Takes the next message: returns its intended time and moves on. Never
    /// skips a message, however late the caller is.
    pub fn advance(&mut self) -> u64 {
        let t = self.peek();
        self.next += 1;
        t
    }
}

/// How a producer decides when to send its next message.
#[derive(Debug, Clone)]
pub enum Pacing {
    /// Open loop: follow the schedule.
    Open(Schedule),
    /// Closed loop: as fast as the pipelining window allows; a message's
    /// intended time is when it is created.
    Closed,
}

impl Pacing {
    /// Intended time of the next message, given the current time.
    pub fn next_due(&self, now_ns: u64) -> u64 {
        match self {
            Pacing::Open(s) => s.peek(),
            Pacing::Closed => now_ns,
        }
    }

    /// Takes the next message; returns its intended time.
    pub fn take(&mut self, now_ns: u64) -> u64 {
        match self {
            Pacing::Open(s) => s.advance(),
            Pacing::Closed => now_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn intended_times_are_spaced_one_over_rate() {
        let start = 1_000 * MS;
        let mut s = Schedule::new(start, 1000.0);
        let times: Vec<u64> = (0..5).map(|_| s.advance()).collect();
        assert_eq!(
            times,
            [
                start,
                start + MS,
                start + 2 * MS,
                start + 3 * MS,
                start + 4 * MS
            ]
        );
        // A rate that does not divide a second evenly does not drift.
        let s = Schedule::new(0, 3.0);
        assert_eq!(s.intended_ns(3), 1_000_000_000);
        assert_eq!(s.intended_ns(3_000_000), 1_000_000 * 1_000_000_000);
        assert_eq!(s.intended_ns(1), 333_333_333);
    }

    #[test]
    fn a_late_producer_never_skips() {
        let start = 50 * MS;
        let mut s = Schedule::new(start, 1000.0);
        // The producer wakes 10.5 ms late: eleven messages are due, and
        // every one of them is sent now, each keeping its own intended time.
        let now = start + 10 * MS + MS / 2;
        let mut sent = Vec::new();
        while s.peek() <= now {
            sent.push(s.advance());
        }
        assert_eq!(sent.len(), 11);
        for (k, t) in sent.iter().enumerate() {
            assert_eq!(*t, start + k as u64 * MS);
        }
        // The next one is back on the original grid, not re-based on `now`.
        assert_eq!(s.peek(), start + 11 * MS);
        // Through Pacing too: a late caller gets the scheduled time, not now.
        let mut p = Pacing::Open(Schedule::new(start, 1000.0));
        assert_eq!(p.take(now), start);
        assert_eq!(p.take(now), start + MS);
        assert_eq!(p.next_due(now), start + 2 * MS);
    }

    #[test]
    fn early_producer_waits_for_the_schedule() {
        let mut s = Schedule::new(10 * MS, 100.0);
        assert_eq!(s.peek(), 10 * MS);
        s.advance();
        assert_eq!(s.peek(), 20 * MS);
    }

    #[test]
    fn staggered_producers_interleave_evenly() {
        // Four producers sharing 4000 msg/s: together, one message every 250 µs.
        let mut all: Vec<u64> = (0..4)
            .flat_map(|i| {
                let s = Schedule::staggered(0, 4000.0, i, 4);
                (0..10).map(move |k| s.intended_ns(k))
            })
            .collect();
        all.sort_unstable();
        for (k, t) in all.iter().enumerate() {
            assert_eq!(*t, k as u64 * 250_000);
        }
    }

    #[test]
    fn closed_loop_intends_now() {
        let mut p = Pacing::Closed;
        assert_eq!(p.next_due(77), 77);
        assert_eq!(p.take(78), 78);
        let mut p = Pacing::Open(Schedule::new(5, 1.0));
        assert_eq!(p.next_due(1_000_000_000_000), 5);
        assert_eq!(p.take(1_000_000_000_000), 5);
    }

    #[test]
    fn end_time_is_shared() {
        let e = EndTime::new(5);
        let seen_by_producer = e.clone();
        e.set(9);
        assert_eq!(seen_by_producer.get(), 9);
    }

    #[test]
    fn clock_is_monotonic_and_near_wall_time() {
        let c = Clock::new().unwrap();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(wall.abs_diff(a) < 60 * 1_000 * MS);
    }
}
