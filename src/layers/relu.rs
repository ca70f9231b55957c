//! ReLU: `y = x` where `x > 0`, else `+0.0`; `dx = dout` where `x > 0`, else `+0.0`.
//!
//! Shapes: `x`, `y`, `dout` and `dx` all share one shape, any rank.
//!
//! Kept for Backward: the mask `x <= 0` as a bitset, one bit per element
//! (1/32 of a float32 tensor). The mask follows numpy's `x <= 0` exactly: a NaN
//! compares false, so NaN passes through Forward and its gradient passes
//! through Backward; `-0.0 <= 0` is true, so `-0.0` becomes `+0.0`.
//! (`max(x, 0.0)` would turn NaN into 0 and differ from numpy.)
//!
//! Half types (float16, bfloat16 on the wire) are not widened: ReLU only
//! passes a value or replaces it by `+0.0`, so it is exact in any float type,
//! and masking their 16-bit elements directly gives the bits of widening to
//! float32, ReLU and rounding back ([`Relu::keep_halves`],
//! [`Relu::backward_halves`]). The mask is the same either way.

use std::mem::MaybeUninit;

use ndarray::{ArcArray, ArrayD, ArrayViewD, IxDyn};

use super::layer::Halved;
use super::{Backwarded, Float, Forwarded, Inputs, Layer, Part, Parts, Plan};
use crate::dtype::Wire;

/// The ReLU kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Relu;

/// Bit `i` is set where element `i` (row-major) of the Forward input was `<= 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    words: Vec<u64>,
    len: usize,
}

impl Mask {
    /// Bytes a mask over `len` elements occupies.
    pub const fn bytes_for(len: usize) -> usize {
        len.div_ceil(64) * std::mem::size_of::<u64>()
    }

    /// Whether element `i` was masked (`x <= 0`).
    pub fn is_masked(&self, i: usize) -> bool {
        assert!(i < self.len, "mask index {i} out of range {}", self.len);
        self.words[i / 64] >> (i % 64) & 1 == 1
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.words.len() * std::mem::size_of::<u64>()
    }
}

/// An element ReLU masks: a float, or the 16-bit pattern of a half type.
/// `+0.0` is all zero bits in each.
trait Maskable: Copy + bytemuck::Zeroable {
    /// Numpy's `x <= 0`: false for NaN, true for `-0.0`.
    fn masked(self) -> bool;
}

impl<F: Float> Maskable for F {
    fn masked(self) -> bool {
        self <= F::zero()
    }
}

/// The 16-bit pattern of a half type whose +infinity is `INF` (a larger
/// magnitude is a NaN).
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(transparent)]
struct HalfBits<const INF: u16>(u16);

impl<const INF: u16> Maskable for HalfBits<INF> {
    fn masked(self) -> bool {
        // +0, or the sign set on anything but a NaN.
        self.0 == 0 || (self.0 & 0x8000 != 0 && self.0 & 0x7fff <= INF)
    }
}

/// float16's and bfloat16's +infinity.
const F16_INF: u16 = 0x7c00;
const BF16_INF: u16 = 0x7f80;

impl Relu {
    /// `y` and the mask, for a keeping Forward.
    pub fn keep<F: Float>(x: ArrayViewD<'_, F>) -> (ArcArray<F, IxDyn>, Mask) {
        let x = x.as_standard_layout();
        let (y, mask) = keep_slice(x.as_slice().expect("standard layout is contiguous"));
        (into_shape(x.raw_dim(), y).into_shared(), mask)
    }

    /// `y` and the mask from the 16-bit elements of half type `wire`.
    pub fn keep_halves(xs: &[u16], wire: Wire) -> (Vec<u16>, Mask) {
        match wire {
            Wire::F16 => halves(keep_slice::<HalfBits<F16_INF>>(bytemuck::cast_slice(xs))),
            Wire::BF16 => halves(keep_slice::<HalfBits<BF16_INF>>(bytemuck::cast_slice(xs))),
            Wire::F32 | Wire::F64 => unreachable!("{wire:?} is not a half type"),
        }
    }

    /// `y` alone, for `no_grad`.
    pub fn no_grad<F: Float>(x: ArrayViewD<'_, F>) -> ArrayD<F> {
        x.mapv(Relu::one)
    }

    /// `y` of one element, as every Forward computes it.
    #[inline]
    pub fn one<F: Float>(x: F) -> F {
        relu(x)
    }

