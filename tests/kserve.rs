//! The KServe v2 service against a real server: what tritonclient cannot
//! easily provoke — a sequence start cut off by the request timeout, a client
//! that cancels mid-call — and how sequences and native sessions share one
//! store; and ModelInfer's own message path (`kserve::wire`) against the
//! codec path gzip takes.

mod common;

use std::time::Duration;

use common::{kserve::*, *};
use layerd::pb::inference::infer_parameter::ParameterChoice;
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use tonic::{codec::CompressionEncoding, Code};

#[tokio::test]
async fn model_infer_answers_alike_with_and_without_gzip() {
    let server = start(|_| {}).await;
    let mut client = kserve_client(&server).await;
    // 800 kB: the message spans many HTTP/2 frames both ways.
    let values: Vec<f64> = (0..100_000).map(|i| f64::from(i) - 50_000.5).collect();
    let plain = infer(&mut client, "relu_no_grad", &values, &[])
        .await
        .unwrap();
    // A compressed request goes through tonic's codec instead.
    let mut gzip = client.send_compressed(CompressionEncoding::Gzip);
    let zipped = gzip
        .model_infer(infer_request("relu_no_grad", &values, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain, zipped);
    let relu: Vec<f64> = values.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(infer_values(&plain), relu);
    server.stop().await;
}

#[tokio::test]
async fn model_infer_reads_fields_in_any_order_and_checks_the_prefix() {
    let server = start(|c| c.max_message_bytes = bytesize::ByteSize::kib(64)).await;
    let channel = server.channel().await;
    let request = infer_request("relu_no_grad", &[-1.0, 2.0], &[]);
    // The raw contents first (prost writes them last), then an unknown field.
    let raw = request.raw_input_contents[0].clone();
    let mut message = vec![0x3a, raw.len() as u8];
    message.extend_from_slice(&raw);
    let rest = pb::inference::ModelInferRequest {
        raw_input_contents: vec![],
        ..request
    };
    message.extend(prost::Message::encode_to_vec(&rest));
    message.extend([0x98, 0x06, 0x01]);
    let answer = infer_raw(&channel, 0, &message).await.unwrap();
    assert_eq!(infer_values(&answer), [0.0, 2.0]);
    // Longer than --max-message-bytes by its prefix alone: refused unread.
    assert_status(
        infer_raw(&channel, 0, &vec![0; 70_000]).await,
        Code::ResourceExhausted,
        "LIMIT_EXCEEDED",
        &["--max-message-bytes", "64.0 KiB"],
    );
    // Flagged compressed without a grpc-encoding header.
    let status = infer_raw(&channel, 1, &message).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("compressed-flag"), "{status:?}");
    // Cut short: the raw contents say 16 bytes and end after 3.
    let status = infer_raw(&channel, 0, &message[..5]).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("failed to decode"), "{status:?}");
    // And the server still serves.
    let answer = infer_raw(&channel, 0, &message).await.unwrap();
    assert_eq!(infer_values(&answer), [0.0, 2.0]);
    server.stop().await;
}

