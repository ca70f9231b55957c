//! `ModelInfer` messages read from and written to HTTP/2 frames without
//! tonic's codec copies: a tensor's raw contents travel between the frames
//! and the tensor's own buffer in at most one copy.
//!
//! # Why
//! tonic's codec copies every message it receives into one contiguous buffer,
//! and prost copies every `bytes` field it encodes into the send buffer. At
//! 1 Mi float32 elements that is 4 MiB copied on the way in and 4 MiB on the
//! way out, and an input whose bytes do not start at an address aligned for
//! its elements was copied a third time before the math could view it: a
//! third of the server's CPU time per call, on a path bound by moving bytes.
//! (The aligning copy, then the layer's pass over it, still took half of the
//! server's user time at 1 Mi: stateless calls now skip it, see
//! [`crate::layers::kernels::elementwise`].)
//!
//! # How
//! - In: the frames of one length-prefixed message are kept as they came
//!   ([`read_message`]). Every field but the raw contents is re-encoded into
//!   a small buffer that prost decodes. The server keeps each raw content in
//!   its frames ([`decode_framed`]): a stateless model computes straight from
//!   them, and anything else gets it as [`Chunks::into_bytes`] gives it —
//!   the frame itself when it lies in one at an aligned address, else copied
//!   once into a buffer aligned for any element type (as [`decode`] does).
//! - Out: the message without its raw contents is encoded by prost; each raw
//!   content follows as its own frame, uncopied ([`encode`], [`Frames`]).
//!
//! The bytes on the wire are standard protobuf in standard gRPC framing: the
//! raw contents come last, where prost puts them too (theirs is the highest
//! field number), and a sender may put them anywhere. The server takes
//! this path for uncompressed `ModelInfer` calls ([`DirectInfer`]); the load
//! generator uses [`unary`] as its client.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prost::{
    encoding::{
        decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint, WireType,
    },
    Message,
};
use tonic::{body::Body, metadata::MetadataMap, server::NamedService, Status};

use super::InferenceService;
use crate::pb::inference as pb;

/// The gRPC path of `ModelInfer`.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// gRPC's message prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// Raw contents are aligned for the widest element type (float64, int64).
type Word = u64;

/// A message whose repeated `bytes` field of raw tensor contents is carried
/// apart from the rest.
pub trait RawContents: Message + Default {
    /// The field number of the raw contents.
    const FIELD: u32;
    fn raw_contents(&mut self) -> &mut Vec<Bytes>;
}

impl RawContents for pb::ModelInferRequest {
    const FIELD: u32 = 7;
    fn raw_contents(&mut self) -> &mut Vec<Bytes> {
        &mut self.raw_input_contents
    }
}

impl RawContents for pb::ModelInferResponse {
    const FIELD: u32 = 6;
    fn raw_contents(&mut self) -> &mut Vec<Bytes> {
        &mut self.raw_output_contents
    }
}

/// The frames of one message, in order, as a [`Buf`] that hands out a whole
/// frame's bytes without copying them.
#[derive(Debug, Default)]
pub struct Chunks {
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Splits off the first `len` bytes (at most `remaining`), uncopied.
    pub fn split_to(&mut self, len: usize) -> Chunks {
        let mut head = Chunks::default();
        let mut left = len.min(self.remaining);
        while left > 0 {
            let front = self
                .chunks
                .front_mut()
                .expect("remaining counts the chunks");
            let part = if front.len() <= left {
                self.chunks.pop_front().expect("a front chunk")
            } else {
                front.split_to(left)
            };
            left -= part.len();
            self.remaining -= part.len();
            head.push(part);
        }
        head
    }
}

impl FromIterator<Bytes> for Chunks {
    fn from_iter<I: IntoIterator<Item = Bytes>>(frames: I) -> Chunks {
        let mut chunks = Chunks::default();
        frames.into_iter().for_each(|frame| chunks.push(frame));
        chunks
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advanced past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self
                .chunks
                .front_mut()
                .expect("remaining counts the chunks");
            if front.len() > cnt {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.chunks.front_mut() {
            Some(front) if front.len() >= len => {
                self.remaining -= len;
                let bytes = front.split_to(len);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                bytes
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

/// Reads the one message of a unary call's body, as its frames came: `None`
/// if the body ends before any byte of one. Errors as tonic's codec words
/// them (the oversize one is rewritten to name `--max-message-bytes` by the
/// server's response layer).
pub async fn read_message<B>(body: &mut B, max: usize) -> Result<Option<Chunks>, Status>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut got = Chunks::default();
    let mut len = None;
    loop {
        if len.is_none() && got.remaining() >= PREFIX {
            let mut prefix = got.split_to(PREFIX);
            match prefix.get_u8() {
                0 => {}
                1 => {
                    return Err(Status::internal(
                        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                    ))
                }
                flag => {
                    return Err(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1)"
                    )))
                }
            }
            let found = prefix.get_u32() as usize;
            if found > max {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {found} bytes, the limit is: {max} bytes"
                )));
            }
            len = Some(found);
        }
        if let Some(len) = len {
            if got.remaining() >= len {
                // A unary call has one message; anything after it is not read.
                return Ok(Some(got.split_to(len)));
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.push(data);
                }
            }
            Some(Err(error)) => return Err(Status::from_error(error.into())),
            None if len.is_none() && got.remaining() == 0 => return Ok(None),
            None => return Err(Status::internal("Unexpected EOF decoding stream.")),
        }
    }
}

