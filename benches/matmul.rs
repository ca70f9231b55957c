//! Which matrix product should the trainable layers use? One thread, the
//! shapes affine and convolution layers multiply, each candidate timed on the
//! same inputs in one run (interleaved), checked against the others.
//!
//! Candidates: ndarray's `dot` (the `matrixmultiply` crate, already in the
//! tree), and the `gemm` crate (pure Rust, run-time dispatch up to AVX-512)
//! through `layers::linalg`, the wrapper the layers use; and the same on two
//! threads (the rows of C split in halves, the second half on a scoped thread),
//! to show whether these shapes gain from the second core.
//! BLAS (OpenBLAS) is measured through numpy by `bench/matmul.py`, which runs
//! this and prints one table.
//!
//! `cargo bench --bench matmul` (add `-- --json` for one JSON object per line).

use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};

/// (name, m, k, n): C (m×n) = A (m×k) · B (k×n).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("affine 784->100, batch 100: x·W", 100, 784, 100),
    ("affine backward: xᵀ·dout (dW)", 784, 100, 100),
    ("affine backward: dout·Wᵀ (dx)", 100, 100, 784),
    ("conv 30 filters 5x5 on 100x1x28x28: col·W", 57_600, 25, 30),
    ("conv backward: colᵀ·dout (dW)", 25, 57_600, 30),
];

trait Candidate {
    const NAME: &'static str;
    fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>);
}

struct NdarrayDot;

impl Candidate for NdarrayDot {
    const NAME: &'static str = "ndarray dot (matrixmultiply)";
    fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, mut c: ArrayViewMut2<'_, f32>) {
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    }
}

struct Gemm;

impl Candidate for Gemm {
    const NAME: &'static str = "gemm crate";
    fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>) {
        // The layers' own wrapper, so this measures exactly what they run.
        layerd::layers::linalg::matmul_into(a, b, c, false);
    }
}

struct GemmTwoThreads;

impl Candidate for GemmTwoThreads {
    const NAME: &'static str = "gemm crate, two threads";
    fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>) {
        let half = a.nrows() / 2;
        let (a1, a2) = a.split_at(Axis(0), half);
        let (c1, c2) = c.split_at(Axis(0), half);
        std::thread::scope(|scope| {
            scope.spawn(move || Gemm::matmul(a2, b, c2));
            Gemm::matmul(a1, b, c1);
        });
    }
}

/// A deterministic matrix of values in [-1, 1).
fn matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array2::from_shape_simple_fn((rows, cols), || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

/// Seconds per product, the median of `batches` timed batches of ~50 ms.
fn time<C: Candidate>(a: &Array2<f32>, b: &Array2<f32>, c: &mut Array2<f32>) -> Vec<f64> {
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < Duration::from_millis(50) {
        C::matmul(a.view(), b.view(), c.view_mut());
        calls += 1;
    }
    let per_batch = calls.max(1);
    (0..9)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                C::matmul(a.view(), b.view(), c.view_mut());
            }
            start.elapsed().as_secs_f64() / f64::from(per_batch)
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    for &(name, m, k, n) in SHAPES {
        let (a, b) = (matrix(m, k, 1), matrix(k, n, 2));
        let (mut c1, mut c2, mut c3) = (
            Array2::zeros((m, n)),
            Array2::zeros((m, n)),
            Array2::zeros((m, n)),
        );
        // Interleaved rounds, so drift on a shared machine hits all alike.
        let (mut t1, mut t2, mut t3) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            t1.extend(time::<NdarrayDot>(&a, &b, &mut c1));
            t2.extend(time::<Gemm>(&a, &b, &mut c2));
            t3.extend(time::<GemmTwoThreads>(&a, &b, &mut c3));
        }
        let scale = c1.iter().fold(0f32, |s, v| s.max(v.abs()));
        for other in [&c2, &c3] {
            let diff = c1
                .iter()
                .zip(other)
                .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{name}: candidates differ by {diff}");
        }
        let flops = 2.0 * (m * k * n) as f64;
        for (candidate, seconds) in [
            (NdarrayDot::NAME, median(t1)),
            (Gemm::NAME, median(t2)),
            (GemmTwoThreads::NAME, median(t3)),
        ] {
            let gflops = flops / seconds / 1e9;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"shape": name, "m": m, "k": k, "n": n, "candidate": candidate,
                                       "seconds": seconds, "gflops": gflops})
                );
            } else {
                println!(
                    "{name:45} {candidate:30} {:9.1} us {gflops:7.1} GFLOP/s",
                    seconds * 1e6
                );
            }
        }
    }
}
