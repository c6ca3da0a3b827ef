//! Framing: every message on a coremq connection is a length-prefixed frame.
//!
//! ```text
//! request  = frame_len u32 | api u16 | api_version u16 | request_id u32 | body
//! response = frame_len u32 | request_id u32 | error_code u16 | body
//! ```
//! All integers big-endian. `frame_len` counts the bytes after itself, so a
//! reader needs four bytes to know how much to wait for, and can refuse a
//! frame over the limit before buffering it. Request ids are the client's:
//! the broker echoes them, which lets a client pipeline many requests on one
//! connection and match replies that complete out of order.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const FRAME_LEN_BYTES: usize = 4;
/// Bytes of a request header after the length prefix.
pub const REQUEST_HEADER_BYTES: usize = 8;
/// Bytes of a response header after the length prefix.
pub const RESPONSE_HEADER_BYTES: usize = 6;
/// Default limit of one frame (after the length prefix).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 << 20;
/// The protocol version this build speaks (every api is at version 1).
pub const API_VERSION: u16 = 1;

/// The header of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api: u16,
    pub api_version: u16,
    pub request_id: u32,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
}

/// Reads the length prefix at the start of `buf` and checks it against the
/// limit. `Ok(None)` means fewer than four bytes are buffered yet.
pub fn peek_frame_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_LEN_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(Some(len))
}

/// Splits a request frame (without its length prefix) into header and body.
pub fn parse_request(mut frame: Bytes) -> Result<(RequestHeader, Bytes), FrameError> {
    if frame.len() < REQUEST_HEADER_BYTES {
        return Err(FrameError::TooShort(frame.len()));
    }
    let header = RequestHeader {
        api: frame.get_u16(),
        api_version: frame.get_u16(),
        request_id: frame.get_u32(),
    };
    Ok((header, frame))
}

/// Splits a response frame (without its length prefix) into request id, error code and body.
pub fn parse_response(mut frame: Bytes) -> Result<(u32, u16, Bytes), FrameError> {
    if frame.len() < RESPONSE_HEADER_BYTES {
        return Err(FrameError::TooShort(frame.len()));
    }
    let request_id = frame.get_u32();
    let code = frame.get_u16();
    Ok((request_id, code, frame))
}

/// Writes a request frame header; `body_len` is the number of body bytes that follow.
pub fn put_request_header(out: &mut BytesMut, header: RequestHeader, body_len: usize) {
    out.put_u32((REQUEST_HEADER_BYTES + body_len) as u32);
    out.put_u16(header.api);
    out.put_u16(header.api_version);
    out.put_u32(header.request_id);
}

/// Writes a response frame header; `body_len` is the number of body bytes that follow.
pub fn put_response_header(out: &mut BytesMut, request_id: u32, code: u16, body_len: usize) {
    out.put_u32((RESPONSE_HEADER_BYTES + body_len) as u32);
    out.put_u32(request_id);
    out.put_u16(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut out = BytesMut::new();
        let h = RequestHeader {
            api: 2,
            api_version: 1,
            request_id: 77,
        };
        put_request_header(&mut out, h, 3);
        out.put_slice(b"abc");
        let len = peek_frame_len(&out, 100).unwrap().unwrap();
        assert_eq!(len, out.len() - FRAME_LEN_BYTES);
        let (h2, body) = parse_request(out.freeze().slice(FRAME_LEN_BYTES..)).unwrap();
        assert_eq!(h2, h);
        assert_eq!(&body[..], b"abc");
    }

    #[test]
    fn oversized_and_short_frames_are_refused() {
        assert_eq!(peek_frame_len(&[0, 0], 10), Ok(None));
        assert_eq!(
            peek_frame_len(&[0, 0, 1, 0], 10),
            Err(FrameError::TooLarge { len: 256, max: 10 })
        );
        assert_eq!(
            parse_request(Bytes::from_static(&[1, 2, 3])),
            Err(FrameError::TooShort(3))
        );
        assert_eq!(
            parse_response(Bytes::from_static(&[1])),
            Err(FrameError::TooShort(1))
        );
    }
}
