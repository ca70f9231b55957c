//! Batch normalization, per feature (2-D input) or per channel (4-D input).
//!
//! `x` (N, D) is normalized per column; `x` (N, C, H, W) per channel, with
//! statistics over N, H and W (as ONNX and PyTorch do), by viewing it as the
//! (N·H·W, C) matrix [`to_rows`] makes. With `eps` inside the square root:
//!
//! - training: `μ = mean(x)`, `xc = x − μ`, `var = mean(xc²)`,
//!   `std = sqrt(var + eps)`, `xn = xc / std`; the running statistics become
//!   `m·running + (1 − m)·batch` (scalars rounded to the dtype first);
//! - evaluation: `xn = (x − running_mean) / sqrt(running_var + eps)`;
//! - `y = γ · xn + β`.
//!
//! Backward (training), numpy's order: `dβ = Σ d`, `dγ = Σ xn·d`,
//! `dxn = γ·d`, `dxc = dxn / std`, `dstd = −Σ (dxn·xc) / (std·std)`,
//! `dvar = 0.5·dstd / std`, `dxc += (2/n)·xc·dvar`, `dμ = Σ dxc`,
//! `dx = dxc − dμ / n`. In evaluation `dx = dxn / std`.
//!
//! Kept for Backward: training `xc`, `xn` (2 × N·D elements) and `std` (D);
//! evaluation `xn` and `std`. Means and sums are compared with the reference
//! within a tolerance; the elementwise steps follow its order.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewD, Axis, IxDyn};

use super::affine::param1;
use super::{Backwarded, Fill, Float, Forwarded, Inputs, Layer, Part, Parts, Plan, Slot};

/// The batch_norm kind, configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub features: usize,
    pub settings: Settings,
}

/// What Forward keeps, with the input's shape.
pub struct KeptInput<F> {
    kept: Kept<F>,
    shape: Vec<usize>,
}

impl Layer for BatchNorm {
    const NAME: &'static str = "batch_norm";
    const DESCRIPTION: &'static str = "Batch normalization per feature of x (N, F), or per channel of x (N, F, H, W): y = gamma·(x - mean)/sqrt(var + eps) + beta with the batch's statistics in training (running_mean, running_var += (1 - momentum)·(batch - running)) and the running ones in evaluation. Parameters gamma, beta; buffers running_mean, running_var. Keeps x - mean, the normalized x and std (training), or the normalized x and std (evaluation).";
    type Kept<F: Float> = KeptInput<F>;

    fn slots(&self) -> Vec<Slot> {
        let f = vec![self.features];
        vec![
            Slot::param("gamma", f.clone(), Fill::Ones),
            Slot::param("beta", f.clone(), Fill::Zeros),
            Slot::buffer("running_mean", f.clone(), Fill::Zeros),
            Slot::buffer("running_var", f, Fill::Zeros),
        ]
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        match *x {
            [_, f] | [_, f, _, _] if f == self.features => Ok(x.to_vec()),
            _ => Err(format!("(N, {0}) or (N, {0}, H, W)", self.features)),
        }
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        let rows = plan.x.iter().product::<usize>() / self.features.max(1);
        Kept::<f64>::elements_for(rows, self.features, plan.eval) * plan.itemsize
    }

    fn save_kept<F: Float>(&self, kept: &KeptInput<F>) -> Vec<Part<F>> {
        let k = &kept.kept;
        let mut parts = vec![
            Part::Floats(k.xn.clone().into_dyn()),
            Part::Floats(k.std.clone().into_dyn()),
        ];
        parts.extend(k.xc.iter().map(|xc| Part::Floats(xc.clone().into_dyn())));
        parts
    }

