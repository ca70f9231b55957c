//! Helpers for the kernels' unit tests: deterministic inputs and central
//! differences in float64.

use ndarray::{Array, Dimension, ShapeBuilder};

/// A deterministic array of values in [-1, 1) (a linear congruential sequence).
pub fn filled<Sh: ShapeBuilder>(shape: Sh, seed: u64) -> Array<f64, Sh::Dim> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array::from_shape_simple_fn(shape, || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    })
}

/// d f / d a, element by element, by central differences with step 1e-6.
pub fn central_difference<D: Dimension>(
    a: &Array<f64, D>,
    f: impl Fn(&Array<f64, D>) -> f64,
) -> Array<f64, D> {
    let h = 1e-6;
    let mut probe = a.as_standard_layout().into_owned();
    let grad = (0..probe.len())
        .map(|i| {
            let old = probe.as_slice().expect("standard layout")[i];
            probe.as_slice_mut().expect("standard layout")[i] = old + h;
            let plus = f(&probe);
            probe.as_slice_mut().expect("standard layout")[i] = old - h;
            let minus = f(&probe);
            probe.as_slice_mut().expect("standard layout")[i] = old;
            (plus - minus) / (2.0 * h)
        })
        .collect();
    Array::from_shape_vec(a.raw_dim(), grad).expect("one value per element")
}

/// max |got − want| / max |want|, the measure the numerics are specified in.
pub fn max_relative_error<D: Dimension>(got: &Array<f64, D>, want: &Array<f64, D>) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

/// A Forward of a layer without slots, target or generator, in training mode.
pub fn forward<L: super::Layer, F: super::Float>(
    layer: &L,
    x: ndarray::ArrayViewD<'_, F>,
    keep: bool,
) -> super::Forwarded<F, L::Kept<F>> {
    layer.forward(super::Inputs {
        x,
        x_shared: None,
        values: &[],
        target: None,
        eval: false,
        keep,
        rng: None,
    })
}
