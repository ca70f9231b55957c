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

use ndarray::{Array4, ArrayView4, ArrayViewD, Ix4};

use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};

impl Layer for Pool {
    const NAME: &'static str = "pooling";
    const DESCRIPTION: &'static str = "Max pooling: x (N, C, H, W) -> y (N, C, OH, OW), each output the maximum of its pool_h × pool_w window, OH = (H + 2·pad - pool_h) / stride + 1; -inf padding; ties to the first maximum, NaN wins (numpy's argmax); dx adds dout to each window's winner. Keeps each winner's position (4 bytes per output).";
    type Kept<F: Float> = Winners;

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        let expected = || {
            format!(
                "(N, C, H, W) with H + 2·{pad} ≥ {} and W + 2·{pad} ≥ {} (an output of at least 1×1)",
                self.pool_h,
                self.pool_w,
                pad = self.pad
            )
        };
        match *x {
            [n, c, h, w] => {
                let (oh, ow) = self.output_size(h, w).ok_or_else(expected)?;
                Ok(vec![n, c, oh, ow])
            }
            _ => Err(expected()),
        }
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        let y = self.output_shape(plan.x).expect("validated");
        Winners::bytes_for(y.iter().product())
    }

    fn save_kept<F: Float>(&self, winners: &Winners) -> Vec<Part<F>> {
        vec![Part::Positions(winners.positions.clone().into_dyn())]
    }

    fn load_kept<F: Float>(&self, plan: Plan<'_>, parts: &mut Parts<F>) -> Result<Winners, String> {
        let y = self.output_shape(plan.x)?;
        let cells = u32::try_from(self.pool_h * self.pool_w).unwrap_or(u32::MAX);
        let positions = parts.positions("winners", &y, cells)?;
        let input: [usize; 4] = plan
            .x
            .try_into()
            .map_err(|_| format!("x: expected (N, C, H, W), got {:?}", plan.x))?;
        let positions = positions
            .into_dimensionality::<Ix4>()
            .map_err(|_| format!("winners: expected 4 dimensions, got {y:?}"))?;
        Ok(Winners { input, positions })
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Winners> {
        let x = inputs
            .x
            .into_dimensionality::<Ix4>()
            .expect("validated (N, C, H, W)");
        let (y, winners) = forward(x, *self);
        Forwarded::new(y.into_dyn().into_shared(), inputs.keep.then_some(winners))
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        winners: &Winners,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let dout = dout
            .into_dimensionality::<Ix4>()
            .expect("the output's shape");
        Backwarded {
            dx: backward(winners, dout, *self).into_dyn(),
            grads: Vec::new(),
        }
    }
}

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
            self.pad
                .checked_mul(2)?
                .checked_add(size)?
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
    let x = x.as_standard_layout();
    let (n, c, h, w) = x.dim();
    let (oh, ow) = pool.output_size(h, w).expect("validated: the window fits");
    // Without padding every output is written whole; with it, outputs start
    // at −inf and take their window's cells one by one.
    let start = if pool.pad == 0 {
        F::zero()
    } else {
        F::neg_infinity()
    };
    let mut y = Array4::from_elem((n, c, oh, ow), start);
    let mut positions = Array4::zeros((n, c, oh, ow));
    let xs = x.as_slice().expect("standard layout");
    let ys = y.as_slice_mut().expect("new arrays are standard layout");
    let ps = positions
        .as_slice_mut()
        .expect("new arrays are standard layout");
    if pool.pad == 0 {
        forward_unpadded(xs, ys, ps, (h, w), (oh, ow), pool);
    } else {
        forward_padded(xs, ys, ps, (h, w), (oh, ow), pool);
    }
    let input = [n, c, h, w];
    (y, Winners { input, positions })
}

