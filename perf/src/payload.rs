//! Message payloads: what producers send, so that compression sees
//! realistic data.
//!
//! Every payload starts with its intended send time (see
//! [`TIMESTAMP_BYTES`]); what follows is one of:
//! - `text` (the default): newline-separated JSON order events (order id,
//!   account, symbol, side, type, quantity, price, venue, status, trader,
//!   ...), each field drawn from a seeded PRNG, cut to the message size.
//!   Field names repeat and values vary, so codecs find what they find in
//!   real event streams (a few times smaller), not the 50x of one template
//!   repeated;
//! - `random`: incompressible bytes from the same PRNG (the worst case for
//!   a codec, and like OpenMessaging Benchmark's payload files, which are
//!   the same bytes for every message).
//!
//! Generating text for every message would cost the load generator more
//! CPU than the broker spends storing it, so each producer thread builds a
//! pool of distinct bodies once and hands them out in turn. The pool holds
//! at least twice as many bodies as one batch holds messages, so no body
//! repeats within a batch (a codec compresses each batch on its own, so
//! that is all that counts for the ratio); sending one costs writing its
//! timestamp. Everything is deterministic for a given seed.

use serde::{Deserialize, Serialize};

use crate::drivers::messages_per_batch;
use crate::workload::{Workload, TIMESTAMP_BYTES};

/// Seed of producer 0's payloads (producer i uses this + i).
pub const PAYLOAD_SEED: u64 = 0x636f_7265_6d71;
/// Fewest bodies in a pool.
pub const POOL_BODIES_MIN: usize = 256;
/// Most bytes of bodies in one pool (larger messages get fewer bodies).
pub const POOL_BYTES_MAX: usize = 16 << 20;

/// What follows the timestamp in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// JSON order events with varying values: compressible like real data.
    #[default]
    Text,
    /// Random bytes: incompressible.
    Random,
}

impl std::fmt::Display for PayloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PayloadKind::Text => "text",
            PayloadKind::Random => "random",
        })
    }
}

/// A small, fast PRNG (wyrand): deterministic for a seed, not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

const SYMBOLS: &[&str] = &[
    "AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "META", "TSLA", "BRK.B", "JPM", "V", "UNH", "XOM",
    "JNJ", "WMT", "MA", "PG", "AVGO", "HD", "CVX", "MRK", "ABBV", "COST", "PEP", "KO", "ADBE",
    "CRM", "NFLX", "AMD", "TMO", "ORCL", "ACN", "MCD", "CSCO", "ABT", "INTC", "DIS", "VZ", "NKE",
    "QCOM", "IBM",
];
const SIDES: &[&str] = &["BUY", "SELL"];
const ORDER_TYPES: &[&str] = &["LIMIT", "MARKET", "STOP", "STOP_LIMIT"];
const TIME_IN_FORCE: &[&str] = &["DAY", "GTC", "IOC", "FOK"];
const VENUES: &[&str] = &[
    "XNAS", "XNYS", "ARCX", "BATS", "IEXG", "EDGX", "MEMX", "XCHI",
];
const STATUSES: &[&str] = &["NEW", "ACCEPTED", "PARTIALLY_FILLED", "FILLED", "CANCELED"];
const CURRENCIES: &[&str] = &["USD", "USD", "USD", "EUR", "GBP", "JPY"];
const TRADERS: &[&str] = &[
    "a.martin",
    "b.chen",
    "c.okafor",
    "d.silva",
    "e.novak",
    "f.haddad",
    "g.rossi",
    "h.tanaka",
    "i.kowalski",
    "j.murphy",
    "k.singh",
    "l.dubois",
    "m.garcia",
    "n.ivanova",
    "o.larsen",
    "p.moreau",
];
const DESKS: &[&str] = &[
    "equities-1",
    "equities-2",
    "program",
    "retail",
    "arb",
    "delta-one",
];

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `v` with at least `width` digits (zero-padded).
fn put_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut tmp = Vec::with_capacity(20);
    put_u64(&mut tmp, v);
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(tmp.len())));
    out.extend_from_slice(&tmp);
}

fn put_str_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":\"");
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// State of the text generator: ids that grow like a real order stream's.
#[derive(Debug, Clone)]
struct TextState {
    next_order: u64,
    ts_ms: u64,
}

