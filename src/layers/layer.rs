//! The [`Layer`] trait every kind implements, and what passes between a kind
//! and the chain that runs it: the [`Slot`]s it declares, the [`Plan`] it is
//! checked against, one Forward's [`Inputs`], what Forward and
//! Backward produce ([`Forwarded`], [`Backwarded`]), and the kept state that
//! runs its own Backward ([`MemberKept`], [`KeptMembers`]).

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use super::kernels::{init, rng, vexp};
use super::record::{Part, Parts};
use super::softmax_with_loss::TargetView;
use crate::dtype::{Element, Wire};

/// An element type the layers compute in: `f32` or `f64`.
pub trait Float: Element + num_traits::Float {
    /// The IEEE 754 bits, widened, for bit-exact comparisons in tests.
    fn to_bits_u64(self) -> u64;
    /// `e^self` by [`vexp`], which the compiler can vectorise (within about
    /// 1 ulp of libm's `exp`).
    fn vexp(self) -> Self;
    /// Members' kept state of this element type, dtype-erased.
    fn keep(members: Vec<Box<dyn MemberKept<Self>>>) -> KeptMembers;
    /// The members' kept state, if it is of this element type.
    fn kept(members: &KeptMembers) -> Option<&[Box<dyn MemberKept<Self>>]>;
}

impl Float for f32 {
    fn to_bits_u64(self) -> u64 {
        self.to_bits().into()
    }
    fn vexp(self) -> f32 {
        vexp::exp_f32(self)
    }
    fn keep(members: Vec<Box<dyn MemberKept<f32>>>) -> KeptMembers {
        KeptMembers::F32(members)
    }
    fn kept(members: &KeptMembers) -> Option<&[Box<dyn MemberKept<f32>>]> {
        match members {
            KeptMembers::F32(members) => Some(members),
            KeptMembers::F64(_) => None,
        }
    }
}

impl Float for f64 {
    fn to_bits_u64(self) -> u64 {
        self.to_bits()
    }
    fn vexp(self) -> f64 {
        vexp::exp_f64(self)
    }
    fn keep(members: Vec<Box<dyn MemberKept<f64>>>) -> KeptMembers {
        KeptMembers::F64(members)
    }
    fn kept(members: &KeptMembers) -> Option<&[Box<dyn MemberKept<f64>>]> {
        match members {
            KeptMembers::F64(members) => Some(members),
            KeptMembers::F32(_) => None,
        }
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
pub struct Inputs<'a, F> {
    pub x: ArrayViewD<'a, F>,
    /// `x` itself as a shared array, when the caller holds it as one (the
    /// previous member's output, or the aligned copy of a request's
    /// elements): a kind that keeps its input keeps this, without a copy.
    pub x_shared: Option<&'a ArcArray<F, IxDyn>>,
    /// The layer's slots' values, in [`Layer::slots`] order.
    pub values: &'a [ArrayViewD<'a, F>],
    /// The target of a loss layer.
    pub target: Option<TargetView<'a, F>>,
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
    /// What Backward needs, when the call was asked to keep it.
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
pub trait Layer: Clone + Send + Sync + 'static {
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

    /// The kind as configured without a config, for a kind that takes none
    /// (ReLU, Sigmoid, ...); None, the default: it needs one.
    fn unconfigured() -> Option<Self> {
        None
    }