/// Forward with padding: each window cell's value for every output of a
/// plane is gathered into one contiguous run (−inf where the cell is
/// padding), which is then folded into the plane's running maxima in one
/// branch-free, vectorised pass: every output keeps its own running maximum,
/// so neighbouring comparisons do not wait on each other. A padded cell
/// (−inf) never beats a running maximum; a window whose real cells are all
/// −inf keeps position 0, as np.argmax would.
fn forward_padded<F: Float>(
    xs: &[F],
    ys: &mut [F],
    ps: &mut [u32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    pool: Pool,
) {
    let cols: Vec<std::ops::Range<usize>> = (0..pool.pool_w)
        .map(|j| valid_outputs(ow, w, j, pool))
        .collect();
    let mut cell = vec![F::neg_infinity(); oh * ow];
    for ((plane, y_plane), p_plane) in xs
        .chunks_exact(h * w)
        .zip(ys.chunks_exact_mut(oh * ow))
        .zip(ps.chunks_exact_mut(oh * ow))
    {
        for (at, (i, j)) in (0..pool.pool_h)
            .flat_map(|i| (0..pool.pool_w).map(move |j| (i, j)))
            .enumerate()
        {
            cell.fill(F::neg_infinity());
            let cols = cols[j].clone();
            if cols.is_empty() {
                continue;
            }
            let first = cols.start * pool.stride + j - pool.pad;
            for (r, run) in cell.chunks_exact_mut(ow).enumerate() {
                let Some(row) = (r * pool.stride + i)
                    .checked_sub(pool.pad)
                    .filter(|&row| row < h)
                else {
                    continue;
                };
                let source = plane[row * w + first..(row + 1) * w]
                    .iter()
                    .step_by(pool.stride);
                for (value, &x) in run[cols.clone()].iter_mut().zip(source) {
                    *value = x;
                }
            }
            fold_run(y_plane, p_plane, &cell, at as u32);
        }
    }
}

/// Forward without padding, where every window cell is a real input cell,
/// in passes over each plane that keep numpy's row-major tie order and run
/// as long, branch-free, vectorised loops (output rows are too short to
/// vectorise one at a time):
/// 1. each input row's windows are reduced across their width (the first
///    maximum of each row segment, and its column `j`) — where the windows
///    tile the rows exactly (stride = width, no leftover column), as one
///    loop over the whole plane;
/// 2. for every input row `r` at once, the first maximum across rows
///    `r .. r + pool_h` of those (position `i·pool_w + j`), by folding the
///    row-reduced plane shifted by `i` rows into a copy of itself;
/// 3. the rows `r·stride` of that are the output.
///
/// Step 2 also computes the rows between the strided ones; on the
/// row-reduced plane, in cache, that costs less than short loops do.
fn forward_unpadded<F: Float>(
    xs: &[F],
    ys: &mut [F],
    ps: &mut [u32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    pool: Pool,
) {
    let rows = (oh - 1) * pool.stride + pool.pool_h;
    let starts = (rows - pool.pool_h + 1) * ow;
    let (mut row_best, mut row_at) = (vec![F::zero(); rows * ow], vec![0u32; rows * ow]);
    let (mut best, mut best_at) = (vec![F::zero(); starts], vec![0u32; starts]);
    let tiles = pool.stride == pool.pool_w && w == ow * pool.pool_w;
    for ((plane, y_plane), p_plane) in xs
        .chunks_exact(h * w)
        .zip(ys.chunks_exact_mut(oh * ow))
        .zip(ps.chunks_exact_mut(oh * ow))
    {
        let used = &plane[..rows * w];
        match (tiles, pool.pool_w) {
            (true, 2) => reduce_tiles::<F, 2>(used, &mut row_best, &mut row_at),
            (true, 3) => reduce_tiles::<F, 3>(used, &mut row_best, &mut row_at),
            _ => {
                for ((row, best), at) in used
                    .chunks_exact(w)
                    .zip(row_best.chunks_exact_mut(ow))
                    .zip(row_at.chunks_exact_mut(ow))
                {
                    reduce_row(row, best, at, pool);
                }
            }
        }
        best.copy_from_slice(&row_best[..starts]);
        best_at.copy_from_slice(&row_at[..starts]);
        for i in 1..pool.pool_h {
            let shifted = i * ow..i * ow + starts;
            let at = (i * pool.pool_w) as u32;
            fold_shifted(
                &mut best,
                &mut best_at,
                &row_best[shifted.clone()],
                &row_at[shifted],
                at,
            );
        }
        for (r, (y_row, p_row)) in y_plane
            .chunks_exact_mut(ow)
            .zip(p_plane.chunks_exact_mut(ow))
            .enumerate()
        {
            let from = r * pool.stride * ow;
            y_row.copy_from_slice(&best[from..][..ow]);
            p_row.copy_from_slice(&best_at[from..][..ow]);
        }
    }
}

/// The first pass where windows tile the rows: each chunk of `WIDTH`
/// cells reduced to its first maximum and that maximum's position.
#[multiversion::multiversion(targets = "simd")]
fn reduce_tiles<F: Float, const WIDTH: usize>(cells: &[F], best: &mut [F], best_at: &mut [u32]) {
    for ((tile, b), a) in cells
        .chunks_exact(WIDTH)
        .zip(best.iter_mut())
        .zip(best_at.iter_mut())
    {
        (*b, *a) = first_maximum(tile);
    }
}

/// The first pass for one row, any stride and width.
fn reduce_row<F: Float>(row: &[F], best: &mut [F], best_at: &mut [u32], pool: Pool) {
    for (s, (b, a)) in best.iter_mut().zip(best_at.iter_mut()).enumerate() {
        (*b, *a) = first_maximum(&row[s * pool.stride..][..pool.pool_w]);
    }
}

/// A window row segment's first maximum (numpy's argmax order) and its
/// position, by branch-free selects.
#[inline(always)]
fn first_maximum<F: Float>(window: &[F]) -> (F, u32) {
    let (mut top, mut top_at) = (window[0], 0);
    for (j, &v) in window.iter().enumerate().skip(1) {
        let take = beats(v, top);
        top = if take { v } else { top };
        top_at = if take { j as u32 } else { top_at };
    }
    (top, top_at)
}

/// Step 2 of [`forward_unpadded`]: a later window row's maxima (their
/// positions offset by `first_at`) folded into the running ones.
#[multiversion::multiversion(targets = "simd")]
fn fold_shifted<F: Float>(
    best: &mut [F],
    best_at: &mut [u32],
    row: &[F],
    row_at: &[u32],
    first_at: u32,
) {
    for (((b, a), &v), &j) in best.iter_mut().zip(best_at.iter_mut()).zip(row).zip(row_at) {
        let take = beats(v, *b);
        *b = if take { v } else { *b };
        *a = if take { first_at + j } else { *a };
    }
}

/// Folds one window cell (position `at`) into running maxima: `cell[k]` is
/// the cell's value for output `k`. Branch-free over contiguous runs, so it
/// vectorises and random data costs no mispredicted jumps; compiled for
/// several SIMD levels, picked at run time.
#[multiversion::multiversion(targets = "simd")]
fn fold_run<F: Float>(best: &mut [F], best_at: &mut [u32], cell: &[F], at: u32) {
    for ((b, a), &v) in best.iter_mut().zip(best_at.iter_mut()).zip(cell) {
        let take = beats(v, *b);
        *b = if take { v } else { *b };
        *a = if take { at } else { *a };
    }
}

/// Whether `v`, coming later in the window, takes the place of `best`: it is
/// larger, or it is the first NaN (numpy's argmax treats NaN as the maximum).
#[inline(always)]
fn beats<F: Float>(v: F, best: F) -> bool {
    // `x != x` is NaN's test, written as a comparison so it vectorises.
    #[allow(clippy::eq_op)]
    let (v_nan, best_nan) = (v != v, best != best);
    (v > best) | (v_nan & !best_nan)
}

/// The outputs `o` in `0..out` whose window cell at offset `k` reads inside
/// `0..size` (`o·stride + k − pad`), as a range; the others read padding.
fn valid_outputs(out: usize, size: usize, k: usize, pool: Pool) -> std::ops::Range<usize> {
    let first = pool.pad.saturating_sub(k).div_ceil(pool.stride);
    let end = (size + pool.pad)
        .saturating_sub(k)
        .div_ceil(pool.stride)
        .min(out);
    first.min(end)..end
}

/// The cell's index if (row, col) is inside an h × w input, None in the padding.
fn inside(row: isize, col: isize, h: usize, w: usize) -> Option<(usize, usize)> {
    (row >= 0 && col >= 0 && (row as usize) < h && (col as usize) < w)
        .then_some((row as usize, col as usize))
}

/// `dx` (the input's shape) for `dout` (the output's shape).
pub fn backward<F: Float>(winners: &Winners, dout: ArrayView4<'_, F>, pool: Pool) -> Array4<F> {
    let [n, c, h, w] = winners.input;
    let dout = dout.as_standard_layout();
    let (_, _, oh, ow) = dout.dim();
    let mut dx = Array4::zeros((n, c, h, w));
    let planes = dx
        .as_slice_mut()
        .expect("new arrays are standard layout")
        .chunks_exact_mut(h * w);
    let douts = dout
        .as_slice()
        .expect("standard layout")
        .chunks_exact(oh * ow);
    let winners = winners
        .positions
        .as_slice()
        .expect("made in standard layout")
        .chunks_exact(oh * ow);
    if pool.pad == 0 {
        // Every winner is a real cell: its index is the window's corner plus
        // an offset per position, computed once — no bounds to check.
        let offsets: Vec<usize> = (0..pool.pool_h)
            .flat_map(|i| (0..pool.pool_w).map(move |j| i * w + j))
            .collect();
        for ((plane, dout), winners) in planes.zip(douts).zip(winners) {
            for (r, (dout, winners)) in dout
                .chunks_exact(ow)
                .zip(winners.chunks_exact(ow))
                .enumerate()
            {
                let corner = r * pool.stride * w;
                for (s, (&d, &at)) in dout.iter().zip(winners).enumerate() {
                    let cell = &mut plane[corner + s * pool.stride + offsets[at as usize]];
                    *cell = *cell + d;
                }
            }
        }
        return dx;
    }
    // Each window position's (row, column) offset, computed once: no divisions per output.
    let offsets: Vec<(usize, usize)> = (0..pool.pool_h)
        .flat_map(|i| (0..pool.pool_w).map(move |j| (i, j)))
        .collect();
    for ((plane, dout), winners) in planes.zip(douts).zip(winners) {
        for (r, (dout, winners)) in dout
            .chunks_exact(ow)
            .zip(winners.chunks_exact(ow))
            .enumerate()
        {
            for (s, (&d, &at)) in dout.iter().zip(winners).enumerate() {
                let (i, j) = offsets[at as usize];
                let row = (r * pool.stride + i) as isize - pool.pad as isize;
                let col = (s * pool.stride + j) as isize - pool.pad as isize;
                if let Some((row, col)) = inside(row, col, h, w) {
                    let cell = &mut plane[row * w + col];
                    *cell = *cell + d;
                }
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests;