    fn load_kept<F: Float>(
        &self,
        plan: Plan<'_>,
        parts: &mut Parts<F>,
    ) -> Result<KeptInput<F>, String> {
        let f = self.features;
        let rows = plan.x.iter().product::<usize>() / f.max(1);
        let matrix = |a: ndarray::ArrayD<F>| a.into_dimensionality::<ndarray::Ix2>().expect("2-D");
        let xn = matrix(parts.floats("xn", &[rows, f])?);
        let std = parts.floats("std", &[f])?;
        let std = std.into_dimensionality::<ndarray::Ix1>().expect("1-D");
        let xc = if plan.eval {
            None
        } else {
            Some(matrix(parts.floats("xc", &[rows, f])?))
        };
        Ok(KeptInput {
            kept: Kept { xc, xn, std },
            shape: plan.x.to_vec(),
        })
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, KeptInput<F>> {
        let shape = inputs.x.shape().to_vec();
        let rows = to_rows(inputs.x);
        let [gamma, beta, mean, var] = [0, 1, 2, 3].map(|i| param1(&inputs.values[i]));
        let (y, kept, buffers) = if inputs.eval {
            let (y, kept) = forward_eval(rows.view(), gamma, beta, (mean, var), self.settings);
            (y, kept, Vec::new())
        } else {
            let (y, kept, (mean, var)) =
                forward_train(rows.view(), gamma, beta, (mean, var), self.settings);
            // Running statistics change only on a keeping training Forward.
            let buffers = if inputs.keep {
                vec![mean.into_dyn(), var.into_dyn()]
            } else {
                Vec::new()
            };
            (y, kept, buffers)
        };
        Forwarded {
            y: from_rows(y, &shape).into_shared(),
            kept: inputs.keep.then_some(KeptInput { kept, shape }),
            buffers,
        }
    }

    fn backward<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        kept: &KeptInput<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let d = to_rows(dout);
        let g = backward(&kept.kept, param1(&values[0]), d.view());
        Backwarded {
            dx: from_rows(g.dx, &kept.shape),
            grads: vec![g.dgamma.into_dyn(), g.dbeta.into_dyn()],
        }
    }
}

/// Momentum and epsilon, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub momentum: f64,
    pub epsilon: f64,
}

/// What a Forward keeps for Backward.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept<F> {
    /// `x − μ`; None in evaluation mode, whose Backward does not need it.
    xc: Option<Array2<F>>,
    xn: Array2<F>,
    std: Array1<F>,
}

impl<F: Float> Kept<F> {
    /// Elements kept for `rows` × `features` in training or evaluation mode.
    pub const fn elements_for(rows: usize, features: usize, eval: bool) -> usize {
        rows * features * if eval { 1 } else { 2 } + features
    }
}

/// `x` (N, D) or (N, C, H, W) as the matrix of feature rows (N, D) or (N·H·W, C).
///
/// The 4-D case is one (C, H·W) → (H·W, C) transpose per image, in plain
/// loops: ndarray's general copy of a permuted view walks every element by
/// index and took most of a small convnet's inputs.
pub fn to_rows<F: Float>(x: ArrayViewD<'_, F>) -> Array2<F> {
    match *x.shape() {
        [n, c, h, w] => {
            let x = x.as_standard_layout();
            let data = x.as_slice().expect("standard layout");
            let plane = h * w;
            let mut rows = vec![F::zero(); n * plane * c];
            for (image, out) in data
                .chunks_exact(c * plane)
                .zip(rows.chunks_exact_mut(plane * c))
            {
                for (channel, values) in image.chunks_exact(plane).enumerate() {
                    for (p, &v) in values.iter().enumerate() {
                        out[p * c + channel] = v;
                    }
                }
            }
            Array2::from_shape_vec((n * plane, c), rows).expect("N·H·W × C")
        }
        [n, d] => x.into_shape_with_order((n, d)).expect("2-D").to_owned(),
        _ => panic!("batch_norm takes 2-D or 4-D input (validated by the caller)"),
    }
}

/// The inverse of [`to_rows`] for an input of `shape`.
pub fn from_rows<F: Float>(rows: Array2<F>, shape: &[usize]) -> ndarray::ArrayD<F> {
    match *shape {
        [n, c, h, w] => {
            let rows = rows.as_standard_layout();
            let data = rows.as_slice().expect("standard layout");
            let plane = h * w;
            let mut x = vec![F::zero(); n * c * plane];
            for (values, image) in data
                .chunks_exact(plane * c)
                .zip(x.chunks_exact_mut(c * plane))
            {
                for (channel, out) in image.chunks_exact_mut(plane).enumerate() {
                    for (p, v) in out.iter_mut().enumerate() {
                        *v = values[p * c + channel];
                    }
                }
            }
            ndarray::ArrayD::from_shape_vec(IxDyn(shape), x).expect("N × C × H × W")
        }
        _ => rows.into_dyn(),
    }
}

/// New running (mean, variance).
pub type Statistics<F> = (Array1<F>, Array1<F>);