    /// `y` of the 16-bit elements of half type `wire` into `ys` (as long),
    /// masked as they are (the bits of [`Relu::keep_halves`]'s `y`).
    pub fn no_grad_halves(wire: Wire, xs: &[u16], ys: &mut [u16]) {
        use bytemuck::{cast_slice as view, cast_slice_mut as view_mut};
        match wire {
            Wire::F16 => no_grad_kernel::<HalfBits<F16_INF>>(view(xs), view_mut(ys)),
            Wire::BF16 => no_grad_kernel::<HalfBits<BF16_INF>>(view(xs), view_mut(ys)),
            Wire::F32 | Wire::F64 => unreachable!("{wire:?} is not a half type"),
        }
    }

    /// `dx` from the kept mask.
    pub fn backward_with<F: Float>(mask: &Mask, dout: ArrayViewD<'_, F>) -> ArrayD<F> {
        let dout = dout.as_standard_layout();
        let dx = backward_slice(
            mask,
            dout.as_slice().expect("standard layout is contiguous"),
        );
        into_shape(dout.raw_dim(), dx)
    }

    /// `dx` from the kept mask and the 16-bit elements of a half `dout`.
    pub fn backward_halves(mask: &Mask, ds: &[u16]) -> Vec<u16> {
        backward_slice(mask, ds)
    }
}

/// y and the mask of `xs`.
fn keep_slice<T: Maskable>(xs: &[T]) -> (Vec<T>, Mask) {
    let mut y = Vec::with_capacity(xs.len());
    let mut words = vec![0u64; xs.len().div_ceil(64)];
    forward_kernel(xs, &mut y.spare_capacity_mut()[..xs.len()], &mut words);
    // SAFETY: the kernel wrote every one of the first xs.len() elements.
    unsafe { y.set_len(xs.len()) };
    let mask = Mask {
        words,
        len: xs.len(),
    };
    (y, mask)
}

fn halves<const INF: u16>((y, mask): (Vec<HalfBits<INF>>, Mask)) -> (Vec<u16>, Mask) {
    (bytemuck::allocation::cast_vec(y), mask)
}

/// dx of `ds` under `mask`.
fn backward_slice<T: Copy + bytemuck::Zeroable>(mask: &Mask, ds: &[T]) -> Vec<T> {
    assert_eq!(ds.len(), mask.len, "dout length differs from the kept mask");
    let mut dx = Vec::with_capacity(ds.len());
    backward_kernel(ds, &mask.words, &mut dx.spare_capacity_mut()[..ds.len()]);
    // SAFETY: the kernel wrote every one of the first ds.len() elements.
    unsafe { dx.set_len(ds.len()) };
    dx
}

impl Layer for Relu {
    const NAME: &'static str = "relu";
    const DESCRIPTION: &'static str =
        "ReLU: y = x where x > 0, else +0; dx = dout where x > 0, else +0. Keeps the mask x <= 0 as a bitset.";
    type Kept<F: Float> = Mask;

    fn unconfigured() -> Option<Relu> {
        Some(Relu)
    }

    fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>, String> {
        Ok(x.to_vec())
    }

    fn kept_bytes(&self, plan: Plan<'_>) -> usize {
        Mask::bytes_for(plan.x.iter().product())
    }

    fn save_kept<F: Float>(&self, mask: &Mask) -> Vec<Part<F>> {
        vec![Part::Bits(mask.words.clone())]
    }

    fn load_kept<F: Float>(&self, plan: Plan<'_>, parts: &mut Parts<F>) -> Result<Mask, String> {
        let len = plan.x.iter().product();
        let words = parts.bits("mask", len)?;
        Ok(Mask { words, len })
    }

    fn forward<F: Float>(&self, inputs: Inputs<'_, F>) -> Forwarded<F, Mask> {
        if inputs.keep {
            let (y, mask) = Relu::keep(inputs.x);
            Forwarded::new(y, Some(mask))
        } else {
            Forwarded::new(Relu::no_grad(inputs.x).into_shared(), None)
        }
    }

