//! Convolution (cross-correlation, as the classic layer computes it), by
//! `im2col` and one matrix product.
//!
//! Shapes: `x` (N, C, H, W), `W` (FN, C, FH, FW), `b` (FN) → `y` (N, FN, OH, OW)
//! with `OH = (H + 2·pad − FH) / stride + 1` (likewise OW), at least 1; the
//! input reads 0 outside its edges (the padding).
//!
//! Forward: `col = im2col(x)` is (N·OH·OW, C·FH·FW) — a row per output
//! position, columns ordered (C, FH, FW) like `W`'s last three axes — then
//! `y = col · W2ᵀ + b` with `W2 = W` as (FN, C·FH·FW), laid out as
//! (N, FN, OH, OW). Backward, with `d2 = dout` as (N·OH·OW, FN):
//! `db = Σ_rows d2`, `dW = d2ᵀ · col`, `dx = col2im(d2 · W2)`, where `col2im`
//! adds each column entry back to the input cell it was read from (so cells
//! that several windows read add up) and drops the padding. The code builds
//! `col` transposed (a row per kernel cell), so that building it, and adding
//! it back, runs along contiguous rows; the products take it either way. It
//! works through the batch in blocks of images whose `col` fits in about
//! 256 KiB, multiplying each image's columns straight into its `y` (and
//! accumulating `dW`), so `col` is used while it is in the core's cache and
//! no batch-sized scratch array is ever built.
//!
//! Kept for Backward: `x` (N·C·H·W elements), from which Backward builds
//! `col` again — 1/(FH·FW) of the memory of keeping `col`.
//!
//! Numerics: the products and sums are compared with the reference within a
//! tolerance; the bias is added after the product, as numpy does.

use ndarray::{
    Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut2,
    ArrayViewMut4, Axis, Ix1, Ix4,
};

use super::linalg::matmul_into;
use super::{
    init::Init, Backwarded, Fill, Float, Forwarded, Inputs, Layer, Part, Parts, Plan, Slot,
};

/// The convolution kind, configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Convolution {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: (usize, usize),
    pub geometry: Geometry,
    pub init: Init,
}

impl Layer for Convolution {
    const NAME: &'static str = "convolution";
    const DESCRIPTION: &'static str = "Convolution (cross-correlation by im2col): x (N, C, H, W), W (FN, C, FH, FW), b (FN) -> y (N, FN, OH, OW), OH = (H + 2·pad - FH) / stride + 1; zero padding. Keeps x.";
    type Kept<F: Float> = Array4<F>;

    fn slots(&self) -> Vec<Slot> {
        let (fh, fw) = self.kernel;
        let weights = Fill::Weights {
            fan_in: self.in_channels.saturating_mul(fh).saturating_mul(fw),
            init: self.init,
        };
        vec![
            Slot::param(
                "W",
                vec![self.out_channels, self.in_channels, fh, fw],
                weights,
            ),
            Slot::param("b", vec![self.out_channels], Fill::Zeros),
        ]
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        let expected = || {
            format!(
                "(N, {}, H, W) with H + 2·{pad} ≥ {} and W + 2·{pad} ≥ {} (an output of at least 1×1)",
                self.in_channels,
                self.kernel.0,
                self.kernel.1,
                pad = self.geometry.pad
            )
        };
        match *x {
            [n, c, h, w] if c == self.in_channels => {
                let (oh, ow) = self
                    .geometry
                    .output_size((h, w), self.kernel)
                    .ok_or_else(expected)?;
                Ok(vec![n, self.out_channels, oh, ow])
            }
            _ => Err(expected()),
        }
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        plan.x.iter().product::<usize>() * plan.itemsize
    }

    fn save_kept<F: Float>(&self, x: &Array4<F>) -> Vec<Part<F>> {
        vec![Part::Floats(x.clone().into_dyn())]
    }

