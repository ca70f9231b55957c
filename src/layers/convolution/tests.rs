//! Tests of [`super`].

use super::*;
use crate::layers::testing::{central_difference, filled, max_relative_error};
use ndarray::{Array1, Array4};

/// The definition, by nested loops, in f64.
fn naive(x: &Array4<f64>, w: &Array4<f64>, b: &Array1<f64>, g: Geometry) -> Array4<f64> {
    let (n, c, h, wd) = x.dim();
    let (fn_, _, fh, fw) = w.dim();
    let (oh, ow) = g.output_size((h, wd), (fh, fw)).unwrap();
    Array4::from_shape_fn((n, fn_, oh, ow), |(ni, f, r, s)| {
        let mut sum = 0.0;
        for ci in 0..c {
            for i in 0..fh {
                for j in 0..fw {
                    let (row, col) = source(g, r, s, i, j);
                    if let Some((row, col)) = inside(row, col, h, wd) {
                        sum += x[[ni, ci, row, col]] * w[[f, ci, i, j]];
                    }
                }
            }
        }
        sum + b[f]
    })
}

#[test]
fn forward_is_the_definition() {
    for (g, x_shape, w_shape) in [
        (Geometry { stride: 1, pad: 0 }, (2, 3, 6, 5), (4, 3, 3, 2)),
        (Geometry { stride: 2, pad: 1 }, (1, 2, 7, 6), (3, 2, 3, 3)),
        (Geometry { stride: 3, pad: 2 }, (3, 1, 4, 4), (2, 1, 5, 5)),
        (Geometry { stride: 1, pad: 0 }, (1, 1, 3, 3), (1, 1, 3, 3)), // output 1×1
        // Kernel rows and columns that read only padding (a fuzzer's find).
        (Geometry { stride: 1, pad: 2 }, (2, 1, 1, 1), (2, 1, 5, 5)),
        (Geometry { stride: 3, pad: 3 }, (1, 2, 2, 3), (2, 2, 3, 4)),
    ] {
        let (x, w) = (filled(x_shape, 1), filled(w_shape, 2));
        let b = filled(w_shape.0, 3);
        let got = forward(x.view(), w.view(), b.view(), g);
        assert!(
            max_relative_error(&got, &naive(&x, &w, &b, g)) < 1e-14,
            "{g:?} {x_shape:?} {w_shape:?}"
        );
    }
}

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    // <im2col(x), c> = <x, col2im(c)> for every x and c.
    for (g, x_shape, kernel) in [
        (Geometry { stride: 2, pad: 1 }, (2, 3, 5, 4), (3, 2)),
        (Geometry { stride: 1, pad: 2 }, (2, 1, 1, 1), (5, 5)),
    ] {
        let x = filled(x_shape, 1);
        let col = im2col_t(x.view(), kernel, g);
        let c = filled(col.raw_dim(), 2);
        let back = col2im_t(c.view(), x.dim(), kernel, g);
        assert!(((&col * &c).sum() - (&x * &back).sum()).abs() < 1e-12);
    }
}

/// Several blocks of images, the last one short, with padding (whose
/// column entries the reused buffer keeps at zero): the same as one
/// product over the whole batch.
/// Without dx (a training step's first layer), the parameter gradients
/// are the same bits.
#[test]
fn gradients_without_dx_are_backwards() {
    let g = Geometry { stride: 2, pad: 1 };
    let (x, w) = (filled((3, 2, 9, 9), 1), filled((4, 2, 3, 3), 2));
    let dout = filled((3, 4, 5, 5), 3);
    let all = backward(x.view(), w.view(), dout.view(), g, true);
    let without = backward(x.view(), w.view(), dout.view(), g, false);
    assert!(without.dx.is_none());
    assert_eq!((all.dw, all.db), (without.dw, without.db));
}

#[test]
fn blocks_give_what_the_whole_batch_gives() {
    let g = Geometry { stride: 1, pad: 1 };
    let (x, w, b) = (
        filled((5, 2, 25, 25), 1),
        filled((4, 2, 3, 3), 2),
        filled(4, 3),
    );
    assert_eq!(block_images::<f64>(x.dim(), (3, 3), (25, 25)), 2);
    let y = forward(x.view(), w.view(), b.view(), g);
    assert!(max_relative_error(&y, &naive(&x, &w, &b, g)) < 1e-14);
    let dout = filled(y.raw_dim(), 4);
    let got = backward(x.view(), w.view(), dout.view(), g, true);
    let col = im2col_t(x.view(), (3, 3), g);
    let d2 = dout
        .view()
        .permuted_axes([1, 0, 2, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((4, 5 * 25 * 25))
        .unwrap();
    let w2 = w.view().into_shape_with_order((4, 18)).unwrap();
    let dw = d2
        .dot(&col.t())
        .into_shape_with_order((4, 2, 3, 3))
        .unwrap();
    let dx = col2im_t(w2.t().dot(&d2).view(), x.dim(), (3, 3), g);
    assert!(max_relative_error(&got.dw, &dw) < 1e-12);
    assert!(max_relative_error(&got.db, &d2.sum_axis(Axis(1))) < 1e-12);
    assert!(max_relative_error(&got.dx.unwrap(), &dx) < 1e-12);
}

/// dx, dW and db against central differences of L = Σ y ⊙ r, in float64,
/// with stride and padding (the reference's own self-check case).
#[test]
fn gradients_match_central_differences() {
    let g = Geometry { stride: 2, pad: 1 };
    let (x, w, b) = (
        filled((2, 2, 7, 6), 1),
        filled((4, 2, 3, 3), 2),
        filled(4, 3),
    );
    let r = filled(forward(x.view(), w.view(), b.view(), g).raw_dim(), 4);
    let loss = |x: &Array4<f64>, w: &Array4<f64>, b: &Array1<f64>| {
        (forward(x.view(), w.view(), b.view(), g) * &r).sum()
    };
    let grads = backward(x.view(), w.view(), r.view(), g, true);
    let dx = central_difference(&x, |x| loss(x, &w, &b));
    let dw = central_difference(&w, |w| loss(&x, w, &b));
    let db = central_difference(&b, |b| loss(&x, &w, b));
    assert!(max_relative_error(&grads.dx.unwrap(), &dx) < 1e-7);
    assert!(max_relative_error(&grads.dw, &dw) < 1e-7);
    assert!(max_relative_error(&grads.db, &db) < 1e-7);
    assert!(backward(x.view(), w.view(), r.view(), g, false)
        .dx
        .is_none());
}
