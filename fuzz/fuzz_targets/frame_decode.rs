//! Arbitrary bytes through the frame decoder, as a server reads them.
//!
//! 1. The whole input is decoded as one frame body of every message type
//!    (`Request`, `Response`, `Hello`, `HelloReply`). What decodes must
//!    re-encode, no longer than the body, to bytes that decode to the same
//!    value; a request's id must be readable with `peek_request_id`.
//! 2. Input byte 0 picks a chunk size and byte 1 a body limit; the rest is
//!    a byte stream fed to `FrameCodec` the way a connection does: `Hello`
//!    first, then the codec is retyped to `Request`. It is fed once in
//!    chunks and once whole; both must yield the same frames, errors and
//!    end of stream, and after each chunk the buffer must hold less than
//!    one frame (`HEADER_LEN + limit`).

#![no_main]

use std::fmt::Debug;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{self, FrameError, HEADER_LEN, MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{Hello, HelloReply, Request, Response};

fuzz_target!(|data: &[u8]| {
    decode_everything(data);
    if let [chunk, limit, stream @ ..] = data {
        let limit = match limit % 4 {
            0 => MAX_REQUEST_FRAME,
            // Small limits put valid frames over the limit and exercise
            // the exact boundary.
            n => u32::from(*limit >> 2) * u32::from(n),
        };
        let chunk = usize::from(*chunk).max(1);
        let whole = run(std::iter::once(stream), limit);
        let chunked = run(stream.chunks(chunk), limit);
        assert_eq!(whole, chunked, "chunks of {chunk} bytes, limit {limit}");
    }
});

/// Step 1: the input as one body of each message type.
fn decode_everything(body: &[u8]) {
    if let Ok(request) = frame::decode::<Request>(body) {
        assert_eq!(frame::peek_request_id(body), Some(request.id));
        round_trip(&request, body);
    }
    if let Ok(hello) = frame::decode::<Hello>(body) {
        round_trip(&hello, body);
    }
    if let Ok(response) = frame::decode::<Response>(body) {
        round_trip(&response, body);
    }
    if let Ok(reply) = frame::decode::<HelloReply>(body) {
        round_trip(&reply, body);
    }
}

fn round_trip<T>(msg: &T, body: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + Debug,
{
    // Re-encoding is minimal: never longer than the body, and shorter
    // where the body had non-minimal varints (postcard reads those too).
    let wire = frame::encode(msg, u32::MAX).expect("a decoded message re-encodes");
    assert!(wire.len() - HEADER_LEN <= body.len(), "re-encoding grew");
    let back: T = frame::decode(&wire[HEADER_LEN..]).expect("a re-encoded message decodes");
    assert_eq!(&back, msg);
}

/// The decoder of one connection: `Hello` first, then requests.
struct Connection {
    hello: Option<FrameCodec<Hello, HelloReply>>,
    requests: Option<FrameCodec<Request, Response>>,
}

impl Connection {
    fn new(limit: u32) -> Self {
        Self {
            hello: Some(FrameCodec::new(limit, MAX_REPLY_FRAME)),
            requests: None,
        }
    }

    /// The next frame as text, `None` if more bytes are needed.
    fn next(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<String>, FrameError> {
        if let Some(codec) = &mut self.hello {
            let item = step(codec, buf, eof)?;
            if item.is_some() {
                // As the server does after its `Welcome`.
                self.requests = self.hello.take().map(FrameCodec::retype);
            }
            return Ok(item);
        }
        let codec = self
            .requests
            .as_mut()
            .expect("one of the two codecs is always present");
        step(codec, buf, eof)
    }
}

fn step<In, Out>(
    codec: &mut FrameCodec<In, Out>,
    buf: &mut BytesMut,
    eof: bool,
) -> Result<Option<String>, FrameError>
where
    In: serde::de::DeserializeOwned + Debug,
{
    let item = if eof {
        codec.decode_eof(buf)?
    } else {
        codec.decode(buf)?
    };
    Ok(item.map(|item| match item {
        Ok(msg) => format!("{msg:?}"),
        Err(bad) => format!("undecodable {:?}: {}", &bad.body[..], bad.error),
    }))
}

/// Step 2: feeds `chunks` and returns everything the decoder said.
fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, limit: u32) -> Vec<String> {
    let mut conn = Connection::new(limit);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let frame_max = HEADER_LEN + usize::try_from(limit).expect("u32 fits in usize");
    let mut largest_chunk = 0;
    for chunk in chunks {
        largest_chunk = largest_chunk.max(chunk.len());
        buf.extend_from_slice(chunk);
        loop {
            match conn.next(&mut buf, false) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(e) => {
                    // The stream is out of sync; a server closes here.
                    events.push(format!("fatal: {e}"));
                    return events;
                }
            }
        }
        assert!(
            buf.len() < frame_max,
            "{} bytes buffered, limit {limit}",
            buf.len()
        );
        // Reserving for a frame in progress is bounded by the limit too
        // (with the buffer's doubling, and the chunks appended so far).
        assert!(
            buf.capacity() <= 2 * (frame_max + largest_chunk) + 64,
            "capacity {} with limit {limit} and chunks of up to {largest_chunk} bytes",
            buf.capacity(),
        );
    }
    match conn.next(&mut buf, true) {
        Ok(None) => events.push("eof".into()),
        Ok(Some(event)) => panic!("decode_eof found a frame decode missed: {event}"),
        Err(e) => events.push(format!("fatal at eof: {e}")),
    }
    events
}