/// Where a decoded raw content may start in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At an address aligned for any element type, so the elements can be
    /// viewed in place (the server's inputs).
    Aligned,
    /// Anywhere: bytes that are only compared or copied (a client's answers)
    /// stay in their frame when they lie in one.
    Anywhere,
}

/// Decodes a message whose frames [`read_message`] returned.
pub fn decode<M: RawContents>(buf: Chunks, start: Start) -> Result<M, Status> {
    let (mut message, raw) = decode_framed::<M>(buf)?;
    *message.raw_contents() = raw.into_iter().map(|r| r.into_bytes(start)).collect();
    Ok(message)
}

/// Decodes a message whose frames [`read_message`] returned, leaving its raw
/// contents (returned apart, in order) in the frames they arrived in: the
/// server then reads them once, a piece at a time, as it computes.
pub fn decode_framed<M: RawContents>(mut buf: Chunks) -> Result<(M, Vec<Chunks>), Status> {
    let malformed =
        |what: &str| Status::internal(format!("failed to decode Protobuf message: {what}"));
    let mut rest = BytesMut::new();
    let mut raw = Vec::new();
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(|e| malformed(&e.to_string()))?;
        let length = |buf: &mut Chunks| -> Result<usize, Status> {
            let len = decode_varint(buf).map_err(|e| malformed(&e.to_string()))?;
            usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.remaining())
                .ok_or_else(|| malformed("buffer underflow"))
        };
        if tag == M::FIELD && wire_type == WireType::LengthDelimited {
            let len = length(&mut buf)?;
            raw.push(buf.split_to(len));
            continue;
        }
        encode_key(tag, wire_type, &mut rest);
        let len = match wire_type {
            WireType::Varint => {
                let value = decode_varint(&mut buf).map_err(|e| malformed(&e.to_string()))?;
                encode_varint(value, &mut rest);
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let len = length(&mut buf)?;
                encode_varint(len as u64, &mut rest);
                len
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(malformed("groups are not used by this protocol"))
            }
        };
        if buf.remaining() < len {
            return Err(malformed("buffer underflow"));
        }
        rest.put((&mut buf).take(len));
    }
    let message = M::decode(rest.freeze()).map_err(|e| Status::internal(e.to_string()))?;
    Ok((message, raw))
}

impl Chunks {
    /// The bytes, a frame's worth at a time, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().map(|c| &c[..])
    }

    /// The buffers, front to back (not copied).
    pub fn into_pieces(self) -> impl Iterator<Item = Bytes> {
        self.chunks.into_iter()
    }

    /// The bytes in one buffer starting as `start` asks: the frame itself
    /// when they lie so in one, else copied once into an aligned buffer.
    pub fn into_bytes(mut self, start: Start) -> Bytes {
        let len = self.remaining;
        let chunk = self.chunk();
        let aligned = (chunk.as_ptr() as usize).is_multiple_of(std::mem::align_of::<Word>());
        if chunk.len() == len && (aligned || start == Start::Anywhere) {
            return self.copy_to_bytes(len);
        }
        let words = len.div_ceil(std::mem::size_of::<Word>());
        let mut aligned: Vec<Word> = Vec::with_capacity(words);
        if words > 0 {
            // The padding past `len` is never read, but must be initialised.
            aligned.spare_capacity_mut()[words - 1].write(0);
        }
        let dst = aligned.as_mut_ptr().cast::<u8>();
        let mut copied = 0;
        for chunk in &self.chunks {
            // SAFETY: `dst` has room for `words * 8 >= len` bytes and the
            // chunks hold `len` bytes in all; a frame's bytes never overlap
            // a fresh allocation.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst.add(copied), chunk.len()) };
            copied += chunk.len();
        }
        // SAFETY: the first `len` bytes were written above and the last word
        // was initialised before them, so all `words` words are initialised.
        unsafe { aligned.set_len(words) };
        Bytes::from_owner(AlignedBytes {
            words: aligned,
            len,
        })
    }
}

/// Bytes in a buffer of words, so that they start aligned.
struct AlignedBytes {
    words: Vec<Word>,
    len: usize,
}

