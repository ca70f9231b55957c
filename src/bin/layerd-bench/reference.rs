//! The local reference each answer is checked against: written here from the
//! numpy definitions, independent of the server's own layer code (the
//! trainable kinds' in `trainable.rs`).
//!
//! For the elementwise kinds:
//! ReLU and Identity answers, and every Backward answer, must be bit-identical.
//! A Sigmoid Forward must be within 1e-6 (float32) / 1e-14 (float64) relative
//! error of `1 / (1 + exp(-x))`, with NaN exactly where x is NaN; its bytes are
//! then pinned, so every later answer must equal the first accepted one, and
//! the expected Backward is numpy's `dout * (1.0 - y) * y` on that y.

use std::{collections::HashMap, sync::OnceLock};

use bytes::Bytes;
use layerd::pb;

use crate::args::{Dtype, Kind};
use crate::trainable;

/// A float the reference computes in.
pub trait Element: num_traits::Float + bytemuck::Pod + Send + Sync {
    const DTYPE: pb::DType;
    const SIGMOID_TOLERANCE: f64;
}

impl Element for f32 {
    const DTYPE: pb::DType = pb::DType::DtypeFloat32;
    const SIGMOID_TOLERANCE: f64 = 1e-6;
}

impl Element for f64 {
    const DTYPE: pb::DType = pb::DType::DtypeFloat64;
    const SIGMOID_TOLERANCE: f64 = 1e-14;
}

// The half types: the server computes in float32 and rounds once, which
// only the exact kinds' answers (relu, identity) can be checked against
// bit for bit; `Reference::new` drives no other kind in them.
impl Element for half::f16 {
    const DTYPE: pb::DType = pb::DType::DtypeFloat16;
    const SIGMOID_TOLERANCE: f64 = f64::NAN;
}

impl Element for half::bf16 {
    const DTYPE: pb::DType = pb::DType::DtypeBfloat16;
    const SIGMOID_TOLERANCE: f64 = f64::NAN;
}

/// The layer one workload creates, the inputs it sends, and what must come back.
pub struct Reference {
    pub x: pb::Tensor,
    /// None: Backward without dout (after a loss).
    pub dout: Option<pb::Tensor>,
    /// The labels of a loss.
    pub t: Option<pb::Tensor>,
    pub config: Option<pb::LayerConfig>,
    /// Parameters the bench gives the layer (so that it knows them).
    pub params: HashMap<String, pb::Tensor>,
    /// The shape Forward answers.
    pub(crate) y_shape: Vec<u64>,
    pub(crate) check: Box<dyn Checker>,
}

impl Reference {
    /// The workload of `kind` at `shape`, or why that shape does not fit it.
    pub fn new(kind: Kind, dtype: Dtype, shape: &[u64]) -> Result<Reference, String> {
        match dtype {
            Dtype::F32 => build::<f32>(kind, shape),
            Dtype::F64 => build::<f64>(kind, shape),
            Dtype::F16 | Dtype::Bf16 if !matches!(kind, Kind::Relu | Kind::Identity) => {
                Err(format!(
                    "{} answers in a half dtype are rounded from float32 and not checked bit for \
                     bit here: --dtype f16 and bf16 drive relu and identity",
                    kind.name()
                ))
            }
            Dtype::F16 => build::<half::f16>(kind, shape),
            Dtype::Bf16 => build::<half::bf16>(kind, shape),
        }
    }

    /// Whether Backward asks for the parameter gradients (and checks them).
    pub fn return_grads(&self) -> bool {
        !self.params.is_empty()
    }

    /// Whether `y` is the right Forward answer.
    pub fn check_y(&self, y: Option<&pb::Tensor>) -> bool {
        y.is_some_and(|y| {
            y.dtype == self.x.dtype
                && y.shape == self.y_shape
                && self.check.check(Answer::Y(&y.data))
        })
    }

    /// Whether `dx` and `grads` are the right Backward answer after the
    /// checked Forward that answered `y`.
    pub fn check_backward(
        &self,
        dx: Option<&pb::Tensor>,
        grads: &HashMap<String, pb::Tensor>,
        y: &Bytes,
    ) -> bool {
        dx.is_some_and(|dx| {
            dx.dtype == self.x.dtype
                && dx.shape == self.x.shape
                && grads.values().all(|g| g.dtype == self.x.dtype)
                && self.check.check(Answer::Backward {
                    dx: &dx.data,
                    grads,
                    y,
                })
        })
    }
}

/// One answer to check.
pub enum Answer<'a> {
    Y(&'a Bytes),
    /// dx, the parameter gradients, and the y of the Forward it follows.
    Backward {
        dx: &'a Bytes,
        grads: &'a HashMap<String, pb::Tensor>,
        y: &'a Bytes,
    },
}

/// Checks one kind's answers.
pub trait Checker: Send + Sync {
    fn check(&self, answer: Answer<'_>) -> bool;
}

impl<T: Fn(Answer<'_>) -> bool + Send + Sync> Checker for T {
    fn check(&self, answer: Answer<'_>) -> bool {
        self(answer)
    }
}

/// Deterministic inputs: a spread of ordinary values with the special ones
/// (signed zeros, infinities, NaN, saturating magnitudes) at fixed places.
fn inputs<F: Element>(len: usize) -> (Vec<F>, Vec<F>) {
    let specials = [
        -0.0,
        0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        88.8,
        -88.8,
        710.0,
        -710.0,
        1e-40,
    ];
    let x = (0..len)
        .map(|i| {
            let v = if i % 97 < specials.len() && i >= 97 {
                specials[i % 97]
            } else {
                // A fixed pseudo-random value in [-20, 20).
                let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                (h as f64 / (1u64 << 24) as f64) * 40.0 - 20.0
            };
            F::from(v).expect("representable")
        })
        .collect();
    let dout = (0..len)
        .map(|i| F::from(((i % 7) as f64 - 3.0) * 0.37 + 0.01).expect("representable"))
        .collect();
    (x, dout)
}

pub fn tensor<F: Element>(shape: &[u64], values: &[F]) -> pb::Tensor {
    pb::Tensor {
        dtype: F::DTYPE.into(),
        shape: shape.to_vec(),
        data: Bytes::copy_from_slice(bytemuck::cast_slice(values)),
    }
}

fn bytes_of<F: Element>(values: Vec<F>) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(&values))
}

