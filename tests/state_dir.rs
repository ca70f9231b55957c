//! `--state-dir` with bearer tokens: a restart brings each principal's sessions
//! back to their owners only (two principals with the same session id stay
//! two sessions), and with the idle time they had left, not a fresh timeout.

mod common;

use std::time::Duration;

use common::*;
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use tonic::{Code, IntoRequest, Request};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";

fn as_principal<M>(token: &str, message: M) -> Request<M> {
    let mut request = message.into_request();
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn open(client: &mut Client, token: &str, session_id: &str, idle: u32, bias: f32) {
    client
        .create_session(as_principal(
            token,
            pb::CreateSessionRequest {
                session_id: session_id.into(),
                idle_timeout_seconds: idle,
            },
        ))
        .await
        .unwrap();
    let config = pb::layer_config::Config::Affine(pb::AffineConfig {
        in_features: 2,
        out_features: 1,
        init: None,
    });
    client
        .create_layer(as_principal(
            token,
            pb::CreateLayerRequest {
                session_id: session_id.into(),
                layer_id: "fc".into(),
                kind: "affine".into(),
                config: Some(pb::LayerConfig {
                    config: Some(config),
                }),
                params: [("b".to_string(), f32_tensor(&[1], &[bias]))].into(),
                dtype: pb::DType::DtypeFloat32.into(),
            },
        ))
        .await
        .unwrap();
}

/// The bias of `session_id`'s layer, as `token`'s principal sees it.
async fn bias(client: &mut Client, token: &str, session_id: &str) -> Result<f32, Code> {
    let answer = client
        .get_params(as_principal(
            token,
            pb::GetParamsRequest {
                session_id: session_id.into(),
                layer_id: "fc".into(),
                include_grads: false,
            },
        ))
        .await
        .map_err(|status| status.code())?;
    let b = &answer.into_inner().params["b"];
    Ok(f32::from_le_bytes(b.data[..4].try_into().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_owners_and_the_idle_time_left() {
    let dir = TempDir::new("layerd-state-dir");
    let tokens = dir.write("tokens", format!("{ALICE} alice\n{BOB} bob\n"));
    let state = dir.0.join("state");
    let configure = |config: &mut layerd::config::Config| {
        config.auth_tokens = Some(tokens.clone());
        config.state_dir = Some(state.clone());
    };

    let first = start(configure).await;
    let mut client = LayerServiceClient::new(first.channel().await);
    open(&mut client, ALICE, "old", 4, 1.0).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // "old" has 1.5 s left
    open(&mut client, ALICE, "s", 8, 2.0).await;
    open(&mut client, BOB, "s", 8, 3.0).await;
    first.stop().await;
    let files = std::fs::read_dir(&state).unwrap().count();
    assert_eq!(files, 3, "one file per session");

    let second = start(configure).await;
    let mut client = LayerServiceClient::new(second.channel().await);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // "old" kept its remaining 1.5 s (a fresh 4 s would still be running).
    assert_eq!(bias(&mut client, ALICE, "old").await, Err(Code::NotFound));
    // Each "s" is its owner's, with its owner's values.
    assert_eq!(bias(&mut client, ALICE, "s").await, Ok(2.0));
    assert_eq!(bias(&mut client, BOB, "s").await, Ok(3.0));
    second.stop().await;
    // The expired session's file went at the drain's save.
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 2);
}
