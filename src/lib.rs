//! layerd: a gRPC service that computes neural-network layers for remote
//! clients, keeping between Forward and Backward exactly what Backward needs.
//!
//! # Layout
//!
//! - [`pb`]: the code generated from `proto/layerd/v1/layerd.proto` and, in
//!   [`pb::inference`], from Triton's `proto/inference/`, fenced in.
//! - [`layers`]: the math, one file per kind (`relu.rs`, `sigmoid.rs`,
//!   `identity.rs`, `affine.rs`, `convolution.rs`, `pooling.rs`,
//!   `batch_norm.rs`, `dropout.rs`, `softmax_with_loss.rs`, with `linalg.rs`,
//!   `rng.rs` and `init.rs`) behind the [`layers::Layer`] trait; pure ndarray;
//!   `chain.rs` runs a layer instance's members (a `sequential`);
//!   `elementwise.rs` runs the stateless elementwise kinds over raw bytes at
//!   any address (KServe's stateless models, in one pass from the frames).
//! - [`optimizers`]: SGD, Momentum, AdaGrad, Adam as pure elementwise math.
//! - [`dtype`]: element types (the wire dtype enum, the element trait), at the
//!   bottom: it depends on nothing but errors and the generated code.
//! - [`tensor`]: the only place wire tensors become arrays and back.
//! - [`session`]: the session store, limits, kept-state accounting, expiry,
//!   optimizers and the layers they own.
//! - [`engine`]: the compute path both protocols share: Forward and Backward
//!   on a layer instance, timeout, tracing and metrics per call, where
//!   computations run, in-order stream answering.
//! - [`training`]: Step and TrainStep on that path, all or nothing;
//!   `training::queue` runs an optimizer's large TrainSteps back to back.
//! - [`checkpoint`]: a session as a safetensors file (export) and back (import).
//! - [`persist`]: `--state-dir`: sessions written at the drain (and
//!   periodically) and read back at start.
//! - [`service`]: the gRPC handlers of the layer service (thin).
//! - [`kserve`]: the KServe v2 / Triton inference protocol over the same
//!   sessions: models, sequence parameters, statistics; `kserve::wire` reads
//!   and writes ModelInfer's tensors between HTTP/2 frames and their buffers
//!   without tonic's codec copies.
//! - [`auth`]: bearer tokens and the principal each session belongs to.
//! - [`error`]: the error enum and its one mapping to `tonic::Status`.
//! - [`overload`]: the process-wide call limit (load shedding) and the
//!   connection cap.
//! - [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//! - [`config`]: flags and `LAYERD_*` variables (clap).
//! - [`server`]: assembles services, HTTP/2 guards, health, reflection, shutdown.
//! - [`drain`]: ends health Watch streams when shutdown drains.
//! - [`telemetry`], [`signal`]: logging setup and shutdown signals;
//!   [`allocator`]: glibc malloc settings for the server process (and the
//!   load generator).
//! - [`client`]: connecting, for the bundled tools `layerd-bench` (a verifying
//!   load generator, `src/bin/layerd-bench/`) and `layerd-cli`.

pub mod allocator;
pub mod api;
pub mod auth;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod drain;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod kserve;
pub mod layers;
pub mod metrics;
pub mod optimizers;
pub mod overload;
pub mod persist;
pub mod rpc;
pub mod server;
pub mod session;
pub mod signal;
pub mod spec;
pub mod telemetry;
pub mod tensor;
pub mod training;

/// Generated protobuf and gRPC code for `layerd.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("layerd.v1");

    /// Encoded descriptors of `layerd.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("layerd_descriptor");

    /// Generated code for Triton's `inference` package (KServe v2 protocol).
    /// Its descriptors are in [`FILE_DESCRIPTOR_SET`] too.
    pub mod inference {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("inference");
    }
}