fn build<F: Element>(kind: Kind, shape: &[u64]) -> Result<Reference, String> {
    if !Kind::ELEMENTWISE.contains(&kind) {
        return trainable::build::<F>(kind, shape);
    }
    let len = shape.iter().product::<u64>() as usize;
    let (x, dout) = inputs::<F>(len);
    let zero = F::zero();
    let check: Box<dyn Checker> = match kind {
        Kind::Relu => Box::new(Exact {
            // numpy: mask = x <= 0 (false for NaN); masked positions are set to 0.
            y: bytes_of(
                x.iter()
                    .map(|&v| if v <= zero { zero } else { v })
                    .collect(),
            ),
            dx: bytes_of(
                x.iter()
                    .zip(&dout)
                    .map(|(&v, &d)| if v <= zero { zero } else { d })
                    .collect(),
            ),
        }),
        Kind::Sigmoid => Box::new(SigmoidCheck {
            x: x.clone(),
            dout: dout.clone(),
            pinned: OnceLock::new(),
        }),
        _ => Box::new(Exact {
            y: bytes_of(x.clone()),
            dx: bytes_of(dout.clone()),
        }),
    };
    Ok(Reference {
        x: tensor(shape, &x),
        dout: Some(tensor(shape, &dout)),
        t: None,
        config: None,
        params: HashMap::new(),
        y_shape: shape.to_vec(),
        check,
    })
}

struct Exact {
    y: Bytes,
    dx: Bytes,
}

impl Checker for Exact {
    fn check(&self, answer: Answer<'_>) -> bool {
        match answer {
            Answer::Y(data) => *data == self.y,
            Answer::Backward { dx, grads, .. } => *dx == self.dx && grads.is_empty(),
        }
    }
}

struct SigmoidCheck<F> {
    x: Vec<F>,
    dout: Vec<F>,
    /// The first accepted y, and the dx numpy computes from it.
    pinned: OnceLock<(Bytes, Bytes)>,
}

impl<F: Element> SigmoidCheck<F> {
    fn within_tolerance(&self, data: &Bytes) -> bool {
        if data.len() != self.x.len() * std::mem::size_of::<F>() {
            return false;
        }
        let y: Vec<F> = bytemuck::pod_collect_to_vec(data);
        self.x.iter().zip(&y).all(|(&x, &y)| {
            let want = F::one() / (F::one() + (-x).exp());
            if x.is_nan() || want.is_nan() {
                return y.is_nan() && x.is_nan();
            }
            let (y, want) = (y.to_f64().unwrap(), want.to_f64().unwrap());
            (0.0..=1.0).contains(&y)
                && (y == want || (y - want).abs() <= F::SIGMOID_TOLERANCE * want.abs())
        })
    }
}

impl<F: Element> Checker for SigmoidCheck<F> {
    fn check(&self, answer: Answer<'_>) -> bool {
        match answer {
            Answer::Y(data) => self.y(data),
            Answer::Backward { dx, grads, .. } => {
                grads.is_empty() && self.pinned.get().is_some_and(|(_, want)| dx == want)
            }
        }
    }
}

impl<F: Element> SigmoidCheck<F> {
    fn y(&self, data: &Bytes) -> bool {
        if let Some((y, _)) = self.pinned.get() {
            return data == y;
        }
        if !self.within_tolerance(data) {
            return false;
        }
        let (y, _) = self.pinned.get_or_init(|| {
            let y: Vec<F> = bytemuck::pod_collect_to_vec(data);
            let one = F::one();
            let dx = self
                .dout
                .iter()
                .zip(&y)
                .map(|(&d, &y)| (d * (one - y)) * y)
                .collect();
            (data.clone(), bytes_of(dx))
        });
        data == y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_reference_follows_numpy_on_special_values() {
        let r = Reference::new(Kind::Relu, Dtype::F32, &[300]).unwrap();
        let x: Vec<f32> = bytemuck::pod_collect_to_vec(&r.x.data);
        assert!(
            x.iter().any(|v| v.is_nan()) && x.iter().any(|v| v.to_bits() == (-0.0f32).to_bits())
        );
        // The server's own answer for identity is not a ReLU answer.
        assert!(!r.check_y(Some(&r.x)));
    }

    #[test]
    fn sigmoid_pins_the_first_accepted_answer() {
        let r = Reference::new(Kind::Sigmoid, Dtype::F64, &[200]).unwrap();
        let x: Vec<f64> = bytemuck::pod_collect_to_vec(&r.x.data);
        let y: Vec<f64> = x.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
        let mut answer = tensor(&[200], &y);
        assert!(r.check_y(Some(&answer)));
        // One ULP off a non-special element is within tolerance but not the pinned answer.
        let mut y2 = y.clone();
        y2[1] = f64::from_bits(y2[1].to_bits() + 1);
        answer.data = bytes_of(y2);
        assert!(!r.check_y(Some(&answer)));
    }
}
