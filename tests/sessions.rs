//! Sessions over the wire: idle expiry in real time, every limit, and many
//! sessions in parallel.

mod common;

use std::time::Duration;

use bytesize::ByteSize;
use common::*;
use layerd::pb;
use tonic::Code;

#[tokio::test]
async fn an_idle_session_expires_after_one_second_and_calls_extend_it() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    let granted = c
        .create_session(pb::CreateSessionRequest {
            session_id: "ttl".into(),
            idle_timeout_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .idle_timeout_seconds;
    assert_eq!(granted, 1);
    c.create_layer(pb::CreateLayerRequest {
        session_id: "ttl".into(),
        layer_id: "l".into(),
        kind: "relu".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        forward(&mut c, "ttl", "l", f32_tensor(&[1], &[1.0]), false)
            .await
            .expect("a call every 0.6 s keeps it alive");
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = forward(&mut c, "ttl", "l", f32_tensor(&[1], &[1.0]), false).await;
    assert_status(r, Code::NotFound, "SESSION_NOT_FOUND", &["expired"]);
    // Its id is free again.
    c.create_session(pb::CreateSessionRequest {
        session_id: "ttl".into(),
        idle_timeout_seconds: 1,
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn session_and_layer_count_limits() {
    let server = start(|c| {
        c.max_sessions = 2;
        c.max_layers_per_session = 1;
    })
    .await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "a", "l", "relu").await;
    c.create_session(pb::CreateSessionRequest {
        session_id: "b".into(),
        idle_timeout_seconds: 0,
    })
    .await
    .unwrap();
    let r = c
        .create_session(pb::CreateSessionRequest {
            session_id: "c".into(),
            idle_timeout_seconds: 0,
        })
        .await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-sessions", "2"],
    );
    let r = c
        .create_layer(pb::CreateLayerRequest {
            session_id: "a".into(),
            layer_id: "m".into(),
            kind: "relu".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-layers-per-session"],
    );
    c.close_session(pb::CloseSessionRequest {
        session_id: "b".into(),
    })
    .await
    .unwrap();
    c.create_session(pb::CreateSessionRequest {
        session_id: "c".into(),
        idle_timeout_seconds: 0,
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn kept_bytes_limits_per_session_and_in_total() {
    let server = start(|c| {
        c.max_session_kept_bytes = ByteSize::b(4096);
        c.max_total_kept_bytes = ByteSize::b(6144);
    })
    .await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "a", "sig", "sigmoid").await;
    session_with_layer(&mut c, "b", "sig", "sigmoid").await;
    c.create_layer(pb::CreateLayerRequest {
        session_id: "a".into(),
        layer_id: "relu".into(),
        kind: "relu".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ones = |n: usize| f32_tensor(&[n as u64], &vec![1.0; n]);

    // Sigmoid keeps y: 1024 float32 = 4096 bytes, exactly a's budget.
    forward(&mut c, "a", "sig", ones(1024), false)
        .await
        .unwrap();
    // ReLU keeps 1 bit per element: 64 elements = one 8-byte word, over a's budget.
    let r = forward(&mut c, "a", "relu", ones(64), false).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-session-kept-bytes"],
    );
    // no_grad keeps nothing, so it is not limited.
    forward(&mut c, "a", "relu", ones(64), true).await.unwrap();
    // b fits its own budget but not the total: 4096 + 4096 > 6144.
    let r = forward(&mut c, "b", "sig", ones(1024), false).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-total-kept-bytes"],
    );
    forward(&mut c, "b", "sig", ones(512), false).await.unwrap();
    // The refused calls changed nothing: a's sigmoid still has its 1024-element y.
    backward(&mut c, "a", "sig", ones(1024)).await.unwrap();
    // Replacing kept state needs room for the old and the new until the new
    // one commits: 4096 + 2048 + 2048 > 6144 in total.
    let r = forward(&mut c, "b", "sig", ones(512), false).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-total-kept-bytes"],
    );
    // Closing a frees its 4096 bytes.
    c.close_session(pb::CloseSessionRequest {
        session_id: "a".into(),
    })
    .await
    .unwrap();
    forward(&mut c, "b", "sig", ones(512), false).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted_on_unary_and_stream() {
    let server = start(|c| c.max_message_bytes = ByteSize::kib(64)).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "l", "identity").await;
    let big = f32_tensor(&[20_000], &vec![1.0; 20_000]); // 80 kB
    let r = forward(&mut c, "s", "l", big.clone(), false).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-message-bytes", "64.0 KiB"],
    );
    let step = pb::RunRequest {
        step: Some(pb::run_request::Step::Forward(pb::ForwardRequest {
            session_id: "s".into(),
            layer_id: "l".into(),
            x: Some(big),
            no_grad: false,
            ..Default::default()
        })),
    };
    let mut answers = c
        .run(tokio_stream::iter([step]))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        answers.message().await,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-message-bytes"],
    );
    // Just under the limit works.
    forward(
        &mut c,
        "s",
        "l",
        f32_tensor(&[16_000], &vec![1.0; 16_000]),
        false,
    )
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_sessions_in_parallel_get_their_own_results() {
    let server = start(|_| {}).await;
    let mut tasks = Vec::new();
    for worker in 0..16u32 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            let sid = format!("w{worker}");
            session_with_layer(&mut c, &sid, "relu", "relu").await;
            c.create_layer(pb::CreateLayerRequest {
                session_id: sid.clone(),
                layer_id: "sig".into(),
                kind: "sigmoid".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            for round in 0..12u32 {
                // Sizes straddle the inline/blocking threshold (16 Ki elements).
                let n = [1usize, 100, 5_000, 40_000][(round % 4) as usize];
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i as u32 * 7 + worker * 13 + round) % 29) as f32 - 14.0)
                    .collect();
                let dout: Vec<f32> = (0..n)
                    .map(|i| (i % 5) as f32 - 2.0 + worker as f32)
                    .collect();
                let shape = [n as u64];
                let y = f32_values(
                    &forward(&mut c, &sid, "relu", f32_tensor(&shape, &x), false)
                        .await
                        .unwrap(),
                );
                let dx = f32_values(
                    &backward(&mut c, &sid, "relu", f32_tensor(&shape, &dout))
                        .await
                        .unwrap(),
                );
                for i in 0..n {
                    let keep = x[i] > 0.0;
                    assert_eq!(y[i], if keep { x[i] } else { 0.0 });
                    assert_eq!(dx[i], if keep { dout[i] } else { 0.0 });
                }
                let s = f32_values(
                    &forward(&mut c, &sid, "sig", f32_tensor(&shape, &x), false)
                        .await
                        .unwrap(),
                );
                let ds = f32_values(
                    &backward(&mut c, &sid, "sig", f32_tensor(&shape, &dout))
                        .await
                        .unwrap(),
                );
                for i in 0..n {
                    let want = 1.0 / (1.0 + (-x[i]).exp());
                    assert!((s[i] - want).abs() <= 1e-6 * want, "{} vs {want}", s[i]);
                    assert_eq!(ds[i], dout[i] * (1.0 - s[i]) * s[i]);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.stop().await;
}
