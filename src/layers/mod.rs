//! Layer kinds and the math of a layer instance.
//!
//! - [`layer`]: the [`Layer`] trait each kind implements, and the types that
//!   pass between a kind and the chain that runs it;
//! - [`registry`]: [`Kind`] (every kind by name), [`Spec`] (a configured
//!   kind) and the dispatch from them to each kind's `impl Layer`;
//! - one file per kind (`relu.rs`, `sigmoid.rs`, `identity.rs`, `affine.rs`,
//!   `convolution.rs`, `pooling.rs`, `batch_norm.rs`, `dropout.rs`,
//!   `softmax_with_loss.rs`): pure ndarray math with its formula, shapes and
//!   kept state in its `//!` doc, beside its bit-exact and gradient-checked
//!   tests;
//! - [`kernels`]: what the kinds share: matrix products ([`linalg`]), a
//!   vectorisable exp ([`vexp`]), the seeded generator ([`rng`]), weight
//!   initialisation ([`init`]) and the stateless elementwise passes over raw
//!   bytes ([`elementwise`]);
//! - [`record`]: kept state as plain arrays, to move it between replicas;
//! - [`chain`]: a layer instance's math, dtype-erased over validated
//!   [`crate::tensor::Tensor`]s: its members run in order on Forward and in
//!   reverse on Backward.
//!
//! A kind's `impl Layer` declares its parameters and buffers ([`Slot`]s with
//! shapes), checks its input's shape, says how many bytes a keeping Forward
//! will hold (before anything is computed), and runs Forward and Backward on
//! arrays. Adding a kind is one file and its registration in [`registry`]
//! (and, if it takes a config, its config in [`crate::spec`]).

pub mod affine;
pub mod batch_norm;
pub mod chain;
pub mod convolution;
pub mod dropout;
pub mod identity;
pub mod kernels;
pub mod layer;
pub mod pooling;
pub mod record;
pub mod registry;
pub mod relu;
pub mod sigmoid;
pub mod softmax_with_loss;
#[cfg(test)]
mod testing;

pub use kernels::{elementwise, init, linalg, rng, vexp};

pub use affine::Affine;
pub use batch_norm::BatchNorm;
pub use chain::{Chain, Kept, KeptRecord, Member, MemberParts, MemberState};
pub use convolution::Convolution;
pub use dropout::Dropout;
pub use elementwise::Elementwise;
pub use identity::Identity;
pub use layer::{
    Backwarded, Fill, Float, Forwarded, Inputs, KeptBy, KeptMembers, Layer, MemberKept, Plan, Role,
    Slot,
};
pub use pooling::Pool;
pub use record::{Part, Parts};
pub(crate) use registry::{with_float, with_spec};
pub use registry::{Kind, Spec};
pub use relu::Relu;
pub use sigmoid::Sigmoid;
pub use softmax_with_loss::{SoftmaxWithLoss, TargetView};