/// Appends one JSON order event and a newline.
fn put_event(out: &mut Vec<u8>, rng: &mut Rng, st: &mut TextState) {
    st.next_order += 1 + rng.below(7);
    st.ts_ms += rng.below(40);
    out.extend_from_slice(b"{\"event\":\"order.");
    out.extend_from_slice(rng.pick(STATUSES).to_ascii_lowercase().as_bytes());
    out.extend_from_slice(b"\",\"order_id\":\"ORD-");
    put_padded(out, st.next_order, 10);
    out.extend_from_slice(b"\",\"ts\":");
    put_u64(out, st.ts_ms);
    out.extend_from_slice(b",\"account\":\"ACC-");
    put_padded(out, rng.below(1_000_000), 6);
    out.push(b'"');
    put_str_field(out, "symbol", rng.pick(SYMBOLS));
    put_str_field(out, "side", rng.pick(SIDES));
    put_str_field(out, "type", rng.pick(ORDER_TYPES));
    put_str_field(out, "tif", rng.pick(TIME_IN_FORCE));
    out.extend_from_slice(b",\"qty\":");
    put_u64(out, 1 + rng.below(100) * 10u64.pow(rng.below(3) as u32));
    out.extend_from_slice(b",\"price\":");
    put_u64(out, 1 + rng.below(2_000));
    out.push(b'.');
    put_padded(out, rng.below(100), 2);
    put_str_field(out, "currency", rng.pick(CURRENCIES));
    put_str_field(out, "venue", rng.pick(VENUES));
    put_str_field(out, "status", rng.pick(STATUSES));
    put_str_field(out, "trader", rng.pick(TRADERS));
    put_str_field(out, "desk", rng.pick(DESKS));
    out.extend_from_slice(b",\"client_order_id\":\"");
    put_padded(out, rng.next_u64() & 0xffff_ffff_ffff, 15);
    out.extend_from_slice(b"\"}\n");
}

