//! Identity: `y = x`, `dx = dout`.
//!
//! Shapes: `x`, `y`, `dout` and `dx` all share one shape, any rank.
//!
//! Kept for Backward: nothing of the tensor (only its shape and dtype, which
//! every kind's instance checks `dout` against). It is the no-compute baseline
//! that benchmarks compare the real kinds against: what a call costs in
//! transport, decoding and session bookkeeping alone.

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use super::{Float, Layer};

/// The identity kind.
pub struct Identity;

impl Layer for Identity {
    const NAME: &'static str = "identity";
    const DESCRIPTION: &'static str =
        "Identity: y = x; dx = dout. Keeps only the shape and dtype (the no-compute baseline).";
    type Kept<F: Float> = ();

    fn kept_bytes<F: Float>(_len: usize) -> usize {
        0
    }

    fn forward<F: Float>(x: ArrayViewD<'_, F>) -> (ArcArray<F, IxDyn>, ()) {
        (Self::forward_no_grad(x).into_shared(), ())
    }

    fn forward_no_grad<F: Float>(x: ArrayViewD<'_, F>) -> ArrayD<F> {
        x.as_standard_layout().into_owned()
    }

    fn backward<F: Float>(_kept: &(), dout: ArrayViewD<'_, F>) -> ArrayD<F> {
        dout.as_standard_layout().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    #[test]
    fn passes_every_bit_through_both_ways() {
        let x = arr2(&[[f32::NAN, -0.0], [f32::NEG_INFINITY, 1e-45]]).into_dyn();
        let (y, ()) = Identity::forward(x.view());
        let dx = Identity::backward(&(), x.t());
        let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y.to_owned()), bits(&x.to_owned()));
        // A transposed (non-contiguous) view comes back in its logical order.
        assert_eq!(bits(&dx), bits(&x.t().to_owned()));
        assert_eq!(Identity::kept_bytes::<f64>(1 << 20), 0);
    }
}
