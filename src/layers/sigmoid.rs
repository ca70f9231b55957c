//! Sigmoid: `y = 1 / (1 + exp(-x))`; `dx = (dout * (1 - y)) * y`.
//!
//! Shapes: `x`, `y`, `dout` and `dx` all share one shape, any rank.
//!
//! Kept for Backward: `y` itself (one element of the tensor's dtype each).
//!
//! Forward is computed in the tensor's own dtype with the same operations as
//! numpy's `1 / (1 + np.exp(-x))`, so results differ from numpy only by the
//! last-bit differences between exp implementations. `exp(-x)` overflowing to
//! `+inf` for very negative x gives `1 / inf = 0`, never NaN; `+inf` gives 1.
//! Backward multiplies in exactly numpy's order, `(dout * (1.0 - y)) * y`, so
//! it is bit-identical to numpy's `dout * (1.0 - y) * y` on the same y.

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};

/// The sigmoid kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sigmoid;

fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).vexp())
}

impl Sigmoid {
    /// `y = 1 / (1 + exp(-x))`.
    pub fn y<F: Float>(x: ArrayViewD<'_, F>) -> ArrayD<F> {
        let x = x.as_standard_layout();
        let mut y = ArrayD::zeros(x.raw_dim());
        forward_kernel(
            x.as_slice().expect("standard layout is contiguous"),
            y.as_slice_mut().expect("new arrays are contiguous"),
        );
        y
    }

    /// `y` of a slice, into `ys` (as long): the bits of [`Sigmoid::y`].
    pub fn y_slice<F: Float>(xs: &[F], ys: &mut [F]) {
        forward_kernel(xs, ys);
    }

    /// `y` of one element, as [`Sigmoid::y`] computes it.
    #[inline]
    pub fn one<F: Float>(x: F) -> F {
        sigmoid(x)
    }

    /// `dx` from the kept `y`.
    pub fn backward_with<F: Float>(y: &ArcArray<F, IxDyn>, dout: ArrayViewD<'_, F>) -> ArrayD<F> {
        let dout = dout.as_standard_layout();
        let mut dx = ArrayD::zeros(dout.raw_dim());
        backward_kernel(
            dout.as_slice().expect("standard layout is contiguous"),
            y.as_slice().expect("kept y is contiguous"),
            dx.as_slice_mut().expect("new arrays are contiguous"),
        );
        dx
    }
}

impl Layer for Sigmoid {
    const NAME: &'static str = "sigmoid";
    const DESCRIPTION: &'static str =
        "Sigmoid: y = 1 / (1 + exp(-x)); dx = dout * (1 - y) * y. Keeps y.";
    type Kept<F: Float> = ArcArray<F, IxDyn>;

    fn unconfigured() -> Option<Sigmoid> {
        Some(Sigmoid)
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        Ok(x.to_vec())
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        plan.x.iter().product::<usize>() * plan.itemsize
    }

    fn save_kept<F: Float>(&self, y: &ArcArray<F, IxDyn>) -> Vec<Part<F>> {
        vec![Part::Floats(y.to_owned())]
    }

    fn load_kept<F: Float>(
        &self,
        plan: Plan<'_>,
        parts: &mut Parts<F>,
    ) -> Result<ArcArray<F, IxDyn>, String> {
        Ok(parts.floats("y", plan.x)?.into_shared())
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, ArcArray<F, IxDyn>> {
        // The answer and the kept state are one buffer.
        let y = Sigmoid::y(inputs.x).into_shared();
        let kept = inputs.keep.then(|| y.clone());
        Forwarded::new(y, kept)
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        y: &ArcArray<F, IxDyn>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        Backwarded {
            dx: Sigmoid::backward_with(y, dout),
            grads: Vec::new(),
        }
    }
}

// The kernels loop over slices they are given rather than collecting an
// iterator: `collect` runs in library code compiled for the baseline CPU, which
// would undo the per-CPU compilation.

/// Element-wise sigmoid, compiled for several SIMD levels, picked at run time.
#[multiversion::multiversion(targets = "simd")]
fn forward_kernel<F: Float>(xs: &[F], ys: &mut [F]) {
    for (y, &x) in ys.iter_mut().zip(xs) {
        *y = sigmoid(x);
    }
}

/// `dx = (dout * (1 - y)) * y`, in exactly numpy's order (no fused multiply-add:
/// Rust never contracts `a * b + c` on its own, so every level gives the same bits).
#[multiversion::multiversion(targets = "simd")]
fn backward_kernel<F: Float>(dout: &[F], y: &[F], dx: &mut [F]) {
    for ((dx, &d), &y) in dx.iter_mut().zip(dout).zip(y) {
        *dx = (d * (F::one() - y)) * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, ArrayD};

    fn fwd<F: Float>(values: &[F]) -> ArrayD<F> {
        Sigmoid::y(arr1(values).into_dyn().view())
    }

    #[test]
    fn hand_derived_values() {
        // sigmoid(0) = 1 / (1 + e^0) = 1 / 2 exactly.
        // sigmoid(ln 3) = 1 / (1 + 1/3) = 3/4; sigmoid(-ln 3) = 1 / (1 + 3) = 1/4.
        let ln3 = 3f64.ln();
        let y = fwd(&[0.0, ln3, -ln3]);
        assert_eq!(y[0], 0.5);
        assert!((y[1] - 0.75).abs() < 1e-15, "{}", y[1]);
        assert!((y[2] - 0.25).abs() < 1e-15, "{}", y[2]);
        // -0.0: exp(0.0) = 1, so 1/2 as well.
        assert_eq!(fwd(&[-0.0f32])[0], 0.5);
    }

    #[test]
    fn infinities_and_nan() {
        // exp(-inf) = 0 -> 1/1 = 1; exp(+inf) = inf -> 1/inf = +0.
        let y = fwd(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1].to_bits(), 0);
        // NaN in, NaN out (numpy does the same); the only way to get NaN.
        assert!(y[2].is_nan());
    }

