//! A batch on its way to the log, and whether its memory is its own.
//!
//! The shard stamps the base offset and leader epoch into every batch it
//! stores, so it needs the bytes mutable. A batch that owns its memory
//! (`Owned`: a buffer of its own, or a disjoint piece of one cut with
//! `BytesMut::split_to`) is patched where it is. A view of memory others
//! share (`Shared`) is copied first, unless nothing else holds it.
//!
//! A ProduceMany frame read into a buffer of its own is cut into one owned
//! piece per batch (`protocol::many`), so its batches reach the log without
//! a copy. The pieces of a frame are stored one after another, and the tail
//! cache drops batches in log order, so the frame's memory is freed when
//! its last batch leaves the cache, as with the copy slab (`copy_slab`).

use bytes::{Bytes, BytesMut};
use std::ops::Deref;

/// Equal when the bytes are, whoever owns them.
#[derive(Clone)]
pub enum BatchBuf {
    /// Memory only this batch uses: patched in place.
    Owned(BytesMut),
    /// A view of a buffer that may hold other data too.
    Shared(Bytes),
}

impl BatchBuf {
    pub fn is_owned(&self) -> bool {
        matches!(self, BatchBuf::Owned(_))
    }
}

impl Default for BatchBuf {
    fn default() -> Self {
        BatchBuf::Shared(Bytes::new())
    }
}

impl Deref for BatchBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BatchBuf::Owned(m) => m,
            BatchBuf::Shared(b) => b,
        }
    }
}

impl PartialEq for BatchBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for BatchBuf {}

impl std::fmt::Debug for BatchBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_owned() { "Owned" } else { "Shared" };
        write!(f, "{kind}({} bytes)", self.len())
    }
}

impl From<Bytes> for BatchBuf {
    fn from(b: Bytes) -> Self {
        BatchBuf::Shared(b)
    }
}

impl From<BytesMut> for BatchBuf {
    fn from(m: BytesMut) -> Self {
        BatchBuf::Owned(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_read_as_their_bytes() {
        let owned = BatchBuf::from(BytesMut::from(&b"abc"[..]));
        let shared = BatchBuf::from(Bytes::from_static(b"abc"));
        assert_eq!(&owned[..], b"abc");
        assert_eq!(&shared[..], b"abc");
        assert!(owned.is_owned() && !shared.is_owned());
        assert_eq!(owned, shared);
        assert_eq!(format!("{:?}", BatchBuf::default()), "Shared(0 bytes)");
    }
}
