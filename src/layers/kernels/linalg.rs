//! Matrix products for the trainable layers, by the `gemm` crate (one thread,
//! run-time dispatch up to AVX-512), on ndarray views of any strides — so a
//! transpose (`W.t()`, `x.t()`) costs nothing.
//!
//! Products are not bit-reproducible across libraries (numpy's OpenBLAS sums
//! in another order, and uses fused multiply-add); layers built on them are
//! compared with the numpy reference within a tolerance, their elementwise
//! parts bit for bit. The choice of `gemm` over ndarray's own `dot` and a BLAS
//! backend is measured in `benches/matmul.rs` (docs/benchmarks.md).

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::layers::Float;

/// `a · b`, a new standard-layout matrix.
pub fn matmul<F: Float>(a: ArrayView2<'_, F>, b: ArrayView2<'_, F>) -> Array2<F> {
    let (m, n) = (a.nrows(), b.ncols());
    assert_eq!(b.nrows(), a.ncols(), "inner dimensions of a matrix product");
    if a.ncols() == 0 || m == 0 || n == 0 {
        return Array2::zeros((m, n));
    }
    // Not zeroed first: a product that does not accumulate writes every
    // element and reads none, so a memset of the result would be wasted.
    let mut c = Array2::<F>::uninit((m, n));
    // SAFETY: `c` is a new standard-layout m×n matrix, aliasing neither
    // input; with `accumulate` false gemm writes each of its elements and
    // reads none, so every element is initialised when it returns.
    unsafe {
        gemm_raw(a, b, c.as_mut_ptr().cast::<F>(), (1, n as isize), false);
        c.assume_init()
    }
}

/// `c = a · b`, or `c += a · b` with `accumulate`.
///
/// # Panics
/// If the shapes do not chain (`a` is m×k, `b` k×n, `c` m×n): callers have
/// validated them, so a mismatch is a bug.
pub fn matmul_into<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    mut c: ArrayViewMut2<'_, F>,
    accumulate: bool,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert_eq!(b.nrows(), k, "inner dimensions of a matrix product");
    assert_eq!(c.dim(), (m, n), "shape of a matrix product's result");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(F::zero());
        }
        return;
    }
    let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
    // SAFETY: the pointer with its strides describes exactly the live view
    // `c`, which is borrowed mutably and so aliases neither input.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), (c_cs, c_rs), accumulate) }
}

/// `c = a · b` (or `c += a · b` with `accumulate`) into the m×n matrix at
/// `c` with (column stride, row stride) `c_strides`, for non-empty shapes
/// that chain.
///
/// # Safety
/// `c` with its strides must address m×n elements writable by this call and
/// aliasing neither `a` nor `b`; with `accumulate` they must be initialised.
unsafe fn gemm_raw<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    c: *mut F,
    (c_cs, c_rs): (isize, isize),
    accumulate: bool,
) {
    let ((m, k), n) = (a.dim(), b.ncols());
    // (column stride, row stride) in elements, as gemm takes them.
    let strides = |s: &[isize]| (s[1], s[0]);
    let (a_cs, a_rs) = strides(a.strides());
    let (b_cs, b_rs) = strides(b.strides());
    // SAFETY: the caller vouches for `c`; `a` and `b` are live views
    // described exactly by their pointers and strides; F is f32 or f64, both
    // of which gemm supports; with `accumulate` false gemm does not read `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    /// The textbook triple loop, in f64.
    fn naive(a: ArrayView2<'_, f64>, b: ArrayView2<'_, f64>) -> Array2<f64> {
        Array2::from_shape_fn((a.nrows(), b.ncols()), |(i, j)| {
            (0..a.ncols()).map(|p| a[[i, p]] * b[[p, j]]).sum()
        })
    }

    fn filled(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
        let mut state = seed | 1;
        Array2::from_shape_simple_fn((rows, cols), || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
    }

    fn assert_close(got: &Array2<f64>, want: &Array2<f64>) {
        assert_eq!(got.dim(), want.dim());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            diff <= 1e-13 * scale,
            "max |diff| {diff} of max |want| {scale}"
        );
    }

    #[test]
    fn products_of_any_strides_match_the_triple_loop() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 2), (17, 33, 9), (64, 1, 7), (2, 300, 3)] {
            let (a, b) = (filled(m, k, 1), filled(k, n, 2));
            assert_close(&matmul(a.view(), b.view()), &naive(a.view(), b.view()));
            // Transposed and sliced views, as the layers pass them.
            let (at, bt) = (filled(k, m, 3), filled(n, k, 4));
            assert_close(&matmul(at.t(), bt.t()), &naive(at.t(), bt.t()));
            let big = filled(2 * m, 2 * k, 5);
            let strided = big.slice(s![..;2, ..;2]);
            assert_close(&matmul(strided, b.view()), &naive(strided, b.view()));
        }
    }

    #[test]
    fn accumulates_and_handles_empty_dimensions() {
        let (a, b) = (filled(4, 3, 1), filled(3, 2, 2));
        let mut c = Array2::from_elem((4, 2), 1.0);
        matmul_into(a.view(), b.view(), c.view_mut(), true);
        assert_close(&c, &(naive(a.view(), b.view()) + 1.0));
        let mut c = Array2::from_elem((4, 2), 7.0);
        matmul_into(
            Array2::<f64>::zeros((4, 0)).view(),
            Array2::<f64>::zeros((0, 2)).view(),
            c.view_mut(),
            false,
        );
        assert!(c.iter().all(|&v| v == 0.0));
        assert_eq!(
            matmul(
                Array2::<f32>::zeros((0, 3)).view(),
                Array2::zeros((3, 4)).view()
            )
            .dim(),
            (0, 4)
        );
    }

    #[test]
    fn float32_products_are_close_to_float64() {
        let (a, b) = (filled(100, 784, 1), filled(784, 100, 2));
        let want = naive(a.view(), b.view());
        let got = matmul(a.mapv(|v| v as f32).view(), b.mapv(|v| v as f32).view());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        assert!(diff <= 1e-5 * scale, "{diff} vs {scale}");
    }
}