#[tokio::test]
async fn a_sequence_start_cut_off_by_the_request_timeout_leaves_no_session() {
    let server = start(|c| c.request_timeout = Duration::from_millis(5)).await;
    let mut client = kserve_client(&server).await;
    // 6 Mi float64 exponentials take far longer than 5 ms.
    let big = vec![0.5; 6 << 20];
    let status = infer(
        &mut client,
        "sigmoid",
        &big,
        &[seq(7), flag("sequence_start")],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let status = infer(&mut client, "sigmoid", &[0.0], &[seq(7)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // And the id can start again.
    infer(
        &mut client,
        "sigmoid",
        &[0.0],
        &[seq(7), flag("sequence_start")],
    )
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_forward_keeps_the_sequence_as_it_was() {
    let server = start(|_| {}).await;
    let mut client = kserve_client(&server).await;
    infer(
        &mut client,
        "sigmoid",
        &[0.0, 0.0],
        &[seq(9), flag("sequence_start")],
    )
    .await
    .unwrap();
    let big = vec![0.5; 6 << 20];
    let mut cancelled = client.clone();
    let call = tokio::spawn(async move { infer(&mut cancelled, "sigmoid", &big, &[seq(9)]).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    call.abort();
    let _ = call.await;
    // The kept y is the first Forward's: y = 1/2, dx = 4 * 1/2 * (1 - 1/2).
    let dx = infer(
        &mut client,
        "sigmoid_backward",
        &[4.0, 4.0],
        &[seq(9), flag("sequence_end")],
    )
    .await
    .unwrap();
    assert_eq!(infer_values(&dx), [1.0, 1.0]);
    server.stop().await;
}

#[tokio::test]
async fn a_sequence_is_a_native_session_named_after_its_id() {
    let server = start(|_| {}).await;
    let mut client = kserve_client(&server).await;
    infer(
        &mut client,
        "relu",
        &[-1.0, 2.0],
        &[seq(u64::MAX), flag("sequence_start")],
    )
    .await
    .unwrap();
    // The native API sees the session and its layer, named after the kind.
    let mut native = LayerServiceClient::new(server.channel().await);
    let dx = native
        .backward(pb::BackwardRequest {
            session_id: "seq:18446744073709551615".into(),
            layer_id: "relu".into(),
            dout: Some(f64_tensor(&[2], &[5.0, 5.0])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f64_values(&dx.dx.unwrap()), [0.0, 5.0]);
    // ... and a native CloseSession ends the sequence.
    native
        .close_session(pb::CloseSessionRequest {
            session_id: "seq:18446744073709551615".into(),
        })
        .await
        .unwrap();
    let status = infer(
        &mut client,
        "relu",
        &[1.0],
        &[("sequence_id", ParameterChoice::Int64Param(-1))],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn sequences_count_against_the_session_limit() {
    let server = start(|c| c.max_sessions = 2).await;
    let mut client = kserve_client(&server).await;
    for id in [1, 2] {
        infer(
            &mut client,
            "identity",
            &[1.0],
            &[seq(id), flag("sequence_start")],
        )
        .await
        .unwrap();
    }
    let status = infer(
        &mut client,
        "identity",
        &[1.0],
        &[seq(3), flag("sequence_start")],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-sessions"), "{status:?}");
    // Ending a sequence frees its place.
    infer(
        &mut client,
        "identity",
        &[1.0],
        &[seq(1), flag("sequence_end")],
    )
    .await
    .unwrap();
    infer(
        &mut client,
        "identity",
        &[1.0],
        &[seq(3), flag("sequence_start")],
    )
    .await
    .unwrap();
    server.stop().await;
}

/// A client may send a sequence's next request before the answer to the one
/// before it (perf_analyzer does, when it ends its sequences): requests of a
/// sequence that share a connection take effect in the order they arrived.
/// (Without that, the server ran most of these pairs in reverse.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_a_sequence_sent_without_waiting_take_effect_in_arrival_order() {
    let server = start(|_| {}).await;
    let mut client = kserve_client(&server).await;
    let channel = server.channel().await;
    let pair = |first, second| async {
        let [a, b] = infer_pipelined(&channel, vec![first, second])
            .await
            .try_into()
            .unwrap();
        (a, b)
    };
    let mut failures = Vec::new();
    let mut check = |id, what, outcome: Result<_, tonic::Status>| {
        failures.extend(outcome.err().map(|status| (id, what, status)))
    };
    for id in 1..=300u64 {
        // A middle request, then the end: the end must not close the
        // sequence under the request that arrived before it.
        let start = &[seq(id), flag("sequence_start")];
        infer(&mut client, "relu", &[1.0], start).await.unwrap();
        let (middle, end) = pair(
            infer_request("relu", &[-1.0], &[seq(id)]),
            infer_request("relu", &[2.0], &[seq(id), flag("sequence_end")]),
        )
        .await;
        check(id, "middle", middle.map(drop));
        check(id, "end", end.map(drop));

        // The start, then the end: the end must find what the start made.
        let id = id + 1000;
        let (start, end) = pair(
            infer_request("relu", &[1.0], &[seq(id), flag("sequence_start")]),
            infer_request("relu", &[2.0], &[seq(id), flag("sequence_end")]),
        )
        .await;
        check(id, "start", start.map(drop));
        check(id, "end", end.map(drop));

        // A Forward, then the Backward that ends: dx follows the mask of
        // the Forward sent just before it, not of the one before that.
        let id = id + 1000;
        let start = &[seq(id), flag("sequence_start")];
        infer(&mut client, "relu", &[-1.0, 2.0], start)
            .await
            .unwrap();
        let (forward, backward) = pair(
            infer_request("relu", &[3.0, -4.0], &[seq(id)]),
            infer_request(
                "relu_backward",
                &[1.0, 1.0],
                &[seq(id), flag("sequence_end")],
            ),
        )
        .await;
        check(id, "forward", forward.map(drop));
        check(
            id,
            "backward",
            backward.and_then(|dx| match infer_values(&dx) {
                dx if dx == [1.0, 0.0] => Ok(()),
                dx => Err(tonic::Status::internal(format!("dx {dx:?}"))),
            }),
        );
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    server.stop().await;
}

/// A stateless model computes straight from the request's frames
/// (`layers::elementwise`); a call in a sequence copies the input into
/// aligned memory and runs the layer (`layers::chain`); gzip goes through
/// tonic's codec to the layer too. For every model and datatype, special
/// values and random bits, in a message of many frames: the same bytes.
#[tokio::test]
async fn stateless_answers_from_the_frames_are_the_layers_answers() {
    let server = start(|_| {}).await;
    let mut client = kserve_client(&server).await;
    let mut gzip = client.clone().send_compressed(CompressionEncoding::Gzip);
    let specials = [
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1e-40,
        -710.0,
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (datatype, size) in [("FP32", 4), ("FP64", 8), ("FP16", 2), ("BF16", 2)] {
        // 300,001 elements: more than one 1 MiB frame in every datatype
        // but the half ones, and an odd length.
        let len = 300_001;
        let mut raw = Vec::with_capacity(len * size);
        for i in 0..len {
            let v = specials.get(i % 1000).copied();
            let bytes: Vec<u8> = match (datatype, v) {
                ("FP32", Some(v)) => (v as f32).to_le_bytes().to_vec(),
                ("FP64", Some(v)) => v.to_le_bytes().to_vec(),
                ("FP16", Some(v)) => half::f16::from_f64(v).to_le_bytes().to_vec(),
                ("BF16", Some(v)) => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                (_, None) => random().to_le_bytes()[..size].to_vec(),
                _ => unreachable!(),
            };
            raw.extend(bytes);
        }
        for kind in ["relu", "sigmoid", "identity"] {
            let request = |model: String, params: &[(&str, ParameterChoice)]| {
                let mut request = infer_request(&model, &[], params);
                request.inputs[0].datatype = datatype.into();
                request.inputs[0].shape = vec![len as i64];
                request.raw_input_contents = vec![raw.clone().into()];
                request
            };
            let answer = |response: pb::inference::ModelInferResponse| {
                assert_eq!(response.outputs[0].datatype, datatype);
                response.raw_output_contents[0].clone()
            };
            let stateless = client
                .model_infer(request(format!("{kind}_no_grad"), &[]))
                .await
                .unwrap();
            let in_sequence = client
                .model_infer(request(
                    kind.into(),
                    &[seq(7), flag("sequence_start"), flag("sequence_end")],
                ))
                .await
                .unwrap();
            let zipped = gzip
                .model_infer(request(format!("{kind}_no_grad"), &[]))
                .await
                .unwrap();
            let stateless = answer(stateless.into_inner());
            assert_eq!(stateless.len(), raw.len());
            assert!(
                stateless == answer(in_sequence.into_inner()),
                "{kind} {datatype}: stateless and in a sequence differ"
            );
            assert!(
                stateless == answer(zipped.into_inner()),
                "{kind} {datatype}: from the frames and through the codec differ"
            );
        }
    }
    server.stop().await;
}