/// One body of `size` bytes: a zeroed timestamp slot, then the kind's bytes.
fn body(kind: PayloadKind, size: usize, rng: &mut Rng, st: &mut TextState) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 512);
    out.resize(TIMESTAMP_BYTES.min(size), 0);
    match kind {
        PayloadKind::Random => {
            while out.len() < size {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        PayloadKind::Text => {
            while out.len() < size {
                put_event(&mut out, rng, st);
            }
        }
    }
    out.truncate(size);
    out
}

/// How many bodies a pool needs so that none repeats within a batch of
/// `messages_per_batch` (at least [`POOL_BODIES_MIN`], at most what
/// [`POOL_BYTES_MAX`] holds, and never fewer than 2).
pub fn pool_bodies(message_size: usize, messages_per_batch: usize) -> usize {
    let wanted = messages_per_batch.saturating_mul(2).max(POOL_BODIES_MIN);
    let fits = POOL_BYTES_MAX / message_size.max(1);
    wanted.min(fits).max(2)
}

/// A producer thread's payloads: a pool of distinct bodies, handed out in
/// turn with the timestamp written in.
#[derive(Debug, Clone)]
pub struct Payloads {
    pool: Vec<Vec<u8>>,
    next: usize,
}

impl Payloads {
    /// A pool of `bodies` payloads of `size` bytes, from `seed`.
    pub fn new(kind: PayloadKind, size: usize, bodies: usize, seed: u64) -> Payloads {
        let mut rng = Rng::new(seed);
        let mut st = TextState {
            next_order: 1_000_000 + rng.below(1_000_000_000),
            ts_ms: 1_700_000_000_000 + rng.below(100_000_000_000),
        };
        let pool = (0..bodies.max(1))
            .map(|_| body(kind, size, &mut rng, &mut st))
            .collect();
        Payloads { pool, next: 0 }
    }

    /// Producer `index`'s payloads for workload `w` (seeded by the index,
    /// so runs repeat).
    pub fn for_producer(w: &Workload, index: usize) -> Payloads {
        let bodies = pool_bodies(w.message_size, messages_per_batch(w));
        Payloads::new(
            w.payload,
            w.message_size,
            bodies,
            PAYLOAD_SEED + index as u64,
        )
    }

    /// The next payload, stamped with `intended_ns` in its first bytes.
    pub fn next(&mut self, intended_ns: u64) -> &[u8] {
        let i = self.next;
        self.next = (i + 1) % self.pool.len();
        let p = &mut self.pool[i];
        let n = TIMESTAMP_BYTES.min(p.len());
        p[..n].copy_from_slice(&intended_ns.to_be_bytes()[..n]);
        &self.pool[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::payload_timestamp;
    use coremq_shards::batch::{decode_records, BatchBuilder, Compression};

    #[test]
    fn payloads_carry_their_timestamp_and_size() {
        for kind in [PayloadKind::Text, PayloadKind::Random] {
            for size in [8usize, 9, 100, 1024, 5000] {
                let mut p = Payloads::new(kind, size, 4, 7);
                for k in 0..10u64 {
                    let v = p.next(1_000 + k);
                    assert_eq!(v.len(), size, "{kind} {size}");
                    assert_eq!(payload_timestamp(v), Some(1_000 + k));
                }
            }
        }
    }

    #[test]
    fn bodies_vary_and_repeat_only_after_the_pool() {
        let mut p = Payloads::new(PayloadKind::Text, 1024, 16, 1);
        let first: Vec<Vec<u8>> = (0..16).map(|_| p.next(0).to_vec()).collect();
        for (i, a) in first.iter().enumerate() {
            for b in &first[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(p.next(0), first[0].as_slice());
        // The same seed gives the same bodies; another seed others.
        let mut again = Payloads::new(PayloadKind::Text, 1024, 16, 1);
        assert_eq!(again.next(0), first[0].as_slice());
        let mut other = Payloads::new(PayloadKind::Text, 1024, 16, 2);
        assert_ne!(other.next(0), first[0].as_slice());
    }

    #[test]
    fn text_looks_like_json_events() {
        let mut p = Payloads::new(PayloadKind::Text, 1024, 1, 3);
        let v = p.next(0)[TIMESTAMP_BYTES..].to_vec();
        let text = String::from_utf8(v).unwrap();
        let first = text.lines().next().unwrap();
        let event: serde_json::Value = serde_json::from_str(first).unwrap();
        assert!(event["order_id"].as_str().unwrap().starts_with("ORD-"));
        assert!(event["price"].is_number());
        assert!(SYMBOLS.contains(&event["symbol"].as_str().unwrap()));
        // Several events per KiB.
        assert!(text.lines().count() >= 3, "{text}");
    }

    /// Compressed size of one 64 KiB batch of pool bodies.
    fn ratio(kind: PayloadKind, codec: Compression) -> f64 {
        let mut p = Payloads::new(kind, 1024, pool_bodies(1024, 62), 11);
        let mut plain = 0usize;
        let mut b = BatchBuilder::new(codec);
        for k in 0..62u64 {
            let v = p.next(1_700_000_000_000_000_000 + k * 50_000);
            plain += v.len();
            b.push(1_700_000_000_000, None, Some(v), &[]);
        }
        let batch = b.build();
        // It decodes back to the same payloads.
        let (_, records) = decode_records(&batch).unwrap();
        assert_eq!(records.len(), 62);
        plain as f64 / batch.len() as f64
    }

    #[test]
    fn text_compresses_like_data_and_random_does_not() {
        for codec in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let text = ratio(PayloadKind::Text, codec);
            let random = ratio(PayloadKind::Random, codec);
            // Real JSON event streams compress a few times, not 50x.
            assert!(text > 1.5 && text < 12.0, "{codec}: text ratio {text}");
            assert!(random < 1.01, "{codec}: random ratio {random}");
        }
    }

    #[test]
    fn pools_outnumber_a_batch() {
        assert_eq!(pool_bodies(1024, 62), POOL_BODIES_MIN);
        assert_eq!(pool_bodies(1024, 1000), 2000);
        // Capped by bytes, but never below 2.
        assert_eq!(pool_bodies(1 << 20, 100), 16);
        assert_eq!(pool_bodies(64 << 20, 1), 2);
    }

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut c = Rng::new(6);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[c.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800 && n < 1200), "{seen:?}");
    }
}
