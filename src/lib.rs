//! layerd: a gRPC service that computes neural-network layers for remote
//! clients, keeping between Forward and Backward exactly what Backward needs.
//!
//! # Layout
//!
//! The core computes layers and keeps their state; it names no wire format
//! (`tests/architecture.rs` checks it). `docs/architecture.md` has the map
//! and the path of a call.
//!
//! - [`layers`]: the [`layers::Layer`] trait (`layers/layer.rs`), the
//!   registry of kinds (`layers/registry.rs`), one file per kind, the
//!   kernels they share (`layers/kernels/`), and `layers/chain/`, a layer
//!   instance's math over validated tensors (plan, forward, backward).
//! - [`optimizers`]: SGD, Momentum, AdaGrad, Adam as pure elementwise math.
//! - [`dtype`], [`tensor`], [`error`]: element types, validated tensors and
//!   the domain error, at the bottom.
//! - [`spec`]: layer and optimizer specifications (serde) and their
//!   validation.
//! - [`session`]: the session store, limits, kept-state budgets, expiry,
//!   optimizers, the layers they own and their queue of steps.
//! - [`engine`]: the one executor both protocols call: Forward and Backward
//!   on a layer instance, stateless Forwards, values, where work runs.
//! - [`training`]: Step and TrainStep on that path, all or nothing.
//! - [`checkpoint`]: a session as a safetensors file (export) and back (import).
//!
//! At the edges:
//!
//! - [`pb`]: the code generated from `proto/layerd/v1/layerd.proto` and, in
//!   [`pb::inference`], from Triton's `proto/inference/`, fenced in.
//! - [`api`]: the native `layerd.v1` handlers and codec.
//! - [`kserve`]: the KServe v2 / Triton inference protocol over the same
//!   sessions: models, sequence parameters, statistics, shared memory, its
//!   codec, and `kserve::wire`, which moves ModelInfer's raw contents
//!   between HTTP/2 frames and their buffers without tonic's codec copies.
//! - [`rpc`]: what both protocols share around a call: spans, deadlines,
//!   metrics, headers, stream answering, errors as statuses.
//! - [`auth`]: bearer tokens and the principal each session belongs to.
//! - [`overload`]: the process-wide call limit (load shedding) and the
//!   connection cap.
//! - [`persist`]: `--state-dir`: sessions written at the drain (and
//!   periodically) and read back at start.
//! - [`durable`]: `--session-store`: sessions kept in Redis, held by one
//!   replica at a time (leases, epochs, fencing), taken over by any other.
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
pub mod durable;
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