    #[test]
    fn large_magnitudes_saturate_without_nan() {
        // float32: exp(88.8) overflows (ln(f32::MAX) ≈ 88.72), so sigmoid(-88.8) = 1/inf = 0.
        // exp(-88.8) ≈ 2.9e-39 is subnormal, and 1 + 2.9e-39 rounds to 1, so sigmoid(88.8) = 1.
        let y32 = fwd(&[-88.8f32, 88.8, -88.0, 1e-40]);
        assert_eq!(y32[0], 0.0);
        assert_eq!(y32[1], 1.0);
        // exp(88) ≈ 1.65e38 still fits in f32: y ≈ 6.05e-39, a tiny subnormal, not 0.
        assert!(y32[2] > 0.0 && y32[2] < 1e-38, "{}", y32[2]);
        // A subnormal input: exp(-1e-40) rounds to 1 -> exactly 1/2.
        assert_eq!(y32[3], 0.5);
        // float64: exp(710) overflows (ln(f64::MAX) ≈ 709.78).
        let y64 = fwd(&[-710.0f64, 710.0, -700.0, -88.8]);
        assert_eq!(y64[0], 0.0);
        assert_eq!(y64[1], 1.0);
        // exp(700) ≈ 1.014e304 -> y ≈ 9.86e-305, a normal f64.
        assert!(
            (y64[2] / 9.859_676_543_759_77e-305 - 1.0).abs() < 1e-12,
            "{}",
            y64[2]
        );
        // exp(88.8) ≈ 3.6e38 fits in f64: y ≈ 2.76e-39.
        assert!(y64[3] > 2.7e-39 && y64[3] < 2.8e-39, "{}", y64[3]);
        for v in y32.iter().map(|&v| v as f64).chain(y64.iter().copied()) {
            assert!((0.0..=1.0).contains(&v), "{v} outside [0, 1]");
        }
    }

    #[test]
    fn backward_multiplies_in_numpy_order() {
        let x = arr1(&[0.3f32, -1.7, 2.9, 0.0]).into_dyn();
        let y = Sigmoid::y(x.view()).into_shared();
        let kept = y.clone();
        let dout = arr1(&[1.25f32, -0.5, 3.0, -2.0]).into_dyn();
        let dx = Sigmoid::backward_with(&kept, dout.view());
        for i in 0..4 {
            let want = (dout[i] * (1.0 - y[i])) * y[i];
            assert_eq!(dx[i].to_bits(), want.to_bits(), "element {i}");
        }
        // At x = 0: y = 1/2, so dx = (-2 * 1/2) * 1/2 = -0.5 exactly.
        assert_eq!(dx[3], -0.5);
    }

    #[test]
    fn gradient_matches_central_difference_in_float64() {
        // d/dx sigmoid(x) ≈ (sigmoid(x + h) - sigmoid(x - h)) / 2h with error O(h²).
        let h = 1e-5;
        let xs: [f64; 7] = [-6.0, -2.5, -0.7, 0.0, 0.4, 1.9, 5.5];
        let dout: [f64; 7] = [0.3, -1.2, 2.0, 1.0, -0.75, 4.0, -2.5];
        let x = arr1(&xs).into_dyn();
        let kept = Sigmoid::y(x.view()).into_shared();
        let dx = Sigmoid::backward_with(&kept, arr1(&dout).into_dyn().view());
        for i in 0..xs.len() {
            let numeric = (sigmoid(xs[i] + h) - sigmoid(xs[i] - h)) / (2.0 * h) * dout[i];
            assert!(
                (dx[i] - numeric).abs() < 1e-9,
                "x = {}: analytic {} vs numeric {}",
                xs[i],
                dx[i],
                numeric
            );
        }
    }

    #[test]
    fn keeps_y_at_its_dtype_size() {
        let plan = |itemsize| Plan {
            x: &[10, 100],
            itemsize,
            eval: false,
            classes: false,
        };
        assert_eq!(Sigmoid.kept_bytes(plan(4)), 4000);
        assert_eq!(Sigmoid.kept_bytes(plan(8)), 8000);
        let x = ArrayD::<f64>::zeros(ndarray::IxDyn(&[2, 3, 0]));
        let y = Sigmoid::y(x.view()).into_shared();
        let kept = y.clone();
        assert_eq!((y.shape(), kept.len()), (&[2, 3, 0][..], 0));
    }
}
