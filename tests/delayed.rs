//! Delayed messages end to end against the real broker: a message produced
//! with `--delay-ms` is invisible until its due time and visible within a
//! tick of it (bounds here are generous: scheduling slack on a loaded test
//! machine, not the tick, dominates), also across a `kill -9` of the broker
//! in the middle of the delay (exactly once); out-of-range delays are
//! refused by the CLI and by the broker itself.
//!
//! Every wait is bounded and every broker is killed when its handle drops.

mod common;
use common::*;
use coremq::client::{ClientError, ConsumedRecord, Consumer, ConsumerConfig, StartFrom};
use coremq::protocol::{ErrorCode, Flush, Reply};
use std::time::{Duration, Instant};

/// Slack allowed past the due time: two 10 ms ticks plus process start-up
/// and scheduling on a busy machine.
const LATE_SLACK: Duration = Duration::from_secs(3);
/// How long a restarted broker may take before the due message shows up, on top of the slack.
const RESTART_SLACK: Duration = Duration::from_secs(5);

fn consumer(addr: &str, group: &str) -> Consumer {
    let cfg = ConsumerConfig {
        from: StartFrom::Earliest,
        max_wait_ms: 100,
        ..ConsumerConfig::new(group)
    };
    Consumer::connect(addr, "later", cfg).expect("connect consumer")
}

/// Polls until something arrives or `until`; returns it with the arrival time.
fn poll_until(c: &mut Consumer, until: Instant) -> (Vec<ConsumedRecord>, Instant) {
    loop {
        let got = c.poll(Duration::from_millis(50)).expect("poll");
        let now = Instant::now();
        if !got.is_empty() || now >= until {
            return (got, now);
        }
    }
}

#[test]
fn delayed_message_is_visible_at_its_due_time_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("later", 1, Flush::Sync);
    let mut c = consumer(&b.addr, "watch");

    let t0 = Instant::now();
    let (code, _, err) = b.cli(&["produce", "later", "--delay-ms", "2000"], "wake-up\n");
    assert_eq!(code, 0, "{err}");
    // Nothing during the first 1.5 s.
    let (early, _) = poll_until(&mut c, t0 + Duration::from_millis(1500));
    assert!(early.is_empty(), "delivered early: {early:?}");
    // Then it arrives, not before 2 s and not much after.
    let (got, at) = poll_until(&mut c, t0 + Duration::from_secs(2) + LATE_SLACK);
    assert_eq!(got.len(), 1, "not delivered by the due time + slack");
    assert_eq!(value(&got[0]), "wake-up");
    let after = at - t0;
    assert!(after >= Duration::from_secs(2), "delivered after {after:?}");
    assert!(
        after <= Duration::from_secs(2) + LATE_SLACK,
        "delivered after {after:?}"
    );
    // Push consumers see it too, once.
    let (code, out, err) = b.cli(
        &[
            "consume",
            "later",
            "--group",
            "p",
            "--push",
            "--timeout-ms",
            "1000",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "wake-up\n");
}

#[test]
fn delayed_message_survives_a_broker_crash_and_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("later", 1, Flush::Sync);
    let t0 = Instant::now();
    let (code, _, err) = b.cli(
        &["produce", "later", "--delay-ms", "3000", "--priority", "2"],
        "after-crash\n",
    );
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    b.kill9();

    let b = Broker::start(dir.path(), &[]);
    let mut c = consumer(&b.addr, "watch");
    let (got, at) = poll_until(&mut c, t0 + Duration::from_secs(3) + RESTART_SLACK);
    assert_eq!(got.len(), 1, "lost across the restart");
    assert_eq!(value(&got[0]), "after-crash");
    let after = at - t0;
    assert!(after >= Duration::from_secs(3), "delivered after {after:?}");
    // Exactly once: nothing more shows up, and the queue holds one message.
    let (more, _) = poll_until(&mut c, Instant::now() + Duration::from_secs(2));
    assert!(more.is_empty(), "delivered twice: {more:?}");
    let info = b.admin().describe_topic("later").unwrap();
    assert_eq!(info.queues[0].end_offset, 1);

    // A clean restart after delivery does not deliver it again either.
    assert_eq!(b.terminate(), Some(0));
    let b = Broker::start(dir.path(), &[]);
    let all = consume_all(&b.addr, "later", "fresh", 2);
    assert_eq!(all.len(), 1, "{all:?}");
}

#[test]
fn out_of_range_delays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), &[]);
    b.create_topic("later", 1, Flush::Async);
    // The CLI refuses before sending anything.
    let (code, _, err) = b.cli(&["produce", "later", "--delay-ms", "-5"], "x\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--delay-ms: delay must not be negative, not -5 ms"),
        "{err}"
    );
    let too_long = (91u64 * 24 * 3600 * 1000).to_string();
    let (code, _, err) = b.cli(&["produce", "later", "--delay-ms", &too_long], "x\n");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("90 days"), "{err}");
    // The broker refuses them too.
    for delay_ms in [-5, -1, 91 * 24 * 3600 * 1000] {
        match raw_produce_with(&b.addr, "later", 0, 0, delay_ms) {
            Err(ClientError::Broker(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidRequest, "{e}");
                assert!(e.message.contains("delay"), "{e}");
            }
            other => panic!("delay {delay_ms} ms was not refused: {other:?}"),
        }
    }
    // A delayed batch is acknowledged with base offset -1 (it gets one when due).
    let r = raw_produce_with(&b.addr, "later", 0, 0, 60_000).unwrap();
    assert_eq!(
        r,
        Reply::Produce {
            base_offset: -1,
            duplicate: false
        }
    );
    assert!(consume_all(&b.addr, "later", "g", 1).is_empty());
}
