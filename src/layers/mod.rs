//! Layer kinds: the [`Layer`] trait each kind implements in its own file, the
//! [`Kind`] list and the [`Spec`] of a configured layer, and (in [`chain`])
//! the dtype-erased bridge from them to validated [`crate::tensor::Tensor`]s.
//!
//! A kind file is pure ndarray math with its formula, shapes and kept state
//! in its `//!` doc; its `impl Layer` declares its parameters and buffers
//! ([`Slot`]s with shapes), checks its input's shape, says how many bytes a
//! keeping Forward will hold (before anything is computed), and runs Forward
//! and Backward on arrays. Adding a kind is one file, one [`Kind`] and one
//! [`Spec`] variant, and its config in [`crate::spec`].

pub mod affine;
pub mod batch_norm;
pub mod chain;
pub mod convolution;
pub mod dropout;
pub mod elementwise;
pub mod identity;
pub mod init;
pub mod linalg;
pub mod pooling;
pub mod relu;
pub mod rng;
pub mod sigmoid;
pub mod softmax_with_loss;
#[cfg(test)]
mod testing;
pub mod vexp;

use std::fmt;

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use crate::dtype::Element;

pub use affine::Affine;
pub use batch_norm::BatchNorm;
pub use chain::{Chain, Kept, Member, MemberState};
pub use convolution::Convolution;
pub use dropout::Dropout;
pub use elementwise::Elementwise;
pub use identity::Identity;
pub use pooling::Pool;
pub use relu::Relu;
pub use sigmoid::Sigmoid;
pub use softmax_with_loss::{SoftmaxWithLoss, Target};

/// An element type the layers compute in: `f32` or `f64`.
pub trait Float: Element + num_traits::Float {
    /// The IEEE 754 bits, widened, for bit-exact comparisons in tests.
    fn to_bits_u64(self) -> u64;
    /// `e^self` by [`vexp`], which the compiler can vectorise (within about
    /// 1 ulp of libm's `exp`).
    fn vexp(self) -> Self;
}

impl Float for f32 {
    fn to_bits_u64(self) -> u64 {
        self.to_bits().into()
    }
    fn vexp(self) -> f32 {
        vexp::exp_f32(self)
    }
}

impl Float for f64 {
    fn to_bits_u64(self) -> u64 {
        self.to_bits()
    }
    fn vexp(self) -> f64 {
        vexp::exp_f64(self)
    }
}

/// Whether a [`Slot`] is learned (it gets a gradient) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Learned: W, b, gamma, beta.
    Param,
    /// State that is not learned: running_mean, running_var.
    Buffer,
}

/// How a slot starts when the client gives no value for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    Zeros,
    Ones,
    /// Normal weights by [`init::Method`], from the layer's seeded generator.
    Weights {
        fan_in: usize,
        init: init::Init,
    },
}

/// A parameter or buffer a layer holds, declared from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub role: Role,
    pub fill: Fill,
}

impl Slot {
    pub fn param(name: &'static str, shape: Vec<usize>, fill: Fill) -> Slot {
        Slot {
            name,
            shape,
            role: Role::Param,
            fill,
        }
    }

    pub fn buffer(name: &'static str, shape: Vec<usize>, fill: Fill) -> Slot {
        Slot {
            name,
            shape,
            role: Role::Buffer,
            fill,
        }
    }

    /// Elements, saturating (a config too large for memory saturates, and the
    /// budget check refuses it before anything is allocated).
    pub fn elements(&self) -> u64 {
        self.shape
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d as u64))
    }
}

/// What the server knows about a Forward before computing it.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// The input's shape (checked by [`Layer::output_shape`]).
    pub x: &'a [usize],
    /// Bytes per element.
    pub itemsize: usize,
    pub eval: bool,
    /// For a loss: whether the target is class ids (else probabilities).
    pub classes: bool,
}

/// One Forward's inputs.
pub struct Step<'a, F> {
    pub x: ArrayViewD<'a, F>,
    /// `x` itself as a shared array, when the caller holds it as one (the
    /// previous member's output, or the aligned copy of a request's
    /// elements): a kind that keeps its input keeps this, without a copy.
    pub x_shared: Option<&'a ArcArray<F, IxDyn>>,
    /// The layer's slots' values, in [`Layer::slots`] order.
    pub values: &'a [ArrayViewD<'a, F>],
    /// The target of a loss layer.
    pub target: Option<Target<'a, F>>,
    pub eval: bool,
    /// Whether to keep what Backward needs (not `no_grad`).
    pub keep: bool,
    /// The layer's generator (Dropout's), positioned where the draws start.
    pub rng: Option<&'a mut rng::Rng>,
}

