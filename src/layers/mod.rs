//! Layer kinds: the [`Layer`] trait each kind implements in its own file, the
//! [`Kind`] registry, and the dtype-erased [`Kept`] state a layer instance holds
//! between Forward and Backward.
//!
//! The kind files (`identity.rs`, `relu.rs`, `sigmoid.rs`) are pure ndarray
//! math; this module is the one bridge from them to validated [`Tensor`]s.

pub mod affine;
pub mod batch_norm;
pub mod convolution;
pub mod dropout;
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

use std::{any::Any, fmt};

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use crate::dtype::{DType, Element};
use crate::error::Error;
use crate::tensor::Tensor;

pub use identity::Identity;
pub use relu::Relu;
pub use sigmoid::Sigmoid;

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

/// One layer kind's math. The implementor declares what Forward keeps for
/// Backward (`Kept`) and how many bytes that costs, so the server can reserve
/// the memory before it computes.
pub trait Layer {
    /// The name clients pass as `CreateLayerRequest.kind`.
    const NAME: &'static str;
    /// Formula and kept state, shown by ListLayerKinds.
    const DESCRIPTION: &'static str;
    /// What a keeping Forward leaves for Backward.
    type Kept<F: Float>: Send + Sync + 'static;

    /// Heap bytes of `Kept<F>` for a tensor of `len` elements: exact, and
    /// known before Forward runs.
    fn kept_bytes<F: Float>(len: usize) -> usize;
    /// `y` and what Backward will need. `y` is shared (reference-counted) so a
    /// kind that keeps `y` itself, like Sigmoid, answers without copying it.
    fn forward<F: Float>(x: ArrayViewD<'_, F>) -> (ArcArray<F, IxDyn>, Self::Kept<F>);
    /// `y` alone, for `no_grad` calls.
    fn forward_no_grad<F: Float>(x: ArrayViewD<'_, F>) -> ArrayD<F>;
    /// `dx` from the upstream gradient; `dout` has the kept Forward's shape.
    fn backward<F: Float>(kept: &Self::Kept<F>, dout: ArrayViewD<'_, F>) -> ArrayD<F>;
}

/// The layer kinds this server offers, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Identity,
    Relu,
    Sigmoid,
}

/// Expands `$body` with `$L` bound to the kind's [`Layer`] type.
macro_rules! with_layer {
    ($kind:expr, $L:ident => $body:expr) => {
        match $kind {
            Kind::Identity => {
                type $L = Identity;
                $body
            }
            Kind::Relu => {
                type $L = Relu;
                $body
            }
            Kind::Sigmoid => {
                type $L = Sigmoid;
                $body
            }
        }
    };
}

/// Expands `$body` with `$F` bound to the element type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $F = f32;
                $body
            }
            DType::F64 => {
                type $F = f64;
                $body
            }
        }
    };
}

impl Kind {
    /// Every kind, sorted by name.
    pub const ALL: [Kind; 3] = [Kind::Identity, Kind::Relu, Kind::Sigmoid];

    pub fn name(self) -> &'static str {
        with_layer!(self, L => L::NAME)
    }

    pub fn description(self) -> &'static str {
        with_layer!(self, L => L::DESCRIPTION)
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The known names, comma-separated, for error messages.
    pub fn names() -> String {
        Kind::ALL.map(Kind::name).join(", ")
    }

    /// Bytes a keeping Forward of `len` elements of `dtype` will hold.
    pub fn kept_bytes(self, dtype: DType, len: usize) -> usize {
        with_layer!(self, L => with_float!(dtype, F => L::kept_bytes::<F>(len)))
    }

    /// Forward that keeps state: `y` and what Backward needs.
    pub fn forward(self, x: &Tensor) -> (Tensor, Kept) {
        with_layer!(self, L => with_float!(x.dtype(), F => {
            let (y, state) = L::forward::<F>(x.view::<F>().view());
            let kept = Kept {
                kind: self,
                dtype: x.dtype(),
                shape: x.shape().to_vec(),
                bytes: L::kept_bytes::<F>(x.len()),
                state: Box::new(state),
            };
            (Tensor::from_shared(y), kept)
        }))
    }

    /// Forward that keeps nothing (`no_grad`).
    pub fn forward_no_grad(self, x: &Tensor) -> Tensor {
        with_layer!(self, L => with_float!(x.dtype(), F => {
            Tensor::from_array(L::forward_no_grad::<F>(x.view::<F>().view()))
        }))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a keeping Forward left for Backward: the input's dtype and shape,
/// and the kind's own state (`Layer::Kept<F>`), dtype-erased.
pub struct Kept {
    kind: Kind,
    dtype: DType,
    shape: Vec<usize>,
    bytes: usize,
    state: Box<dyn Any + Send + Sync>,
}

impl Kept {
    /// Heap bytes of the kept state, as [`Kind::kept_bytes`] declared.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `dx` for `dout`, which must have the dtype and shape of the kept
    /// Forward's input. Changes nothing, so it may run any number of times.
    pub fn backward(&self, dout: &Tensor) -> Result<Tensor, Error> {
        if dout.dtype() != self.dtype || dout.shape() != self.shape.as_slice() {
            return Err(Error::invalid(
                "dout",
                format!(
                    "the kept Forward's {}{:?}",
                    self.dtype.proto_name(),
                    self.shape
                ),
                format!("{}{:?}", dout.dtype().proto_name(), dout.shape()),
                "DOUT_MISMATCH",
            ));
        }
        Ok(with_layer!(self.kind, L => with_float!(self.dtype, F => {
            let state = self
                .state
                .downcast_ref::<<L as Layer>::Kept<F>>()
                .expect("kept state was made by this kind at this dtype");
            Tensor::from_array(L::backward::<F>(state, dout.view::<F>().view()))
        })))
    }
}

impl fmt::Debug for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kept")
            .field("kind", &self.kind)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
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
        assert_eq!(Kind::names(), "identity, relu, sigmoid");
    }

    #[test]
    fn declared_kept_bytes_match_what_is_held() {
        let x = Tensor::from_array(ndarray::ArrayD::from_elem(
            ndarray::IxDyn(&[3, 67]),
            -1.0f32,
        ));
        let (_, relu) = Kind::Relu.forward(&x);
        assert_eq!(relu.bytes(), relu::Mask::bytes_for(201));
        let mask = relu.state.downcast_ref::<relu::Mask>().unwrap();
        assert_eq!(mask.heap_bytes(), relu.bytes());
        let (_, sigmoid) = Kind::Sigmoid.forward(&x);
        assert_eq!(sigmoid.bytes(), 201 * 4);
        let (_, identity) = Kind::Identity.forward(&x);
        assert_eq!(identity.bytes(), 0);
    }

    #[test]
    fn backward_rejects_another_shape_or_dtype() {
        let x = Tensor::from_array(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.0f32));
        let (_, kept) = Kind::Relu.forward(&x);
        let wrong_shape =
            Tensor::from_array(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 2]), 1.0f32));
        let wrong_dtype =
            Tensor::from_array(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.0f64));
        for dout in [wrong_shape, wrong_dtype] {
            let err = kept.backward(&dout).unwrap_err();
            assert!(err.to_string().contains("dout"), "{err}");
        }
        assert!(kept.backward(&x).is_ok());
    }
}
