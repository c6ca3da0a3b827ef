//! Error codes a response carries. The numbers are part of the wire format
//! (docs/protocol.md): never renumber, only append.

/// Every failure the broker reports to a client, with a stable number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    None = 0,
    /// The frame or its body could not be parsed; the connection is closed after this reply.
    Malformed = 1,
    UnknownApi = 2,
    UnsupportedVersion = 3,
    UnknownTopic = 4,
    UnknownQueue = 5,
    TopicExists = 6,
    InvalidRequest = 7,
    /// A record batch over `max_message_bytes`.
    MessageTooLarge = 8,
    /// A record batch whose length, magic or CRC-32C is wrong.
    CorruptBatch = 9,
    /// The fetch offset is before the log start or after the end; the reply carries both.
    OffsetOutOfRange = 10,
    /// Idempotent producer: a sequence gap (a batch before this one is missing).
    OutOfOrderSequence = 11,
    /// Idempotent producer: an epoch older than the one the broker knows.
    InvalidProducerEpoch = 12,
    /// The disk write or flush failed; the shard refuses writes until restart.
    StorageError = 13,
    /// The broker is shutting down.
    ShuttingDown = 14,
    /// A frame over `max_frame_bytes`; the connection is closed after this reply.
    FrameTooLarge = 15,
    Internal = 16,
    /// Idempotent producer: an old duplicate whose offsets are no longer remembered.
    DuplicateSequence = 17,
    /// The group or member is unknown (a member whose session expired must rejoin).
    UnknownMember = 18,
    /// The join does not match the group: another topic, strategy or mode.
    InconsistentGroup = 19,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            0 => None,
            1 => Malformed,
            2 => UnknownApi,
            3 => UnsupportedVersion,
            4 => UnknownTopic,
            5 => UnknownQueue,
            6 => TopicExists,
            7 => InvalidRequest,
            8 => MessageTooLarge,
            9 => CorruptBatch,
            10 => OffsetOutOfRange,
            11 => OutOfOrderSequence,
            12 => InvalidProducerEpoch,
            13 => StorageError,
            14 => ShuttingDown,
            15 => FrameTooLarge,
            17 => DuplicateSequence,
            18 => UnknownMember,
            19 => InconsistentGroup,
            _ => Internal,
        }
    }

    /// Whether a client may retry the same request unchanged and expect success.
    pub fn is_retriable(self) -> bool {
        matches!(self, ErrorCode::ShuttingDown)
    }

    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            None => "NONE",
            Malformed => "MALFORMED",
            UnknownApi => "UNKNOWN_API",
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            UnknownTopic => "UNKNOWN_TOPIC",
            UnknownQueue => "UNKNOWN_QUEUE",
            TopicExists => "TOPIC_EXISTS",
            InvalidRequest => "INVALID_REQUEST",
            MessageTooLarge => "MESSAGE_TOO_LARGE",
            CorruptBatch => "CORRUPT_BATCH",
            OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            OutOfOrderSequence => "OUT_OF_ORDER_SEQUENCE",
            InvalidProducerEpoch => "INVALID_PRODUCER_EPOCH",
            StorageError => "STORAGE_ERROR",
            ShuttingDown => "SHUTTING_DOWN",
            FrameTooLarge => "FRAME_TOO_LARGE",
            Internal => "INTERNAL",
            DuplicateSequence => "DUPLICATE_SEQUENCE",
            UnknownMember => "UNKNOWN_MEMBER",
            InconsistentGroup => "INCONSISTENT_GROUP",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}