/// What one Forward produced.
pub struct Forwarded<F, K> {
    /// Shared, so a kind that keeps `y` (Sigmoid) answers without copying it.
    pub y: ArcArray<F, IxDyn>,
    /// What Backward needs, when the step was asked to keep it.
    pub kept: Option<K>,
    /// New values of the buffers (BatchNorm's running statistics), in slot
    /// order after the parameters; empty when they stay as they were.
    pub buffers: Vec<ArrayD<F>>,
}

impl<F, K> Forwarded<F, K> {
    /// An answer that changes no buffer.
    pub fn new(y: ArcArray<F, IxDyn>, kept: Option<K>) -> Self {
        Forwarded {
            y,
            kept,
            buffers: Vec::new(),
        }
    }
}

/// What one Backward produced: `dx`, and a gradient per parameter (slot
/// order, parameters only).
pub struct Backwarded<F> {
    pub dx: ArrayD<F>,
    pub grads: Vec<ArrayD<F>>,
}

/// One layer kind's math on one configured instance. The implementor declares
/// what it holds and what Forward keeps for Backward, and the byte size of
/// that, so the server can check the budgets before it allocates.
pub trait Layer: Send + Sync + 'static {
    /// The name clients pass as `CreateLayerRequest.kind`.
    const NAME: &'static str;
    /// Formula, parameters and kept state, shown by ListLayerKinds.
    const DESCRIPTION: &'static str;
    /// What a keeping Forward leaves for Backward.
    type Kept<F: Float>: Send + Sync + 'static;

    /// Parameters, then buffers, with their shapes.
    fn slots(&self) -> Vec<Slot> {
        Vec::new()
    }

    /// Checks the input's shape; `Ok` is the output's shape, `Err` says what
    /// shape was expected.
    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String>;

    /// Heap bytes of `Kept<F>` after a keeping Forward: exact, known before
    /// Forward runs.
    fn kept_bytes(&self, plan: Plan<'_>) -> usize;

    /// The largest scratch array Forward or Backward builds besides inputs
    /// and outputs (im2col's), in elements.
    fn scratch_elements(&self, _x: &[usize]) -> u64 {
        0
    }

    /// Whether this is a loss layer: it takes a target and answers a scalar.
    fn is_loss(&self) -> bool {
        false
    }

    fn forward<F: Float>(&self, step: Step<'_, F>) -> Forwarded<F, Self::Kept<F>>;

    /// `dx` and the parameter gradients for `dout` (the shape of the kept
    /// Forward's output), from the slots' values and the kept state.
    fn backward<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &Self::Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F>;

    /// Only the parameter gradients of [`Layer::backward`], for the first
    /// layer of a training step whose `dx` nobody asked for. Kinds whose
    /// `dx` costs a matrix product skip it; the default computes and drops it.
    fn param_grads<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &Self::Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Vec<ArrayD<F>> {
        self.backward(values, kept, dout).grads
    }
}

/// The layer kinds this server offers, by name (sorted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Affine,
    BatchNorm,
    Convolution,
    Dropout,
    Identity,
    Pooling,
    Relu,
    Sequential,
    Sigmoid,
    SoftmaxWithLoss,
}

const SEQUENTIAL_NAME: &str = "sequential";
const SEQUENTIAL_DESCRIPTION: &str = "Sequential: members run in order on Forward and in reverse on Backward, under one call; the last may be a softmax_with_loss (without t, Forward stops before it and answers the scores). Parameters named <member>.<name>. Keeps what each member keeps.";

impl Kind {
    /// Every kind, sorted by name: the one list the registry,
    /// ListLayerKinds, the tools and the fuzz targets use.
    pub const ALL: [Kind; 10] = [
        Kind::Affine,
        Kind::BatchNorm,
        Kind::Convolution,
        Kind::Dropout,
        Kind::Identity,
        Kind::Pooling,
        Kind::Relu,
        Kind::Sequential,
        Kind::Sigmoid,
        Kind::SoftmaxWithLoss,
    ];

