//! Broker configuration: built-in defaults, overridden by a TOML file
//! (`--config`), overridden by command-line flags. Every flag has a key of
//! the same name with `_` for `-` in the file.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Default data directory, under the working directory.
pub const DATA_DIR_DEFAULT: &str = "coremq-data";
/// Default address every shard listens on (SO_REUSEPORT).
pub const LISTEN_DEFAULT: &str = "127.0.0.1:9700";
/// Default first per-shard port: shard N listens on this + N.
pub const SHARD_PORT_BASE_DEFAULT: u16 = 9710;
/// Default size of a commit-log segment file.
pub const SEGMENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest segment size accepted: a segment must hold the largest message.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Default longest wait before async-flush data is `fdatasync`ed.
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 100;
/// Default unsynced bytes that trigger an early `fdatasync` of async-flush data.
pub const FLUSH_BYTES_DEFAULT: u64 = 16 << 20;
/// Default largest frame on a connection.
pub const MAX_FRAME_BYTES_DEFAULT: usize = 16 << 20;
/// Largest frame the broker may be configured for: what the client library accepts.
pub const MAX_FRAME_BYTES_LIMIT: usize = 64 << 20;
/// Default largest record batch (Kafka's message.max.bytes).
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 1 << 20;
/// Default memory per shard for recently written batches served to consumers.
pub const TAIL_CACHE_BYTES_DEFAULT: usize = 64 << 20;
/// Default memory touched at start, per shard, in tail caches' worth: the
/// caches fill under any sustained load, and about as much again is in
/// flight in read buffers and write buffers.
pub const PRETOUCH_TAIL_CACHES_DEFAULT: usize = 2;
/// Default tick of each shard's time wheel (delayed messages).
pub const TICK_MS_DEFAULT: u64 = 10;
/// Default period of the retention check.
pub const RETENTION_CHECK_MS_DEFAULT: u64 = 5_000;

/// `coremq serve` flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the commit logs, indexes and metadata live [default: ./coremq-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address every shard accepts connections on (SO_REUSEPORT) [default: 127.0.0.1:9700].
    /// Port 0 picks a free port (printed at start).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Shard N also listens on PORT+N, so shard-aware clients skip the
    /// cross-core hop [default: 9710]. 0 picks a free port per shard.
    #[arg(long, value_name = "PORT")]
    pub shard_port_base: Option<u16>,
    /// Number of shards, one pinned thread each [default: the CPUs this process may use].
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Size at which a shard's commit-log segment rolls [default: 1 GiB].
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<u64>,
    /// Longest time async-flush data waits for fdatasync [default: 100].
    #[arg(long, value_name = "MS")]
    pub flush_interval_ms: Option<u64>,
    /// Async-flush data is also fdatasync'ed once this much is unsynced [default: 16 MiB].
    #[arg(long, value_name = "BYTES")]
    pub flush_bytes: Option<u64>,
    /// Largest frame a client may send [default: 16 MiB].
    #[arg(long, value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Largest record batch a producer may send [default: 1 MiB].
    #[arg(long, value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Memory per shard for recent batches served to consumers [default: 64 MiB].
    #[arg(long, value_name = "BYTES")]
    pub tail_cache_bytes: Option<usize>,
    /// Memory touched once at start and kept, so that the first traffic does not wait
    /// for the kernel (or a VM's host) to back fresh pages; 0 = none, at most half of
    /// memory [default: 2 x shards x --tail-cache-bytes (256 MiB with 2 shards), at most
    /// a quarter of memory (RAM, or the cgroup's limit if lower)].
    #[arg(long, value_name = "BYTES")]
    pub pretouch_bytes: Option<usize>,
    /// Tick of each shard's time wheel: delayed messages are delivered within one tick [default: 10].
    #[arg(long, value_name = "MS")]
    pub tick_ms: Option<u64>,
    /// How often retention runs [default: 5000].
    #[arg(long, value_name = "MS")]
    pub retention_check_ms: Option<u64>,
    /// Busy-poll this long before a shard sleeps: lower latency, more CPU [default: 0].
    #[arg(long, value_name = "US")]
    pub spin_us: Option<u64>,
}

/// The keys a `--config` file may hold.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    shard_port_base: Option<u16>,
    shards: Option<usize>,
    segment_bytes: Option<u64>,
    flush_interval_ms: Option<u64>,
    flush_bytes: Option<u64>,
    max_frame_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    tail_cache_bytes: Option<usize>,
    pretouch_bytes: Option<usize>,
    retention_check_ms: Option<u64>,
    tick_ms: Option<u64>,
    spin_us: Option<u64>,
}

/// The resolved configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: std::net::SocketAddr,
    pub shard_port_base: u16,
    pub shards: usize,
    pub segment_bytes: u64,
    pub flush_interval: Duration,
    pub flush_bytes: u64,
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub tail_cache_bytes: usize,
    pub pretouch_bytes: usize,
    pub retention_check: Duration,
    pub tick: Duration,
    pub spin: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Two tail caches per shard, but never more than a quarter of memory: many
/// shards on a small machine (or in a small container) must not make the
/// defaults invalid.
fn default_pretouch_bytes(shards: usize, tail_cache_bytes: usize) -> usize {
    PRETOUCH_TAIL_CACHES_DEFAULT
        .saturating_mul(shards)
        .saturating_mul(tail_cache_bytes)
        .min(crate::pretouch::memory_bytes() / 4)
}

