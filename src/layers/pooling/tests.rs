//! Tests of [`super`].

use super::*;
use crate::layers::testing::{central_difference, filled, max_relative_error};
use ndarray::{array, Array4};

const TWO_BY_TWO: Pool = Pool {
    pool_h: 2,
    pool_w: 2,
    stride: 2,
    pad: 0,
};

fn image(rows: Vec<Vec<f64>>) -> Array4<f64> {
    let (h, w) = (rows.len(), rows[0].len());
    Array4::from_shape_vec((1, 1, h, w), rows.concat()).unwrap()
}

#[test]
fn maxima_of_each_window() {
    let x = image(vec![
        vec![1.0, 3.0, -1.0, 0.0],
        vec![2.0, 0.5, -2.0, -0.5],
        vec![0.0, 0.0, 9.0, 1.0],
        vec![0.0, 7.0, 1.0, 1.0],
    ]);
    let (y, _) = forward(x.view(), TWO_BY_TWO);
    assert_eq!(y, image(vec![vec![3.0, 0.0], vec![7.0, 9.0]]));
}

#[test]
fn ties_go_to_the_first_maximum_and_nan_wins() {
    let x = image(vec![
        vec![5.0, 5.0, 1.0, f64::NAN],
        vec![5.0, 2.0, f64::NAN, 9.0],
    ]);
    let (y, kept) = forward(x.view(), TWO_BY_TWO);
    assert_eq!(kept.positions[[0, 0, 0, 0]], 0); // the first of three 5s
    assert_eq!(kept.positions[[0, 0, 0, 1]], 1); // the first NaN, not the later 9
    assert!(y[[0, 0, 0, 1]].is_nan());
    let dx = backward(&kept, image(vec![vec![1.0, 2.0]]).view(), TWO_BY_TWO);
    assert_eq!(dx, image(vec![vec![1.0, 0.0, 0.0, 2.0], vec![0.0; 4]]));
}

#[test]
fn padding_is_minus_infinity_and_never_beats_a_real_cell() {
    let pool = Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 2,
        pad: 1,
    };
    let x = image(vec![vec![-5.0, -6.0], vec![-7.0, -8.0]]);
    let (y, kept) = forward(x.view(), pool);
    assert_eq!(y, image(vec![vec![-5.0, -6.0], vec![-7.0, -8.0]]));
    let dx = backward(&kept, Array4::<f64>::ones((1, 1, 2, 2)).view(), pool);
    assert_eq!(dx, Array4::<f64>::ones((1, 1, 2, 2)));
    // A real -inf ties with the padding: the first in row-major order wins. Of the four
    // windows over this 1×1 input only the last has the real cell first, so only its
    // gradient arrives; the padded winners' are dropped (as the reference's col2im does).
    let pool = Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 1,
        pad: 1,
    };
    let x = image(vec![vec![f64::NEG_INFINITY]]);
    let (y, kept) = forward(x.view(), pool);
    assert_eq!(y.len(), 4);
    assert_eq!(
        kept.positions.iter().copied().collect::<Vec<_>>(),
        vec![0, 0, 0, 0]
    );
    let dout = image(vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    assert_eq!(backward(&kept, dout.view(), pool), array![[[[4.0]]]]);
}

#[test]
fn overlapping_windows_add_their_gradients() {
    let pool = Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 1,
        pad: 0,
    };
    let x = image(vec![
        vec![0.0, 0.0, 0.0],
        vec![0.0, 9.0, 0.0],
        vec![0.0, 0.0, 0.0],
    ]);
    let (_, kept) = forward(x.view(), pool);
    let dx = backward(
        &kept,
        image(vec![vec![1.0, 2.0], vec![3.0, 4.0]]).view(),
        pool,
    );
    assert_eq!(dx[[0, 0, 1, 1]], 10.0);
    assert_eq!(dx.sum(), 10.0);
}

#[test]
fn output_sizes() {
    assert_eq!(TWO_BY_TWO.output_size(24, 24), Some((12, 12)));
    assert_eq!(TWO_BY_TWO.output_size(5, 5), Some((2, 2)));
    assert_eq!(
        Pool {
            pool_h: 3,
            pool_w: 3,
            stride: 1,
            pad: 0
        }
        .output_size(2, 9),
        None
    );
    assert_eq!(
        Pool {
            pool_h: 3,
            pool_w: 3,
            stride: 2,
            pad: 1
        }
        .output_size(1, 1),
        Some((1, 1))
    );
}

