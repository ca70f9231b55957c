//! Every error the layer service answers, with its code, its `ErrorInfo`
//! reason, a message naming the field, and no change to the session.

mod common;

use common::*;
use layerd::pb;
use tonic::{Code, Request};

fn raw(dtype: i32, shape: &[u64], bytes: usize) -> pb::Tensor {
    pb::Tensor {
        dtype,
        shape: shape.to_vec(),
        data: vec![0u8; bytes].into(),
    }
}

/// A server with session "s" holding ReLU layer "l" that kept the mask of
/// x = [1, -1]: a later Backward of [d, d] must give [d, 0] if nothing changed it.
async fn relu_with_kept_mask() -> (TestServer, Client) {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "l", "relu").await;
    forward(&mut c, "s", "l", f32_tensor(&[2], &[1.0, -1.0]), false)
        .await
        .unwrap();
    (server, c)
}

#[tokio::test]
async fn not_found_for_unknown_closed_sessions_and_unknown_layers() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    let x = || f32_tensor(&[1], &[1.0]);
    assert_status(
        forward(&mut c, "nope", "l", x(), false).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
        &["\"nope\""],
    );
    assert_status(
        backward(&mut c, "nope", "l", x()).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
        &["nope"],
    );
    let close = c
        .close_session(pb::CloseSessionRequest {
            session_id: "nope".into(),
        })
        .await;
    assert_status(close, Code::NotFound, "SESSION_NOT_FOUND", &["nope"]);
    let layer = c
        .create_layer(pb::CreateLayerRequest {
            session_id: "nope".into(),
            layer_id: "l".into(),
            kind: "relu".into(),
            ..Default::default()
        })
        .await;
    assert_status(layer, Code::NotFound, "SESSION_NOT_FOUND", &["nope"]);

    session_with_layer(&mut c, "s", "l", "relu").await;
    assert_status(
        forward(&mut c, "s", "other", x(), false).await,
        Code::NotFound,
        "LAYER_NOT_FOUND",
        &["\"other\"", "\"s\""],
    );
    assert_status(
        backward(&mut c, "s", "other", x()).await,
        Code::NotFound,
        "LAYER_NOT_FOUND",
        &["other"],
    );

    c.close_session(pb::CloseSessionRequest {
        session_id: "s".into(),
    })
    .await
    .unwrap();
    assert_status(
        forward(&mut c, "s", "l", x(), false).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
        &["closed"],
    );
    let again = c
        .close_session(pb::CloseSessionRequest {
            session_id: "s".into(),
        })
        .await;
    assert_status(again, Code::NotFound, "SESSION_NOT_FOUND", &["s"]);
    server.stop().await;
}

#[tokio::test]
async fn already_exists_leaves_the_existing_one_untouched() {
    let (server, mut c) = relu_with_kept_mask().await;
    let session = c
        .create_session(pb::CreateSessionRequest {
            session_id: "s".into(),
            idle_timeout_seconds: 0,
        })
        .await;
    assert_status(session, Code::AlreadyExists, "SESSION_EXISTS", &["\"s\""]);
    let layer = c
        .create_layer(pb::CreateLayerRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            kind: "sigmoid".into(),
            ..Default::default()
        })
        .await;
    assert_status(layer, Code::AlreadyExists, "LAYER_EXISTS", &["\"l\""]);
    // Still the ReLU with its mask.
    let dx = backward(&mut c, "s", "l", f32_tensor(&[2], &[5.0, 5.0]))
        .await
        .unwrap();
    assert_eq!(f32_values(&dx), [5.0, 0.0]);
    server.stop().await;
}

#[tokio::test]
async fn invalid_ids_and_kinds() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    for bad in ["has space", "slash/", &"x".repeat(129)] {
        let r = c
            .create_session(pb::CreateSessionRequest {
                session_id: bad.into(),
                idle_timeout_seconds: 0,
            })
            .await;
        assert_status(
            r,
            Code::InvalidArgument,
            "INVALID_ID",
            &["session_id", "1 to 128 characters"],
        );
    }
    c.create_session(pb::CreateSessionRequest {
        session_id: "s".into(),
        idle_timeout_seconds: 0,
    })
    .await
    .unwrap();
    let r = c
        .create_layer(pb::CreateLayerRequest {
            session_id: "s".into(),
            layer_id: "".into(),
            kind: "relu".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        "INVALID_ID",
        &["layer_id", "got \"\""],
    );
    let r = c
        .create_layer(pb::CreateLayerRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            kind: "tanh".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        "UNKNOWN_KIND",
        &["kind", "identity, pooling, relu, sequential", "\"tanh\""],
    );
    let r = forward(&mut c, "s", "bad id", f32_tensor(&[1], &[1.0]), false).await;
    assert_status(r, Code::InvalidArgument, "INVALID_ID", &["layer_id"]);
    server.stop().await;
}