impl AsRef<[u8]> for AlignedBytes {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

/// A message as gRPC frames: the prefix and the message without its raw
/// contents, then each raw content behind its own key and length, uncopied.
/// `OUT_OF_RANGE` (as tonic's codec) if it is longer than `max`.
pub fn encode<M: RawContents>(mut message: M, max: usize) -> Result<VecDeque<Bytes>, Status> {
    let raw = std::mem::take(message.raw_contents());
    let raw_key_len = prost::encoding::key_len(M::FIELD);
    let rest_len = message.encoded_len();
    let len = rest_len
        + raw
            .iter()
            .map(|r| raw_key_len + encoded_len_varint(r.len() as u64) + r.len())
            .sum::<usize>();
    if len > max || u32::try_from(len).is_err() {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    let mut head = BytesMut::with_capacity(PREFIX + rest_len + 16);
    head.put_u8(0);
    head.put_u32(len as u32);
    message.encode_raw(&mut head);
    let mut frames = VecDeque::with_capacity(1 + 2 * raw.len());
    for content in raw {
        encode_key(M::FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(content.len() as u64, &mut head);
        frames.push_back(head.split().freeze());
        frames.push_back(content);
    }
    frames.push_back(head.freeze());
    frames.retain(|f| !f.is_empty());
    Ok(frames)
}

/// A body of data frames known in advance, then optional trailers.
#[derive(Debug, Default)]
pub struct Frames {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Frames {
    pub fn new(data: VecDeque<Bytes>, trailers: Option<HeaderMap>) -> Frames {
        Frames { data, trailers }
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.data.pop_front() {
            Some(data) => Some(Frame::data(data)),
            None => self.trailers.take().map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.iter().map(|d| d.len() as u64).sum())
    }
}

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// A successful unary answer: `metadata` as headers, the message's frames,
/// `grpc-status: 0` as the trailer.
pub fn response<M: RawContents>(
    metadata: MetadataMap,
    message: M,
    max: usize,
) -> http::Response<Body> {
    let frames = match encode(message, max) {
        Ok(frames) => frames,
        Err(status) => return status.into_http(),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut response = http::Response::new(Body::new(Frames::new(frames, Some(trailers))));
    *response.headers_mut() = metadata.into_headers();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// Whether the server reads this request itself: an uncompressed gRPC
/// `ModelInfer`. Anything else (gzip, gRPC-Web) goes through tonic's codec.
pub fn is_direct(request: &http::Request<Body>) -> bool {
    let headers = request.headers();
    request.method() == http::Method::POST
        && request.uri().path() == MODEL_INFER_PATH
        && headers
            .get("grpc-encoding")
            .is_none_or(|e| e.as_bytes() == b"identity")
        && headers.get(header::CONTENT_TYPE).is_some_and(|t| {
            let t = t.as_bytes();
            t == b"application/grpc" || t.starts_with(b"application/grpc+proto")
        })
}

/// One unary call with raw contents on `service` (a tonic `Channel`, maybe
/// behind an interceptor): the client side of this module's path.
pub async fn unary<S, B, M, R>(
    service: &mut S,
    path: &'static str,
    metadata: MetadataMap,
    message: M,
    max: usize,
) -> Result<R, Status>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    M: RawContents,
    R: RawContents,
{
    let frames = encode(message, max)?;
    let mut request = http::Request::new(Body::new(Frames::new(frames, None)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(path);
    *request.headers_mut() = metadata.into_headers();
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = service
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, mut body) = response.into_parts();
    // A trailers-only answer: its status is in the headers.
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    if parts.status != http::StatusCode::OK {
        return Err(Status::unknown(format!("HTTP status {}", parts.status)));
    }
    let message = read_message(&mut body, max).await?;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::from_error(e.into()))?;
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) if status.code() != tonic::Code::Ok => Err(status),
        Some(_) => match message {
            Some(message) => decode(message, Start::Anywhere),
            None => Err(Status::internal("Missing response message.")),
        },
        None => Err(Status::internal("missing grpc-status trailer")),
    }
}

/// The server side: serves uncompressed `ModelInfer` calls on this module's
/// path and hands every other request to `inner` (tonic's generated server).
#[derive(Clone)]
pub struct DirectInfer<S> {
    inner: S,
    service: InferenceService,
    max_message_bytes: usize,
}

impl<S> DirectInfer<S> {
    pub fn new(inner: S, service: InferenceService, max_message_bytes: usize) -> Self {
        DirectInfer {
            inner,
            service,
            max_message_bytes,
        }
    }
}

impl<S: NamedService> NamedService for DirectInfer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for DirectInfer<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !is_direct(&request) {
            return Box::pin(self.inner.call(request));
        }
        let (service, max) = (self.service.clone(), self.max_message_bytes);
        Box::pin(async move {
            let (parts, mut body) = request.into_parts();
            let message = match read_message(&mut body, max).await {
                Ok(Some(message)) => decode_framed::<pb::ModelInferRequest>(message),
                Ok(None) => Err(Status::internal("Missing request message.")),
                Err(status) => Err(status),
            };
            let answer = match message {
                Ok((message, raw)) => {
                    let request =
                        tonic::Request::from_http(http::Request::from_parts(parts, message));
                    service.model_infer_framed(request, Some(raw)).await
                }
                Err(status) => Err(status),
            };
            Ok(match answer {
                Ok(answer) => {
                    let (metadata, message, _) = answer.into_parts();
                    response(metadata, message, max)
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

#[cfg(test)]
mod tests;
