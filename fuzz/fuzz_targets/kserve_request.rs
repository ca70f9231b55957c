//! Fuzzes the KServe v2 request mapping from wire bytes: `ModelInferRequest`
//! decoding, model lookup, sequence parameters, input validation (raw or
//! typed contents) and the stateless Forward with its KServe output.
//! Invariants: nothing panics; a validated input computes, and its output
//! has the input's shape and byte size.
#![no_main]

use layerd::kserve::{models::Model, sequence::SequenceParams, take_input};
use layerd::pb::inference::ModelInferRequest;
use layerd::layers::MemberState;
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
    let Ok(mut request) = ModelInferRequest::decode(wire) else {
        return;
    };
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
    let (wire, shape, bytes) = (
        x.wire(),
        x.shape().to_vec(),
        x.len() * x.wire().itemsize(),
    );
    let chain = model.chain();
    let plan = chain.plan(&x, None, false).expect("an elementwise kind takes any shape");
    let stateless = [MemberState::default()];
    let y = chain.forward(&stateless, &x, None, &plan, false, false).y;
    let (output, raw) = y.into_kserve(model.output());
    assert_eq!(output.datatype, wire.kserve_name());
    assert!(output.shape.iter().map(|&d| d as usize).eq(shape));
    assert_eq!(raw.len(), bytes);
});
