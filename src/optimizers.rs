//! Optimizers: SGD, Momentum, AdaGrad and Adam as pure elementwise math on
//! slices, bit-identical to the classic numpy layer set's classes.
//!
//! Formulas (p: parameter, g: its gradient, state zero at the start):
//!
//! | algorithm | state | update |
//! |---|---|---|
//! | SGD | — | `p -= lr * g` |
//! | Momentum | v | `v = momentum * v - lr * g; p += v` |
//! | AdaGrad | h | `h += g * g; p -= lr * g / (sqrt(h) + 1e-7)` |
//! | Adam | m, v | `m += (1 - beta1) * (g - m); v += (1 - beta2) * (g * g - v); p -= lr_t * m / (sqrt(v) + 1e-7)` |
//!
//! with Adam's `lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)` at its t-th
//! update. What makes them bit-identical to numpy:
//! - each operation rounds in the parameter's dtype, left to right as written
//!   (`lr * g / d` is `(lr * g) / d`; no fused multiply-add);
//! - every scalar is first rounded to that dtype, as numpy ≥ 2 does with a
//!   Python float: `lr`, `momentum`, `1e-7`, and `1 - beta1` / `1 - beta2`
//!   (computed in float64, then rounded);
//! - `lr_t` is computed in float64 (`powf` is C's `pow`, as Python's `**`),
//!   then rounded; `t` counts this optimizer's updates, this one included.
//!
//! An update reads the old values and writes new ones in place; the caller
//! updates copies and commits them, so a failed call changes nothing.

use crate::layers::Float;

/// AdaGrad's and Adam's `1e-7` in the denominator.
pub const EPSILON: f64 = 1e-7;

/// An optimizer's algorithm and hyperparameters (float64, as the client sent
/// them; rounded to each parameter's dtype where used).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    Sgd { lr: f64 },
    Momentum { lr: f64, momentum: f64 },
    AdaGrad { lr: f64 },
    Adam { lr: f64, beta1: f64, beta2: f64 },
}

