//! IEEE half-precision storage for the decode cache: f32 rows narrowed to f16 bits (round to
//! nearest, ties to even) when stored, widened back to f32 when read.
//!
//! Why: the cache grows with the context (SmolLM2: 45 KiB per token in f32, 360 MiB at 8k
//! tokens); in f16, as llama.cpp keeps it by default, it is half, and so are the bytes a decode
//! step reads from it (decode speed itself did not move on a 2-thread Zen 2 at 128 or 1024
//! keys: there, attention is bound by its arithmetic as much as by memory). The x86 vector
//! levels convert with F16C (`vcvtph2ps`/`vcvtps2ph`, eight values per instruction, on every
//! AVX2 CPU); the portable path is bit arithmetic that auto-vectorises, with no libm call.
//! Both are exact conversions, so every level gives the same bits (tested over all 65,536
//! halves against the `half` crate).

use super::simd::Level;

/// `2^112`: scales an f16's exponent/mantissa bits placed in an f32 (bias 127) to the f16's
/// value (bias 15), subnormals included.
const REBIAS: f32 = f32::from_bits(0x7780_0000);
/// Smallest f32 magnitude that rounds to f16 infinity (65520, halfway above 65504).
const OVERFLOW: u32 = 0x477f_f000;
/// `2^-14`, the smallest normal f16: below it, the result is subnormal.
const MIN_NORMAL: u32 = 0x3880_0000;
/// 1.5·2²³: adding and subtracting it rounds a small f32 to an integer, ties to even.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// One f16 (as bits) to f32.
#[inline(always)]
fn widen1(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let mag = if em >= 0x7c00 {
        f32::from_bits((em << 13) | 0x7f80_0000) // infinity, NaN (payload kept)
    } else {
        f32::from_bits(em << 13) * REBIAS
    };
    f32::from_bits(mag.to_bits() | ((h & 0x8000) << 16))
}

/// One f32 to f16 bits, rounded to nearest, ties to even.
#[inline(always)]
fn narrow1(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    let mag = if a > 0x7f80_0000 {
        0x7e00 | ((a >> 13) & 0x3ff) as u16 // NaN stays NaN (quiet)
    } else if a >= OVERFLOW {
        0x7c00
    } else if a < MIN_NORMAL {
        // Multiples of 2^-24: the scaled value is exact, then rounded to an integer.
        let v = f32::from_bits(a) * 16_777_216.0;
        ((v + ROUND_MAGIC) - ROUND_MAGIC) as u16
    } else {
        // Drop 13 mantissa bits, ties to even; a carry moves into the exponent as it should.
        let r = a + 0xfff + ((a >> 13) & 1);
        ((r - 0x3800_0000) >> 13) as u16
    };
    sign | mag
}

/// `dst[i] = src[i]` widened, at `level`.
pub fn widen_at(level: Level, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    widen_rows_at(level, src, src.len(), src.len(), dst)
}

/// Rows `width` wide, `stride` apart in `src`, widened into consecutive rows of `dst`
/// (`dst.len() / width` rows): one decode task's keys of one KV head, out of rows that hold
/// every head.
pub fn widen_rows_at(level: Level, src: &[u16], stride: usize, width: usize, dst: &mut [f32]) {
    if width == 0 || dst.is_empty() {
        return;
    }
    let rows = dst.len() / width;
    assert!(dst.len() == rows * width && width <= stride);
    assert!(src.len() >= (rows - 1) * stride + width);
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && std::arch::is_x86_feature_detected!("f16c") {
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            // SAFETY: F16C checked just above, AVX at every level from avx2 up.
            unsafe { x86::widen(&src[r * stride..r * stride + width], d) };
        }
        return;
    }
    let _ = level;
    for (r, d) in dst.chunks_exact_mut(width).enumerate() {
        for (d, s) in d.iter_mut().zip(&src[r * stride..r * stride + width]) {
            *d = widen1(*s);
        }
    }
}

/// `dst[i] = src[i]` narrowed to f16 bits, at `level`.
pub fn narrow_at(level: Level, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: as in `widen_at`.
        return unsafe { x86::narrow(src, dst) };
    }
    let _ = level;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = narrow1(*s);
    }
}

/// [`narrow_at`] at the thread's level.
pub fn narrow(src: &[f32], dst: &mut [u16]) {
    narrow_at(super::simd::level(), src, dst)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        for i in n8..src.len() {
            dst[i] = super::widen1(src[i]);
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let x = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        for i in n8..src.len() {
            dst[i] = super::narrow1(src[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern widens to the `half` crate's value at every level (NaNs to NaNs).
    #[test]
    fn every_half_widens_exactly_at_every_level() {
        // 65,539 values: not a multiple of 8, so the vector paths' tails run too.
        let src: Vec<u16> = (0..=u16::MAX).chain([1, 0x8001, 0x3c00]).collect();
        for level in Level::supported() {
            let mut got = vec![0f32; src.len()];
            widen_at(level, &src, &mut got);
            for (h, g) in src.iter().zip(&got) {
                let want = half::f16::from_bits(*h).to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{h:#06x} at {level}: {g} vs {want}"
                );
            }
        }
    }

    /// Strided rows land in consecutive rows, at every level.
    #[test]
    fn strided_rows_widen_into_consecutive_rows() {
        let (rows, stride, width) = (5, 29, 19);
        let src: Vec<u16> = (0..rows * stride).map(|i| 0x3c00 + i as u16).collect();
        for level in Level::supported() {
            let mut got = vec![0f32; rows * width];
            widen_rows_at(
                level,
                &src[..(rows - 1) * stride + width],
                stride,
                width,
                &mut got,
            );
            for r in 0..rows {
                for c in 0..width {
                    let want = half::f16::from_bits(src[r * stride + c]).to_f32();
                    assert_eq!(got[r * width + c], want, "{r} {c} at {level}");
                }
            }
        }
    }

    /// Narrowing rounds to nearest, ties to even, like `half`: on every f16 value, the
    /// midpoints between neighbours and just off them, overflow, subnormals and specials.
    #[test]
    fn narrowing_rounds_like_half_at_every_level() {
        let mut src = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
        ];
        src.extend([
            65504.0,
            65519.99,
            65520.0,
            70000.0,
            1e10,
            f32::MAX,
            f32::MIN_POSITIVE,
        ]);
        for h in 0..0x7bffu16 {
            let (a, b) = (widen1(h), widen1(h + 1));
            let mid = (a as f64 + b as f64) / 2.0;
            let mid32 = mid as f32;
            for v in [
                a,
                mid32,
                f32::from_bits(mid32.to_bits() + 1),
                f32::from_bits(mid32.to_bits().saturating_sub(1)),
            ] {
                src.extend([v, -v]);
            }
        }
        for level in Level::supported() {
            let mut got = vec![0u16; src.len()];
            narrow_at(level, &src, &mut got);
            for (x, g) in src.iter().zip(&got) {
                let want = half::f16::from_f32(*x);
                let g16 = half::f16::from_bits(*g);
                assert!(
                    *g == want.to_bits() || (g16.is_nan() && want.is_nan()),
                    "{x:e} ({:#010x}) at {level}: {g:#06x} vs {:#06x}",
                    x.to_bits(),
                    want.to_bits()
                );
            }
        }
    }
}
