//! The reference for the trainable kinds: written here in float64 from the
//! classic numpy layers, by plain loops, independent of the server's kernels
//! (no im2col, no shared code).
//!
//! The bench gives the layer its parameters (so it knows them), sends the
//! same x (and labels) every call, and checks:
//! - Forward y, Backward dx and every parameter gradient within a max-norm
//!   relative error (max |a − b| / max |b|) of 1e-4 (float32) or 1e-10
//!   (float64) of the float64 reference computed from the values as sent
//!   (rounded to the dtype) — wide enough for any summation order, narrow
//!   enough to catch a wrong formula, shape or parameter;
//! - then pins the first accepted answer: every later one must be the same
//!   bytes (the server is deterministic for a fixed input and parameters).
//!
//! Dropout draws a new mask each Forward, so it is checked per answer: every
//! y element is x or x·0 (bit for bit), the kept fraction is within six
//! standard deviations of 1 − ratio, and dx is dout where y kept x, else
//! dout·0.
//!
//! Fixed configurations (the classic network's shapes by default):
//! affine `in → 100`; convolution 30 filters 5×5, stride 1, no padding;
//! pooling 2×2, stride 2; batch_norm over the channels (axis 1); dropout
//! ratio 0.5; softmax_with_loss with class labels, Backward without dout.

use std::collections::HashMap;

use bytes::Bytes;
use layerd::pb;
use ndarray::{Array1, Array2, Array4, ArrayD, Axis, Dimension, IxDyn};

use crate::args::Kind;
use crate::reference::{tensor, Answer, Element, Reference};

/// Filters, kernel and features of the fixed configurations.
const AFFINE_OUT: u64 = 100;
const FILTERS: usize = 30;
const KERNEL: usize = 5;
const POOL: usize = 2;
const DROPOUT_RATIO: f64 = 0.5;

/// The shape a kind is driven at when no --shape is given.
pub fn default_shape(kind: Kind) -> Option<Vec<u64>> {
    Some(match kind {
        Kind::Affine => vec![100, 784],
        Kind::Convolution => vec![100, 1, 28, 28],
        Kind::Pooling => vec![100, 30, 24, 24],
        Kind::BatchNorm => vec![100, 100],
        Kind::SoftmaxWithLoss => vec![100, 10],
        _ => return None,
    })
}

