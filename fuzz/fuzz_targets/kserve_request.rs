//! Fuzzes the KServe v2 request mapping from wire bytes: `ModelInferRequest`
//! decoding as the server reads it (`kserve::wire`, the message cut into
//! frames), model lookup, sequence parameters, input validation (raw or
//! typed contents) and the stateless Forward with its KServe output.
//! Invariants: nothing panics; what the server decodes, prost decodes alike,
//! with every raw content aligned; a validated input computes, and its output
//! has the input's shape and byte size; the server's stateless path straight
//! from the frames (`layers::elementwise`) answers the chain's bytes.
#![no_main]

use std::collections::BTreeSet;

use bytes::Bytes;
use layerd::kserve::wire::{self, Chunks, Start};
use layerd::kserve::{models::Model, sequence::SequenceParams, take_input};
use layerd::layers::{Elementwise, MemberState};
use layerd::pb::inference::ModelInferRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Larger tensors are as valid, but only slow the fuzzer down.
const MAX_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // The first byte may name a served model, so the fuzzer need not guess
    // model names to get past the lookup.
    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    // Frames of 1 to 442 bytes, as the selector says.
    let frames = || {
        wire.chunks(1 + usize::from(selector % 64) * 7)
            .map(Bytes::copy_from_slice)
            .collect::<Chunks>()
    };
    let Ok(mut request) = wire::decode::<ModelInferRequest>(frames(), Start::Aligned) else {
        return;
    };
    // As the server reads it: the raw contents left in their frames.
    let (_, in_frames) =
        wire::decode_framed::<ModelInferRequest>(frames()).expect("decoded once already");
    assert!(in_frames
        .iter()
        .map(|c| c.pieces().flatten().copied().collect::<Vec<u8>>())
        .eq(request.raw_input_contents.iter().map(|r| r.to_vec())));
    // Field by field: whole messages may hold NaNs (not equal to themselves)
    // and maps (encoded in no fixed order).
    let by_prost = ModelInferRequest::decode(wire).expect("what the server decodes, prost decodes");
    assert_eq!(by_prost.raw_input_contents, request.raw_input_contents);
    let head = |r: &ModelInferRequest| {
        let inputs: Vec<_> = r
            .inputs
            .iter()
            .map(|i| (i.name.clone(), i.datatype.clone(), i.shape.clone()))
            .collect();
        let outputs: Vec<_> = r.outputs.iter().map(|o| o.name.clone()).collect();
        let parameters: BTreeSet<_> = r.parameters.keys().cloned().collect();
        (
            r.model_name.clone(),
            r.model_version.clone(),
            r.id.clone(),
            inputs,
            outputs,
            parameters,
        )
    };
    assert_eq!(head(&by_prost), head(&request));
    for raw in request
        .raw_input_contents
        .iter()
        .filter(|raw| !raw.is_empty())
    {
        assert_eq!(raw.as_ptr() as usize % 8, 0, "an unaligned raw content");
    }
    let model = match Model::find(&request.model_name, &request.model_version) {
        Ok(model) => model,
        Err(_) if selector < 128 => return,
        Err(_) => Model::all()
            .nth(usize::from(selector) % Model::count())
            .expect("in range"),
    };
    let _ = SequenceParams::parse(&request.parameters);
    let Ok(x) = take_input(model, &mut request) else {
        return;
    };
    if x.len() > MAX_ELEMENTS {
        return;
    }
    let (wire, shape, bytes) = (x.wire(), x.shape().to_vec(), x.len() * x.wire().itemsize());
    let chain = model.chain();
    let plan = chain
        .plan(&x, None, false)
        .expect("an elementwise kind takes any shape");
    let stateless = [MemberState::default()];
    let y = chain.forward(&stateless, &x, None, &plan, false, false).y;
    let (output, raw) = y.into_kserve(model.output());
    assert_eq!(output.datatype, wire.kserve_name());
    assert!(output.shape.iter().map(|&d| d as usize).eq(shape));
    assert_eq!(raw.len(), bytes);
    if let [content] = &in_frames[..] {
        // The input was these raw bytes (take_input reads them when given).
        let mut streamed = Vec::new();
        Elementwise::of(model.kind)
            .expect("models are of elementwise kinds")
            .forward_bytes(wire, content.pieces(), &mut streamed);
        assert_eq!(
            streamed, raw,
            "from the frames, the stateless path answers as the chain"
        );
    }
});
