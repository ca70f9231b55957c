//! Tests of [`super`].

use super::*;
use proptest::prelude::*;

fn request(raw: Vec<Vec<u8>>) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "relu".into(),
        id: "call-1".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![2, 3],
            ..Default::default()
        }],
        raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
        ..Default::default()
    }
}

/// `bytes` cut at `cuts` (offsets, any order), as frames.
fn frames(bytes: &[u8], cuts: &[usize]) -> Chunks {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (bytes.len() + 1)).collect();
    cuts.extend([0, bytes.len()]);
    cuts.sort_unstable();
    cuts.windows(2)
        .map(|pair| Bytes::copy_from_slice(&bytes[pair[0]..pair[1]]))
        .collect()
}

fn joined(frames: VecDeque<Bytes>) -> Vec<u8> {
    frames.iter().flat_map(|f| f.iter().copied()).collect()
}

/// A body of `frames`, read as the server reads one.
fn read(frames: Vec<Bytes>, max: usize) -> Result<Option<Chunks>, Status> {
    let mut body = Frames::new(frames.into(), None);
    block_on(read_message(&mut body, max))
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

proptest! {
    /// Whatever the frames, the message decodes to what was encoded, each
    /// raw content at an aligned address.
    #[test]
    fn encode_then_decode_in_any_frames(
        raw in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let sent = request(raw);
        let wire = joined(encode(sent.clone(), usize::MAX).unwrap());
        let message = read(frames(&wire, &cuts).chunks.into(), usize::MAX).unwrap().unwrap();
        let got: pb::ModelInferRequest = decode(message, Start::Aligned).unwrap();
        prop_assert_eq!(&got, &sent);
        for content in &got.raw_input_contents {
            prop_assert_eq!(content.as_ptr() as usize % 8, 0);
        }
    }

    /// A message prost encoded (raw contents before other fields' ends,
    /// unknown fields) decodes as prost decodes it.
    #[test]
    fn decodes_what_prost_encodes(
        raw in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..3),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let sent = request(raw);
        let mut bytes = sent.encode_to_vec();
        // Field 99, varint 1: unknown, skipped by both.
        bytes.extend([0x98, 0x06, 0x01]);
        let got: pb::ModelInferRequest = decode(frames(&bytes, &cuts), Start::Aligned).unwrap();
        prop_assert_eq!(got, pb::ModelInferRequest::decode(&bytes[..]).unwrap());
    }
}

#[test]
fn a_raw_content_aligned_in_one_frame_is_not_copied() {
    let content = Bytes::from(vec![7u8; 64]);
    let mut head = BytesMut::new();
    encode_key(7, WireType::LengthDelimited, &mut head);
    encode_varint(64, &mut head);
    // Bytes from a Vec<u8> of 64 bytes: the allocator aligns it to 8 or more.
    assert_eq!(content.as_ptr() as usize % 8, 0);
    let mut chunks = Chunks::default();
    chunks.push(head.freeze());
    chunks.push(content.clone());
    let got: pb::ModelInferRequest = decode(chunks, Start::Aligned).unwrap();
    assert_eq!(got.raw_input_contents[0].as_ptr(), content.as_ptr());
    // Not aligned: copied for the server, kept in its frame for a client.
    let unaligned = content.slice(1..);
    for (start, kept) in [(Start::Aligned, false), (Start::Anywhere, true)] {
        let mut head = BytesMut::new();
        encode_key(7, WireType::LengthDelimited, &mut head);
        encode_varint(63, &mut head);
        let mut chunks = Chunks::default();
        chunks.push(head.freeze());
        chunks.push(unaligned.clone());
        let got: pb::ModelInferRequest = decode(chunks, start).unwrap();
        assert_eq!(got.raw_input_contents[0], unaligned);
        assert_eq!(
            got.raw_input_contents[0].as_ptr() == unaligned.as_ptr(),
            kept,
            "{start:?}"
        );
    }
}

#[test]
fn responses_carry_their_raw_contents_as_their_own_frames() {
    let content = Bytes::from(vec![1u8; 1000]);
    let response = pb::ModelInferResponse {
        model_name: "relu".into(),
        raw_output_contents: vec![content.clone()],
        ..Default::default()
    };
    let frames = encode(response.clone(), usize::MAX).unwrap();
    assert!(frames.iter().any(|f| f.as_ptr() == content.as_ptr()));
    let wire = joined(frames);
    assert_eq!(wire[0], 0);
    assert_eq!(
        u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize,
        wire.len() - 5
    );
    assert_eq!(
        pb::ModelInferResponse::decode(&wire[5..]).unwrap(),
        response
    );
}

/// Asserts `status` has `code` and a message containing `words`.
fn assert_status(status: Status, code: tonic::Code, words: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(words), "{status:?}");
}

#[test]
fn an_answer_longer_than_the_limit_is_out_of_range() {
    let response = pb::ModelInferResponse {
        raw_output_contents: vec![Bytes::from(vec![0u8; 100])],
        ..Default::default()
    };
    let status = encode(response, 50).unwrap_err();
    assert_status(
        status,
        tonic::Code::OutOfRange,
        "encoded message length too large",
    );
}

#[test]
fn read_message_rejects_as_tonic_does() {
    let message = |flag: u8, len: u32, body: &[u8]| {
        let mut bytes = vec![flag];
        bytes.extend(len.to_be_bytes());
        bytes.extend(body);
        vec![Bytes::from(bytes)]
    };
    let limit = "found 1000 bytes, the limit is: 999 bytes";
    let status = read(message(0, 1000, &[]), 999).unwrap_err();
    assert_status(status, tonic::Code::OutOfRange, limit);
    let status = read(message(1, 1, &[0]), 999).unwrap_err();
    assert_status(status, tonic::Code::Internal, "compressed-flag");
    let status = read(message(0, 10, &[1, 2, 3]), 999).unwrap_err();
    assert_status(status, tonic::Code::Internal, "Unexpected EOF");
    assert!(read(vec![], 999).unwrap().is_none());
    // What follows the one message is not read.
    let mut two = message(0, 2, &[0x08, 0x01]);
    two.extend(message(0, 1000, &[]));
    assert_eq!(read(two, 999).unwrap().unwrap().remaining(), 2);
}

#[test]
fn truncated_and_grouped_fields_are_malformed() {
    for bytes in [
        &[0x3a, 0x05, 1, 2][..], // raw contents of 5 bytes, 2 present
        &[0x0a, 0x09, b'r'],     // model_name of 9 bytes, 1 present
        &[0x0b],                 // a group start
        &[0x80],                 // a key's varint cut short
    ] {
        let status =
            decode::<pb::ModelInferRequest>(frames(bytes, &[]), Start::Anywhere).unwrap_err();
        assert_status(
            status,
            tonic::Code::Internal,
            "failed to decode Protobuf message",
        );
    }
}