#[tokio::test]
async fn every_tensor_defect_is_invalid_argument_and_changes_nothing() {
    let (server, mut c) = relu_with_kept_mask().await;

    let cases: Vec<(Option<pb::Tensor>, &[&str])> = vec![
        (None, &["x", "a tensor", "not set"]),
        (Some(raw(0, &[1], 4)), &["x.dtype", "DTYPE_UNSPECIFIED"]),
        (Some(raw(9, &[1], 4)), &["x.dtype", "unknown value 9"]),
        (
            Some(raw(1, &[1; 9], 4)),
            &["x.shape", "at most 8", "9 dimensions"],
        ),
        (Some(raw(2, &[u64::MAX, 2], 0)), &["x.shape", "overflows"]),
        (
            Some(raw(1, &[1 << 31, 1 << 31], 16)),
            &["x.shape", "overflows"],
        ),
        (
            Some(raw(1, &[2, 3], 23)),
            &["x.data", "24 bytes", "got 23 bytes"],
        ),
        (
            Some(raw(2, &[2, 3], 24)),
            &["x.data", "48 bytes", "got 24 bytes"],
        ),
        (Some(raw(1, &[], 0)), &["x.data", "4 bytes", "got 0 bytes"]),
        (Some(raw(1, &[0], 4)), &["x.data", "0 bytes", "got 4 bytes"]),
    ];
    for (x, words) in cases {
        let request = pb::ForwardRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            x,
            no_grad: false,
            ..Default::default()
        };
        let reason = if words[1] == "a tensor" {
            "MISSING_TENSOR"
        } else {
            "INVALID_TENSOR"
        };
        assert_status(
            c.forward(request).await,
            Code::InvalidArgument,
            reason,
            words,
        );
    }
    // The dout side names its own field.
    let r = backward(&mut c, "s", "l", raw(1, &[2], 7)).await;
    assert_status(
        r,
        Code::InvalidArgument,
        "INVALID_TENSOR",
        &["dout.data", "8 bytes", "got 7"],
    );
    let missing = c
        .backward(pb::BackwardRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            dout: None,
            ..Default::default()
        })
        .await;
    assert_status(missing, Code::InvalidArgument, "MISSING_TENSOR", &["dout"]);
    // A dout unlike the kept Forward's x.
    let r = backward(&mut c, "s", "l", f32_tensor(&[1, 2], &[1.0, 1.0])).await;
    assert_status(
        r,
        Code::InvalidArgument,
        "DOUT_MISMATCH",
        &["dout", "DTYPE_FLOAT32[2]", "DTYPE_FLOAT32[1, 2]"],
    );
    let r = backward(&mut c, "s", "l", f64_tensor(&[2], &[1.0, 1.0])).await;
    assert_status(
        r,
        Code::InvalidArgument,
        "DOUT_MISMATCH",
        &["DTYPE_FLOAT64[2]"],
    );

    // After all that, the mask of the one good Forward is still there.
    let dx = backward(&mut c, "s", "l", f32_tensor(&[2], &[3.0, 3.0]))
        .await
        .unwrap();
    assert_eq!(f32_values(&dx), [3.0, 0.0]);
    server.stop().await;
}

#[tokio::test]
async fn backward_with_nothing_kept_is_failed_precondition() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "l", "sigmoid").await;
    let r = backward(&mut c, "s", "l", f32_tensor(&[1], &[1.0])).await;
    assert_status(
        r,
        Code::FailedPrecondition,
        "NOTHING_KEPT",
        &["\"l\"", "no_grad"],
    );
    forward(&mut c, "s", "l", f32_tensor(&[1], &[1.0]), true)
        .await
        .unwrap();
    let r = backward(&mut c, "s", "l", f32_tensor(&[1], &[1.0])).await;
    assert_status(r, Code::FailedPrecondition, "NOTHING_KEPT", &["l"]);
    server.stop().await;
}

#[tokio::test]
async fn a_routing_header_must_name_the_session() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "l", "identity").await;
    let mut request = Request::new(pb::ForwardRequest {
        session_id: "s".into(),
        layer_id: "l".into(),
        x: Some(f32_tensor(&[1], &[1.0])),
        no_grad: false,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-session-id", "other".parse().unwrap());
    assert_status(
        c.forward(request).await,
        Code::InvalidArgument,
        "SESSION_HEADER_MISMATCH",
        &["x-session-id", "\"s\"", "\"other\""],
    );

    let mut request = Request::new(pb::CreateSessionRequest {
        session_id: "t".into(),
        idle_timeout_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("x-session-id", "u".parse().unwrap());
    assert_status(
        c.create_session(request).await,
        Code::InvalidArgument,
        "SESSION_HEADER_MISMATCH",
        &["x-session-id"],
    );

    // A matching header is fine, on every RPC.
    let mut request = Request::new(pb::CreateLayerRequest {
        session_id: "s".into(),
        layer_id: "m".into(),
        kind: "relu".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-session-id", "s".parse().unwrap());
    c.create_layer(request).await.unwrap();
    let mut request = Request::new(pb::CloseSessionRequest {
        session_id: "s".into(),
    });
    request
        .metadata_mut()
        .insert("x-session-id", "s".parse().unwrap());
    c.close_session(request).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_forward_cut_off_by_the_request_timeout_changes_nothing() {
    let server = start(|c| c.request_timeout = std::time::Duration::from_millis(5)).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "sig", "sigmoid").await;
    forward(&mut c, "s", "sig", f64_tensor(&[2], &[0.0, 0.0]), false)
        .await
        .unwrap();
    // 6 Mi float64 exponentials take far longer than 5 ms, even optimised.
    let n = 6 << 20;
    let big = f64_tensor(&[n], &vec![0.5; n as usize]);
    let r = forward(&mut c, "s", "sig", big, false).await;
    assert_status(r, Code::DeadlineExceeded, "REQUEST_TIMEOUT", &["5ms"]);
    // The kept y is still the one of the small Forward: y = 1/2, dx = (4 * 1/2) * 1/2.
    let dx = backward(&mut c, "s", "sig", f64_tensor(&[2], &[4.0, 4.0]))
        .await
        .unwrap();
    assert_eq!(f64_values(&dx), [1.0, 1.0]);
    server.stop().await;
}