    fn load_kept<F: Float>(
        &self,
        plan: Plan<'_>,
        parts: &mut Parts<F>,
    ) -> Result<Array4<F>, String> {
        let x = parts.floats("x", plan.x)?;
        x.into_dimensionality::<Ix4>()
            .map_err(|_| format!("x: expected 4 dimensions, got {:?}", plan.x))
    }

    fn scratch_elements(&self, x: &[usize]) -> u64 {
        let Ok(y) = self.output_shape(x) else {
            return 0;
        };
        let (fh, fw) = self.kernel;
        // One block of images' colᵀ (see `block_images`; f32 makes the larger blocks).
        let images = block_images::<f32>((x[0], x[1], x[2], x[3]), self.kernel, (y[2], y[3]));
        [images, y[2], y[3], self.in_channels, fh, fw]
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d as u64))
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Array4<F>> {
        let x = inputs
            .x
            .into_dimensionality::<Ix4>()
            .expect("validated (N, C, H, W)");
        let w = inputs.values[0]
            .view()
            .into_dimensionality::<Ix4>()
            .expect("4-D W");
        let b = inputs.values[1]
            .view()
            .into_dimensionality::<Ix1>()
            .expect("1-D b");
        let y = forward(x, w, b, self.geometry).into_dyn().into_shared();
        Forwarded::new(y, inputs.keep.then(|| x.to_owned()))
    }

    fn backward<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        x: &Array4<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        let g = self.gradients(values, x, dout, true);
        Backwarded {
            dx: g.dx.expect("asked for").into_dyn(),
            grads: vec![g.dw.into_dyn(), g.db.into_dyn()],
        }
    }

    fn param_grads<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        x: &Array4<F>,
        dout: ArrayViewD<'_, F>,
    ) -> Vec<ndarray::ArrayD<F>> {
        let g = self.gradients(values, x, dout, false);
        vec![g.dw.into_dyn(), g.db.into_dyn()]
    }
}

impl Convolution {
    /// [`backward`] on the layer's W and the kept x.
    fn gradients<F: Float>(
        &self,
        values: &[ArrayViewD<'_, F>],
        x: &Array4<F>,
        dout: ArrayViewD<'_, F>,
        want_dx: bool,
    ) -> Gradients<F> {
        let w = values[0]
            .view()
            .into_dimensionality::<Ix4>()
            .expect("4-D W");
        let dout = dout
            .into_dimensionality::<Ix4>()
            .expect("the output's shape");
        backward(x.view(), w, dout, self.geometry, want_dx)
    }
}

/// Stride and zero padding; validated by the caller (stride at least 1,
/// output at least 1×1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub pad: usize,
}

impl Geometry {
    /// (OH, OW) for an h × w input and an fh × fw kernel, or None when the
    /// kernel does not fit once.
    pub fn output_size(
        &self,
        (h, w): (usize, usize),
        (fh, fw): (usize, usize),
    ) -> Option<(usize, usize)> {
        let out = |size: usize, k: usize| {
            self.pad
                .checked_mul(2)?
                .checked_add(size)?
                .checked_sub(k)
                .map(|span| span / self.stride + 1)
        };
        Some((out(h, fh)?, out(w, fw)?))
    }
}

/// Where each column entry of output position (r, s) reads the input: (row,
/// col) relative to the unpadded input, for kernel cell (i, j).
#[cfg(test)]
fn source(g: Geometry, r: usize, s: usize, i: usize, j: usize) -> (isize, isize) {
    (
        (r * g.stride + i) as isize - g.pad as isize,
        (s * g.stride + j) as isize - g.pad as isize,
    )
}

#[cfg(test)]
fn inside(row: isize, col: isize, h: usize, w: usize) -> Option<(usize, usize)> {
    (row >= 0 && col >= 0 && (row as usize) < h && (col as usize) < w)
        .then_some((row as usize, col as usize))
}

