//! A hierarchical timing wheel: the shard's timer for delayed messages (and
//! any other deadline a shard keeps by the million).
//!
//! Time is counted in ticks of `tick_ms`. Level i has 64 slots of 64^i
//! ticks each; a timer sits in the lowest level whose current 64-slot block
//! contains its due tick, and moves down a level (cascades) when time
//! reaches its slot. Insert and expiry are O(1) amortised; memory is the
//! item plus its due tick, nothing per tick. Timers further out than the
//! four levels cover (64^4 ticks: about 46 hours at 10 ms) wait in an
//! ordered overflow map. Due timers are returned by `advance` no earlier than
//! their due tick, and at most one tick late (plus the caller's scheduling).

use std::collections::BTreeMap;

/// Slots per level (a power of two).
const SLOTS: u64 = 64;
const SLOT_BITS: u32 = 6;
/// Levels before the overflow map.
const LEVELS: usize = 4;

pub struct TimeWheel<T> {
    tick_ms: u64,
    /// The last tick processed.
    now_tick: u64,
    levels: Vec<Vec<Vec<(u64, T)>>>,
    /// Timers per level, to skip empty stretches of time in `advance`.
    counts: [usize; LEVELS],
    overflow: BTreeMap<u64, Vec<T>>,
    /// Timers due at or before `now_tick` when inserted, returned by the next `advance`.
    ready: Vec<T>,
    len: usize,
}

impl<T> TimeWheel<T> {
    /// A wheel whose clock starts at `now_ms`.
    pub fn new(tick_ms: u64, now_ms: u64) -> Self {
        assert!(tick_ms > 0, "a tick must be at least 1 ms");
        TimeWheel {
            tick_ms,
            now_tick: now_ms / tick_ms,
            levels: (0..LEVELS)
                .map(|_| (0..SLOTS).map(|_| Vec::new()).collect())
                .collect(),
            counts: [0; LEVELS],
            overflow: BTreeMap::new(),
            ready: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Adds a timer due at `due_ms` (rounded up to a tick).
    pub fn insert(&mut self, due_ms: u64, item: T) {
        self.len += 1;
        let due_tick = due_ms.div_ceil(self.tick_ms);
        self.place(due_tick, item);
    }

    fn place(&mut self, due_tick: u64, item: T) {
        if due_tick <= self.now_tick {
            self.ready.push(item);
            return;
        }
        for level in 0..LEVELS {
            let block_shift = SLOT_BITS * (level as u32 + 1);
            if due_tick >> block_shift == self.now_tick >> block_shift {
                let slot = ((due_tick >> (SLOT_BITS * level as u32)) & (SLOTS - 1)) as usize;
                self.levels[level][slot].push((due_tick, item));
                self.counts[level] += 1;
                return;
            }
        }
        self.overflow.entry(due_tick).or_default().push(item);
    }

    /// Moves the clock to `now_ms` and returns every timer now due.
    pub fn advance(&mut self, now_ms: u64) -> Vec<T> {
        let mut due = std::mem::take(&mut self.ready);
        let target = now_ms / self.tick_ms;
        while self.now_tick < target {
            // Jump over time in which nothing can happen: with levels 0..=L
            // empty, nothing fires before the next level-(L+1) boundary.
            let mut skip_to = self.now_tick;
            for level in 0..LEVELS {
                if self.counts[level] != 0 {
                    break;
                }
                let span = 1u64 << (SLOT_BITS * (level as u32 + 1));
                skip_to = (self.now_tick / span + 1) * span - 1;
            }
            if skip_to >= target {
                let all_empty = self.counts.iter().all(|c| *c == 0);
                if all_empty && self.overflow.is_empty() {
                    self.now_tick = target;
                    break;
                }
                skip_to = target - 1;
            }
            self.now_tick = self.now_tick.max(skip_to);
            self.now_tick += 1;
            let t = self.now_tick;
            if t & ((1 << (SLOT_BITS * LEVELS as u32)) - 1) == 0 {
                // A new top-level block: bring in overflow timers that fall in it.
                let end = t + (1 << (SLOT_BITS * LEVELS as u32));
                let moved: Vec<u64> = self.overflow.range(..end).map(|(k, _)| *k).collect();
                for k in moved {
                    for item in self.overflow.remove(&k).unwrap_or_default() {
                        self.place(k, item);
                    }
                }
            }
            for level in (1..LEVELS).rev() {
                let shift = SLOT_BITS * level as u32;
                if t & ((1 << shift) - 1) == 0 {
                    let slot = ((t >> shift) & (SLOTS - 1)) as usize;
                    let cascaded = std::mem::take(&mut self.levels[level][slot]);
                    self.counts[level] -= cascaded.len();
                    for (due_tick, item) in cascaded {
                        self.place(due_tick, item);
                    }
                }
            }
            let slot = (t & (SLOTS - 1)) as usize;
            self.counts[0] -= self.levels[0][slot].len();
            due.extend(self.levels[0][slot].drain(..).map(|(_, item)| item));
            due.append(&mut self.ready);
        }
        self.len -= due.len();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_at_their_tick_never_early() {
        let mut w = TimeWheel::new(10, 1_000);
        w.insert(1_005, "a"); // rounds up to tick 101
        w.insert(1_000, "now");
        w.insert(1_640, "b");
        w.insert(1_000 + 10 * 5_000, "c"); // level 2
        assert_eq!(w.advance(1_000), vec!["now"]);
        assert!(w.advance(1_009).is_empty());
        assert_eq!(w.advance(1_010), vec!["a"]);
        assert!(w.advance(1_639).is_empty());
        assert_eq!(w.advance(1_640), vec!["b"]);
        assert!(w.advance(1_000 + 10 * 5_000 - 1).is_empty());
        assert_eq!(w.advance(1_000 + 10 * 5_000), vec!["c"]);
        assert!(w.is_empty());
    }

    /// Against a sorted model: random timers across every level and the
    /// overflow, advanced in random steps.
    #[test]
    fn matches_a_sorted_model() {
        let mut x: u64 = 0x243f6a8885a308d3;
        let mut rnd = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let start = 123_456_789u64;
        // 100 ms ticks: the spans below reach every level and the overflow
        // (64^4 ticks is about 19 days) without stepping through billions of ticks.
        let mut w = TimeWheel::new(100, start);
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut now = start;
        for id in 0..5_000u32 {
            let span = [700, 50_000, 3_000_000, 200_000_000, 4_000_000_000][rnd(5) as usize];
            let due = now + rnd(span);
            w.insert(due, id);
            model.push((due, id));
            if id % 50 == 0 {
                now += rnd(span / 2 + 1);
                let mut got = w.advance(now);
                got.sort_unstable();
                // A timer fires at the first tick at or after its due time.
                let tick_end = now / 100 * 100;
                let mut want: Vec<u32> = model
                    .iter()
                    .filter(|(d, _)| d.div_ceil(100) * 100 <= tick_end)
                    .map(|(_, i)| *i)
                    .collect();
                want.sort_unstable();
                model.retain(|(d, _)| d.div_ceil(100) * 100 > tick_end);
                assert_eq!(got, want, "at {now}");
                assert_eq!(w.len(), model.len());
            }
        }
    }
}
