//! Catch-up reads: OpenMessaging Benchmark's `consumerBacklogSizeGB`.
//!
//! As in OMB, consumers are paused while producers run at their rate until
//! the backlog — payload bytes acked and not yet consumed, summed over the
//! subscriptions — reaches the requested size; then consumers start, and
//! the producers keep going at their rate while the consumers drain the
//! backlog. The catch-up ends when what is left is at most
//! [`caught_up_messages`] (OMB drains to 1,000 messages). What it measures
//! is the consumers' read rate during that phase: backlog drained per
//! second plus the produce rate.
//!
//! Where this differs from OMB, for runs of seconds rather than hours:
//! - the build phase lasts at most the workload's duration: if the backlog
//!   is not reached by then, consumers start with what there is (the report
//!   says how much);
//! - the catch-up lasts at most the workload's duration too (then
//!   `catch_up_complete` is false and the figures cover what was read);
//! - the producers stop when the catch-up ends or the duration has passed
//!   since the start, whichever is later (OMB then runs a whole further
//!   test duration). Publish rates and latencies cover that whole window;
//!   end-to-end latency includes the time messages waited in the backlog.
//!
//! [`Backlog`] is the phase logic alone (the counts in, what to do out),
//! driven by `run::supervise`.

use serde::Serialize;

use crate::schedule::NANOS_PER_SEC;
use crate::stats::BYTES_PER_MB;

/// Fewest messages left that count as caught up (OMB's threshold).
pub const CAUGHT_UP_MESSAGES_MIN: u64 = 1_000;
/// Messages left that count as caught up also include what producers send
/// in this long (a consumer that keeps up still trails by its fetch round
/// trip).
pub const CAUGHT_UP_SLACK_S: f64 = 0.01;

/// Messages left (over all subscriptions) at which the catch-up is over.
pub fn caught_up_messages(producer_rate: f64, subscriptions: u32) -> u64 {
    let slack = (producer_rate * CAUGHT_UP_SLACK_S).ceil() as u64 * u64::from(subscriptions);
    CAUGHT_UP_MESSAGES_MIN.max(slack)
}

/// Counts the phases are decided on, summed over the run's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub acked: u64,
    pub acked_bytes: u64,
    pub consumed: u64,
    pub consumed_bytes: u64,
}

/// What the main thread must do after a [`Backlog::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Start the consumers now.
    StartConsumers,
    /// The catch-up is over (or gave up): producers may stop.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Building,
    CatchingUp { since_ns: u64, at_start: Progress },
    Done,
}

/// The figures of a backlog run, as written into the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BacklogReport {
    /// What was asked for, payload bytes (all subscriptions).
    pub backlog_bytes_target: u64,
    /// The backlog when the consumers started, payload bytes.
    pub backlog_bytes: u64,
    /// From the first send to the consumers' start.
    pub backlog_build_s: f64,
    /// From the consumers' start to caught up (or to giving up).
    pub catch_up_s: f64,
    /// Messages and payload MiB consumers read per second during the
    /// catch-up: backlog drained per second plus the produce rate.
    pub catch_up_msgs_per_s: f64,
    pub catch_up_mb_per_s: f64,
    /// Whether consumers caught up within the time allowed.
    pub catch_up_complete: bool,
}

/// The phases of a backlog run.
#[derive(Debug, Clone)]
pub struct Backlog {
    target_bytes: u64,
    subscriptions: u32,
    caught_up: u64,
    start_ns: u64,
    /// Longest build, and longest catch-up, in ns.
    phase_max_ns: u64,
    phase: Phase,
    report: Option<BacklogReport>,
}

impl Backlog {
    /// A backlog of `target_bytes` over `subscriptions`, producers starting
    /// at `start_ns`; each phase lasts at most `phase_max_ns`.
    pub fn new(
        target_bytes: u64,
        subscriptions: u32,
        caught_up: u64,
        start_ns: u64,
        phase_max_ns: u64,
    ) -> Backlog {
        Backlog {
            target_bytes,
            subscriptions,
            caught_up,
            start_ns,
            phase_max_ns,
            phase: Phase::Building,
            report: None,
        }
    }

    /// Bytes waiting for the consumers.
    fn backlog_bytes(&self, p: &Progress) -> u64 {
        (p.acked_bytes * u64::from(self.subscriptions)).saturating_sub(p.consumed_bytes)
    }

    fn backlog_messages(&self, p: &Progress) -> u64 {
        (p.acked * u64::from(self.subscriptions)).saturating_sub(p.consumed)
    }

    /// Whether producers must keep going whatever the scheduled end.
    pub fn holds_producers(&self) -> bool {
        !matches!(self.phase, Phase::Done)
    }

