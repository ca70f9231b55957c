//! Overload limits against a real server: calls beyond
//! `--max-concurrent-calls` are shed UNAVAILABLE (OVERLOADED) without running
//! while health still answers, open streams hold their slot, and connections
//! beyond `--max-connections` are closed.

mod common;

use std::time::Duration;

use common::*;
use layerd::pb::{self, layer_service_client::LayerServiceClient, run_request::Step};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

fn forward_request(session_id: &str) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: session_id.into(),
        layer_id: "l".into(),
        x: Some(f32_tensor(&[2], &[-1.0, 2.0])),
        no_grad: false,
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_beyond_the_limit_are_shed_and_streams_hold_their_slot() {
    let server = start(|config| config.max_concurrent_calls = 2).await;
    let mut client = server.client().await;
    session_with_layer(&mut client, "s", "l", "relu").await;

    // Two open Run streams take both slots for as long as they are open.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (steps, receiver) = mpsc::channel(1);
        let mut answers = client
            .run(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        steps
            .send(pb::RunRequest {
                step: Some(Step::Forward(forward_request("s"))),
            })
            .await
            .unwrap();
        answers.message().await.unwrap().expect("an answer");
        streams.push((steps, answers));
    }
    for _ in 0..20 {
        assert_status(
            client.forward(forward_request("s")).await,
            Code::Unavailable,
            "OVERLOADED",
            &["--max-concurrent-calls", "did not run"],
        );
    }
    let health = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1, "probes are never shed");

    // A stream still works, and when one ends its slot is free again.
    let (steps, mut answers) = streams.pop().unwrap();
    steps
        .send(pb::RunRequest {
            step: Some(Step::Backward(pb::BackwardRequest {
                session_id: "s".into(),
                layer_id: "l".into(),
                dout: Some(f32_tensor(&[2], &[3.0, 3.0])),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    answers.message().await.unwrap().expect("an answer");
    drop(steps);
    assert!(answers.message().await.unwrap().is_none(), "stream ended");
    drop(answers);
    let y = forward(&mut client, "s", "l", f32_tensor(&[2], &[-1.0, 2.0]), false)
        .await
        .unwrap();
    assert_eq!(f32_values(&y), [0.0, 2.0]);
    drop(streams);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    let server = start(|config| config.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = server.client().await;
        client
            .list_layer_kinds(pb::ListLayerKindsRequest {})
            .await
            .unwrap();
        held.push(client);
    }
    let lazy_client = || {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect_lazy();
        LayerServiceClient::new(channel)
    };
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        lazy_client()
            .list_layer_kinds(pb::ListLayerKindsRequest {})
            .await
    })
    .await
    .expect("refused at once, not hanging");
    // The connection is closed on accept: tonic reports that as CANCELLED
    // ("connection closed"), grpcio as UNAVAILABLE.
    let status = refused.unwrap_err();
    assert!(
        [Code::Unavailable, Code::Cancelled].contains(&status.code()),
        "{status:?}"
    );

    // A slot frees when a connection closes.
    held.pop();
    let mut answered = false;
    for _ in 0..50 {
        if lazy_client()
            .list_layer_kinds(pb::ListLayerKindsRequest {})
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered, "a new connection is accepted once one closed");
    drop(held);
    server.stop().await;
}
