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

pub fn seq(id: u64) -> (&'static str, ParameterChoice) {
    ("sequence_id", ParameterChoice::Uint64Param(id))
}

pub fn flag(name: &'static str) -> (&'static str, ParameterChoice) {
    (name, ParameterChoice::BoolParam(true))
}
