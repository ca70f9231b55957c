//! The layer service end to end over loopback gRPC: sessions, layers,
//! Forward and Backward for every kind and dtype, kept-state semantics.

mod common;

use common::*;
use layerd::pb;

#[tokio::test]
async fn server_picks_an_unguessable_id_and_grants_the_timeout() {
    let server = start(|c| c.max_idle_timeout = std::time::Duration::from_secs(120)).await;
    let mut client = server.client().await;
    let a = client
        .create_session(pb::CreateSessionRequest {
            session_id: String::new(),
            idle_timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.session_id.len(), 32);
    assert!(a.session_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        a.idle_timeout_seconds, 120,
        "the 5 min default is lowered to the 2 min maximum"
    );
    let b = client
        .create_session(pb::CreateSessionRequest {
            session_id: "mine".into(),
            idle_timeout_seconds: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.session_id.as_str(), b.idle_timeout_seconds), ("mine", 7));
    assert_ne!(
        a.session_id,
        client
            .create_session(pb::CreateSessionRequest::default())
            .await
            .unwrap()
            .into_inner()
            .session_id
    );
    server.stop().await;
}

#[tokio::test]
async fn lists_the_kinds() {
    let server = start(|_| {}).await;
    let kinds = server
        .client()
        .await
        .list_layer_kinds(pb::ListLayerKindsRequest {})
        .await
        .unwrap()
        .into_inner()
        .kinds;
    let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "affine",
            "batch_norm",
            "convolution",
            "dropout",
            "identity",
            "pooling",
            "relu",
            "sequential",
            "sigmoid",
            "softmax_with_loss"
        ]
    );
    assert!(kinds[6].description.contains("x <= 0"));
    server.stop().await;
}

#[tokio::test]
async fn relu_forward_and_backward_in_float32() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "s", "relu1", "relu").await;
    let x = [
        1.5f32,
        -2.0,
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-45,
    ];
    let y = forward(&mut client, "s", "relu1", f32_tensor(&[2, 4], &x), false)
        .await
        .unwrap();
    assert_eq!(y.shape, [2, 4]);
    let y = f32_values(&y);
    let want_y = [1.5f32, 0.0, 0.0, 0.0, f32::NAN, f32::INFINITY, 0.0, 1e-45];
    assert_eq!(
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want_y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    let dout = [0.5f32, -1.0, 2.0, -3.0, 4.0, -5.0, 6.0, -7.0];
    let dx = f32_values(
        &backward(&mut client, "s", "relu1", f32_tensor(&[2, 4], &dout))
            .await
            .unwrap(),
    );
    assert_eq!(dx, [0.5, 0.0, 0.0, 0.0, 4.0, -5.0, 0.0, -7.0]);
    // Backward changes nothing: again gives the same.
    let again = f32_values(
        &backward(&mut client, "s", "relu1", f32_tensor(&[2, 4], &dout))
            .await
            .unwrap(),
    );
    assert_eq!(again, dx);
    server.stop().await;
}

#[tokio::test]
async fn sigmoid_forward_and_backward_in_float64() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "s", "sig", "sigmoid").await;
    let x = [0.0f64, 3f64.ln(), -710.0, 710.0];
    let y = f64_values(
        &forward(&mut client, "s", "sig", f64_tensor(&[4], &x), false)
            .await
            .unwrap(),
    );
    assert_eq!(y[0], 0.5);
    assert!((y[1] - 0.75).abs() < 1e-15);
    assert_eq!((y[2], y[3]), (0.0, 1.0));
    let dout = [2.0f64, -4.0, 1.0, 1.0];
    let dx = f64_values(
        &backward(&mut client, "s", "sig", f64_tensor(&[4], &dout))
            .await
            .unwrap(),
    );
    for i in 0..4 {
        assert_eq!(dx[i].to_bits(), ((dout[i] * (1.0 - y[i])) * y[i]).to_bits());
    }
    assert_eq!(dx[0], 0.5); // (2 * 1/2) * 1/2
    server.stop().await;
}

