//! Fuzzes a layer-service request from its wire bytes: protobuf decoding, id
//! and tensor validation, then Forward (keeping and `no_grad`) and Backward of
//! every kind on whatever validated. Invariants: nothing panics; a valid
//! tensor's Forward keeps exactly the bytes its kind declares, and both
//! Forwards give the same `y`; Backward with a `dout` of another shape or
//! dtype is an error, never a panic.
#![no_main]

use layerd::layers::Kind;
use layerd::pb::{self, run_request::Step};
use layerd::session::check_id;
use layerd::tensor::Tensor;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Larger tensors are as valid, but only slow the fuzzer down.
const MAX_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // A Run step, as it arrives on the wire: Forward and Backward requests
    // are its two arms.
    let Ok(request) = pb::RunRequest::decode(data) else {
        return;
    };
    let (session_id, layer_id, tensor, field) = match request.step {
        Some(Step::Forward(f)) => (f.session_id, f.layer_id, f.x, "x"),
        Some(Step::Backward(b)) => (b.session_id, b.layer_id, b.dout, "dout"),
        None => return,
    };
    let _ = check_id("session_id", &session_id);
    let _ = check_id("layer_id", &layer_id);
    let Ok(x) = Tensor::from_proto(tensor, field) else {
        return;
    };
    if x.len() > MAX_ELEMENTS {
        return;
    }
    // A small tensor of another shape, for the mismatched Backward.
    let other = Tensor::from_proto(
        Some(pb::Tensor {
            dtype: pb::DType::DtypeFloat32.into(),
            shape: vec![x.len() as u64 + 1],
            data: vec![0u8; 4 * (x.len() + 1)].into(),
        }),
        "dout",
    )
    .expect("a valid tensor");
    for kind in Kind::ALL {
        let (y, kept) = kind.forward(&x);
        assert_eq!((y.dtype(), y.shape()), (x.dtype(), x.shape()));
        assert_eq!(kept.bytes(), kind.kept_bytes(x.dtype(), x.len()));
        assert!(kind.forward_no_grad(&x) == y, "{kind}: no_grad differs");
        let dx = kept.backward(&x).expect("dout of x's own shape and dtype");
        assert_eq!((dx.dtype(), dx.shape()), (x.dtype(), x.shape()));
        assert!(kept.backward(&other).is_err());
    }
});