/// CPUs this process may run on.
pub fn available_cpus() -> usize {
    core_affinity::get_core_ids().map_or(1, |ids| ids.len().max(1))
}

impl Config {
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        let listen_text = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| LISTEN_DEFAULT.to_string());
        let listen = listen_text.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "--listen {listen_text:?} is not an IP:PORT address"
            ))
        })?;
        let shards = args.shards.or(file.shards).unwrap_or_else(available_cpus);
        let tail_cache_bytes = args
            .tail_cache_bytes
            .or(file.tail_cache_bytes)
            .unwrap_or(TAIL_CACHE_BYTES_DEFAULT);
        let cfg = Config {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT)),
            listen,
            shard_port_base: args
                .shard_port_base
                .or(file.shard_port_base)
                .unwrap_or(SHARD_PORT_BASE_DEFAULT),
            shards,
            segment_bytes: args
                .segment_bytes
                .or(file.segment_bytes)
                .unwrap_or(SEGMENT_BYTES_DEFAULT),
            flush_interval: Duration::from_millis(
                args.flush_interval_ms
                    .or(file.flush_interval_ms)
                    .unwrap_or(FLUSH_INTERVAL_MS_DEFAULT),
            ),
            flush_bytes: args
                .flush_bytes
                .or(file.flush_bytes)
                .unwrap_or(FLUSH_BYTES_DEFAULT)
                .max(1),
            max_frame_bytes: args
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(MAX_FRAME_BYTES_DEFAULT),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(MAX_MESSAGE_BYTES_DEFAULT),
            tail_cache_bytes,
            pretouch_bytes: args
                .pretouch_bytes
                .or(file.pretouch_bytes)
                .unwrap_or_else(|| default_pretouch_bytes(shards, tail_cache_bytes)),
            retention_check: Duration::from_millis(
                args.retention_check_ms
                    .or(file.retention_check_ms)
                    .unwrap_or(RETENTION_CHECK_MS_DEFAULT)
                    .max(1),
            ),
            tick: Duration::from_millis(
                args.tick_ms
                    .or(file.tick_ms)
                    .unwrap_or(TICK_MS_DEFAULT)
                    .clamp(1, 1000),
            ),
            spin: Duration::from_micros(args.spin_us.or(file.spin_us).unwrap_or(0)),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.shards == 0 || self.shards > 256 {
            return invalid(format!("--shards must be 1..=256, not {}", self.shards));
        }
        if self.max_frame_bytes > MAX_FRAME_BYTES_LIMIT {
            return invalid(format!(
                "--max-frame-bytes must be at most {MAX_FRAME_BYTES_LIMIT} (64 MiB), not {}",
                self.max_frame_bytes
            ));
        }
        if self.max_message_bytes < 1024 {
            return invalid("--max-message-bytes must be at least 1024".into());
        }
        if self.max_frame_bytes < self.max_message_bytes + 1024 {
            return invalid(format!(
                "--max-frame-bytes ({}) must exceed --max-message-bytes ({}) by at least 1024",
                self.max_frame_bytes, self.max_message_bytes
            ));
        }
        if self.segment_bytes < SEGMENT_BYTES_MIN.max(2 * self.max_message_bytes as u64) {
            return invalid(format!(
                "--segment-bytes must be at least 1 MiB and twice --max-message-bytes, not {}",
                self.segment_bytes
            ));
        }
        if self.shard_port_base != 0
            && usize::from(self.shard_port_base) + self.shards > usize::from(u16::MAX)
        {
            return invalid("--shard-port-base + --shards exceeds the port range".into());
        }
        let memory = crate::pretouch::memory_bytes();
        if self.pretouch_bytes > memory / 2 {
            return invalid(format!(
                "--pretouch-bytes ({}) must be at most half of the memory this process may use ({} MiB)",
                self.pretouch_bytes,
                memory >> 20
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("coremq-data"));
        assert_eq!(c.listen.port(), 9700);
        assert_eq!(c.shard_port_base, 9710);
        assert_eq!(c.shards, available_cpus());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "shards = 3\nlisten = \"127.0.0.1:1234\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            shards: Some(1),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.shards, 1);
        assert_eq!(c.listen.port(), 1234);
        std::fs::write(&path, "shardz = 3\n").unwrap();
        let err = Config::resolve(&args).unwrap_err().to_string();
        assert!(err.contains("shardz"), "{err}");
    }

    #[test]
    fn the_default_pre_touch_is_two_tail_caches_a_shard_within_a_quarter_of_memory() {
        let c = Config::resolve(&ServeArgs {
            shards: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.pretouch_bytes, 2 * 2 * TAIL_CACHE_BYTES_DEFAULT);
        // So many tail caches that they pass any machine's memory: clamped, not refused.
        let c = Config::resolve(&ServeArgs {
            shards: Some(256),
            tail_cache_bytes: Some(1 << 40),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.pretouch_bytes, crate::pretouch::memory_bytes() / 4);
    }

    #[test]
    fn nonsense_is_refused() {
        for args in [
            ServeArgs {
                shards: Some(0),
                ..Default::default()
            },
            ServeArgs {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            ServeArgs {
                segment_bytes: Some(100),
                ..Default::default()
            },
        ] {
            assert!(Config::resolve(&args).is_err());
        }
    }
}