fn scalar<F: Float>(v: f64) -> F {
    F::from(v).expect("a float")
}

/// Training Forward on feature rows: `y`, what Backward needs, and the new
/// running mean and variance.
pub fn forward_train<F: Float>(
    x: ArrayView2<'_, F>,
    gamma: ArrayView1<'_, F>,
    beta: ArrayView1<'_, F>,
    running: (ArrayView1<'_, F>, ArrayView1<'_, F>),
    s: Settings,
) -> (Array2<F>, Kept<F>, Statistics<F>) {
    let n = scalar::<F>(x.nrows() as f64);
    let mu = x.sum_axis(Axis(0)).mapv(|v| v / n);
    let xc = &x - &mu;
    let var = xc.mapv(|v| v * v).sum_axis(Axis(0)).mapv(|v| v / n);
    let eps = scalar::<F>(s.epsilon);
    let std = var.mapv(|v| (v + eps).sqrt());
    let xn = &xc / &std;
    let (m, one_m) = (scalar::<F>(s.momentum), scalar::<F>(1.0 - s.momentum));
    let new_mean = ndarray::Zip::from(&running.0)
        .and(&mu)
        .map_collect(|&r, &b| m * r + one_m * b);
    let new_var = ndarray::Zip::from(&running.1)
        .and(&var)
        .map_collect(|&r, &b| m * r + one_m * b);
    let y = affine(&xn, gamma, beta);
    (
        y,
        Kept {
            xc: Some(xc),
            xn,
            std,
        },
        (new_mean, new_var),
    )
}

/// Evaluation Forward on feature rows, from the running statistics.
pub fn forward_eval<F: Float>(
    x: ArrayView2<'_, F>,
    gamma: ArrayView1<'_, F>,
    beta: ArrayView1<'_, F>,
    running: (ArrayView1<'_, F>, ArrayView1<'_, F>),
    s: Settings,
) -> (Array2<F>, Kept<F>) {
    let eps = scalar::<F>(s.epsilon);
    let xc = &x - &running.0;
    let std = running.1.mapv(|v| (v + eps).sqrt());
    let xn = &xc / &std;
    let y = affine(&xn, gamma, beta);
    (y, Kept { xc: None, xn, std })
}

/// `γ · xn + β`, in that order.
fn affine<F: Float>(
    xn: &Array2<F>,
    gamma: ArrayView1<'_, F>,
    beta: ArrayView1<'_, F>,
) -> Array2<F> {
    let mut y = xn.clone();
    for mut row in y.rows_mut() {
        ndarray::Zip::from(&mut row)
            .and(&gamma)
            .and(&beta)
            .for_each(|y, &g, &b| *y = g * *y + b);
    }
    y
}

/// What one Backward computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<F> {
    pub dx: Array2<F>,
    pub dgamma: Array1<F>,
    pub dbeta: Array1<F>,
}

