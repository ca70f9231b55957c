//! The Run stream: steps answered one for one, in order; the first failing
//! step ends the stream with its status after the answers before it.

mod common;

use common::*;
use layerd::pb::{self, run_request::Step, run_response::Result as Answer};
use tonic::{Code, Request};

fn fwd(layer: &str, x: pb::Tensor) -> pb::RunRequest {
    pb::RunRequest {
        step: Some(Step::Forward(pb::ForwardRequest {
            session_id: "s".into(),
            layer_id: layer.into(),
            x: Some(x),
            no_grad: false,
            ..Default::default()
        })),
    }
}

fn bwd(layer: &str, dout: pb::Tensor) -> pb::RunRequest {
    pb::RunRequest {
        step: Some(Step::Backward(pb::BackwardRequest {
            session_id: "s".into(),
            layer_id: layer.into(),
            dout: Some(dout),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn steps_are_answered_in_order() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "r", "relu").await;
    let mut steps = Vec::new();
    for k in 0..50 {
        let v = k as f32 - 25.0;
        steps.push(fwd("r", f32_tensor(&[2], &[v, -v])));
        steps.push(bwd("r", f32_tensor(&[2], &[k as f32, k as f32])));
    }
    let mut answers = c.run(tokio_stream::iter(steps)).await.unwrap().into_inner();
    for k in 0..50 {
        let v = k as f32 - 25.0;
        let Some(Answer::Forward(y)) = answers.message().await.unwrap().unwrap().result else {
            panic!("step {k}: not a forward answer")
        };
        assert_eq!(
            f32_values(&y.y.unwrap()),
            [v.max(0.0), (-v).max(0.0)],
            "step {k}"
        );
        let Some(Answer::Backward(dx)) = answers.message().await.unwrap().unwrap().result else {
            panic!("step {k}: not a backward answer")
        };
        // Each Backward uses the mask of the Forward just before it.
        let want = [
            if v > 0.0 { k as f32 } else { 0.0 },
            if -v > 0.0 { k as f32 } else { 0.0 },
        ];
        assert_eq!(f32_values(&dx.dx.unwrap()), want, "step {k}");
    }
    assert!(
        answers.message().await.unwrap().is_none(),
        "the stream ends after the last answer"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_first_failing_step_ends_the_stream_after_earlier_answers() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "r", "relu").await;
    let steps = vec![
        fwd("r", f32_tensor(&[1], &[2.0])),
        bwd("r", f32_tensor(&[1], &[1.0])),
        bwd("r", f32_tensor(&[3], &[1.0, 1.0, 1.0])), // wrong shape
        fwd("r", f32_tensor(&[1], &[-9.0])),          // never run
    ];
    let mut answers = c.run(tokio_stream::iter(steps)).await.unwrap().into_inner();
    assert!(matches!(
        answers.message().await.unwrap().unwrap().result,
        Some(Answer::Forward(_))
    ));
    assert!(matches!(
        answers.message().await.unwrap().unwrap().result,
        Some(Answer::Backward(_))
    ));
    assert_status(
        answers.message().await,
        Code::InvalidArgument,
        "DOUT_MISMATCH",
        &["dout"],
    );
    // The step after the failure never ran: the mask is still from x = 2.
    let dx = backward(&mut c, "s", "r", f32_tensor(&[1], &[5.0]))
        .await
        .unwrap();
    assert_eq!(f32_values(&dx), [5.0]);

    let empty = pb::RunRequest { step: None };
    let mut answers = c
        .run(tokio_stream::iter([empty]))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        answers.message().await,
        Code::InvalidArgument,
        "MISSING_STEP",
        &["step"],
    );
    server.stop().await;
}

#[tokio::test]
async fn every_step_must_match_the_routing_header() {
    let server = start(|_| {}).await;
    let mut c = server.client().await;
    session_with_layer(&mut c, "s", "r", "relu").await;
    let other = pb::RunRequest {
        step: Some(Step::Forward(pb::ForwardRequest {
            session_id: "t".into(),
            layer_id: "r".into(),
            x: Some(f32_tensor(&[1], &[1.0])),
            no_grad: false,
            ..Default::default()
        })),
    };
    let mut request = Request::new(tokio_stream::iter(vec![
        fwd("r", f32_tensor(&[1], &[1.0])),
        other,
    ]));
    request
        .metadata_mut()
        .insert("x-session-id", "s".parse().unwrap());
    let mut answers = c.run(request).await.unwrap().into_inner();
    assert!(answers.message().await.unwrap().is_some());
    assert_status(
        answers.message().await,
        Code::InvalidArgument,
        "SESSION_HEADER_MISMATCH",
        &["\"t\""],
    );
    server.stop().await;
}
