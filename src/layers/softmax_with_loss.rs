//! Softmax with cross-entropy loss, the classic output layer.
//!
//! Forward: `y = softmax(x)` row by row (`x − max`, `exp`, divided by the
//! row's sum), then the mean cross-entropy against the target `t`:
//! - class ids, int64 (N,) in [0, C): `loss = −Σ_i log(y[i, t_i] + 1e−7) / N`;
//! - probabilities (N, C) of `x`'s dtype: `loss = −Σ log(y + 1e−7) ⊙ t / N`
//!   (numpy: `−np.sum(t * np.log(y + eps)) / n`).
//!
//! Backward (dout = 1 unless given): `dx = (y − onehot(t)) * dout / N` for class
//! ids, `(y − t) * dout / N` for probabilities — left to right, in the scores'
//! dtype, so it is bit-identical to numpy given the same `y`.
//!
//! Shapes: `x` (N, C) scores; the loss is a scalar; `dx` (N, C).
//! Kept for Backward: `y` (N·C elements) and the target.
//!
//! Edge cases as numpy: a NaN score makes its row's maximum NaN and so its
//! whole row of `y` NaN; `−inf` scores get probability 0; a row of all `−inf`
//! is NaN (`−inf − −inf`).

use ndarray::{arr0, Array1, Array2, ArrayView1, ArrayView2, ArrayViewD, Axis, Ix2};

use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};

/// The softmax_with_loss kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SoftmaxWithLoss;

/// A target the layer keeps (its own copy).
pub enum OwnedTarget<F> {
    Classes(Array1<i64>),
    Probabilities(Array2<F>),
}

impl<F: Float> OwnedTarget<F> {
    fn view(&self) -> TargetView<'_, F> {
        match self {
            OwnedTarget::Classes(c) => TargetView::Classes(c.view()),
            OwnedTarget::Probabilities(p) => TargetView::Probabilities(p.view()),
        }
    }
}

/// What Forward keeps: the softmax output and the target.
pub struct Kept<F> {
    y: Array2<F>,
    t: OwnedTarget<F>,
}

impl Layer for SoftmaxWithLoss {
    const NAME: &'static str = "softmax_with_loss";
    const DESCRIPTION: &'static str = "SoftmaxWithLoss: y = softmax(x) row by row, loss = mean cross-entropy -Σ log(y[t] + 1e-7) / N against t (INT64 class ids (N,) or probabilities (N, C)); y answered is the loss []; dx = (y - onehot(t)) * dout / N, dout = 1 when absent. Keeps y and t.";
    type Kept<F: Float> = Kept<F>;

    fn unconfigured() -> Option<SoftmaxWithLoss> {
        Some(SoftmaxWithLoss)
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        match x {
            [n, c] if *n >= 1 && *c >= 1 => Ok(vec![]),
            _ => Err("(N, C) scores with N ≥ 1 and C ≥ 1".into()),
        }
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        let (n, c) = (plan.x[0], plan.x[1]);
        let target = if plan.classes {
            n * std::mem::size_of::<i64>()
        } else {
            n * c * plan.itemsize
        };
        n * c * plan.itemsize + target
    }

    fn is_loss(&self) -> bool {
        true
    }

    fn save_kept<F: Float>(&self, kept: &Kept<F>) -> Vec<Part<F>> {
        let t = match &kept.t {
            OwnedTarget::Classes(ids) => Part::Classes(ids.clone()),
            OwnedTarget::Probabilities(p) => Part::Floats(p.clone().into_dyn()),
        };
        vec![Part::Floats(kept.y.clone().into_dyn()), t]
    }