/// Deterministic values in [-scale, scale), never exactly zero.
pub(crate) fn values(len: usize, salt: u64, scale: f64) -> Vec<f64> {
    (0..len as u64)
        .map(|i| {
            let h = (i ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                >> 40;
            ((h as f64 + 0.5) / (1u64 << 24) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The values as the dtype holds them, and back in f64 for the reference.
pub(crate) fn rounded<F: Element>(values: Vec<f64>) -> (Vec<F>, Vec<f64>) {
    let as_f: Vec<F> = values
        .iter()
        .map(|&v| F::from(v).expect("representable"))
        .collect();
    let back = as_f.iter().map(|v| v.to_f64().expect("finite")).collect();
    (as_f, back)
}

fn u(shape: &[u64]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

/// Builds the workload of `kind` at `shape`, or says why the shape does not fit.
pub fn build<F: Element>(kind: Kind, shape: &[u64]) -> Result<Reference, String> {
    let len = shape.iter().product::<u64>() as usize;
    let (xf, x) = rounded::<F>(values(len, 1, 2.0));
    let x = ArrayD::from_shape_vec(IxDyn(&u(shape)), x).expect("len");
    let mut params = HashMap::new();
    let mut param = |name: &str, dims: &[usize], scale: f64| -> ArrayD<f64> {
        let n = dims.iter().product();
        let (as_f, back) = rounded::<F>(values(n, params.len() as u64 + 10, scale));
        let dims64: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        params.insert(name.to_string(), tensor(&dims64, &as_f));
        ArrayD::from_shape_vec(IxDyn(dims), back).expect("len")
    };
    let rank = shape.len();
    let want = |what: &str| format!("--kind {} needs --shape {what}, got {shape:?}", kind.name());
    if shape.contains(&0) {
        return Err(want("without a zero dimension"));
    }
    let (config, forward): (pb::layer_config::Config, Expected) = match kind {
        Kind::Affine => {
            if rank < 2 {
                return Err(want("NxFEATURES[x...]"));
            }
            let inputs = len / shape[0] as usize;
            let w = param("W", &[inputs, AFFINE_OUT as usize], 0.05);
            let b = param("b", &[AFFINE_OUT as usize], 0.5);
            let config = pb::layer_config::Config::Affine(pb::AffineConfig {
                in_features: inputs as u64,
                out_features: AFFINE_OUT,
                init: None,
            });
            (config, affine(&x, w, b))
        }
        Kind::Convolution => {
            if rank != 4 || shape[2] < KERNEL as u64 || shape[3] < KERNEL as u64 {
                return Err(want("NxCxHxW with H and W at least 5"));
            }
            let c = shape[1] as usize;
            let w = param("W", &[FILTERS, c, KERNEL, KERNEL], 0.2);
            let b = param("b", &[FILTERS], 0.5);
            let config = pb::layer_config::Config::Convolution(pb::ConvolutionConfig {
                in_channels: c as u64,
                out_channels: FILTERS as u64,
                kernel_h: KERNEL as u64,
                kernel_w: KERNEL as u64,
                stride: 1,
                pad: 0,
                init: None,
            });
            (config, convolution(&x, w, b))
        }
        Kind::Pooling => {
            if rank != 4 || shape[2] < POOL as u64 || shape[3] < POOL as u64 {
                return Err(want("NxCxHxW with H and W at least 2"));
            }
            let config = pb::layer_config::Config::Pooling(pb::PoolingConfig {
                pool_h: POOL as u64,
                pool_w: POOL as u64,
                stride: POOL as u64,
                pad: 0,
            });
            (config, pooling(&x))
        }
        Kind::BatchNorm => {
            if !(rank == 2 || rank == 4) || shape[0] < 2 {
                return Err(want("NxD or NxCxHxW with N at least 2"));
            }
            let c = shape[1] as usize;
            let gamma = param("gamma", &[c], 1.0);
            let beta = param("beta", &[c], 1.0);
            let config = pb::layer_config::Config::BatchNorm(pb::BatchNormConfig {
                num_features: c as u64,
                momentum: None,
                epsilon: None,
            });
            (config, batch_norm(&x, gamma, beta, 1e-6))
        }
        Kind::SoftmaxWithLoss => {
            if rank != 2 {
                return Err(want("NxCLASSES"));
            }
            let (n, classes) = (shape[0] as usize, shape[1] as usize);
            let labels: Vec<i64> = (0..n).map(|i| (i * 7 % classes) as i64).collect();
            let expected = softmax_with_loss(&x, &labels);
            return Ok(finish::<F>(shape, xf, Some(labels), params, expected, None));
        }
        Kind::Dropout => {
            let config = pb::layer_config::Config::Dropout(pb::DropoutConfig {
                ratio: Some(DROPOUT_RATIO),
                seed: 7,
            });
            let (doutf, _) = rounded::<F>(values(len, 2, 1.0));
            return Ok(dropout::<F>(shape, xf, doutf, config));
        }
        other => return Err(format!("{other} has no trainable reference here")),
    };
    Ok(finish::<F>(shape, xf, None, params, forward, Some(config)))
}

/// dx and each parameter's gradient.
pub(crate) type Gradients = (ArrayD<f64>, Vec<(&'static str, ArrayD<f64>)>);

/// Backward as a function of dout.
pub(crate) type BackwardFn = Box<dyn Fn(&ArrayD<f64>) -> Gradients>;

/// The reference's answers: y, and Backward as a function of dout.
pub(crate) struct Expected {
    pub(crate) y: ArrayD<f64>,
    pub(crate) backward: BackwardFn,
}

/// The workload of a kind with a reference: a loss (labels given) is
/// driven with Backward without dout.
fn finish<F: Element>(
    shape: &[u64],
    xf: Vec<F>,
    t: Option<Vec<i64>>,
    params: HashMap<String, pb::Tensor>,
    expected: Expected,
    config: Option<pb::layer_config::Config>,
) -> Reference {
    let y_shape: Vec<u64> = expected.y.shape().iter().map(|&d| d as u64).collect();
    let (dout, dout_f64) = match t {
        None => {
            let (as_f, back) = rounded::<F>(values(expected.y.len(), 2, 1.0));
            (
                Some(tensor(&y_shape, &as_f)),
                ArrayD::from_shape_vec(expected.y.raw_dim(), back).expect("len"),
            )
        }
        Some(_) => (None, ArrayD::from_elem(IxDyn(&[]), 1.0)),
    };
    let (dx, grads) = (expected.backward)(&dout_f64);
    let tolerance = if F::DTYPE == pb::DType::DtypeFloat32 {
        1e-4
    } else {
        1e-10
    };
    let y = expected.y;
    let pinned_y = std::sync::OnceLock::<Bytes>::new();
    let pinned_back = std::sync::OnceLock::<(Bytes, Vec<(String, Bytes)>)>::new();
    let check = move |answer: Answer<'_>| match answer {
        Answer::Y(data) => match pinned_y.get() {
            Some(pinned) => data == pinned,
            None => {
                close::<F>(data, &y, tolerance) && {
                    pinned_y.get_or_init(|| data.clone());
                    pinned_y.get() == Some(data)
                }
            }
        },
        Answer::Backward {
            dx: data,
            grads: got,
            ..
        } => {
            let mut got_grads: Vec<(String, Bytes)> = got
                .iter()
                .map(|(name, t)| (name.clone(), t.data.clone()))
                .collect();
            got_grads.sort();
            if let Some(pinned) = pinned_back.get() {
                return pinned.0 == data && pinned.1 == got_grads;
            }
            let grads_right = got.len() == grads.len()
                && grads.iter().all(|(name, want)| {
                    got.get(*name).is_some_and(|t| {
                        t.shape
                            .iter()
                            .map(|&d| d as usize)
                            .eq(want.shape().iter().copied())
                            && close::<F>(&t.data, want, tolerance)
                    })
                });
            if !(close::<F>(data, &dx, tolerance) && grads_right) {
                return false;
            }
            let pinned = pinned_back.get_or_init(|| (data.clone(), got_grads.clone()));
            pinned.0 == data && pinned.1 == got_grads
        }
    };
    Reference {
        x: tensor(shape, &xf),
        dout,
        t: t.map(|labels| pb::Tensor {
            dtype: pb::DType::DtypeInt64.into(),
            shape: vec![labels.len() as u64],
            data: Bytes::copy_from_slice(bytemuck::cast_slice(&labels)),
        }),
        config: config.map(|config| pb::LayerConfig {
            config: Some(config),
        }),
        params,
        y_shape,
        check: Box::new(check),
    }
}

/// Whether `data` (dtype F) is within `tolerance` of `want`, max-norm relative.
fn close<F: Element>(data: &Bytes, want: &ArrayD<f64>, tolerance: f64) -> bool {
    if data.len() != want.len() * std::mem::size_of::<F>() {
        return false;
    }
    let got: Vec<F> = bytemuck::pod_collect_to_vec(data);
    let scale = want
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    got.iter().zip(want.iter()).all(|(g, w)| {
        let g = g.to_f64().expect("a float");
        (g - w).abs() <= tolerance * scale
    })
}

pub(crate) fn affine(x: &ArrayD<f64>, w: ArrayD<f64>, b: ArrayD<f64>) -> Expected {
    let n = x.shape()[0];
    let x2 = x
        .clone()
        .into_shape_with_order((n, x.len() / n))
        .expect("rows");
    let w = w.into_dimensionality::<ndarray::Ix2>().expect("2-D");
    let b = b.into_dimensionality::<ndarray::Ix1>().expect("1-D");
    let y = x2.dot(&w) + &b;
    let x_shape = x.raw_dim();
    Expected {
        y: y.into_dyn(),
        backward: Box::new(move |dout| {
            let d = dout
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .expect("2-D");
            let dx = d
                .dot(&w.t())
                .into_shape_with_order(x_shape.clone())
                .expect("x");
            let dw = x2.t().dot(&d);
            let db = d.sum_axis(Axis(0));
            (dx, vec![("W", dw.into_dyn()), ("b", db.into_dyn())])
        }),
    }
}

/// Cross-correlation, stride 1, no padding, by its definition.
pub(crate) fn convolution(x: &ArrayD<f64>, w: ArrayD<f64>, b: ArrayD<f64>) -> Expected {
    let x = x
        .clone()
        .into_dimensionality::<ndarray::Ix4>()
        .expect("4-D");
    let w = w.into_dimensionality::<ndarray::Ix4>().expect("4-D");
    let (n, c, h, wd) = x.dim();
    let (f, _, k, _) = w.dim();
    let (oh, ow) = (h - k + 1, wd - k + 1);
    let y = Array4::from_shape_fn((n, f, oh, ow), |(ni, fi, r, s)| {
        let mut sum = 0.0;
        for ci in 0..c {
            for i in 0..k {
                for j in 0..k {
                    sum += x[[ni, ci, r + i, s + j]] * w[[fi, ci, i, j]];
                }
            }
        }
        sum + b[fi]
    });
    Expected {
        y: y.into_dyn(),
        backward: Box::new(move |dout| {
            let d = dout
                .view()
                .into_dimensionality::<ndarray::Ix4>()
                .expect("4-D");
            let mut dx = Array4::<f64>::zeros(x.raw_dim());
            let mut dw = Array4::<f64>::zeros(w.raw_dim());
            for ((ni, fi, r, s), &g) in d.indexed_iter() {
                for ci in 0..c {
                    for i in 0..k {
                        for j in 0..k {
                            dx[[ni, ci, r + i, s + j]] += w[[fi, ci, i, j]] * g;
                            dw[[fi, ci, i, j]] += x[[ni, ci, r + i, s + j]] * g;
                        }
                    }
                }
            }
            let db = d.sum_axis(Axis(3)).sum_axis(Axis(2)).sum_axis(Axis(0));
            (
                dx.into_dyn(),
                vec![("W", dw.into_dyn()), ("b", db.into_dyn())],
            )
        }),
    }
}

/// Max pooling 2×2, stride 2: the first maximum of each window in row-major order.
pub(crate) fn pooling(x: &ArrayD<f64>) -> Expected {
    let x = x
        .clone()
        .into_dimensionality::<ndarray::Ix4>()
        .expect("4-D");
    let (n, c, h, w) = x.dim();
    let (oh, ow) = ((h - POOL) / POOL + 1, (w - POOL) / POOL + 1);
    let mut winner = Array4::<(usize, usize)>::from_elem((n, c, oh, ow), (0, 0));
    let y = Array4::from_shape_fn((n, c, oh, ow), |(ni, ci, r, s)| {
        let mut best = (f64::NEG_INFINITY, (r * POOL, s * POOL));
        for i in 0..POOL {
            for j in 0..POOL {
                let at = (r * POOL + i, s * POOL + j);
                if x[[ni, ci, at.0, at.1]] > best.0 {
                    best = (x[[ni, ci, at.0, at.1]], at);
                }
            }
        }
        winner[[ni, ci, r, s]] = best.1;
        best.0
    });
    Expected {
        y: y.into_dyn(),
        backward: Box::new(move |dout| {
            let mut dx = Array4::<f64>::zeros(x.raw_dim());
            for ((ni, ci, r, s), &g) in dout
                .view()
                .into_dimensionality::<ndarray::Ix4>()
                .expect("4-D")
                .indexed_iter()
            {
                let (row, col) = winner[[ni, ci, r, s]];
                dx[[ni, ci, row, col]] += g;
            }
            (dx.into_dyn(), Vec::new())
        }),
    }
}

/// Batch normalization in training mode, per feature (axis 1, and over
/// H and W for 4-D input).
fn batch_norm(x: &ArrayD<f64>, gamma: ArrayD<f64>, beta: ArrayD<f64>, eps: f64) -> Expected {
    let shape = x.raw_dim();
    let rows = |a: &ArrayD<f64>| -> Array2<f64> {
        let c = a.shape()[1];
        let moved = a.view().permuted_axes(
            (0..a.ndim())
                .filter(|&d| d != 1)
                .chain([1])
                .collect::<Vec<_>>(),
        );
        moved
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((a.len() / c, c))
            .expect("rows")
    };
    let unrows = move |r: Array2<f64>, shape: &IxDyn| -> ArrayD<f64> {
        let mut moved: Vec<usize> = shape.as_array_view().to_vec();
        let c = moved.remove(1);
        moved.push(c);
        let a = r.into_shape_with_order(IxDyn(&moved)).expect("moved");
        let rank = moved.len();
        let mut order: Vec<usize> = (0..rank).collect();
        order.insert(1, rank - 1);
        order.pop();
        a.permuted_axes(order).as_standard_layout().into_owned()
    };
    let r = rows(x);
    let n = r.nrows() as f64;
    let mu = r.mean_axis(Axis(0)).expect("rows");
    let xc = &r - &mu;
    let var = (&xc * &xc).mean_axis(Axis(0)).expect("rows");
    let std: Array1<f64> = var.mapv(|v| (v + eps).sqrt());
    let xn = &xc / &std;
    let gamma = gamma.into_dimensionality::<ndarray::Ix1>().expect("1-D");
    let beta = beta.into_dimensionality::<ndarray::Ix1>().expect("1-D");
    let y = unrows(&xn * &gamma + &beta, &shape);
    Expected {
        y,
        backward: Box::new(move |dout| {
            let d = rows(dout);
            let dgamma = (&xn * &d).sum_axis(Axis(0));
            let dbeta = d.sum_axis(Axis(0));
            let dxn = &d * &gamma;
            let dstd = -(&dxn * &xc / (&std * &std)).sum_axis(Axis(0));
            let dvar = 0.5 * &dstd / &std;
            let dxc = &dxn / &std + &(&xc * &dvar * (2.0 / n));
            let dmu = dxc.sum_axis(Axis(0));
            let dx = unrows(dxc - &(dmu / n), &shape);
            (
                dx,
                vec![("gamma", dgamma.into_dyn()), ("beta", dbeta.into_dyn())],
            )
        }),
    }
}

/// Softmax over the last axis and the mean cross-entropy with class labels;
/// Backward (no dout) is (softmax − one-hot) / N.
pub(crate) fn softmax_with_loss(x: &ArrayD<f64>, labels: &[i64]) -> Expected {
    let x = x
        .clone()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2-D");
    let n = x.nrows();
    let mut p = x.clone();
    for mut row in p.outer_iter_mut() {
        let top = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - top).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    let loss = -labels
        .iter()
        .enumerate()
        .map(|(i, &t)| (p[[i, t as usize]] + 1e-7).ln())
        .sum::<f64>()
        / n as f64;
    let labels = labels.to_vec();
    Expected {
        y: ArrayD::from_elem(IxDyn(&[]), loss),
        backward: Box::new(move |_| {
            let mut dx = p.clone();
            for (i, &t) in labels.iter().enumerate() {
                dx[[i, t as usize]] -= 1.0;
            }
            ((dx / n as f64).into_dyn(), Vec::new())
        }),
    }
}

/// Dropout: checked per answer (see the module doc).
fn dropout<F: Element>(
    shape: &[u64],
    xf: Vec<F>,
    doutf: Vec<F>,
    config: pb::layer_config::Config,
) -> Reference {
    let zero = F::zero();
    let (x, dout) = (xf.clone(), doutf.clone());
    let check = move |answer: Answer<'_>| {
        let same = |a: F, b: F| bytemuck::bytes_of(&a) == bytemuck::bytes_of(&b);
        match answer {
            Answer::Y(data) => {
                if data.len() != x.len() * std::mem::size_of::<F>() {
                    return false;
                }
                let y: Vec<F> = bytemuck::pod_collect_to_vec(data);
                let kept = x.iter().zip(&y).filter(|(&x, &y)| same(x, y)).count();
                let dropped = x
                    .iter()
                    .zip(&y)
                    .filter(|(&x, &y)| same(x * zero, y))
                    .count();
                let n = x.len() as f64;
                let spread = 6.0 * (n * DROPOUT_RATIO * (1.0 - DROPOUT_RATIO)).sqrt() + 1.0;
                kept + dropped == x.len()
                    && (kept as f64 - n * (1.0 - DROPOUT_RATIO)).abs() <= spread
            }
            Answer::Backward { dx, grads, y } => {
                if dx.len() != dout.len() * std::mem::size_of::<F>() || !grads.is_empty() {
                    return false;
                }
                let (dx, y): (Vec<F>, Vec<F>) = (
                    bytemuck::pod_collect_to_vec(dx),
                    bytemuck::pod_collect_to_vec(y),
                );
                x.iter()
                    .zip(&y)
                    .zip(dout.iter().zip(&dx))
                    .all(|((&x, &y), (&d, &g))| same(g, if same(x, y) { d } else { d * zero }))
            }
        }
    };
    Reference {
        x: tensor(shape, &xf),
        dout: Some(tensor(shape, &doutf)),
        t: None,
        config: Some(pb::LayerConfig {
            config: Some(config),
        }),
        params: HashMap::new(),
        y_shape: shape.to_vec(),
        check: Box::new(check),
    }
}

#[cfg(test)]
mod tests;