    fn backward<F: Float>(
        &self,
        _values: &[ArrayViewD<'_, F>],
        mask: &Mask,
        dout: ArrayViewD<'_, F>,
    ) -> Backwarded<F> {
        Backwarded {
            dx: Relu::backward_with(mask, dout),
            grads: Vec::new(),
        }
    }

    fn forward_halves(&self, wire: Wire, xs: &[u16], keep: bool) -> Option<Halved<Mask>> {
        let (y, mask) = Relu::keep_halves(xs, wire);
        Some((y, keep.then_some(mask)))
    }

    fn backward_halves<F: Float>(&self, kept: &Mask, ds: &[u16]) -> Option<Vec<u16>> {
        Some(Relu::backward_halves(kept, ds))
    }
}

/// `y` and the mask bits, 64 elements per word. Two plain passes per word
/// (select, then compare-and-pack) so each vectorises; compiled for several
/// SIMD levels and picked at run time. `y` (as long as `xs`) is written
/// whole, so it need not be zeroed first (that memset took as long as the
/// kernel on large tensors).
#[multiversion::multiversion(targets = "simd")]
fn forward_kernel<T: Maskable>(xs: &[T], y: &mut [MaybeUninit<T>], words: &mut [u64]) {
    assert_eq!(xs.len(), y.len());
    for ((x64, y64), word) in xs.chunks(64).zip(y.chunks_mut(64)).zip(words) {
        for (yi, &xi) in y64.iter_mut().zip(x64) {
            yi.write(relu(xi));
        }
        *word = x64
            .iter()
            .enumerate()
            .fold(0u64, |bits, (i, &xi)| bits | (xi.masked() as u64) << i);
    }
}

/// One element's answer: `+0.0` (all zero bits) where masked, else itself.
#[inline(always)]
fn relu<T: Maskable>(x: T) -> T {
    if x.masked() {
        T::zeroed()
    } else {
        x
    }
}

/// `y` alone, as [`forward_kernel`] writes it.
#[multiversion::multiversion(targets = "simd")]
fn no_grad_kernel<T: Maskable>(xs: &[T], ys: &mut [T]) {
    assert_eq!(xs.len(), ys.len());
    for (yi, &xi) in ys.iter_mut().zip(xs) {
        *yi = relu(xi);
    }
}

/// `dx = dout` where the mask bit is clear, else `+0.0`; writes all of `dx`
/// (as long as `ds`).
#[multiversion::multiversion(targets = "simd")]
fn backward_kernel<T: Copy + bytemuck::Zeroable>(
    ds: &[T],
    words: &[u64],
    dx: &mut [MaybeUninit<T>],
) {
    assert_eq!(ds.len(), dx.len());
    for ((d64, dx64), &bits) in ds.chunks(64).zip(dx.chunks_mut(64)).zip(words) {
        for (i, (dxi, &di)) in dx64.iter_mut().zip(d64).enumerate() {
            dxi.write(if bits >> i & 1 == 1 { T::zeroed() } else { di });
        }
    }
}

fn into_shape<F>(dim: IxDyn, data: Vec<F>) -> ArrayD<F> {
    ArrayD::from_shape_vec(dim, data).expect("data has exactly one element per index")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, ArrayD, IxDyn};

    fn bits<F: Float>(a: &ArrayD<F>) -> Vec<u64> {
        a.iter().map(|v| v.to_bits_u64()).collect()
    }

    /// Every 16-bit pattern of each half type, against widening to float32,
    /// ReLU and rounding back (which is what the half path stands for): the
    /// same bits, except that a NaN passes with its payload untouched (a
    /// float32 round trip may set its quiet bit), and the same mask.
    #[test]
    fn relu_on_half_elements_is_relu_in_float32_rounded_back_for_every_value() {
        use half::{bf16, f16};
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let f16s = |b: &u16| f16::from_bits(*b).to_f32();
        let bf16s = |b: &u16| bf16::from_bits(*b).to_f32();
        for (wire, wide, back) in [
            (
                Wire::F16,
                all.iter().map(f16s).collect::<Vec<f32>>(),
                (|v| f16::from_f32(v).to_bits()) as fn(f32) -> u16,
            ),
            (Wire::BF16, all.iter().map(bf16s).collect(), |v| {
                bf16::from_f32(v).to_bits()
            }),
        ] {
            let (y, mask) = Relu::keep_halves(&all, wire);
            let (want, want_mask) = Relu::keep(ndarray::aview1(&wide).into_dyn());
            assert_eq!(mask, want_mask, "{wire:?}");
            for (i, (&got, &w)) in y.iter().zip(want.iter()).enumerate() {
                if w.is_nan() {
                    assert_eq!(got, all[i], "a NaN passes unchanged");
                } else {
                    assert_eq!(got, back(w), "{wire:?}: {:#06x}", all[i]);
                }
            }
            // Backward: dout where the mask is clear, +0 elsewhere, for every dout pattern.
            let dx = Relu::backward_halves(&mask, &all);
            let want = Relu::backward_with(&mask, ndarray::aview1(&wide).into_dyn());
            for (i, (&got, &w)) in dx.iter().zip(want.iter()).enumerate() {
                assert!(
                    if w.is_nan() {
                        got == all[i]
                    } else {
                        got == back(w)
                    },
                    "{:#06x}",
                    all[i]
                );
            }
        }
    }

    #[test]
    fn forward_passes_positives_and_zeroes_the_rest() {
        let x = arr1(&[1.5f32, -2.0, 0.0, 3.25, -1e-30]).into_dyn();
        let (y, mask) = Relu::keep(x.view());
        assert_eq!(y, arr1(&[1.5f32, 0.0, 0.0, 3.25, 0.0]).into_dyn());
        let masked: Vec<bool> = (0..5).map(|i| mask.is_masked(i)).collect();
        assert_eq!(masked, [false, true, true, false, true]);
    }

