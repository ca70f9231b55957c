//! Weight initialization for parameters a client does not give: normal
//! values with a standard deviation set by the method, drawn from the layer's
//! own generator, so the same seed gives the same weights on every machine
//! and build. (Biases and β start at 0, γ at 1: not drawn.)

use ndarray::{ArrayD, IxDyn};

use super::rng::Rng;
use crate::layers::Float;

/// How the weights' standard deviation is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// `sqrt(2 / fan_in)`, for ReLU networks.
    He,
    /// `sqrt(1 / fan_in)`, for sigmoid / tanh networks.
    Xavier,
    /// A given standard deviation.
    Normal(f64),
}

/// A configured initialization: the method and the generator's seed (already
/// chosen when the client asked for a random one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub method: Method,
    pub seed: u64,
}

impl Method {
    pub fn std(self, fan_in: usize) -> f64 {
        match self {
            Method::He => (2.0 / fan_in as f64).sqrt(),
            Method::Xavier => (1.0 / fan_in as f64).sqrt(),
            Method::Normal(std) => std,
        }
    }
}

/// Weights of `shape`, normal with mean 0 and the method's std for `fan_in`
/// inputs per output, drawn in row-major order (in float64, then rounded).
pub fn weights<F: Float>(
    shape: &[usize],
    fan_in: usize,
    method: Method,
    rng: &mut Rng,
) -> ArrayD<F> {
    let std = method.std(fan_in);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        F::from(rng.normal() * std).expect("a float")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_layer_has_the_methods_mean_and_std() {
        let fan_in = 784;
        for method in [Method::He, Method::Xavier, Method::Normal(0.01)] {
            let w: ArrayD<f64> = weights(&[fan_in, 500], fan_in, method, &mut Rng::from_seed(3));
            let n = w.len() as f64;
            let mean = w.sum() / n;
            let std = (w.mapv(|v| (v - mean).powi(2)).sum() / n).sqrt();
            let want = method.std(fan_in);
            assert!(mean.abs() < 5.0 * want / n.sqrt(), "{method:?} mean {mean}");
            assert!(
                (std / want - 1.0).abs() < 5.0 / (2.0 * n).sqrt(),
                "{method:?} std {std} vs {want}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_in_both_dtypes() {
        let a: ArrayD<f32> = weights(&[3, 4], 3, Method::He, &mut Rng::from_seed(5));
        let b: ArrayD<f64> = weights(&[3, 4], 3, Method::He, &mut Rng::from_seed(5));
        assert_eq!(a, b.mapv(|v| v as f32));
        let c: ArrayD<f32> = weights(&[3, 4], 3, Method::He, &mut Rng::from_seed(6));
        assert_ne!(a, c);
    }
}
