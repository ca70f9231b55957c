//! Dropout, the book's (not inverted) form.
//!
//! Training: `y = x * mask` with `mask = u > ratio`, `u` uniform in [0, 1)
//! drawn from the layer's own generator ([`Rng`]: the same seed gives the
//! same masks on every machine and build), one draw per element in row-major
//! order; Backward `dx = dout * mask`. Evaluation: `y = x * (1 − ratio)` with
//! the scale rounded to the tensor's dtype first (as numpy rounds a Python
//! float), and Backward `dx = dout * (1 − ratio)`; no draws.
//!
//! Elementwise, in the tensor's dtype: bit-identical to numpy given the same
//! mask. Shapes: any; `y`, `dout`, `dx` have `x`'s. Kept for Backward: the
//! mask as a bitset (one bit per element) in training, nothing in evaluation.

use ndarray::{ArrayD, ArrayViewD};

use super::rng::Rng;
use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};

/// The dropout kind, configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// In [0, 1).
    pub ratio: f64,
    /// The generator's seed (already chosen when the client asked for a random one).
    pub seed: u64,
}

/// What Forward keeps: the mask in training, nothing in evaluation.
pub enum Kept {
    Train(Mask),
    Eval,
}

impl Layer for Dropout {
    const NAME: &'static str = "dropout";
    const DESCRIPTION: &'static str = "Dropout (not inverted): training y = x * mask, mask = u > ratio with u uniform [0, 1) from the layer's seeded generator, dx = dout * mask; evaluation y = x * (1 - ratio), dx = dout * (1 - ratio). Keeps the mask as a bitset (training).";
    type Kept<F: Float> = Kept;

    fn seed(&self) -> Option<u64> {
        Some(self.seed)
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        Ok(x.to_vec())
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        if plan.eval {
            0
        } else {
            Mask::bytes_for(plan.x.iter().product())
        }
    }

    fn save_kept<F: Float>(&self, kept: &Kept) -> Vec<Part<F>> {
        match kept {
            Kept::Train(mask) => vec![Part::Bits(mask.words.clone())],
            Kept::Eval => Vec::new(),
        }
    }

    fn load_kept<F: Float>(&self, plan: Plan<'_>, parts: &mut Parts<F>) -> Result<Kept, String> {
        if plan.eval {
            return Ok(Kept::Eval);
        }
        let words = parts.bits("mask", plan.x.iter().product())?;
        Ok(Kept::Train(Mask { words }))
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Kept> {
        if inputs.eval {
            let y = scale(inputs.x, self.ratio).into_shared();
            return Forwarded::new(y, inputs.keep.then_some(Kept::Eval));
        }
        let rng = inputs.rng.expect("a dropout layer has a generator");
        let (y, mask) = forward_train(inputs.x, self.ratio, rng);
        Forwarded::new(y.into_shared(), inputs.keep.then_some(Kept::Train(mask)))
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        kept: &Kept,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let dx = match kept {
            Kept::Train(mask) => backward_train(mask, dout),
            Kept::Eval => scale(dout, self.ratio),
        };
        Backwarded {
            dx,
            grads: Vec::new(),
        }
    }
}

/// Bit i set where element i (row-major) was kept (`u > ratio`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    words: Vec<u64>,
}

impl Mask {
    /// Bytes a mask over `len` elements occupies.
    pub const fn bytes_for(len: usize) -> usize {
        len.div_ceil(64) * std::mem::size_of::<u64>()
    }

    fn kept(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 == 1
    }
}

/// Training Forward: `y` and the mask, drawing `x.len()` numbers from `rng`.
pub fn forward_train<F: Float>(
    x: ArrayViewD<'_, F>,
    ratio: f64,
    rng: &mut Rng,
) -> (ArrayD<F>, Mask) {
    let mut words = vec![0u64; x.len().div_ceil(64)];
    let mut y = x.to_owned();
    // Row-major order: the draws follow the elements as numpy lays them out.
    for (i, v) in y.iter_mut().enumerate() {
        let keep = rng.uniform() > ratio;
        words[i / 64] |= u64::from(keep) << (i % 64);
        *v = *v * if keep { F::one() } else { F::zero() };
    }
    (y, Mask { words })
}

/// Training Backward: `dout * mask`.
pub fn backward_train<F: Float>(mask: &Mask, dout: ArrayViewD<'_, F>) -> ArrayD<F> {
    let mut dx = dout.to_owned();
    for (i, v) in dx.iter_mut().enumerate() {
        *v = *v * if mask.kept(i) { F::one() } else { F::zero() };
    }
    dx
}

/// The evaluation scale `1 − ratio`, rounded to the dtype.
pub fn eval_scale<F: Float>(ratio: f64) -> F {
    F::from(1.0 - ratio).expect("a float")
}

/// Evaluation Forward or Backward: `t * (1 − ratio)`.
pub fn scale<F: Float>(t: ArrayViewD<'_, F>, ratio: f64) -> ArrayD<F> {
    let s = eval_scale::<F>(ratio);
    t.mapv(|v| v * s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn ones(n: usize) -> ArrayD<f32> {
        ArrayD::from_elem(IxDyn(&[n]), 1.0)
    }

    #[test]
    fn the_same_seed_gives_the_same_mask_and_backward_uses_it() {
        let x = ArrayD::from_shape_fn(IxDyn(&[3, 70]), |i| (i[0] * 70 + i[1]) as f32 - 100.0);
        let (y1, m1) = forward_train(x.view(), 0.5, &mut Rng::from_seed(9));
        let (y2, m2) = forward_train(x.view(), 0.5, &mut Rng::from_seed(9));
        assert_eq!((y1.clone(), m1.clone()), (y2, m2));
        let (_, other) = forward_train(x.view(), 0.5, &mut Rng::from_seed(10));
        assert_ne!(m1, other);
        let dx = backward_train(
            &m1,
            ones(210)
                .into_shape_with_order(IxDyn(&[3, 70]))
                .unwrap()
                .view(),
        );
        for ((y, x), d) in y1.iter().zip(&x).zip(&dx) {
            // Kept elements pass (y = x, dx = 1), dropped ones are zero in both.
            assert!(
                (*d == 1.0 && y == x) || (*d == 0.0 && *y == 0.0),
                "{x} {y} {d}"
            );
        }
    }

    #[test]
    fn the_kept_fraction_is_one_minus_the_ratio() {
        let n = 1_000_000;
        for ratio in [0.0, 0.3, 0.5, 0.9] {
            let (y, _) = forward_train(ones(n).view(), ratio, &mut Rng::from_seed(1));
            let kept = y.sum() as f64 / n as f64;
            let sigma = (ratio * (1.0 - ratio) / n as f64).sqrt();
            assert!(
                (kept - (1.0 - ratio)).abs() <= 5.0 * sigma + 1e-12,
                "ratio {ratio}: kept {kept}"
            );
        }
    }

    #[test]
    fn evaluation_scales_by_one_minus_ratio_rounded_to_the_dtype() {
        let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, -3.0, 0.1]).unwrap();
        let y = scale(x.view(), 0.3);
        let s = (1.0f64 - 0.3) as f32;
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            x.iter().map(|v| (v * s).to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(Mask::bytes_for(65), 16);
    }
}