impl Algorithm {
    /// The name in the export metadata and the logs.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::Sgd { .. } => "sgd",
            Algorithm::Momentum { .. } => "momentum",
            Algorithm::AdaGrad { .. } => "adagrad",
            Algorithm::Adam { .. } => "adam",
        }
    }

    /// The state it keeps per parameter, each of the parameter's shape.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Algorithm::Sgd { .. } => &[],
            Algorithm::Momentum { .. } => &["v"],
            Algorithm::AdaGrad { .. } => &["h"],
            Algorithm::Adam { .. } => &["m", "v"],
        }
    }

    /// One update of `param` from `grad` (same length) with `state` (one
    /// slice per [`Algorithm::state_names`], same length): the new parameter
    /// and the new state, in new buffers — the caller keeps the old ones until
    /// it commits, so an update written in place would first need a copy.
    /// `t` is the number of this update, counting from 1.
    pub fn update<F: Float>(
        &self,
        t: u64,
        param: &[F],
        grad: &[F],
        state: &[&[F]],
    ) -> (Vec<F>, Vec<Vec<F>>) {
        debug_assert_eq!(param.len(), grad.len());
        debug_assert_eq!(state.len(), self.state_names().len());
        let scalar = |value: f64| F::from(value).expect("every f64 rounds to a float");
        let eps = scalar(EPSILON);
        match *self {
            Algorithm::Sgd { lr } => {
                let lr = scalar(lr);
                let p = param.iter().zip(grad).map(|(&p, &g)| p - lr * g);
                (p.collect(), Vec::new())
            }
            Algorithm::Momentum { lr, momentum } => {
                let (lr, momentum) = (scalar(lr), scalar(momentum));
                let [v] = state else {
                    unreachable!("one state")
                };
                let v: Vec<F> = v
                    .iter()
                    .zip(grad)
                    .map(|(&v, &g)| momentum * v - lr * g)
                    .collect();
                let p = param.iter().zip(&v).map(|(&p, &v)| p + v).collect();
                (p, vec![v])
            }
            Algorithm::AdaGrad { lr } => {
                let lr = scalar(lr);
                let [h] = state else {
                    unreachable!("one state")
                };
                let h: Vec<F> = h.iter().zip(grad).map(|(&h, &g)| h + g * g).collect();
                let p = param
                    .iter()
                    .zip(grad)
                    .zip(&h)
                    .map(|((&p, &g), &h)| p - lr * g / (h.sqrt() + eps))
                    .collect();
                (p, vec![h])
            }
            Algorithm::Adam { lr, beta1, beta2 } => {
                let t = t as f64;
                let lr_t = lr * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
                let (lr_t, one_minus_b1, one_minus_b2) =
                    (scalar(lr_t), scalar(1.0 - beta1), scalar(1.0 - beta2));
                let [m, v] = state else {
                    unreachable!("two states")
                };
                let m: Vec<F> = m
                    .iter()
                    .zip(grad)
                    .map(|(&m, &g)| m + one_minus_b1 * (g - m))
                    .collect();
                let v: Vec<F> = v
                    .iter()
                    .zip(grad)
                    .map(|(&v, &g)| v + one_minus_b2 * (g * g - v))
                    .collect();
                let p = param
                    .iter()
                    .zip(&m)
                    .zip(&v)
                    .map(|((&p, &m), &v)| p - lr_t * m / (v.sqrt() + eps))
                    .collect();
                (p, vec![m, v])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numpy classes' arithmetic, written out per element from their
    /// definitions with every rounding explicit, for f64 and f32.
    fn reference<F: Float>(algorithm: &Algorithm, steps: &[Vec<F>], start: &[F]) -> Vec<F> {
        let r = |x: f64| F::from(x).unwrap();
        let mut p = start.to_vec();
        let mut s1 = vec![F::zero(); p.len()];
        let mut s2 = vec![F::zero(); p.len()];
        for (i, g) in steps.iter().enumerate() {
            for j in 0..p.len() {
                match *algorithm {
                    Algorithm::Sgd { lr } => p[j] = p[j] - r(lr) * g[j],
                    Algorithm::Momentum { lr, momentum } => {
                        s1[j] = r(momentum) * s1[j] - r(lr) * g[j];
                        p[j] = p[j] + s1[j];
                    }
                    Algorithm::AdaGrad { lr } => {
                        s1[j] = s1[j] + g[j] * g[j];
                        p[j] = p[j] - r(lr) * g[j] / (s1[j].sqrt() + r(1e-7));
                    }
                    Algorithm::Adam { lr, beta1, beta2 } => {
                        let t = (i + 1) as i32;
                        // Python's float ** int is C's pow.
                        let lr_t =
                            lr * (1.0 - beta2.powf(t.into())).sqrt() / (1.0 - beta1.powf(t.into()));
                        s1[j] = s1[j] + r(1.0 - beta1) * (g[j] - s1[j]);
                        s2[j] = s2[j] + r(1.0 - beta2) * (g[j] * g[j] - s2[j]);
                        p[j] = p[j] - r(lr_t) * s1[j] / (s2[j].sqrt() + r(1e-7));
                    }
                }
            }
        }
        p
    }

    fn run<F: Float>(algorithm: &Algorithm, steps: &[Vec<F>], start: &[F]) -> Vec<F> {
        let mut p = start.to_vec();
        let mut state = vec![vec![F::zero(); p.len()]; algorithm.state_names().len()];
        for (i, g) in steps.iter().enumerate() {
            let slices: Vec<&[F]> = state.iter().map(Vec::as_slice).collect();
            (p, state) = algorithm.update(i as u64 + 1, &p, g, &slices);
        }
        p
    }

    fn algorithms() -> [Algorithm; 4] {
        [
            Algorithm::Sgd { lr: 0.1 },
            Algorithm::Momentum {
                lr: 0.01,
                momentum: 0.9,
            },
            Algorithm::AdaGrad { lr: 0.03 },
            Algorithm::Adam {
                lr: 0.001,
                beta1: 0.9,
                beta2: 0.999,
            },
        ]
    }

    #[test]
    fn every_algorithm_matches_its_formula_bit_for_bit_over_many_steps() {
        let mut rng = crate::layers::rng::Rng::from_seed(3);
        let start: Vec<f64> = (0..64).map(|_| rng.uniform() - 0.5).collect();
        let steps: Vec<Vec<f64>> = (0..50)
            .map(|_| (0..64).map(|_| 4.0 * rng.uniform() - 2.0).collect())
            .collect();
        for algorithm in algorithms() {
            let (ours, theirs) = (
                run(&algorithm, &steps, &start),
                reference(&algorithm, &steps, &start),
            );
            assert!(
                ours.iter()
                    .zip(&theirs)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{algorithm:?} f64"
            );
            assert_ne!(ours, start, "{algorithm:?} moved nothing");
            let start32: Vec<f32> = start.iter().map(|&v| v as f32).collect();
            let steps32: Vec<Vec<f32>> = steps
                .iter()
                .map(|g| g.iter().map(|&v| v as f32).collect())
                .collect();
            let (ours, theirs) = (
                run(&algorithm, &steps32, &start32),
                reference(&algorithm, &steps32, &start32),
            );
            assert!(
                ours.iter()
                    .zip(&theirs)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{algorithm:?} f32"
            );
        }
    }

    #[test]
    fn sgd_on_a_quadratic_descends() {
        // p² has gradient 2p: every algorithm brings p towards 0.
        for algorithm in algorithms() {
            let mut p = vec![1.0f64];
            let mut state = vec![vec![0.0]; algorithm.state_names().len()];
            for t in 1..=500 {
                let g = [2.0 * p[0]];
                let slices: Vec<&[f64]> = state.iter().map(Vec::as_slice).collect();
                (p, state) = algorithm.update(t, &p, &g, &slices);
            }
            assert!(p[0].abs() < 0.9, "{algorithm:?}: {}", p[0]);
        }
    }
}
