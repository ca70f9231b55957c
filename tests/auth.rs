//! Bearer-token authentication against a real server: missing and wrong
//! tokens are UNAUTHENTICATED on both services, health stays open, and one
//! principal can neither see nor touch another's sessions on any RPC.

mod common;

use common::{kserve::*, *};
use layerd::pb::{
    self, inference::grpc_inference_service_client::GrpcInferenceServiceClient,
    layer_service_client::LayerServiceClient, run_request::Step,
};
use tonic::{Code, IntoRequest, Request, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";

/// Cross-principal attempts per RPC.
const ATTEMPTS: usize = 25;

async fn server() -> (TestServer, TempDir) {
    let dir = TempDir::new("layerd-auth");
    let tokens = dir.write(
        "tokens",
        format!("# token principal\n{ALICE} alice\n{BOB} bob\n"),
    );
    let server = start(move |config| config.auth_tokens = Some(tokens)).await;
    (server, dir)
}

/// `message` as a request carrying `token` (if any).
fn with_token<M>(token: Option<&str>, message: M) -> Request<M> {
    let mut request = message.into_request();
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated_and_health_stays_open() {
    let (server, _tokens) = server().await;
    let channel = server.channel().await;
    let mut layers = LayerServiceClient::new(channel.clone());
    let mut kserve = GrpcInferenceServiceClient::new(channel.clone());
    for (token, reason) in [
        (None, "MISSING_TOKEN"),
        (Some("not-a-listed-token-at-all"), "INVALID_TOKEN"),
    ] {
        let open = pb::CreateSessionRequest {
            session_id: "s".into(),
            idle_timeout_seconds: 0,
        };
        assert_status(
            layers.create_session(with_token(token, open)).await,
            Code::Unauthenticated,
            reason,
            &["authorization: Bearer"][..usize::from(token.is_none())],
        );
        let kinds = layers
            .list_layer_kinds(with_token(token, pb::ListLayerKindsRequest {}))
            .await;
        assert_status(kinds, Code::Unauthenticated, reason, &[]);
        let infer = infer_request("relu", &[1.0], &[]);
        assert_status(
            kserve.model_infer(with_token(token, infer)).await,
            Code::Unauthenticated,
            reason,
            &[],
        );
        let live = kserve
            .server_live(with_token(token, Default::default()))
            .await;
        assert_eq!(live.unwrap_err().code(), Code::Unauthenticated);
    }
    // A wrong token is never echoed back.
    let status = layers
        .list_layer_kinds(with_token(
            Some("secret-guess-0123456789"),
            pb::ListLayerKindsRequest {},
        ))
        .await
        .unwrap_err();
    assert!(!status.message().contains("secret-guess"), "{status:?}");

    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "layerd.v1.LayerService".into(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1, "SERVING without a token");
    let kinds = layers
        .list_layer_kinds(with_token(Some(ALICE), pb::ListLayerKindsRequest {}))
        .await
        .unwrap();
    assert!(!kinds.into_inner().kinds.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn another_principal_gets_not_found_on_every_rpc_and_changes_nothing() {
    let (server, _tokens) = server().await;
    let channel = server.channel().await;
    let mut layers = LayerServiceClient::new(channel.clone());
    let mut kserve = GrpcInferenceServiceClient::new(channel);
    let (alice, bob) = (Some(ALICE), Some(BOB));

    // Alice: a native session with a kept Forward, a server-picked id, and a
    // KServe sequence with a kept Forward.
    let created = layers
        .create_session(with_token(alice, pb::CreateSessionRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let picked = created.session_id;
    assert_eq!(picked.len(), 32, "128 bits as hex: {picked}");
    for session_id in ["mine", picked.as_str()] {
        if session_id == "mine" {
            let open = pb::CreateSessionRequest {
                session_id: session_id.into(),
                idle_timeout_seconds: 0,
            };
            layers
                .create_session(with_token(alice, open))
                .await
                .unwrap();
        }
        let layer = pb::CreateLayerRequest {
            session_id: session_id.into(),
            layer_id: "l".into(),
            kind: "relu".into(),
            ..Default::default()
        };
        layers.create_layer(with_token(alice, layer)).await.unwrap();
        let forward = forward_request(session_id, &[-1.0, 2.0]);
        layers.forward(with_token(alice, forward)).await.unwrap();
    }
    let start = [seq(7), flag("sequence_start")];
    kserve
        .model_infer(with_token(
            alice,
            infer_request("relu", &[-1.0, 3.0], &start),
        ))
        .await
        .unwrap();

    // Bob tries every RPC on Alice's sessions, ATTEMPTS times each.
    let mut successes = 0;
    let mut attempts = 0;
    let mut tally = |result: Result<(), Status>| {
        attempts += 1;
        match result {
            Ok(()) => successes += 1,
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        }
    };
    for _ in 0..ATTEMPTS {
        for session_id in ["mine", picked.as_str()] {
            let close = pb::CloseSessionRequest {
                session_id: session_id.into(),
            };
            tally(layers.close_session(with_token(bob, close)).await.map(drop));
            let layer = pb::CreateLayerRequest {
                session_id: session_id.into(),
                layer_id: "l2".into(),
                kind: "relu".into(),
                ..Default::default()
            };
            tally(layers.create_layer(with_token(bob, layer)).await.map(drop));
            let forward = forward_request(session_id, &[5.0, 5.0]);
            tally(
                layers
                    .forward(with_token(bob, forward.clone()))
                    .await
                    .map(drop),
            );
            let backward = backward_request(session_id, &[1.0, 1.0]);
            tally(
                layers
                    .backward(with_token(bob, backward.clone()))
                    .await
                    .map(drop),
            );
            for step in [Step::Forward(forward), Step::Backward(backward)] {
                let steps = tokio_stream::iter([pb::RunRequest { step: Some(step) }]);
                let answer = async {
                    let mut answers = layers.run(with_token(bob, steps)).await?.into_inner();
                    answers.message().await.map(drop)
                };
                tally(answer.await);
            }
        }
        for (model, params) in [
            ("relu", vec![seq(7)]),
            ("relu", vec![seq(7), flag("sequence_end")]),
            ("relu_backward", vec![seq(7)]),
            ("relu_backward", vec![seq(7), flag("sequence_end")]),
        ] {
            let request = infer_request(model, &[1.0, 1.0], &params);
            let answer = kserve.model_infer(with_token(bob, request.clone())).await;
            tally(answer.map(drop));
            let stream = kserve
                .model_stream_infer(with_token(bob, tokio_stream::iter([request])))
                .await;
            let answer = async {
                let mut answers = stream?.into_inner();
                let answer = answers.message().await?.expect("one answer");
                match answer.error_message.as_str() {
                    "" => Ok(()),
                    message => Err(Status::not_found(message)),
                }
            };
            tally(answer.await);
        }
    }
    assert_eq!(attempts, ATTEMPTS * (2 * 6 + 4 * 2));
    assert_eq!(successes, 0, "of {attempts} cross-principal attempts");

    // Bob's own session of the same id is his; it leaves Alice's alone.
    let open = pb::CreateSessionRequest {
        session_id: "mine".into(),
        idle_timeout_seconds: 0,
    };
    layers.create_session(with_token(bob, open)).await.unwrap();
    let close = pb::CloseSessionRequest {
        session_id: "mine".into(),
    };
    layers.close_session(with_token(bob, close)).await.unwrap();

    // Alice's sessions and sequence are exactly as she left them.
    for session_id in ["mine", picked.as_str()] {
        let backward = backward_request(session_id, &[10.0, 10.0]);
        let dx = layers.backward(with_token(alice, backward)).await.unwrap();
        assert_eq!(f64_values(&dx.into_inner().dx.unwrap()), [0.0, 10.0]);
    }
    let end = [seq(7), flag("sequence_end")];
    let dx = kserve
        .model_infer(with_token(
            alice,
            infer_request("relu_backward", &[4.0, 4.0], &end),
        ))
        .await
        .unwrap();
    assert_eq!(infer_values(&dx.into_inner()), [0.0, 4.0]);
    server.stop().await;
}

fn forward_request(session_id: &str, x: &[f64]) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: session_id.into(),
        layer_id: "l".into(),
        x: Some(f64_tensor(&[x.len() as u64], x)),
        no_grad: false,
        ..Default::default()
    }
}

fn backward_request(session_id: &str, dout: &[f64]) -> pb::BackwardRequest {
    pb::BackwardRequest {
        session_id: session_id.into(),
        layer_id: "l".into(),
        dout: Some(f64_tensor(&[dout.len() as u64], dout)),
        ..Default::default()
    }
}
