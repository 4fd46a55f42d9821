//! A `tokio_util::codec` for the frame format (feature `codec`).
//!
//! [`FrameCodec<In, Out>`] decodes frames of `In` (at most `max_in` bytes)
//! and encodes `Out` (at most `max_out` bytes). Errors come in two kinds:
//!
//! - framing errors ([`FrameError::TooLarge`], I/O) are returned as `Err`:
//!   the byte stream can no longer be trusted and the connection must end;
//! - a body that is framed correctly but does not decode is yielded as
//!   `Ok(Err(UndecodableFrame))`: the stream stays in sync, so the peer can
//!   get an error reply and carry on (see [`crate::frame::peek_request_id`]).

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{self, FrameError, HEADER_LEN};

/// A frame whose body did not decode as the expected message.
#[derive(Debug)]
pub struct UndecodableFrame {
    /// The raw body.
    pub body: Bytes,
    /// Why it did not decode.
    pub error: FrameError,
}

/// Length-prefixed postcard frames: decodes `In`, encodes `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_in: u32,
    max_out: u32,
    /// Body length of the frame being read, once its header is consumed.
    pending: Option<usize>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the given body limits for each direction.
    pub fn new(max_in: u32, max_out: u32) -> Self {
        Self {
            max_in,
            max_out,
            pending: None,
            _types: PhantomData,
        }
    }

    /// The same limits, for other message types (for example after the
    /// `Hello` phase). Must be called between frames.
    pub fn retype<In2, Out2>(self) -> FrameCodec<In2, Out2> {
        FrameCodec {
            max_in: self.max_in,
            max_out: self.max_out,
            pending: self.pending,
            _types: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = Result<In, UndecodableFrame>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                let Some(header) = src.get(..HEADER_LEN) else {
                    return Ok(None);
                };
                let header: [u8; HEADER_LEN] = header.try_into().expect("slice is HEADER_LEN long");
                let len = frame::body_len(header, self.max_in)?;
                src.advance(HEADER_LEN);
                self.pending = Some(len);
                len
            }
        };
        if src.len() < len {
            // The limit was checked above, so this reservation is bounded.
            src.reserve(len - src.len());
            return Ok(None);
        }
        self.pending = None;
        let body = src.split_to(len).freeze();
        Ok(Some(
            frame::decode(&body).map_err(|error| UndecodableFrame { body, error }),
        ))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))),
        }
    }
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame::encode_into(item, self.max_out, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::MAX_REQUEST_FRAME;
    use crate::{Hello, Op, Request};

    type ServerCodec = FrameCodec<Request, Hello>;

    fn request(id: u32) -> Request {
        Request { id, body: Op::Host }
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut codec = ServerCodec::new(MAX_REQUEST_FRAME, MAX_REQUEST_FRAME);
        let mut wire = frame::encode(&request(1), MAX_REQUEST_FRAME).expect("encodes");
        wire.extend(frame::encode(&request(2), MAX_REQUEST_FRAME).expect("encodes"));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.extend_from_slice(&[byte]);
            while let Some(item) = codec.decode(&mut buf).expect("no framing error") {
                got.push(item.expect("decodes").id);
            }
        }
        assert_eq!(got, [1, 2]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_fails_before_buffering() {
        let mut codec = ServerCodec::new(1024, 1024);
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { max: 1024, .. })
        ));
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for the hostile length"
        );
    }

    #[test]
    fn undecodable_body_keeps_the_stream_in_sync() {
        let mut codec = ServerCodec::new(MAX_REQUEST_FRAME, MAX_REQUEST_FRAME);
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 9, 0xee][..]);
        buf.extend_from_slice(&frame::encode(&request(3), MAX_REQUEST_FRAME).expect("encodes"));
        let bad = codec
            .decode(&mut buf)
            .expect("framing ok")
            .expect("a frame");
        let bad = bad.expect_err("body is not a Request");
        assert_eq!(frame::peek_request_id(&bad.body), Some(9));
        let good = codec
            .decode(&mut buf)
            .expect("framing ok")
            .expect("a frame");
        assert_eq!(good.expect("decodes").id, 3);
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let mut codec = ServerCodec::new(MAX_REQUEST_FRAME, MAX_REQUEST_FRAME);
        let mut buf = BytesMut::from(&[0, 0, 0, 10, 1, 2][..]);
        assert!(matches!(codec.decode_eof(&mut buf), Err(FrameError::Io(_))));
        let mut fresh = ServerCodec::new(MAX_REQUEST_FRAME, MAX_REQUEST_FRAME);
        assert!(matches!(fresh.decode_eof(&mut BytesMut::new()), Ok(None)));
    }

    #[test]
    fn encoder_refuses_oversized_messages_and_keeps_the_buffer() {
        let mut codec = FrameCodec::<Request, Hello>::new(1024, 16);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let hello = Hello {
            protocol: 1,
            client_name: "x".repeat(100),
        };
        assert!(matches!(
            codec.encode(&hello, &mut buf),
            Err(FrameError::TooLarge { max: 16, .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }
}