/// The outputs `o` in `0..out` whose source `o·stride + k − pad` lies inside
/// `0..size`, as a range (the rest read padding), for kernel offset `k`.
fn valid_outputs(out: usize, size: usize, k: usize, g: Geometry) -> std::ops::Range<usize> {
    // o·stride + k ≥ pad  and  o·stride + k − pad < size
    let first = g.pad.saturating_sub(k).div_ceil(g.stride);
    let end = (size + g.pad).saturating_sub(k).div_ceil(g.stride).min(out);
    first.min(end)..end
}

/// `im2col` transposed: (C·FH·FW, N·OH·OW), a row per kernel cell (c, i, j)
/// and a column per output position (n, r, s). Built row by row, so every
/// write is contiguous and every read strided by `stride` at worst; the
/// products take it transposed at no cost.
pub fn im2col_t<F: Float>(
    x: ArrayView4<'_, F>,
    (fh, fw): (usize, usize),
    g: Geometry,
) -> Array2<F> {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = g
        .output_size((h, w), (fh, fw))
        .expect("validated: the kernel fits");
    let mut col = Array2::zeros((c * fh * fw, n * oh * ow));
    im2col_t_into(x, (fh, fw), g, col.view_mut());
    col
}

/// [`im2col_t`] into `col` (C·FH·FW, N·OH·OW), writing every entry that
/// reads the input and leaving the padding's entries as they are — which
/// are the same for every image, so a zeroed buffer can be reused for
/// block after block.
fn im2col_t_into<F: Float>(
    x: ArrayView4<'_, F>,
    (fh, fw): (usize, usize),
    g: Geometry,
    mut col: ArrayViewMut2<'_, F>,
) {
    let x = x.as_standard_layout();
    let (n, c, h, w) = x.dim();
    let (oh, ow) = g
        .output_size((h, w), (fh, fw))
        .expect("validated: the kernel fits");
    let xs = x.as_slice().expect("standard layout");
    for ((ci, i, j), mut row) in (0..c)
        .flat_map(|ci| (0..fh).flat_map(move |i| (0..fw).map(move |j| (ci, i, j))))
        .zip(col.outer_iter_mut())
    {
        let row = row.as_slice_mut().expect("rows of a contiguous buffer");
        let (rows, cols) = (valid_outputs(oh, h, i, g), valid_outputs(ow, w, j, g));
        if cols.is_empty() {
            // This kernel column reads only padding (its first source would lie outside).
            continue;
        }
        for ni in 0..n {
            let plane = &xs[(ni * c + ci) * h * w..][..h * w];
            for r in rows.clone() {
                let source = &plane[(r * g.stride + i - g.pad) * w..][..w];
                let target = &mut row[(ni * oh + r) * ow..][..ow];
                copy_strided(
                    &mut target[cols.clone()],
                    &source[cols.start * g.stride + j - g.pad..],
                    g.stride,
                );
            }
        }
    }
}

/// The adjoint of [`im2col_t`]: each entry of `col_t` (C·FH·FW, N·OH·OW)
/// added back to the input cell it was read from (padding dropped), giving
/// an input of `shape`.
pub fn col2im_t<F: Float>(
    col_t: ArrayView2<'_, F>,
    shape: (usize, usize, usize, usize),
    (fh, fw): (usize, usize),
    g: Geometry,
) -> Array4<F> {
    let mut x = Array4::zeros(shape);
    col2im_t_add(col_t, (fh, fw), g, x.view_mut());
    x
}

