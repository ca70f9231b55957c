//! KServe v2 request helpers for the integration tests.

use layerd::pb::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor, InferParameter,
};
use tonic::transport::Channel;

use super::TestServer;

pub fn request(
    model: &str,
    input: &str,
    values: &[f64],
    params: &[(&str, ParameterChoice)],
) -> kserve::ModelInferRequest {
    kserve::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: input.into(),
            datatype: "FP64".into(),
            shape: vec![values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()],
        parameters: params
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    InferParameter {
                        parameter_choice: Some(v.clone()),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

pub fn infer_values(response: &kserve::ModelInferResponse) -> Vec<f64> {
    response.raw_output_contents[0]
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub async fn kserve_client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel().await)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// One ModelInfer call: the input is `dout` for Backward models, else `x`.
pub async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    values: &[f64],
    params: &[(&str, ParameterChoice)],
) -> Result<kserve::ModelInferResponse, tonic::Status> {
    client
        .model_infer(infer_request(model, values, params))
        .await
        .map(tonic::Response::into_inner)
}

/// A request for `model`: its input is `dout` for Backward models, else `x`.
pub fn infer_request(
    model: &str,
    values: &[f64],
    params: &[(&str, ParameterChoice)],
) -> kserve::ModelInferRequest {
    let input = if model.ends_with("_backward") {
        "dout"
    } else {
        "x"
    };
    request(model, input, values, params)
}

/// Sends `requests` as ModelInfer calls on one connection, each handed to it
/// before the next is made and all before any answer is awaited (as a client
/// that pipelines does); returns their outcomes in that order.
pub async fn infer_pipelined(
    channel: &Channel,
    requests: Vec<kserve::ModelInferRequest>,
) -> Vec<Result<kserve::ModelInferResponse, tonic::Status>> {
    use prost::Message;
    use tower::{Service, ServiceExt};

    let mut channel = channel.clone();
    let mut calls = Vec::new();
    for request in requests {
        let request = model_infer_http(0, &request.encode_to_vec());
        // `call` hands the request to the connection's task at once.
        calls.push(channel.ready().await.unwrap().call(request));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(model_infer_outcome(call.await.unwrap()).await);
    }
    outcomes
}

/// One ModelInfer call whose body is `message` behind a gRPC prefix with
/// `flag` as its compressed flag, sent as is: the bytes a test composes by
/// hand reach the server unchanged.
pub async fn infer_raw(
    channel: &Channel,
    flag: u8,
    message: &[u8],
) -> Result<kserve::ModelInferResponse, tonic::Status> {
    use tower::ServiceExt;

    let response = channel
        .clone()
        .oneshot(model_infer_http(flag, message))
        .await
        .unwrap();
    model_infer_outcome(response).await
}

/// A ModelInfer HTTP/2 request: `message` behind a gRPC prefix whose
/// compressed flag is `flag`.
fn model_infer_http(flag: u8, message: &[u8]) -> http::Request<tonic::body::Body> {
    let mut frame = vec![flag];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    http::Request::post("http://layerd/inference.GRPCInferenceService/ModelInfer")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(frame),
        )))
        .unwrap()
}

/// A ModelInfer answer's outcome: its status is in the trailers, or in the
/// headers of a trailers-only answer.
async fn model_infer_outcome(
    response: http::Response<tonic::body::Body>,
) -> Result<kserve::ModelInferResponse, tonic::Status> {
    use http_body_util::BodyExt;
    use prost::Message;

    let (head, body) = response.into_parts();
    let body = body.collect().await.unwrap();
    let status = body
        .trailers()
        .and_then(tonic::Status::from_header_map)
        .or_else(|| tonic::Status::from_header_map(&head.headers));
    match status {
        Some(status) if status.code() != tonic::Code::Ok => Err(status),
        _ => Ok(kserve::ModelInferResponse::decode(&body.to_bytes()[5..]).unwrap()),
    }
}

pub fn seq(id: u64) -> (&'static str, ParameterChoice) {
    ("sequence_id", ParameterChoice::Uint64Param(id))
}

pub fn flag(name: &'static str) -> (&'static str, ParameterChoice) {
    (name, ParameterChoice::BoolParam(true))
}