/// Backward on feature rows for `d` (the rows of `dout`).
pub fn backward<F: Float>(
    kept: &Kept<F>,
    gamma: ArrayView1<'_, F>,
    d: ArrayView2<'_, F>,
) -> Gradients<F> {
    let dbeta = d.sum_axis(Axis(0));
    let dgamma = (&kept.xn * &d).sum_axis(Axis(0));
    let dxn = &d * &gamma;
    let dx = match &kept.xc {
        None => &dxn / &kept.std,
        Some(xc) => {
            let n = scalar::<F>(d.nrows() as f64);
            let dxc = &dxn / &kept.std;
            let std_sq = kept.std.mapv(|s| s * s);
            let dstd = (&(&dxn * xc) / &std_sq).sum_axis(Axis(0)).mapv(|v| -v);
            let dvar = ndarray::Zip::from(&dstd)
                .and(&kept.std)
                .map_collect(|&d, &s| scalar::<F>(0.5) * d / s);
            let two_over_n = scalar::<F>(2.0) / n;
            let mut dxc = dxc;
            ndarray::Zip::from(&mut dxc)
                .and(xc)
                .and_broadcast(&dvar)
                .for_each(|dxc, &xc, &dvar| {
                    *dxc = *dxc + two_over_n * xc * dvar;
                });
            let dmu = dxc.sum_axis(Axis(0));
            dxc - &dmu.mapv(|v| v / n)
        }
    };
    Gradients { dx, dgamma, dbeta }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_the_channel_last_transpose_and_back() {
        let x = ndarray::Array::from_shape_fn((3, 4, 2, 5), |(n, c, h, w)| {
            (n * 1000 + c * 100 + h * 10 + w) as f64
        })
        .into_dyn();
        let rows = to_rows(x.view());
        let want = x
            .view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((3 * 2 * 5, 4))
            .unwrap();
        assert_eq!(rows, want);
        assert_eq!(from_rows(rows, x.shape()), x);
        // A non-standard input (a transposed view) too.
        let t = x.view().reversed_axes().reversed_axes();
        assert_eq!(to_rows(t), want);
    }
    use crate::layers::testing::{central_difference, filled, max_relative_error};
    use ndarray::Array1;

    const SETTINGS: Settings = Settings {
        momentum: 0.9,
        epsilon: 1e-6,
    };

    fn zeros(d: usize) -> Array1<f64> {
        Array1::zeros(d)
    }

    #[test]
    fn normalizes_each_feature_and_updates_running_statistics() {
        let x = filled((50, 3), 1) * 4.0 + 2.0;
        let (gamma, beta) = (Array1::ones(3), zeros(3));
        let (y, _, (mean, var)) = forward_train(
            x.view(),
            gamma.view(),
            beta.view(),
            (zeros(3).view(), zeros(3).view()),
            SETTINGS,
        );
        for column in y.columns() {
            assert!(column.mean().unwrap().abs() < 1e-12);
            assert!((column.mapv(|v| v * v).mean().unwrap() - 1.0).abs() < 1e-5);
        }
        let batch_mean = x.mean_axis(Axis(0)).unwrap();
        assert!(max_relative_error(&mean, &(batch_mean * 0.1)) < 1e-12);
        assert!(var.iter().all(|&v| v > 0.0));
    }

    #[test]
    fn four_d_input_is_normalized_per_channel() {
        let x = filled((2, 3, 4, 5), 2).into_dyn();
        let rows = to_rows(x.view());
        assert_eq!(rows.dim(), (40, 3));
        assert_eq!(rows[[7, 2]], x[[0, 2, 1, 2]]); // row 7 = (n 0, h 1, w 2)
        assert_eq!(from_rows(rows, x.shape()), x);
    }

    /// dx, dγ and dβ against central differences in training mode (the batch
    /// statistics depend on x) and in evaluation mode, in float64.
    #[test]
    fn gradients_match_central_differences() {
        let (x, gamma, beta, r) = (
            filled((6, 4), 1),
            filled(4, 2),
            filled(4, 3),
            filled((6, 4), 4),
        );
        let running = (filled(4, 5), filled(4, 6).mapv(|v| v.abs() + 0.5));
        let train = |x: &Array2<f64>, g: &Array1<f64>, b: &Array1<f64>| {
            (forward_train(
                x.view(),
                g.view(),
                b.view(),
                (running.0.view(), running.1.view()),
                SETTINGS,
            )
            .0 * &r)
                .sum()
        };
        let (_, kept, _) = forward_train(
            x.view(),
            gamma.view(),
            beta.view(),
            (running.0.view(), running.1.view()),
            SETTINGS,
        );
        let g = backward(&kept, gamma.view(), r.view());
        assert!(
            max_relative_error(&g.dx, &central_difference(&x, |x| train(x, &gamma, &beta))) < 1e-6
        );
        assert!(
            max_relative_error(
                &g.dgamma,
                &central_difference(&gamma, |gm| train(&x, gm, &beta))
            ) < 1e-7
        );
        assert!(
            max_relative_error(
                &g.dbeta,
                &central_difference(&beta, |b| train(&x, &gamma, b))
            ) < 1e-7
        );
        let eval = |x: &Array2<f64>| {
            (forward_eval(
                x.view(),
                gamma.view(),
                beta.view(),
                (running.0.view(), running.1.view()),
                SETTINGS,
            )
            .0 * &r)
                .sum()
        };
        let (_, kept) = forward_eval(
            x.view(),
            gamma.view(),
            beta.view(),
            (running.0.view(), running.1.view()),
            SETTINGS,
        );
        assert!(
            max_relative_error(
                &backward(&kept, gamma.view(), r.view()).dx,
                &central_difference(&x, eval)
            ) < 1e-7
        );
    }
}
