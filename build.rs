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

    tonic_prost_build::configure()
        // Tensor data stays a `bytes::Bytes` view of the received buffer.
        .bytes(".layerd.v1.Tensor.data")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
