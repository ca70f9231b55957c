//! Fuzzes a layer from its wire bytes: a CreateLayerRequest (kind, config,
//! dtype, params) then a Run step (Forward with x, t, eval, no_grad; or
//! Backward with dout, return_grads), through the same validation the server
//! runs, then the computation on whatever validated.
//!
//! Input: two bytes (little-endian) giving the CreateLayerRequest's length,
//! that many bytes of it, then the RunRequest.
//!
//! Invariants: nothing panics; a keeping and a `no_grad` Forward answer the
//! same `y`; Backward with a `dout` of the kept Forward's output shape (or
//! none after a loss) answers `dx` of x's shape and dtype, and one of another
//! shape is an error; SetParams with the layer's own values validates.
#![no_main]

use std::collections::HashMap;

use layerd::api::spec::new_layer;
use layerd::pb::{self, run_request::Step};
use layerd::session::check_id;
use layerd::tensor::{Target, Tensor};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Larger tensors and layers are as valid, but only slow the fuzzer down.
const MAX_ELEMENTS: usize = 1 << 16;
const MAX_BYTES: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_le_bytes(*head) as usize).min(rest.len());
    let (create, run) = rest.split_at(split);
    let (Ok(create), Ok(run)) = (
        pb::CreateLayerRequest::decode(create),
        pb::RunRequest::decode(run),
    ) else {
        return;
    };
    let _ = check_id("layer_id", &create.layer_id);
    let Ok(layer) = new_layer(&create) else {
        return;
    };
    // The server refuses larger layers at its budget before allocating.
    if layer.chain.held_bytes() > MAX_BYTES {
        return;
    }
    let chain = layer.chain;
    let mut states = chain.initial_state(layer.params);
    let (params, buffers) = chain.named_values(&states);
    let own: HashMap<String, Tensor> = params.into_iter().chain(buffers).collect();
    chain
        .check_values(&own, "values")
        .expect("a layer's own values are valid");

    let (forward, backward) = match run.step {
        Some(Step::Forward(f)) => (f, None),
        Some(Step::Backward(b)) => (pb::ForwardRequest::default(), Some(b)),
        None => return,
    };
    let x = match (&backward, forward.x) {
        // A Backward's dout doubles as the Forward's x before it.
        (Some(b), _) => b.dout.clone(),
        (None, x) => x,
    };
    let Ok(x) = Tensor::from_proto(x, "x") else {
        return;
    };
    let Ok(t) = Target::from_proto(forward.t, "t") else {
        return;
    };
    if x.len() > MAX_ELEMENTS {
        return;
    }
    let Ok(plan) = chain.plan(&x, t.as_ref(), forward.eval) else {
        return;
    };
    if plan.work_bytes > MAX_BYTES || plan.kept_bytes > MAX_BYTES {
        return;
    }
    let eval = forward.eval;
    let kept = chain.forward(&states, &x, t.as_ref(), &plan, eval, true);
    let free = chain.forward(&states, &x, t.as_ref(), &plan, eval, false);
    assert!(free.kept.is_none());
    assert!(
        same_bits(&kept.y, &free.y),
        "{}: no_grad differs",
        chain.kind()
    );
    for (member, (buffers, rng)) in states.iter_mut().zip(kept.updates) {
        let first = member.values.len() - buffers.len();
        member.values.splice(first.., buffers);
        member.rng = rng;
    }
    let kept = kept.kept.expect("a keeping Forward keeps");
    assert_eq!(kept.bytes(), plan.kept_bytes);

    let y = &free.y;
    let ones = Tensor::from_proto(
        Some(pb::Tensor {
            dtype: y.wire().to_proto().into(),
            shape: y.shape().iter().map(|&d| d as u64).collect(),
            data: vec![0u8; y.len() * y.wire().itemsize()].into(),
        }),
        "dout",
    )
    .expect("a valid tensor");
    let other = Tensor::from_proto(
        Some(pb::Tensor {
            dtype: y.wire().to_proto().into(),
            shape: vec![y.len() as u64 + 1],
            data: vec![0u8; (y.len() + 1) * y.wire().itemsize()].into(),
        }),
        "dout",
    )
    .expect("a valid tensor");
    assert!(chain.check_dout(&kept, Some(&other)).is_err());
    let dout = match backward {
        Some(b) if b.dout.is_none() && chain.check_dout(&kept, None).is_ok() => None,
        _ => Some(ones),
    };
    chain
        .check_dout(&kept, dout.as_ref())
        .expect("dout of the output's shape and dtype");
    let out = chain.backward(&states, &kept, dout.as_ref());
    assert_eq!(
        (out.dx.wire(), out.dx.shape()),
        (x.wire(), x.shape()),
        "{}: dx",
        chain.kind()
    );
});

/// Bitwise equality (NaN payloads included).
fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && a.clone().into_proto().data == b.clone().into_proto().data
}