    /// The kinds without parameters, config or target, whose output has the
    /// input's shape: the ones KServe serves as models, and the load
    /// generator's elementwise modes.
    pub const ELEMENTWISE: [Kind; 3] = [Kind::Identity, Kind::Relu, Kind::Sigmoid];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Affine => Affine::NAME,
            Kind::BatchNorm => BatchNorm::NAME,
            Kind::Convolution => Convolution::NAME,
            Kind::Dropout => Dropout::NAME,
            Kind::Identity => Identity::NAME,
            Kind::Pooling => Pool::NAME,
            Kind::Relu => Relu::NAME,
            Kind::Sequential => SEQUENTIAL_NAME,
            Kind::Sigmoid => Sigmoid::NAME,
            Kind::SoftmaxWithLoss => SoftmaxWithLoss::NAME,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Kind::Affine => Affine::DESCRIPTION,
            Kind::BatchNorm => BatchNorm::DESCRIPTION,
            Kind::Convolution => Convolution::DESCRIPTION,
            Kind::Dropout => Dropout::DESCRIPTION,
            Kind::Identity => Identity::DESCRIPTION,
            Kind::Pooling => Pool::DESCRIPTION,
            Kind::Relu => Relu::DESCRIPTION,
            Kind::Sequential => SEQUENTIAL_DESCRIPTION,
            Kind::Sigmoid => Sigmoid::DESCRIPTION,
            Kind::SoftmaxWithLoss => SoftmaxWithLoss::DESCRIPTION,
        }
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The known names, comma-separated, for error messages.
    pub fn names() -> String {
        Kind::ALL.map(Kind::name).join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One configured layer (a member of a [`Chain`]): its kind and validated
/// hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Affine(Affine),
    BatchNorm(BatchNorm),
    Convolution(Convolution),
    Dropout(Dropout),
    Identity(Identity),
    Pooling(Pool),
    Relu(Relu),
    Sigmoid(Sigmoid),
    SoftmaxWithLoss(SoftmaxWithLoss),
}

/// Expands `$body` with `$l` bound to the spec's [`Layer`] value.
macro_rules! with_spec {
    ($spec:expr, $l:ident => $body:expr) => {
        match $spec {
            $crate::layers::Spec::Affine($l) => $body,
            $crate::layers::Spec::BatchNorm($l) => $body,
            $crate::layers::Spec::Convolution($l) => $body,
            $crate::layers::Spec::Dropout($l) => $body,
            $crate::layers::Spec::Identity($l) => $body,
            $crate::layers::Spec::Pooling($l) => $body,
            $crate::layers::Spec::Relu($l) => $body,
            $crate::layers::Spec::Sigmoid($l) => $body,
            $crate::layers::Spec::SoftmaxWithLoss($l) => $body,
        }
    };
}
pub(crate) use with_spec;

/// Expands `$body` with `$F` bound to the element type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $F = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $F = f64;
                $body
            }
        }
    };
}
pub(crate) use with_float;

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Affine(_) => Kind::Affine,
            Spec::BatchNorm(_) => Kind::BatchNorm,
            Spec::Convolution(_) => Kind::Convolution,
            Spec::Dropout(_) => Kind::Dropout,
            Spec::Identity(_) => Kind::Identity,
            Spec::Pooling(_) => Kind::Pooling,
            Spec::Relu(_) => Kind::Relu,
            Spec::Sigmoid(_) => Kind::Sigmoid,
            Spec::SoftmaxWithLoss(_) => Kind::SoftmaxWithLoss,
        }
    }

    /// The spec of a kind that takes no config, if `kind` is one.
    pub fn unconfigured(kind: Kind) -> Option<Spec> {
        match kind {
            Kind::Identity => Some(Spec::Identity(Identity)),
            Kind::Relu => Some(Spec::Relu(Relu)),
            Kind::Sigmoid => Some(Spec::Sigmoid(Sigmoid)),
            Kind::SoftmaxWithLoss => Some(Spec::SoftmaxWithLoss(SoftmaxWithLoss)),
            _ => None,
        }
    }

    pub fn slots(&self) -> Vec<Slot> {
        with_spec!(self, l => l.slots())
    }

    pub fn is_loss(&self) -> bool {
        with_spec!(self, l => l.is_loss())
    }

    /// Whether the layer draws random numbers (and so owns a generator).
    pub fn draws(&self) -> bool {
        matches!(self, Spec::Dropout(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_sorted() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_name("Relu"), None);
        let names = Kind::ALL.map(Kind::name);
        let mut sorted = names;
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(Kind::names().starts_with("affine, batch_norm, convolution"));
    }
}
