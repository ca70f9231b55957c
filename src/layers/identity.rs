//! Identity: `y = x`, `dx = dout`.
//!
//! Shapes: `x`, `y`, `dout` and `dx` all share one shape, any rank.
//!
//! Kept for Backward: nothing of the tensor (only its shape and dtype, which
//! every kind's instance checks `dout` against). It is the no-compute baseline
//! that benchmarks compare the real kinds against: what a call costs in
//! transport, decoding and session bookkeeping alone.

use ndarray::ArrayViewD;

use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};

/// The identity kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Identity;

impl Layer for Identity {
    const NAME: &'static str = "identity";
    const DESCRIPTION: &'static str =
        "Identity: y = x; dx = dout. Keeps only the shape and dtype (the no-compute baseline).";
    type Kept<F: Float> = ();

    fn unconfigured() -> Option<Identity> {
        Some(Identity)
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        Ok(x.to_vec())
    }

    fn kept_bytes(&self, _plan: Plan<'_>) -> usize {
        0
    }

    fn save_kept<F: Float>(&self, _kept: &()) -> Vec<Part<F>> {
        Vec::new()
    }

    fn load_kept<F: Float>(&self, _plan: Plan<'_>, _parts: &mut Parts<F>) -> Result<(), String> {
        Ok(())
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, ()> {
        let y = inputs.x.as_standard_layout().into_owned().into_shared();
        Forwarded::new(y, inputs.keep.then_some(()))
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        _kept: &(),
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        Backwarded {
            dx: dout.as_standard_layout().into_owned(),
            grads: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, ArrayD};

    #[test]
    fn passes_every_bit_through_both_ways() {
        let x = arr2(&[[f32::NAN, -0.0], [f32::NEG_INFINITY, 1e-45]]).into_dyn();
        let y = crate::layers::testing::forward(&Identity, x.view(), true).y;
        let dx = Identity.backward(&[], &(), x.t()).dx;
        let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y.to_owned()), bits(&x.to_owned()));
        // A transposed (non-contiguous) view comes back in its logical order.
        assert_eq!(bits(&dx), bits(&x.t().to_owned()));
    }
}