    /// The seed of the generator the layer draws from (Dropout's mask); None,
    /// the default: it draws nothing.
    fn seed(&self) -> Option<u64> {
        None
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Self::Kept<F>>;

    /// `dx` and the parameter gradients for `dout` (the shape of the kept
    /// Forward's output), from the slots' values and the kept state.
    fn backward<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &Self::Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F>;

    /// The kept state as arrays, to move it to another replica
    /// ([`super::record`]).
    fn save_kept<F: Float>(&self, kept: &Self::Kept<F>) -> Vec<Part<F>>;

    /// The kept state back from the parts [`Layer::save_kept`] listed, for a
    /// keeping Forward as `plan` describes (its shape checked by
    /// [`Layer::output_shape`]); every part is checked, as they come from
    /// outside.
    fn load_kept<F: Float>(
        &self,
        plan: Plan<'_>,
        parts: &mut Parts<F>,
    ) -> Result<Self::Kept<F>, String>;

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

    /// Forward on half-precision elements as they came (`xs`, of half type
    /// `wire`), for a kind that is exact on them without widening (ReLU):
    /// its answer in `wire`, and when `keep`, its kept state. None, the
    /// default: the elements are widened to float32 first.
    fn forward_halves(
        &self,
        _wire: Wire,
        _xs: &[u16],
        _keep: bool,
    ) -> Option<Halved<Self::Kept<f32>>> {
        None
    }

    /// Backward on half-precision `dout` elements as they came, from what
    /// [`Layer::forward_halves`] kept; None, the default: widened first.
    fn backward_halves<F: Float>(&self, _kept: &Self::Kept<F>, _ds: &[u16]) -> Option<Vec<u16>> {
        None
    }
}

/// A Forward on half-precision elements: the answer's 16-bit elements, and
/// the kept state when the call keeps.
pub type Halved<K> = (Vec<u16>, Option<K>);

/// What one member kept for Backward, bound to the layer that kept it: it
/// runs its own Backward, so the chain needs to know neither its type nor
/// its kind.
pub trait MemberKept<F: Float>: Send + Sync {
    /// [`Layer::backward`] from this state.
    fn backward(&self, values: &[ArrayViewD<'_, F>], dout: ArrayViewD<'_, F>) -> Backwarded<F>;
    /// [`Layer::param_grads`] from this state.
    fn param_grads(&self, values: &[ArrayViewD<'_, F>], dout: ArrayViewD<'_, F>) -> Vec<ArrayD<F>>;
    /// [`Layer::backward_halves`] from this state.
    fn backward_halves(&self, ds: &[u16]) -> Option<Vec<u16>>;
    /// [`Layer::save_kept`] of this state.
    fn save(&self) -> Vec<Part<F>>;
}

/// A kind's kept state with (a copy of) the configured kind that kept it.
pub struct KeptBy<L: Layer, F: Float> {
    layer: L,
    kept: L::Kept<F>,
}

impl<L: Layer, F: Float> KeptBy<L, F> {
    pub fn boxed(layer: &L, kept: L::Kept<F>) -> Box<dyn MemberKept<F>> {
        Box::new(KeptBy {
            layer: layer.clone(),
            kept,
        })
    }
}

impl<L: Layer, F: Float> MemberKept<F> for KeptBy<L, F> {
    fn backward(&self, values: &[ArrayViewD<'_, F>], dout: ArrayViewD<'_, F>) -> Backwarded<F> {
        self.layer.backward(values, &self.kept, dout)
    }

    fn param_grads(&self, values: &[ArrayViewD<'_, F>], dout: ArrayViewD<'_, F>) -> Vec<ArrayD<F>> {
        self.layer.param_grads(values, &self.kept, dout)
    }

    fn backward_halves(&self, ds: &[u16]) -> Option<Vec<u16>> {
        self.layer.backward_halves(&self.kept, ds)
    }

    fn save(&self) -> Vec<Part<F>> {
        self.layer.save_kept(&self.kept)
    }
}

/// The kept state of the members that ran in one Forward, in the element
/// type they computed in.
pub enum KeptMembers {
    F32(Vec<Box<dyn MemberKept<f32>>>),
    F64(Vec<Box<dyn MemberKept<f64>>>),
}

impl KeptMembers {
    /// How many members kept state (the ones that ran).
    pub fn len(&self) -> usize {
        match self {
            KeptMembers::F32(members) => members.len(),
            KeptMembers::F64(members) => members.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
