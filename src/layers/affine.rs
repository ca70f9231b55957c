//! Affine (fully connected): `y = x · W + b`.
//!
//! Shapes: `W` is (in, out), `b` is (out); `x` is (N, ...) and is read as the
//! (N, in) matrix of its rows (in = the product of the other dimensions), so
//! `y` is (N, out) and `dx` has `x`'s shape. Backward: `dx = dout · Wᵀ`,
//! `dW = xᵀ · dout`, `db = Σ_rows dout`.
//!
//! Kept for Backward: `x` itself (it is `dW`'s left factor), N·in elements —
//! the input array shared, not copied, when it is already held as one.
//! `dx` is computed only when asked for: the first layer of a network has
//! nobody to pass it to.
//!
//! Numerics: the products (`linalg`) and the column sum are compared with
//! numpy within a tolerance; the bias is added after the product, elementwise,
//! as numpy's `x @ W + b` does.

use ndarray::{
    ArcArray, Array1, Array2, ArrayView1, ArrayView2, ArrayViewD, Axis, Ix1, Ix2, IxDyn,
};

use super::linalg::matmul;
use super::{
    init::Init, Backwarded, Fill, Float, Forwarded, Inputs, Layer, Part, Parts, Plan, Slot,
};

/// The affine kind, configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub in_features: usize,
    pub out_features: usize,
    pub init: Init,
}

/// What Forward keeps: `x` in its own shape (standard layout), shared with
/// the array it came in when there was one, read as the (N, in) matrix.
pub struct Kept<F> {
    x: ArcArray<F, IxDyn>,
}

impl Layer for Affine {
    const NAME: &'static str = "affine";
    const DESCRIPTION: &'static str = "Affine: y = x·W + b, x (N, ...) read as (N, in); W (in, out), b (out); dx = dout·Wᵀ, dW = xᵀ·dout, db = Σ_rows dout. Keeps x.";
    type Kept<F: Float> = Kept<F>;

    fn slots(&self) -> Vec<Slot> {
        let weights = Fill::Weights {
            fan_in: self.in_features,
            init: self.init,
        };
        vec![
            Slot::param("W", vec![self.in_features, self.out_features], weights),
            Slot::param("b", vec![self.out_features], Fill::Zeros),
        ]
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        let features = x.iter().skip(1).product::<usize>();
        match x.first() {
            Some(&n) if features == self.in_features => Ok(vec![n, self.out_features]),
            _ => Err(format!(
                "(N, ...) with {} features per row (the product of the dimensions after the first)",
                self.in_features
            )),
        }
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        plan.x.iter().product::<usize>() * plan.itemsize
    }

    fn save_kept<F: Float>(&self, kept: &Kept<F>) -> Vec<Part<F>> {
        vec![Part::Floats(kept.x.to_owned())]
    }

    fn load_kept<F: Float>(&self, plan: Plan<'_>, parts: &mut Parts<F>) -> Result<Kept<F>, String> {
        let x = parts.floats("x", plan.x)?.into_shared();
        Ok(Kept { x })
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Kept<F>> {
        let x = inputs.x.as_standard_layout();
        let (w, b) = (param2(&inputs.values[0]), param1(&inputs.values[1]));
        let y = forward(rows(x.view(), self.in_features), w, b)
            .into_dyn()
            .into_shared();
        let kept = inputs.keep.then(|| Kept {
            x: match inputs.x_shared {
                Some(shared) if shared.is_standard_layout() => shared.clone(),
                _ => x.into_owned().into_shared(),
            },
        });
        Forwarded::new(y, kept)
    }

    fn backward<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let dout = dout.as_standard_layout();
        let dout = rows(dout.view(), self.out_features);
        let g = backward(
            rows(kept.x.view(), self.in_features),
            param2(&values[0]),
            dout,
            true,
        );
        let dx =
            g.dx.expect("asked for")
                .into_shape_with_order(kept.x.raw_dim())
                .expect("x's element count");
        Backwarded {
            dx,
            grads: vec![g.dw.into_dyn(), g.db.into_dyn()],
        }
    }

    fn param_grads<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &Kept<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Vec<ndarray::ArrayD<F>> {
        let dout = dout.as_standard_layout();
        let dout = rows(dout.view(), self.out_features);
        let g = backward(
            rows(kept.x.view(), self.in_features),
            param2(&values[0]),
            dout,
            false,
        );
        vec![g.dw.into_dyn(), g.db.into_dyn()]
    }
}

