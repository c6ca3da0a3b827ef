//! Errors of the storage layer. Each maps to one wire error code in `src/`.

use crate::batch::BatchError;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("storage i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt batch: {0}")]
    Batch(#[from] BatchError),
    #[error("batch of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid batch: {0}")]
    InvalidBatch(&'static str),
    #[error("{0}")]
    InvalidOption(String),
    #[error("the log refuses writes after an earlier i/o error: {0}")]
    LogFailed(String),
    #[error("offset {offset} is out of range: the queue holds [{start}, {next})")]
    OffsetOutOfRange { offset: i64, start: i64, next: i64 },
    #[error(
        "producer {producer_id}: expected sequence {expected}, got {got} (a batch is missing)"
    )]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {producer_id}: epoch {got} is older than the current epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        got: i16,
        current: i16,
    },
    #[error(
        "producer {producer_id}: sequence {seq} was stored long ago; its offsets are forgotten"
    )]
    DuplicateSequence { producer_id: i64, seq: i32 },
    #[error("the shard is shutting down")]
    ShuttingDown,
    #[error("corrupt file {path}: {reason}")]
    CorruptFile { path: String, reason: String },
}

impl From<glommio::GlommioError<()>> for ShardError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        ShardError::Io(e.into())
    }
}

pub type Result<T> = std::result::Result<T, ShardError>;