#[tokio::test]
async fn identity_scalars_and_empty_tensors() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "s", "id", "identity").await;
    let y = forward(&mut client, "s", "id", f64_tensor(&[], &[-0.0]), false)
        .await
        .unwrap();
    assert_eq!(
        (y.shape.len(), f64_values(&y)[0].to_bits()),
        (0, (-0.0f64).to_bits())
    );
    let dx = backward(&mut client, "s", "id", f64_tensor(&[], &[3.0]))
        .await
        .unwrap();
    assert_eq!(f64_values(&dx), [3.0]);
    let empty = forward(&mut client, "s", "id", f32_tensor(&[3, 0, 2], &[]), false)
        .await
        .unwrap();
    assert_eq!(
        (empty.shape.as_slice(), empty.data.len()),
        (&[3u64, 0, 2][..], 0)
    );
    let rank8 = forward(
        &mut client,
        "s",
        "id",
        f32_tensor(&[1, 2, 1, 2, 1, 2, 1, 1], &[1.0; 8]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(rank8.shape.len(), 8);
    server.stop().await;
}

#[tokio::test]
async fn a_new_forward_replaces_the_kept_state_and_no_grad_keeps_it() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "s", "r", "relu").await;
    let ones = f32_tensor(&[3], &[1.0, 1.0, 1.0]);
    forward(
        &mut client,
        "s",
        "r",
        f32_tensor(&[3], &[1.0, -1.0, 1.0]),
        false,
    )
    .await
    .unwrap();
    // A no_grad Forward computes y but the mask stays [F, T, F].
    let y = forward(
        &mut client,
        "s",
        "r",
        f32_tensor(&[3], &[-1.0, 5.0, -1.0]),
        true,
    )
    .await
    .unwrap();
    assert_eq!(f32_values(&y), [0.0, 5.0, 0.0]);
    assert_eq!(
        f32_values(&backward(&mut client, "s", "r", ones.clone()).await.unwrap()),
        [1.0, 0.0, 1.0]
    );
    // A keeping Forward replaces it: mask [T, F, T].
    forward(
        &mut client,
        "s",
        "r",
        f32_tensor(&[3], &[-1.0, 5.0, -1.0]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        f32_values(&backward(&mut client, "s", "r", ones.clone()).await.unwrap()),
        [0.0, 1.0, 0.0]
    );
    // Even with another shape and dtype.
    forward(&mut client, "s", "r", f64_tensor(&[2], &[2.0, -2.0]), false)
        .await
        .unwrap();
    assert_eq!(
        f64_values(
            &backward(&mut client, "s", "r", f64_tensor(&[2], &[1.0, 1.0]))
                .await
                .unwrap()
        ),
        [1.0, 0.0]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_two_layer_chain_matches_the_composition() {
    // sigmoid(relu(x)): dx = relu'(x) * sigmoid'(relu(x)) * dout.
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "net", "l1", "relu").await;
    client
        .create_layer(pb::CreateLayerRequest {
            session_id: "net".into(),
            layer_id: "l2".into(),
            kind: "sigmoid".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let x = [-1.0f64, 0.5, 2.0];
    let h = forward(&mut client, "net", "l1", f64_tensor(&[3], &x), false)
        .await
        .unwrap();
    let y = f64_values(&forward(&mut client, "net", "l2", h, false).await.unwrap());
    let dout = [1.0f64, -2.0, 0.5];
    let dh = backward(&mut client, "net", "l2", f64_tensor(&[3], &dout))
        .await
        .unwrap();
    let dx = f64_values(&backward(&mut client, "net", "l1", dh).await.unwrap());
    for i in 0..3 {
        let relu_grad = if x[i] > 0.0 { 1.0 } else { 0.0 };
        let want = relu_grad * (dout[i] * (1.0 - y[i])) * y[i];
        assert_eq!(dx[i], want, "element {i}");
    }
    assert_eq!(y[0], 0.5);
    server.stop().await;
}

#[tokio::test]
async fn a_32_mib_tensor_round_trips() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "big", "r", "relu").await;
    let n = 8 << 20; // 8 Mi float32 = 32 MiB
    let x: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { i as f32 } else { -(i as f32) })
        .collect();
    let y = f32_values(
        &forward(&mut client, "big", "r", f32_tensor(&[n as u64], &x), false)
            .await
            .unwrap(),
    );
    assert_eq!(y.len(), n);
    assert!(y
        .iter()
        .enumerate()
        .all(|(i, &v)| v == if i % 2 == 0 { i as f32 } else { 0.0 }));
    let dx = f32_values(
        &backward(
            &mut client,
            "big",
            "r",
            f32_tensor(&[n as u64], &vec![3.0; n]),
        )
        .await
        .unwrap(),
    );
    assert!(dx
        .iter()
        .enumerate()
        .all(|(i, &v)| v == if i % 2 == 0 && i > 0 { 3.0 } else { 0.0 }));
    server.stop().await;
}
