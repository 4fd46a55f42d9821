//! The frame format: a `u32` big-endian body length, then a postcard body.
//!
//! ```text
//! +----------------+------------------------------+
//! | len: u32 (BE)  | postcard(message), len bytes |
//! +----------------+------------------------------+
//! ```
//!
//! A reader checks `len` against its limit *before* allocating anything
//! ([`body_len`]), so a hostile length prefix costs nothing. Bodies must be
//! consumed exactly: trailing bytes after a message are an error, so a
//! format drift cannot pass silently.
//!
//! This module does no I/O; see [`crate::codec`] for the tokio codec.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Largest body a server accepts from a client (`Hello`, `Request`): 64 KiB.
/// Requests are small; nothing legitimate comes close.
pub const MAX_REQUEST_FRAME: u32 = 64 * 1024;

/// Largest body a client accepts from a server (`HelloReply`, `Response`):
/// 16 MiB, enough for `ListVms` of thousands of VMs. A server that would
/// exceed it answers [`crate::ErrorReply::Internal`] instead.
pub const MAX_REPLY_FRAME: u32 = 16 * 1024 * 1024;

/// A frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix (or an encoded message) exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced or encoded body length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The message could not be serialized.
    #[error("cannot encode message")]
    Encode(#[source] postcard::Error),
    /// The body is not a valid message of the expected type.
    #[error("cannot decode message")]
    Decode(#[source] postcard::Error),
    /// The body holds a valid message followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// The transport failed (only from [`crate::codec`]).
    #[error("transport error")]
    Io(#[from] std::io::Error),
}

/// Reads a frame header: the body length, if it is within `max`.
///
/// # Errors
/// [`FrameError::TooLarge`] if the prefix announces more than `max` bytes.
pub fn body_len(header: [u8; HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    // u32 always fits in usize on the 32/64-bit targets vmd supports.
    Ok(usize::try_from(len).expect("u32 fits in usize on supported targets"))
}

/// A growable byte buffer a frame can be appended to (`Vec<u8>`, and
/// `BytesMut` with the `codec` feature).
pub trait FrameBuffer: Extend<u8> + std::ops::DerefMut<Target = [u8]> {
    /// Shortens the buffer to `len` bytes.
    fn truncate_to(&mut self, len: usize);
}

impl FrameBuffer for Vec<u8> {
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len);
    }
}

#[cfg(feature = "codec")]
impl FrameBuffer for bytes::BytesMut {
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len);
    }
}

/// Lends a buffer to postcard, which wants an `Extend` by value.
struct Appender<'a, B>(&'a mut B);

impl<B: Extend<u8>> Extend<u8> for Appender<'_, B> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// Appends one whole frame (header and body) for `msg` to `dst`. On error
/// `dst` is left as it was.
///
/// # Errors
/// [`FrameError::Encode`] if serialization fails, [`FrameError::TooLarge`]
/// if the body exceeds `max`.
pub fn encode_into<T: Serialize, B: FrameBuffer>(
    msg: &T,
    max: u32,
    dst: &mut B,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.extend([0; HEADER_LEN]);
    let result = match postcard::to_extend(msg, Appender(dst)) {
        Err(e) => Err(FrameError::Encode(e)),
        Ok(_) => {
            let body = dst.len() - start - HEADER_LEN;
            match u32::try_from(body) {
                Ok(len) if len <= max => {
                    dst[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
                    return Ok(());
                }
                _ => Err(FrameError::TooLarge {
                    len: body as u64,
                    max,
                }),
            }
        }
    };
    dst.truncate_to(start);
    result
}

/// Encodes one whole frame (header and body) for `msg`.
///
/// # Errors
/// As [`encode_into`].
pub fn encode<T: Serialize>(msg: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(msg, max, &mut out)?;
    Ok(out)
}

/// Decodes a frame body (without its header) as exactly one `T`.
///
/// # Errors
/// [`FrameError::Decode`] if the body is not a `T`,
/// [`FrameError::TrailingBytes`] if bytes remain after it.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(FrameError::Decode)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(FrameError::TrailingBytes(rest.len()))
    }
}

/// The `id` of a request body that did not decode as a whole (for example
/// an operation this server does not know), so the error reply can still
/// name it. `None` if not even the id is readable.
pub fn peek_request_id(body: &[u8]) -> Option<u32> {
    postcard::take_from_bytes::<u32>(body)
        .ok()
        .map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_limit_is_checked_before_allocation() {
        assert_eq!(body_len(64u32.to_be_bytes(), 64).ok(), Some(64));
        assert!(matches!(
            body_len(u32::MAX.to_be_bytes(), MAX_REQUEST_FRAME),
            Err(FrameError::TooLarge { len, max: MAX_REQUEST_FRAME }) if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn encode_respects_limit_and_leaves_buffer_intact() {
        let mut buf = vec![1, 2, 3];
        let big = "x".repeat(100);
        assert!(matches!(
            encode_into(&big, 10, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(buf, [1, 2, 3]);
        encode_into(&"ok", 10, &mut buf).expect("small message fits");
        assert_eq!(buf, [1, 2, 3, 0, 0, 0, 3, 2, b'o', b'k']);
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        assert_eq!(decode::<u8>(&[7]).ok(), Some(7));
        assert!(matches!(
            decode::<u8>(&[7, 0]),
            Err(FrameError::TrailingBytes(1))
        ));
        assert!(matches!(decode::<String>(&[5]), Err(FrameError::Decode(_))));
    }

    #[test]
    fn peek_id() {
        assert_eq!(peek_request_id(&[0xac, 0x02, 0xff]), Some(300));
        assert_eq!(peek_request_id(&[]), None);
    }
}