/// [`col2im_t`] added into `x`, a contiguous (N, C, H, W) view.
fn col2im_t_add<F: Float>(
    col_t: ArrayView2<'_, F>,
    (fh, fw): (usize, usize),
    g: Geometry,
    mut x: ArrayViewMut4<'_, F>,
) {
    let (n, c, h, w) = x.dim();
    let (oh, ow) = g
        .output_size((h, w), (fh, fw))
        .expect("validated: the kernel fits");
    let col_t = col_t.as_standard_layout();
    let xs = x
        .as_slice_mut()
        .expect("a block of a standard-layout array");
    for ((ci, i, j), row) in (0..c)
        .flat_map(|ci| (0..fh).flat_map(move |i| (0..fw).map(move |j| (ci, i, j))))
        .zip(col_t.outer_iter())
    {
        let row = row.to_slice().expect("rows of a standard layout");
        let (rows, cols) = (valid_outputs(oh, h, i, g), valid_outputs(ow, w, j, g));
        if cols.is_empty() {
            // This kernel column reads only padding (its first source would lie outside).
            continue;
        }
        for ni in 0..n {
            let plane = &mut xs[(ni * c + ci) * h * w..][..h * w];
            for r in rows.clone() {
                let target = &mut plane[(r * g.stride + i - g.pad) * w..][..w];
                let source = &row[(ni * oh + r) * ow..][..ow];
                add_strided(
                    &mut target[cols.start * g.stride + j - g.pad..],
                    &source[cols.clone()],
                    g.stride,
                );
            }
        }
    }
}

/// `target[k] = source[k·stride]`; with stride 1 a plain copy loop, which
/// vectorises (these runs are an output row long, too short for `memcpy`).
#[inline]
fn copy_strided<F: Float>(target: &mut [F], source: &[F], stride: usize) {
    if stride == 1 {
        for (t, &v) in target.iter_mut().zip(source) {
            *t = v;
        }
    } else {
        for (t, &v) in target.iter_mut().zip(source.iter().step_by(stride)) {
            *t = v;
        }
    }
}

/// `target[k·stride] += source[k]`, the adjoint of [`copy_strided`].
#[inline]
fn add_strided<F: Float>(target: &mut [F], source: &[F], stride: usize) {
    if stride == 1 {
        for (t, &v) in target.iter_mut().zip(source) {
            *t = *t + v;
        }
    } else {
        for (t, &v) in target.iter_mut().step_by(stride).zip(source) {
            *t = *t + v;
        }
    }
}

/// `W` (FN, C, FH, FW) as the (FN, C·FH·FW) matrix `W2`.
fn flat<F: Float>(w: ArrayView4<'_, F>) -> ArrayView2<'_, F> {
    let (fn_, c, fh, fw) = w.dim();
    w.into_shape_with_order((fn_, c * fh * fw))
        .expect("W is in standard layout (validated)")
}

/// Images per block: as many as keep a block's `colᵀ` within about 256 KiB,
/// so it is built, multiplied and (in Backward) added back while it is in
/// the core's cache, instead of a batch-sized array in memory.
fn block_images<F>(
    x: (usize, usize, usize, usize),
    kernel: (usize, usize),
    out: (usize, usize),
) -> usize {
    let column_bytes = x.1 * kernel.0 * kernel.1 * std::mem::size_of::<F>();
    let image_bytes = column_bytes * out.0 * out.1;
    ((256 << 10) / image_bytes.max(1)).clamp(1, x.0.max(1))
}

/// `y` (N, FN, OH, OW) for `x` (N, C, H, W), block by block of images: for
/// each image, `y[n]` as (FN, OH·OW) is `b` plus `W2 · colᵀ[n]`, computed
/// in place.
pub fn forward<F: Float>(
    x: ArrayView4<'_, F>,
    w: ArrayView4<'_, F>,
    b: ArrayView1<'_, F>,
    g: Geometry,
) -> Array4<F> {
    let (n, _, h, wd) = x.dim();
    let (fn_, c, fh, fw) = w.dim();
    let (oh, ow) = g
        .output_size((h, wd), (fh, fw))
        .expect("validated: the kernel fits");
    let per_block = block_images::<F>(x.dim(), (fh, fw), (oh, ow));
    let mut y = Array4::zeros((n, fn_, oh, ow));
    let mut col_buffer = Array2::zeros((c * fh * fw, per_block * oh * ow));
    for (x_block, mut y_block) in x
        .axis_chunks_iter(Axis(0), per_block)
        .zip(y.axis_chunks_iter_mut(Axis(0), per_block))
    {
        let mut col_t = col_buffer.slice_mut(ndarray::s![.., ..x_block.dim().0 * oh * ow]);
        im2col_t_into(x_block, (fh, fw), g, col_t.view_mut());
        for (image, y_image) in y_block.outer_iter_mut().enumerate() {
            let mut y2 = y_image
                .into_shape_with_order((fn_, oh * ow))
                .expect("standard layout");
            for (mut row, &bias) in y2.outer_iter_mut().zip(b) {
                row.fill(bias);
            }
            let columns = col_t.slice(ndarray::s![.., image * oh * ow..(image + 1) * oh * ow]);
            matmul_into(flat(w), columns, y2, true);
        }
    }
    y
}

/// What one Backward computes: `dx` (when asked for), `dW` and `db`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<F> {
    pub dx: Option<Array4<F>>,
    pub dw: Array4<F>,
    pub db: Array1<F>,
}

