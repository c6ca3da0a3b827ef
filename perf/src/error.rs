//! Everything that can stop a benchmark run before it produces a report.
//!
//! A run that completes but whose counts do not add up (sent != acked,
//! consumers behind) is not an error: it yields a report marked failed, and
//! the command exits non-zero. These errors are for runs that could not be
//! carried out at all: a bad workload, an unreachable broker, a report that
//! cannot be written.

use std::path::PathBuf;

use coremq::client::ClientError;

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error("cannot read workload file {path}: {source}")]
    ReadWorkload {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad YAML in workload file {path}: {source}")]
    WorkloadYaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("bad JSON in workload file {path}: {source}")]
    WorkloadJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A parameter is out of range (the text says which).
    #[error("invalid workload: {0}")]
    Invalid(String),
    /// A request to the broker failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Client {
        context: String,
        source: ClientError,
    },
    /// A peer broker's client (NATS, RabbitMQ) failed; `context` says what
    /// was being done.
    #[error("{context}: {source}")]
    Peer {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot write report {path}: {source}")]
    WriteReport {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the report: {0}")]
    EncodeReport(#[from] serde_json::Error),
    #[error("the system clock reads before 1970")]
    Clock,
    #[error("{0}")]
    Thread(String),
}

impl PerfError {
    /// Wraps a client error with what was being attempted.
    pub fn client(context: impl Into<String>, source: ClientError) -> PerfError {
        PerfError::Client {
            context: context.into(),
            source,
        }
    }

    /// Wraps a peer client's error with what was being attempted.
    pub fn peer(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> PerfError {
        PerfError::Peer {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Wraps an I/O error with what was being attempted.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> PerfError {
        PerfError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the error is the user's to fix (bad parameters or files),
    /// as opposed to a failure while running.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PerfError::ReadWorkload { .. }
                | PerfError::WorkloadYaml { .. }
                | PerfError::WorkloadJson { .. }
                | PerfError::Invalid(_)
        )
    }
}
