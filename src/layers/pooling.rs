//! Max pooling over windows of each channel.
//!
//! Shapes: `x` (N, C, H, W) → `y` (N, C, OH, OW) with
//! `OH = (H + 2·pad − pool_h) / stride + 1` (and likewise OW), at least 1.
//! Each output is the maximum of its `pool_h × pool_w` window; the window
//! reads `−inf` outside the input (the padding).
//!
//! Ties and NaN exactly as numpy's `argmax` over the window in row-major
//! order (the reference's `im2col` + `np.argmax`): the first maximum wins; a
//! NaN is a maximum, so the first NaN wins and `y` is NaN. A padded cell can
//! win only where every real cell of its window is `−inf` and it comes first
//! in row-major order — as in the reference — and then its gradient is
//! dropped, since it is no input.
//!
//! Backward: each `dout` element goes to its window's winner; where windows
//! overlap, a cell adds the gradients of every window it won.
//!
//! Kept for Backward: the winner's position in its window, one `u32` per
//! output element, and the input's shape.

use ndarray::{Array4, ArrayView4};

use super::Float;

/// Window size, stride and padding; validated by the caller (sizes and stride
/// at least 1, output at least 1×1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub pool_h: usize,
    pub pool_w: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Pool {
    /// The output's (OH, OW) for an input of height `h` and width `w`, or
    /// None when a window does not fit once (output smaller than 1×1).
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let out = |size: usize, k: usize| {
            (size + 2 * self.pad)
                .checked_sub(k)
                .map(|span| span / self.stride + 1)
        };
        Some((out(h, self.pool_h)?, out(w, self.pool_w)?))
    }
}

/// What Forward keeps: each output's winning position in its window.
#[derive(Debug, Clone, PartialEq)]
pub struct Winners {
    input: [usize; 4],
    positions: Array4<u32>,
}

impl Winners {
    /// Bytes kept for an output of `outputs` elements.
    pub const fn bytes_for(outputs: usize) -> usize {
        outputs * std::mem::size_of::<u32>()
    }
}

/// `y` and the winners, for `x` (N, C, H, W).
pub fn forward<F: Float>(x: ArrayView4<'_, F>, pool: Pool) -> (Array4<F>, Winners) {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = pool.output_size(h, w).expect("validated: the window fits");
    let mut y = Array4::zeros((n, c, oh, ow));
    let mut positions = Array4::zeros((n, c, oh, ow));
    for ((ni, ci, r, s), out) in y.indexed_iter_mut() {
        let (mut best, mut best_at) = (F::neg_infinity(), 0u32);
        for (at, (row, col)) in pool.window(r, s).enumerate() {
            let v = inside(row, col, h, w)
                .map_or(F::neg_infinity(), |(row, col)| x[[ni, ci, row, col]]);
            // np.argmax: the first maximum; a NaN is maximal, and the first NaN stays.
            if at == 0 || v > best || (v.is_nan() && !best.is_nan()) {
                (best, best_at) = (v, at as u32);
            }
        }
        *out = best;
        positions[[ni, ci, r, s]] = best_at;
    }
    let input = [n, c, h, w];
    (y, Winners { input, positions })
}

impl Pool {
    /// The (row, column) of each cell of output (r, s)'s window, row-major,
    /// relative to the unpadded input (so padding is negative or past the end).
    fn window(&self, r: usize, s: usize) -> impl Iterator<Item = (isize, isize)> + '_ {
        let top = (r * self.stride) as isize - self.pad as isize;
        let left = (s * self.stride) as isize - self.pad as isize;
        (0..self.pool_h)
            .flat_map(move |i| (0..self.pool_w).map(move |j| (top + i as isize, left + j as isize)))
    }
}

/// The cell's index if (row, col) is inside an h × w input, None in the padding.
fn inside(row: isize, col: isize, h: usize, w: usize) -> Option<(usize, usize)> {
    (row >= 0 && col >= 0 && (row as usize) < h && (col as usize) < w)
        .then_some((row as usize, col as usize))
}

/// `dx` (the input's shape) for `dout` (the output's shape).
pub fn backward<F: Float>(winners: &Winners, dout: ArrayView4<'_, F>, pool: Pool) -> Array4<F> {
    let [n, c, h, w] = winners.input;
    let mut dx = Array4::zeros((n, c, h, w));
    for ((ni, ci, r, s), &at) in winners.positions.indexed_iter() {
        let (row, col) = pool
            .window(r, s)
            .nth(at as usize)
            .expect("a position in the window");
        if let Some((row, col)) = inside(row, col, h, w) {
            let cell = &mut dx[[ni, ci, row, col]];
            *cell = *cell + dout[[ni, ci, r, s]];
        }
    }
    dx
}

#[cfg(test)]
mod tests {
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
}