/// The definition, by nested loops: each window scanned in row-major order,
/// padding as −inf, the first maximum (or first NaN) winning.
fn naive(x: &Array4<f32>, pool: Pool) -> (Array4<f32>, Array4<u32>) {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = pool.output_size(h, w).unwrap();
    let mut y = Array4::from_elem((n, c, oh, ow), f32::NEG_INFINITY);
    let mut at = Array4::zeros((n, c, oh, ow));
    for ((ni, ci, r, s), out) in y.indexed_iter_mut() {
        for i in 0..pool.pool_h {
            for j in 0..pool.pool_w {
                let row = (r * pool.stride + i) as isize - pool.pad as isize;
                let col = (s * pool.stride + j) as isize - pool.pad as isize;
                let v = inside(row, col, h, w)
                    .map_or(f32::NEG_INFINITY, |(row, col)| x[[ni, ci, row, col]]);
                if beats(v, *out) {
                    *out = v;
                    at[[ni, ci, r, s]] = (i * pool.pool_w + j) as u32;
                }
            }
        }
    }
    (y, at)
}

/// Every path (padded, unpadded, tiling or not, each compiled stride and
/// width and the general one) against the definition, on inputs full of
/// ties and NaN; and Backward against adding each dout at its winner.
#[test]
fn every_path_matches_the_definition_with_ties_and_nan() {
    let values = [0.0, 1.0, 1.0, 2.0, -1.0, f32::NAN, f32::NEG_INFINITY];
    for (pool_h, pool_w, stride, pad) in [
        (2, 2, 2, 0),
        (3, 3, 3, 0),
        (2, 2, 1, 0),
        (3, 3, 2, 0),
        (1, 3, 1, 0),
        (2, 3, 3, 0),
        (3, 2, 2, 1),
        (2, 2, 2, 1),
        (1, 1, 1, 0),
        (4, 4, 4, 0),
    ] {
        let pool = Pool {
            pool_h,
            pool_w,
            stride,
            pad,
        };
        for (h, w) in [(6, 6), (7, 9), (4, 12), (9, 4)] {
            if pool.output_size(h, w).is_none() {
                continue;
            }
            let codes = filled((2, 3, h, w), (h * w + stride) as u64);
            let x = codes.mapv(|u| values[((u + 1.0) * 3.5) as usize % values.len()]);
            let (y, kept) = forward(x.view(), pool);
            let (y_ref, at_ref) = naive(&x, pool);
            let bits = |a: &Array4<f32>| a.mapv(f32::to_bits);
            assert_eq!(bits(&y), bits(&y_ref), "{pool:?} on {h}x{w}");
            assert_eq!(kept.positions, at_ref, "{pool:?} on {h}x{w}");
            let dout = filled(y.raw_dim(), 5).mapv(|v| v as f32);
            let mut dx_ref = Array4::<f32>::zeros(x.raw_dim());
            for ((ni, ci, r, s), &at) in at_ref.indexed_iter() {
                let (i, j) = (at as usize / pool_w, at as usize % pool_w);
                let row = (r * stride + i) as isize - pad as isize;
                let col = (s * stride + j) as isize - pad as isize;
                if let Some((row, col)) = inside(row, col, h, w) {
                    dx_ref[[ni, ci, row, col]] += dout[[ni, ci, r, s]];
                }
            }
            assert_eq!(backward(&kept, dout.view(), pool), dx_ref, "{pool:?}");
        }
    }
}

/// dx against central differences, on inputs without ties, with stride and padding.
#[test]
fn gradient_matches_central_differences() {
    let pool = Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 2,
        pad: 1,
    };
    let x = filled((2, 3, 5, 5), 3);
    let (y, kept) = forward(x.view(), pool);
    let r = filled(y.raw_dim(), 4);
    let dx = backward(&kept, r.view(), pool);
    let numeric = central_difference(&x, |x| (forward(x.view(), pool).0 * &r).sum());
    assert!(max_relative_error(&dx, &numeric) < 1e-7);
}
