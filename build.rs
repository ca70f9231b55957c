//! Compiles `proto/` into Rust with no system `protoc`: protox parses the
//! files, tonic-prost-build generates the code, and the encoded descriptor set
//! is written for server reflection.

use std::{env, error::Error, fs, path::PathBuf};

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "proto/layerd/v1/layerd.proto",
    "proto/inference/grpc_service.proto",
    "proto/inference/model_config.proto",
];

/// Messages of layer and optimizer specifications, serialised as JSON.
const SPEC_MESSAGES: &[&str] = &[
    ".layerd.v1.Init",
    ".layerd.v1.AffineConfig",
    ".layerd.v1.DropoutConfig",
    ".layerd.v1.BatchNormConfig",
    ".layerd.v1.ConvolutionConfig",
    ".layerd.v1.PoolingConfig",
    ".layerd.v1.SequentialConfig",
    ".layerd.v1.LayerSpec",
    ".layerd.v1.Sgd",
    ".layerd.v1.Momentum",
    ".layerd.v1.AdaGrad",
    ".layerd.v1.Adam",
];

fn main() -> Result<(), Box<dyn Error>> {
    // tonic-prost-build 0.14 does not emit these itself when given descriptors.
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_imports(true).include_source_info(true);
    for proto in PROTOS {
        compiler.open_file(proto)?;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("layerd_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    let mut builder = tonic_prost_build::configure();
    // Layer and optimizer specifications are written as JSON into exported
    // checkpoints (src/checkpoint.rs) and read back through the same
    // validation as CreateLayer and CreateOptimizer.
    // A message's attributes also reach the oneofs nested in it (LayerConfig's).
    for message in SPEC_MESSAGES {
        builder = builder.type_attribute(
            message,
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(deny_unknown_fields)]",
        );
    }
    // LayerConfig is written as its one config, `{"affine": {...}}` (by hand,
    // in src/checkpoint.rs: an attribute on it would reach its oneof too).
    builder = builder
        .type_attribute(
            ".layerd.v1.LayerConfig.config",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\", deny_unknown_fields)]",
        )
        .type_attribute(
            ".layerd.v1.CreateOptimizerRequest.algorithm",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\", deny_unknown_fields)]",
        );
    builder
        // A member's values are tensors of the checkpoint, not JSON.
        .field_attribute(".layerd.v1.LayerSpec.params", "#[serde(skip)]")
        // Tensor data stays a `bytes::Bytes` view of the received buffer.
        .bytes(".layerd.v1.Tensor.data")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
