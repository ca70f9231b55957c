//! Forward + Backward of the trainable kernels on the shapes the issue names,
//! float32, one thread: what they cost before any transport.
//!
//! `cargo bench --bench layers` prints the medians; `-- --json` prints one
//! JSON object per case for `bench/layers.py`, which measures numpy's
//! reference on the same shapes in the same run and writes the comparison.
//! `LAYERD_BENCH_BREAKDOWN=1` times each step of every case.

use std::time::Instant;

use layerd::layers::{affine, convolution, pooling};
use ndarray::{Array1, Array2, Array4};

fn filled<D: ndarray::Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    shape: Sh,
) -> ndarray::Array<f32, D> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    ndarray::Array::from_shape_simple_fn(shape, || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

/// Median milliseconds of 15 runs of `f` after 3 warm-up runs.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut runs: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// One case's median, as text or (with `--json`) a JSON line.
fn report(case: &str, what: &str, ms: f64) {
    if std::env::args().any(|a| a == "--json") {
        println!(r#"{{"case": "{case}", "what": "{what}", "ms": {ms}}}"#);
    } else {
        println!("{what}, forward + backward (dx too), float32: {ms:.3} ms");
    }
}

fn main() {
    if wanted("affine") {
        affine_case();
    }
    if wanted("convolution") {
        convolution_case();
    }
    if wanted("pooling") {
        pooling_case();
    }
}

/// Whether `--only NAME` (if given) selects the case.
fn wanted(case: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--only") {
        Some(i) => args.get(i + 1).is_some_and(|only| only == case),
        None => true,
    }
}

fn affine_case() {
    let x: Array2<f32> = filled((100, 784));
    let (w, b): (Array2<f32>, Array1<f32>) = (filled((784, 100)), filled(100));
    let affine = time(|| {
        let y = affine::forward(x.view(), w.view(), b.view());
        std::hint::black_box(affine::backward(x.view(), w.view(), y.view(), true));
    });
    report("affine", "affine 784->100, batch 100", affine);
    if std::env::var_os("LAYERD_BENCH_BREAKDOWN").is_some() {
        use layerd::layers::linalg::matmul;
        let y = affine::forward(x.view(), w.view(), b.view());
        let steps: [(&str, &dyn Fn()); 4] = [
            ("forward", &|| {
                std::hint::black_box(affine::forward(x.view(), w.view(), b.view()));
            }),
            ("x·W", &|| {
                std::hint::black_box(matmul(x.view(), w.view()));
            }),
            ("dout·Wᵀ", &|| {
                std::hint::black_box(matmul(y.view(), w.t()));
            }),
            ("xᵀ·dout", &|| {
                std::hint::black_box(matmul(x.t(), y.view()));
            }),
        ];
        for (name, step) in steps {
            println!("  {name} {:.3} ms", time(step));
        }
    }
}

fn convolution_case() {
    let x: Array4<f32> = filled((100, 1, 28, 28));
    let (w, b): (Array4<f32>, Array1<f32>) = (filled((30, 1, 5, 5)), filled(30));
    let g = convolution::Geometry { stride: 1, pad: 0 };
    let conv = time(|| {
        let y = convolution::forward(x.view(), w.view(), b.view(), g);
        std::hint::black_box(convolution::backward(x.view(), w.view(), y.view(), g, true));
    });
    report("convolution", "convolution 30x1x5x5 on 100x1x28x28", conv);
    if std::env::var_os("LAYERD_BENCH_BREAKDOWN").is_some() {
        let col = convolution::im2col_t(x.view(), (5, 5), g);
        println!(
            "  im2col_t {:.3} ms",
            time(|| {
                std::hint::black_box(convolution::im2col_t(x.view(), (5, 5), g));
            })
        );
        let w2 = w.view().into_shape_with_order((30, 25)).unwrap();
        println!(
            "  W2·colT {:.3} ms",
            time(|| {
                std::hint::black_box(layerd::layers::linalg::matmul(w2, col.view()));
            })
        );
        let y = convolution::forward(x.view(), w.view(), b.view(), g);
        println!(
            "  forward {:.3} ms",
            time(|| {
                std::hint::black_box(convolution::forward(x.view(), w.view(), b.view(), g));
            })
        );
        println!(
            "  backward no dx {:.3} ms",
            time(|| {
                std::hint::black_box(convolution::backward(
                    x.view(),
                    w.view(),
                    y.view(),
                    g,
                    false,
                ));
            })
        );
        println!(
            "  backward {:.3} ms",
            time(|| {
                std::hint::black_box(convolution::backward(x.view(), w.view(), y.view(), g, true));
            })
        );
        let d = layerd::layers::linalg::matmul(
            w2.t(),
            layerd::layers::linalg::matmul(w2, col.view()).view(),
        );
        println!(
            "  col2im_t {:.3} ms",
            time(|| {
                std::hint::black_box(convolution::col2im_t(d.view(), (100, 1, 28, 28), (5, 5), g));
            })
        );
    }
}

fn pooling_case() {
    let x: Array4<f32> = filled((100, 30, 24, 24));
    let pool = pooling::Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 2,
        pad: 0,
    };
    let pooled = time(|| {
        let (y, winners) = pooling::forward(x.view(), pool);
        std::hint::black_box(pooling::backward(&winners, y.view(), pool));
    });
    report(
        "pooling",
        "max pooling 2x2 stride 2 on 100x30x24x24",
        pooled,
    );
    if std::env::var_os("LAYERD_BENCH_BREAKDOWN").is_some() {
        let (y, winners) = pooling::forward(x.view(), pool);
        println!(
            "  forward {:.3} ms",
            time(|| {
                std::hint::black_box(pooling::forward(x.view(), pool));
            })
        );
        println!(
            "  backward {:.3} ms",
            time(|| {
                std::hint::black_box(pooling::backward(&winners, y.view(), pool));
            })
        );
    }
}
