//! Operations: health, reflection, and graceful shutdown with calls in flight.

mod common;

use std::time::{Duration, Instant};

use common::*;
use layerd::pb::{self, run_request::Step};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let server = start(|_| {}).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "layerd.v1.LayerService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_and_describe_the_services() {
    let server = start(|_| {}).await;
    let channel = server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "layerd.v1.LayerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "layerd.v1.LayerService".into(),
            ),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a file descriptor")
    };
    let raw = files.file_descriptor_proto.concat();
    assert!(raw
        .windows(b"ForwardRequest".len())
        .any(|w| w == b"ForwardRequest"));
    server.stop().await;
}

fn step(v: f32) -> pb::RunRequest {
    pb::RunRequest {
        step: Some(Step::Forward(pb::ForwardRequest {
            session_id: "s".into(),
            layer_id: "r".into(),
            x: Some(f32_tensor(&[1], &[v])),
            no_grad: false,
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn shutdown_turns_health_off_refuses_new_connections_and_finishes_calls_in_flight() {
    let mut server = start(|c| c.shutdown_grace = Duration::from_secs(20)).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "r", "relu").await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    // A Run stream is in flight: one step answered, more to come.
    let (steps, receiver) = mpsc::channel(4);
    steps.send(step(1.0)).await.unwrap();
    let mut answers = c
        .run(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();

    server.begin_shutdown();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // The listener is closed: a new connection is refused.
    let addr = server.addr;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new connections are refused while draining"
    );

    // The call in flight still completes.
    steps.send(step(-2.0)).await.unwrap();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(pb::run_response::Result::Forward(y)) = answer.result else {
        panic!("a forward answer")
    };
    assert_eq!(f32_values(&y.y.unwrap()), [0.0]);
    drop(steps);
    assert!(answers.message().await.unwrap().is_none());
    drop((c, health, watch, answers));
    let waited = server.join().await;
    assert!(
        waited < Duration::from_secs(5),
        "exited {waited:?} after the last call ended"
    );
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    let mut server = start(|c| c.shutdown_grace = Duration::from_millis(500)).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "r", "relu").await;
    // A stream that never ends by itself.
    let (steps, receiver) = mpsc::channel(4);
    steps.send(step(1.0)).await.unwrap();
    let mut answers = c
        .run(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();

    let started = Instant::now();
    server.begin_shutdown();
    server.join().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    drop(steps);
}
