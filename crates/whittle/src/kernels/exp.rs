//! A vectorisable `exp`: the standard library's scalar `expf` costs ~20 cycles, and a 2048-token
//! forward pass evaluates ~0.6 billion exponentials in attention softmax and SiLU. Cephes-style
//! range reduction `x = n·ln2 + r`, a degree-6 polynomial for `e^r`, and `2^n` built from exponent
//! bits; relative error ≈ 2 ulp over the whole range (tested below).

use super::simd::madd;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds an f32 to the nearest integer without SSE4.1.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` for finite `x`; inputs below −87.3 return the smallest normal value's neighbourhood
/// (≈1e-38) rather than 0, which is harmless where it is used (softmax after max subtraction).
///
/// Written with fused multiply-adds where the level has them (`FMA`, from `simd_dispatch!`:
/// half the vector operations of separate ones; the softmax of prefill 2048 evaluates ~0.6
/// billion of these) and with separate ones where it has not (a `mul_add` in code built for
/// baseline x86-64 is a call to libm's `fmaf`).
#[inline(always)]
pub fn exp_approx<const FMA: bool>(x: f32) -> f32 {
    let fma = madd::<FMA>;
    let x = x.clamp(-87.3, 88.7);
    let n = fma(x, LOG2E, ROUND_MAGIC) - ROUND_MAGIC;
    let r = fma(n, -LN2_LO, fma(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = fma(p, r, 1.398_199_9e-3);
    p = fma(p, r, 8.333_452e-3);
    p = fma(p, r, 4.166_579_6e-2);
    p = fma(p, r, 1.666_666_5e-1);
    p = fma(p, r, 0.5);
    let e = fma(p, r * r, r) + 1.0;
    // SAFETY: `x` is clamped above, so `n` is an integer in [-126, 128]: the unchecked conversion
    // is exact, and unlike the saturating `as` it vectorises to one instruction.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    e * f32::from_bits(((n + 127) << 23) as u32)
}

/// `ln x` for positive `x` (below the smallest normal f32 it returns ln of that, −87.3: the
/// callers take logs of probabilities, where that is harmless). `x = 2^e·m` with `m ∈ [√½, √2)`
/// read off the bits, then `ln m = 2 atanh(s)`, `s = (m − 1)/(m + 1)`, `|s| ≤ 0.172`, by its
/// series to `s⁹` (truncation < 1e-9); vectorises like [`exp_approx`], where `f32::ln` is a libm
/// call per element.
#[inline(always)]
pub fn ln_approx<const FMA: bool>(x: f32) -> f32 {
    let fma = madd::<FMA>;
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    /// The bits of √½: subtracting them makes the exponent field count from m ∈ [√½, √2).
    const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
    let e = (bits.wrapping_sub(SQRT_HALF_BITS) as i32) >> 23;
    let m = f32::from_bits(bits.wrapping_sub((e << 23) as u32));
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 9.0f32;
    p = fma(p, s2, 1.0 / 7.0);
    p = fma(p, s2, 1.0 / 5.0);
    p = fma(p, s2, 1.0 / 3.0);
    let ln_m = fma(2.0 * s * s2, p, 2.0 * s);
    let e = e as f32;
    fma(e, LN2_HI, fma(e, LN2_LO, ln_m))
}

simd_dispatch! {
    /// `out_i = ln(a·x_i + b·y_i)`: the log of a mixture of two distributions.
    pub fn ln_mix(x: &[f32], a: f32, y: &[f32], b: f32, out: &mut [f32]) {
        for ((o, p), q) in out.iter_mut().zip(x).zip(y) {
            *o = ln_approx::<FMA>(madd::<FMA>(a, *p, b * q));
        }
    }
}

/// Lanes of the independent accumulators below: float adds and maxes are not associative, so
/// the compiler vectorises a reduction only if it is written as this many separate partial ones.
const LANES: usize = 16;

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    for a in acc {
        max = max.max(a);
    }
    max
}

/// `row_i = e^{scale·(row_i − max)}`, returning their sum.
#[inline(always)]
fn exp_sum<const FMA: bool>(row: &mut [f32], scale: f32, max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_approx::<FMA>(scale * (c[i] - max));
            acc[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx::<FMA>(scale * (*v - max));
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

simd_dispatch! {
    /// `row = softmax(scale · row)` in place, max-subtracted (`scale > 0`). Attention folds its
    /// `1/√d` into `scale` so the scores are read once.
    pub fn softmax_in_place(row: &mut [f32], scale: f32) {
        let max = max_of(row);
        let inv = 1.0 / exp_sum::<FMA>(row, scale, max);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

simd_dispatch! {
    /// `row = e^{scale·(row − max)}` in place, returning the sum and `max`: softmax without its
    /// division, for a caller that divides a narrower result instead (attention's output rows)
    /// or merges it with the softmax of other keys (a decode step split by keys).
    pub fn exp_shifted(row: &mut [f32], scale: f32) -> (f32, f32) {
        let max = max_of(row);
        (exp_sum::<FMA>(row, scale, max), max)
    }
}

simd_dispatch! {
    /// `out_i = e^{row_i − shift} · scale`: with `shift` the row's log-sum-exp, a softmax row
    /// times a gradient.
    pub fn exp_shift_scale(row: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(row) {
            *o = exp_approx::<FMA>(v - shift) * scale;
        }
    }
}

simd_dispatch! {
    /// `out_i = −e^{x_i}`: a Mamba layer's `A = −exp(A_log)` (51 k values a layer for
    /// Hymba-1.5B, every forward pass).
    pub fn neg_exp(x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = -exp_approx::<FMA>(*v);
        }
    }
}

simd_dispatch! {
    /// `ln Σ e^{x_i}` of one row (max-subtracted, so no overflow). Only reads `row`.
    pub fn logsumexp(row: &[f32]) -> f32 {
        let max = max_of(row);
        let mut acc = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|v| exp_approx::<FMA>(*v - max)).sum();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp_approx::<FMA>(c[i] - max);
            }
        }
        max + (acc.iter().sum::<f32>() + tail).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::simd::for_each_level;

    #[test]
    fn ln_is_accurate_from_the_smallest_normal_up() {
        for (name, ln) in [
            ("fma", ln_approx::<true> as fn(f32) -> f32),
            ("separate", ln_approx::<false>),
        ] {
            let mut worst = 0f64;
            let mut x = f32::MIN_POSITIVE;
            while x < 1e38 {
                let want = (x as f64).ln();
                worst = worst.max((ln(x) as f64 - want).abs() / want.abs().max(1.0));
                x *= 1.0013;
            }
            assert!(worst < 3e-7, "{name}: worst error {worst}");
            assert_eq!(ln(1.0), 0.0);
            assert_eq!(ln(0.0), ln(f32::MIN_POSITIVE));
        }
        for_each_level(|level| {
            let x: Vec<f32> = (1..200).map(|i| i as f32 / 200.0).collect();
            let y: Vec<f32> = x.iter().rev().copied().collect();
            let mut out = vec![0.0; x.len()];
            ln_mix(&x, 0.3, &y, 0.7, &mut out);
            for ((o, p), q) in out.iter().zip(&x).zip(&y) {
                let want = (0.3 * *p as f64 + 0.7 * *q as f64).ln();
                assert!((*o as f64 - want).abs() < 1e-6, "{level}: {o} vs {want}");
            }
        });
    }

    #[test]
    fn exp_relative_error_is_a_few_ulp_with_and_without_fma() {
        for (name, exp) in [
            ("fma", exp_approx::<true> as fn(f32) -> f32),
            ("separate", exp_approx::<false>),
        ] {
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let want = (x as f64).exp();
                let rel = ((exp(x) as f64 - want) / want).abs();
                worst = worst.max(rel);
                x += 0.0137;
            }
            assert!(worst < 3e-7, "{name}: worst relative error {worst}");
            assert_eq!(exp(0.0), 1.0);
        }
    }

    #[test]
    fn logsumexp_matches_f64_at_every_level() {
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 13 % 101) as f32 - 50.0) * 0.4)
            .collect();
        let m = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let want = m + x.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
        for_each_level(|l| assert!((logsumexp(&x) as f64 - want).abs() < 1e-5, "{l}"));
    }

    #[test]
    fn softmax_matches_f64_at_every_level() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7 % 11) as f32 - 5.0) * 1.3).collect();
        let m = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = x.iter().map(|v| ((*v as f64 - m) * 0.7).exp()).sum();
        for_each_level(|l| {
            let mut y = x.clone();
            softmax_in_place(&mut y, 0.7);
            for (a, b) in y.iter().zip(&x) {
                let want = ((*b as f64 - m) * 0.7).exp() / z;
                assert!((*a as f64 - want).abs() < 1e-7, "{l}");
            }
        });
    }
}