/// A standard-layout tensor as the (N, features) matrix of its rows.
fn rows<'a, F: Float>(x: ArrayViewD<'a, F>, features: usize) -> ArrayView2<'a, F> {
    let n = x.shape().first().copied().unwrap_or(1);
    x.into_shape_with_order((n, features))
        .expect("validated shape, standard layout")
}

/// A 2-D parameter (its shape validated when it was stored).
pub(crate) fn param2<'a, F: Float>(p: &'a ArrayViewD<'_, F>) -> ArrayView2<'a, F> {
    p.view()
        .into_dimensionality::<Ix2>()
        .expect("a 2-D parameter")
}

/// A 1-D parameter.
pub(crate) fn param1<'a, F: Float>(p: &'a ArrayViewD<'_, F>) -> ArrayView1<'a, F> {
    p.view()
        .into_dimensionality::<Ix1>()
        .expect("a 1-D parameter")
}

/// `x · W + b` for `x` (N, in), `W` (in, out), `b` (out).
pub fn forward<F: Float>(
    x: ArrayView2<'_, F>,
    w: ArrayView2<'_, F>,
    b: ArrayView1<'_, F>,
) -> Array2<F> {
    let mut y = matmul(x, w);
    y.zip_mut_with(&b, |y, &b| *y = *y + b);
    y
}

/// What one Backward computes: `dx` (when asked for), `dW` and `db`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<F> {
    pub dx: Option<Array2<F>>,
    pub dw: Array2<F>,
    pub db: Array1<F>,
}

/// The gradients for upstream `dout` (N, out), from the kept `x` (N, in).
pub fn backward<F: Float>(
    x: ArrayView2<'_, F>,
    w: ArrayView2<'_, F>,
    dout: ArrayView2<'_, F>,
    want_dx: bool,
) -> Gradients<F> {
    Gradients {
        dx: want_dx.then(|| matmul(dout, w.t())),
        dw: matmul(x.t(), dout),
        db: dout.sum_axis(Axis(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{central_difference, filled, max_relative_error};
    use ndarray::{array, Array2};

    #[test]
    fn hand_computed_values() {
        let x = array![[1.0, 2.0], [-1.0, 0.5]];
        let w = array![[1.0, 0.0, 2.0], [3.0, -1.0, 1.0]];
        let b = array![0.5, 1.0, -1.0];
        assert_eq!(
            forward(x.view(), w.view(), b.view()),
            array![[7.5, -1.0, 3.0], [1.0, 0.5, -2.5]]
        );
        let dout = array![[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]];
        let g = backward(x.view(), w.view(), dout.view(), true);
        assert_eq!(g.dx.unwrap(), array![[3.0, 4.0], [0.0, -2.0]]);
        assert_eq!(g.dw, array![[1.0, -2.0, 1.0], [2.0, 1.0, 2.0]]);
        assert_eq!(g.db, array![1.0, 2.0, 1.0]);
        assert!(backward(x.view(), w.view(), dout.view(), false)
            .dx
            .is_none());
    }

    /// dx, dW and db against central differences of L = Σ y ⊙ r, in float64.
    #[test]
    fn gradients_match_central_differences() {
        let (n, i, o) = (3, 5, 4);
        let (x, w, b, r) = (
            filled((n, i), 1),
            filled((i, o), 2),
            filled((1, o), 3).row(0).to_owned(),
            filled((n, o), 4),
        );
        let loss = |x: &Array2<f64>, w: &Array2<f64>, b: &Array1<f64>| {
            (forward(x.view(), w.view(), b.view()) * &r).sum()
        };
        let g = backward(x.view(), w.view(), r.view(), true);
        let dx = central_difference(&x, |x| loss(x, &w, &b));
        let dw = central_difference(&w, |w| loss(&x, w, &b));
        let db = central_difference(&b.clone().insert_axis(Axis(0)), |b| {
            loss(&x, &w, &b.row(0).to_owned())
        });
        assert!(max_relative_error(&g.dx.unwrap(), &dx) < 1e-7);
        assert!(max_relative_error(&g.dw, &dw) < 1e-7);
        assert!(max_relative_error(&g.db.insert_axis(Axis(0)), &db) < 1e-7);
    }
}