    #[test]
    fn special_values_follow_numpy() {
        // numpy: x <= 0 is False for NaN and +inf, True for -inf, -0.0 and +0.0.
        let x = arr1(&[
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            5e-324,
            -5e-324,
        ])
        .into_dyn();
        let (y, mask) = Relu::keep(x.view());
        assert!(y[0].is_nan());
        assert_eq!(y[1], f64::INFINITY);
        // Masked positions are +0.0 exactly, never -0.0.
        for i in [2, 3, 4, 6] {
            assert_eq!(y[i].to_bits(), 0, "y[{i}] must be +0.0");
            assert!(mask.is_masked(i));
        }
        // The smallest positive subnormal passes unchanged.
        assert_eq!(y[5].to_bits(), 1);
        assert!(!mask.is_masked(0) && !mask.is_masked(1) && !mask.is_masked(5));
    }

    #[test]
    fn nan_payload_passes_bit_for_bit() {
        let quiet_nan_with_payload = f32::from_bits(0x7fc0_1234);
        let x = arr1(&[quiet_nan_with_payload]).into_dyn();
        let (y, _) = Relu::keep(x.view());
        assert_eq!(y[0].to_bits(), 0x7fc0_1234);
    }

    #[test]
    fn backward_zeroes_the_kept_positions_of_a_real_gradient() {
        // x = [[2, -1, 0], [NaN, -0.0, 7]] -> mask = [[F, T, T], [F, T, F]]
        let x = arr2(&[[2.0f32, -1.0, 0.0], [f32::NAN, -0.0, 7.0]]).into_dyn();
        let (_, mask) = Relu::keep(x.view());
        let dout = arr2(&[[0.5f32, -3.0, 4.0], [-0.25, 9.0, -0.0]]).into_dyn();
        let dx = Relu::backward_with(&mask, dout.view());
        // dx keeps dout where the mask is clear: 0.5, -0.25 and -0.0 (sign kept).
        let want = arr2(&[[0.5f32, 0.0, 0.0], [-0.25, 0.0, -0.0]]).into_dyn();
        assert_eq!(bits(&dx), bits(&want));
    }

    #[test]
    fn mask_spans_word_boundaries_and_costs_one_bit_per_element() {
        // 130 elements = 3 words; alternate signs so every word has both bits.
        let x: ArrayD<f32> = ArrayD::from_shape_fn(IxDyn(&[2, 65]), |i| {
            let k = i[0] * 65 + i[1];
            if k.is_multiple_of(3) {
                -(k as f32)
            } else {
                k as f32
            }
        });
        let (y, mask) = Relu::keep(x.view());
        assert_eq!(mask.heap_bytes(), 3 * 8);
        assert_eq!(Mask::bytes_for(130), mask.heap_bytes());
        for k in 0..130 {
            // k = 0 is -0.0 <= 0, masked; so is every multiple of 3.
            assert_eq!(mask.is_masked(k), k.is_multiple_of(3), "element {k}");
        }
        let dout = ArrayD::from_elem(IxDyn(&[2, 65]), 2.5f32);
        let dx = Relu::backward_with(&mask, dout.view());
        for (k, (&yk, &dk)) in y.iter().zip(dx.iter()).enumerate() {
            let want = if k.is_multiple_of(3) { 0.0 } else { 2.5 };
            assert_eq!(dk, want, "dx element {k}");
            assert_eq!(yk == 0.0, k.is_multiple_of(3), "y element {k}");
        }
    }

    #[test]
    fn no_grad_forward_equals_keeping_forward() {
        let x = arr1(&[f64::NAN, -0.0, 3.0, -7.0, 88.8, -710.0]).into_dyn();
        assert_eq!(
            bits(&Relu::no_grad(x.view())),
            bits(&Relu::keep(x.view()).0.to_owned())
        );
    }

    #[test]
    fn scalars_and_empty_tensors() {
        let scalar = ArrayD::from_elem(IxDyn(&[]), -4.0f64);
        let (y, mask) = Relu::keep(scalar.view());
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y[IxDyn(&[])].to_bits(), 0);
        assert!(mask.is_masked(0));

        let empty = ArrayD::<f32>::zeros(IxDyn(&[3, 0, 2]));
        let (y, mask) = Relu::keep(empty.view());
        assert_eq!(y.shape(), &[3, 0, 2]);
        assert_eq!(mask.heap_bytes(), 0);
        assert_eq!(Relu::backward_with(&mask, empty.view()).shape(), &[3, 0, 2]);
    }
}