    fn load_kept<F: Float>(&self, plan: Plan<'_>, parts: &mut Parts<F>) -> Result<Kept<F>, String> {
        let (n, c) = (plan.x[0], plan.x[1]);
        let rows = |a: ndarray::ArrayD<F>| a.into_dimensionality::<Ix2>().expect("checked (N, C)");
        let y = rows(parts.floats("y", plan.x)?);
        let t = if plan.classes {
            OwnedTarget::Classes(parts.classes("t", n, c)?)
        } else {
            OwnedTarget::Probabilities(rows(parts.floats("t", plan.x)?))
        };
        Ok(Kept { y, t })
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Kept<F>> {
        let x = inputs
            .x
            .into_dimensionality::<Ix2>()
            .expect("validated (N, C)");
        let t = inputs.target.expect("validated: a loss has a target");
        let y = softmax(x);
        let loss = arr0(loss(y.view(), t)).into_dyn().into_shared();
        let kept = inputs.keep.then(|| Kept {
            t: match t {
                TargetView::Classes(c) => OwnedTarget::Classes(c.to_owned()),
                TargetView::Probabilities(p) => OwnedTarget::Probabilities(p.to_owned()),
            },
            y,
        });
        Forwarded::new(loss, kept)
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        kept: &Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let dout = *dout.iter().next().expect("a scalar dout");
        Backwarded {
            dx: backward(kept.y.view(), kept.t.view(), dout).into_dyn(),
            grads: Vec::new(),
        }
    }
}

/// numpy's `np.log(y + 1e-7)` guard.
pub const LOG_EPS: f64 = 1e-7;

/// What the loss compares the scores with.
#[derive(Debug, Clone, Copy)]
pub enum TargetView<'a, F> {
    /// Class ids, one per row, each in `0..C` (validated by the caller).
    Classes(ArrayView1<'a, i64>),
    /// A probability row per score row, of the scores' shape.
    Probabilities(ArrayView2<'a, F>),
}

/// numpy's `max`: NaN if any element is NaN.
fn row_max<F: Float>(row: ArrayView1<'_, F>) -> F {
    row.iter().fold(F::neg_infinity(), |m, &v| {
        if v > m || v.is_nan() && !m.is_nan() {
            v
        } else {
            m
        }
    })
}

/// Row-wise softmax of `x` (N, C).
pub fn softmax<F: Float>(x: ArrayView2<'_, F>) -> Array2<F> {
    let mut y = x.to_owned();
    for mut row in y.axis_iter_mut(Axis(0)) {
        let max = row_max(row.view());
        row.mapv_inplace(|v| (v - max).vexp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    y
}

/// The mean cross-entropy of softmax output `y` against `t`.
pub fn loss<F: Float>(y: ArrayView2<'_, F>, t: TargetView<'_, F>) -> F {
    let eps = F::from(LOG_EPS).expect("a float");
    let n = F::from(y.nrows()).expect("a float");
    let total = match t {
        TargetView::Classes(classes) => classes
            .iter()
            .enumerate()
            .fold(F::zero(), |s, (i, &c)| s + (y[[i, c as usize]] + eps).ln()),
        TargetView::Probabilities(t) => y
            .iter()
            .zip(t.iter())
            .fold(F::zero(), |s, (&y, &t)| s + t * (y + eps).ln()),
    };
    -total / n
}

/// `dx` for the kept `y` and `t`, scaled by the upstream `dout` (1 for a loss
/// at the end of the network).
pub fn backward<F: Float>(y: ArrayView2<'_, F>, t: TargetView<'_, F>, dout: F) -> Array2<F> {
    let n = F::from(y.nrows()).expect("a float");
    let mut dx = match t {
        TargetView::Classes(classes) => {
            let mut dx = y.to_owned();
            for (i, &c) in classes.iter().enumerate() {
                dx[[i, c as usize]] = dx[[i, c as usize]] - F::one();
            }
            dx
        }
        TargetView::Probabilities(t) => &y - &t,
    };
    dx.mapv_inplace(|v| v * dout / n);
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{central_difference, filled, max_relative_error};
    use ndarray::{array, Array1};

    #[test]
    fn rows_sum_to_one_and_large_scores_do_not_overflow() {
        let y = softmax(array![[1.0f64, 2.0, 3.0], [1000.0, 1000.0, -1000.0]].view());
        for row in y.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-15);
        }
        assert_eq!(y.row(1).to_vec(), vec![0.5, 0.5, 0.0]);
        let e: Array1<f64> = array![1.0f64, 2.0, 3.0].mapv(f64::exp);
        let want = &e / e.sum();
        assert!(max_relative_error(&y.row(0).to_owned(), &want) < 1e-15);
    }

    #[test]
    fn nan_and_infinities_follow_numpy() {
        let y = softmax(array![[1.0f32, f32::NAN, 0.0], [f32::NEG_INFINITY, 0.0, 0.0]].view());
        assert!(y.row(0).iter().all(|v| v.is_nan()));
        assert_eq!(y.row(1).to_vec(), vec![0.0, 0.5, 0.5]);
        let all_minus_inf = softmax(array![[f32::NEG_INFINITY, f32::NEG_INFINITY]].view());
        assert!(all_minus_inf.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn class_ids_and_one_hot_probabilities_agree() {
        let x = filled((4, 6), 1);
        let classes = array![0i64, 5, 2, 2];
        let mut one_hot = Array2::zeros((4, 6));
        for (i, &c) in classes.iter().enumerate() {
            one_hot[[i, c as usize]] = 1.0;
        }
        let y = softmax(x.view());
        let (by_id, by_prob) = (
            TargetView::Classes(classes.view()),
            TargetView::Probabilities(one_hot.view()),
        );
        assert!((loss(y.view(), by_id) - loss(y.view(), by_prob)).abs() < 1e-15);
        assert_eq!(
            backward(y.view(), by_id, 1.0),
            backward(y.view(), by_prob, 1.0)
        );
    }

    /// dx against central differences of the loss itself, in float64. The
    /// analytic gradient is the book's, which ignores the 1e-7 inside the log:
    /// they differ by about 1e-7 / y, hence the 1e-5 bound.
    #[test]
    fn gradient_matches_central_differences() {
        let x = filled((4, 6), 7) * 3.0;
        let classes = array![0i64, 5, 2, 2];
        let t = TargetView::Classes(classes.view());
        let dx = backward(softmax(x.view()).view(), t, 1.0);
        let numeric = central_difference(&x, |x| loss(softmax(x.view()).view(), t));
        assert!(max_relative_error(&dx, &numeric) < 1e-5);
        let probs = softmax(filled((4, 6), 8).view());
        let t = TargetView::Probabilities(probs.view());
        let dx = backward(softmax(x.view()).view(), t, 2.5);
        let numeric = central_difference(&x, |x| 2.5 * loss(softmax(x.view()).view(), t));
        assert!(max_relative_error(&dx, &numeric) < 1e-5);
    }

    #[test]
    fn backward_is_numpys_left_to_right_order() {
        // (y - 1) * dout / n, not (y - 1) * (dout / n): the two round differently.
        let y = array![[0.1f32, 0.7, 0.2], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]];
        let classes = array![1i64, 0, 2];
        let dout = 0.3f32;
        let dx = backward(y.view(), TargetView::Classes(classes.view()), dout);
        let mut want = y.clone();
        for (i, &c) in classes.iter().enumerate() {
            want[[i, c as usize]] -= 1.0;
        }
        let want = want.mapv(|v| v * dout / 3.0);
        assert_eq!(dx.mapv(f32::to_bits), want.mapv(f32::to_bits));
    }
}