    /// Moves the phases on with the counts at `now_ns`.
    pub fn step(&mut self, now_ns: u64, p: Progress) -> Action {
        match self.phase {
            Phase::Building => {
                let full = self.backlog_bytes(&p) >= self.target_bytes;
                let too_long = now_ns.saturating_sub(self.start_ns) >= self.phase_max_ns;
                if full || too_long {
                    self.phase = Phase::CatchingUp {
                        since_ns: now_ns,
                        at_start: p,
                    };
                    return Action::StartConsumers;
                }
                Action::Nothing
            }
            Phase::CatchingUp { since_ns, at_start } => {
                let done = self.backlog_messages(&p) <= self.caught_up;
                let too_long = now_ns.saturating_sub(since_ns) >= self.phase_max_ns;
                if !(done || too_long) {
                    return Action::Nothing;
                }
                let secs = now_ns.saturating_sub(since_ns) as f64 / NANOS_PER_SEC;
                let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
                let read_bytes = p.consumed_bytes - at_start.consumed_bytes;
                self.report = Some(BacklogReport {
                    backlog_bytes_target: self.target_bytes,
                    backlog_bytes: self.backlog_bytes(&at_start),
                    backlog_build_s: since_ns.saturating_sub(self.start_ns) as f64 / NANOS_PER_SEC,
                    catch_up_s: secs,
                    catch_up_msgs_per_s: per_s(p.consumed - at_start.consumed),
                    catch_up_mb_per_s: per_s(read_bytes) / BYTES_PER_MB,
                    catch_up_complete: done,
                });
                self.phase = Phase::Done;
                Action::Finished
            }
            Phase::Done => Action::Nothing,
        }
    }

    /// The figures, once the catch-up is over.
    pub fn report(&self) -> Option<BacklogReport> {
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const MIB: u64 = 1 << 20;

    fn at(acked: u64, consumed: u64) -> Progress {
        // 1 KiB messages.
        Progress {
            acked,
            acked_bytes: acked * 1024,
            consumed,
            consumed_bytes: consumed * 1024,
        }
    }

    #[test]
    fn builds_then_catches_up() {
        // 10 MiB over 2 subscriptions: 5,120 messages acked is enough.
        let mut b = Backlog::new(10 * MIB, 2, 1_000, 0, 60 * SEC);
        assert!(b.holds_producers());
        assert_eq!(b.step(SEC, at(5_000, 0)), Action::Nothing);
        assert_eq!(b.step(2 * SEC, at(5_120, 0)), Action::StartConsumers);
        // Consumers read 10,240 backlog messages (both subscriptions) plus
        // 2 x 1,000 new ones in 2 s; 1,000 left counts as caught up.
        assert_eq!(b.step(3 * SEC, at(5_620, 5_000)), Action::Nothing);
        assert_eq!(b.report(), None);
        assert_eq!(b.step(4 * SEC, at(6_120, 11_240)), Action::Finished);
        assert!(!b.holds_producers());
        let r = b.report().unwrap();
        assert_eq!(r.backlog_bytes, 10 * MIB);
        assert_eq!(r.backlog_bytes_target, 10 * MIB);
        assert_eq!(r.backlog_build_s, 2.0);
        assert_eq!(r.catch_up_s, 2.0);
        assert_eq!(r.catch_up_msgs_per_s, 5_620.0);
        assert_eq!(r.catch_up_mb_per_s, 5_620.0 * 1024.0 / MIB as f64);
        assert!(r.catch_up_complete);
        // Nothing more happens.
        assert_eq!(b.step(5 * SEC, at(7_000, 14_000)), Action::Nothing);
    }

    #[test]
    fn phases_give_up_after_their_time() {
        let mut b = Backlog::new(1 << 40, 1, 10, 10 * SEC, 5 * SEC);
        assert_eq!(b.step(14 * SEC, at(100, 0)), Action::Nothing);
        // The backlog was never reached: consumers start with what there is.
        assert_eq!(b.step(15 * SEC, at(200, 0)), Action::StartConsumers);
        assert_eq!(b.step(19 * SEC, at(300, 0)), Action::Nothing);
        assert_eq!(b.step(20 * SEC, at(400, 50)), Action::Finished);
        let r = b.report().unwrap();
        assert_eq!(r.backlog_bytes, 200 * 1024);
        assert!(!r.catch_up_complete);
        assert_eq!(r.catch_up_s, 5.0);
        assert_eq!(r.catch_up_msgs_per_s, 10.0);
    }

    #[test]
    fn caught_up_threshold() {
        assert_eq!(caught_up_messages(10_000.0, 1), 1_000);
        // 500k msg/s trails by 5,000 messages per subscription in 10 ms.
        assert_eq!(caught_up_messages(500_000.0, 2), 10_000);
    }

    #[test]
    fn report_keys() {
        let mut b = Backlog::new(1, 1, 1_000, 0, SEC);
        b.step(0, at(1, 0));
        b.step(SEC / 2, at(2, 2));
        let v = serde_json::to_value(b.report().unwrap()).unwrap();
        for key in [
            "backlog_bytes",
            "backlog_build_s",
            "catch_up_s",
            "catch_up_mb_per_s",
            "catch_up_msgs_per_s",
            "catch_up_complete",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }
}