/// The gradients for `dout` (N, FN, OH, OW), from the kept `x`, block by
/// block of images: with `d = dout[n]` as (FN, OH·OW), `db += Σ_columns d`,
/// `dW2 += d · colᵀ[n]ᵀ`, and `dx[n] = col2im(W2ᵀ · d)`.
pub fn backward<F: Float>(
    x: ArrayView4<'_, F>,
    w: ArrayView4<'_, F>,
    dout: ArrayView4<'_, F>,
    g: Geometry,
    want_dx: bool,
) -> Gradients<F> {
    let (fn_, c, fh, fw) = w.dim();
    let (_, _, oh, ow) = dout.dim();
    let dout = dout.as_standard_layout();
    let per_block = block_images::<F>(x.dim(), (fh, fw), (oh, ow));
    let mut dw2 = Array2::zeros((fn_, c * fh * fw));
    let mut db = Array1::zeros(fn_);
    let mut dx = want_dx.then(|| Array4::zeros(x.dim()));
    // One zeroed buffer for every block's colᵀ (see `im2col_t_into`), and one
    // for its gradient, which each product overwrites whole.
    let mut col_buffer = Array2::zeros((c * fh * fw, per_block * oh * ow));
    let mut dcol_buffer = want_dx.then(|| Array2::zeros(col_buffer.dim()));
    for (block, (x_block, dout_block)) in x
        .axis_chunks_iter(Axis(0), per_block)
        .zip(dout.axis_chunks_iter(Axis(0), per_block))
        .enumerate()
    {
        let columns = x_block.dim().0 * oh * ow;
        let mut col_t = col_buffer.slice_mut(ndarray::s![.., ..columns]);
        im2col_t_into(x_block, (fh, fw), g, col_t.view_mut());
        let mut dcol = dcol_buffer
            .as_mut()
            .map(|d| d.slice_mut(ndarray::s![.., ..columns]));
        for (image, d) in dout_block.outer_iter().enumerate() {
            let d = d
                .into_shape_with_order((fn_, oh * ow))
                .expect("standard layout");
            let columns = ndarray::s![.., image * oh * ow..(image + 1) * oh * ow];
            matmul_into(d, col_t.slice(columns).t(), dw2.view_mut(), true);
            // db while d is in cache; ndarray's sum keeps several partial
            // sums, so it vectorises.
            for (db, plane) in db.iter_mut().zip(d.outer_iter()) {
                *db = *db + plane.sum();
            }
            if let Some(dcol) = &mut dcol {
                matmul_into(
                    d.t(),
                    flat(w),
                    dcol.slice_mut(columns).reversed_axes(),
                    false,
                );
            }
        }
        if let (Some(dx), Some(dcol)) = (&mut dx, dcol) {
            let start = block * per_block;
            let target = dx.slice_mut(ndarray::s![start..start + x_block.dim().0, .., .., ..]);
            col2im_t_add(dcol.view(), (fh, fw), g, target);
        }
    }
    Gradients {
        dx,
        dw: dw2
            .into_shape_with_order((fn_, c, fh, fw))
            .expect("FN × C·FH·FW"),
        db,
    }
}

#[cfg(test)]
mod tests;
