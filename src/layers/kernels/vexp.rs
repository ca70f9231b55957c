//! `exp` written so the compiler can vectorise it: no calls and no branches,
//! only arithmetic, selects and integer bit work that SIMD units have.
//!
//! The method is the classic one (Cody–Waite reduction, as in Cephes):
//! `exp(x) = 2^n · exp(r)` with `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`;
//! `exp(r)` comes from Cephes' minimax polynomial (float32, ≈1 ulp) or Padé
//! approximant (float64, ≈1 ulp), and `2^n` is applied as two exact powers
//! of two so that overflow gives `+inf` and results in the subnormal range
//! are rounded once, correctly. NaN in gives NaN out.

// The coefficients are Cephes' published values, digit for digit, even where
// the nearest f32 has fewer.
#![allow(clippy::excessive_precision)]

/// `1.5 · 2^23`: adding it rounds an `f32` of magnitude < 2^22 to an integer.
const ROUND_F32: f32 = 12_582_912.0;
/// `1.5 · 2^52`: the same for `f64`.
const ROUND_F64: f64 = 6_755_399_441_055_744.0;

/// `e^x` for `f32`, within about 1 ulp of the correctly rounded value.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Beyond these, exp is +inf or rounds to 0; clamping keeps n in range.
    let xc = x.clamp(-104.0, 89.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND_F32;
    // n as an integer straight from t's bits: no float-to-int conversion,
    // which would not vectorise.
    let n_int = t.to_bits() as i32 - ROUND_F32.to_bits() as i32;
    let n = t - ROUND_F32;
    // ln 2 split in two so n · LN2_HI is exact.
    let r = xc - n * 0.693_359_375 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    let half = n_int >> 1;
    let scale_a = f32::from_bits(((half + 127) as u32) << 23);
    let scale_b = f32::from_bits(((n_int - half + 127) as u32) << 23);
    let y = e_r * scale_a * scale_b;
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `e^x` for `f64`, within about 1 ulp of the correctly rounded value.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let xc = x.clamp(-746.0, 710.0);
    let t = xc * std::f64::consts::LOG2_E + ROUND_F64;
    let n_int = t.to_bits() as i64 - ROUND_F64.to_bits() as i64;
    let n = t - ROUND_F64;
    let r = xc - n * 6.931_457_519_531_25e-1 - n * 1.428_606_820_309_417_2e-6;
    let rr = r * r;
    let px = r
        * ((1.261_771_930_748_105_9e-4 * rr + 3.029_944_077_074_419_6e-2) * rr
            + 9.999_999_999_999_999e-1);
    let qx = ((3.001_985_051_386_644_5e-6 * rr + 2.524_483_403_496_841e-3) * rr
        + 2.272_655_482_081_550_3e-1)
        * rr
        + 2.0;
    let e_r = 1.0 + 2.0 * (px / (qx - px));
    let half = n_int >> 1;
    let scale_a = f64::from_bits(((half + 1023) as u64) << 52);
    let scale_b = f64::from_bits(((n_int - half + 1023) as u64) << 52);
    let y = e_r * scale_a * scale_b;
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite values of one sign.
    fn ulps32(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn f32_is_within_2_ulp_of_libm_everywhere_it_is_finite() {
        // Every 97th float32 bit pattern from -104 to 89: about 20 million values.
        let mut worst = (0, 0.0f32);
        let (lo, hi) = ((-104.0f32).to_bits(), 89.0f32.to_bits());
        let negatives = (0x8000_0000u32..=lo).step_by(97);
        let positives = (0u32..=hi).step_by(97);
        for bits in negatives.chain(positives) {
            let x = f32::from_bits(bits);
            let (ours, libm) = (exp_f32(x), x.exp());
            if libm == 0.0 || libm.is_infinite() {
                assert_eq!(ours, libm, "x = {x}");
                continue;
            }
            let d = ulps32(ours, libm);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn f64_is_within_2_ulp_of_libm() {
        let mut worst = (0, 0.0f64);
        let mut x = -746.0f64;
        while x < 710.0 {
            let (ours, libm) = (exp_f64(x), x.exp());
            if libm == 0.0 || libm.is_infinite() {
                assert_eq!(ours, libm, "x = {x}");
            } else {
                let d = ours.to_bits().abs_diff(libm.to_bits());
                if d > worst.0 {
                    worst = (d, x);
                }
            }
            x += 0.000_731_3;
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY).to_bits(), 0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(88.8), f32::INFINITY);
        assert_eq!(exp_f32(-104.0), 0.0);
        // Subnormal results: exp(-100) ≈ 3.72e-44, a few subnormal steps.
        assert_eq!(exp_f32(-100.0), (-100.0f32).exp());
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp_f64(f64::NEG_INFINITY).to_bits(), 0);
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(710.0), f64::INFINITY);
        assert_eq!(exp_f64(-745.0), (-745.0f64).exp());
        assert_eq!(exp_f64(1.0), std::f64::consts::E);
    }
}
