//! Dot products against group-quantized rows, dequantizing on the fly: `w = fma(scale, q, min)`
//! with unsigned `q`, in blocks of 32. This formula reproduces GGUF's Q4_0, Q4_1 and Q8_0
//! dequantization bit for bit (the products are exact in f32 and both round once), so a model
//! kept in its file's blocks computes with exactly the weights of its f32 expansion while
//! reading 5–8.5 bits per weight instead of 32: decode is memory-bound, so that is its speed.
//!
//! Block layouts (32 weights): 4-bit — 16 bytes, byte `j` holds `q[j]` in the low nibble and
//! `q[j+16]` in the high one (GGML's); 8-bit — 32 bytes, one `q` each.

pub const BLOCK: usize = 32;

/// Bytes of one 32-weight block at `bits` per weight.
pub const fn block_bytes(bits: u8) -> usize {
    BLOCK * bits as usize / 8
}

/// A quantized row: packed blocks plus one (scale, min) per `group` weights.
#[derive(Clone, Copy)]
pub struct QRow<'a> {
    pub bits: u8,
    pub group: usize,
    pub data: &'a [u8],
    pub scales: &'a [f32],
    pub mins: &'a [f32],
}

/// Dequantizes one block (32 weights) into `out`.
#[inline(always)]
fn dequant_block(bits: u8, bytes: &[u8], scale: f32, min: f32, out: &mut [f32; BLOCK]) {
    if bits == 4 {
        for j in 0..16 {
            out[j] = scale.mul_add((bytes[j] & 0x0f) as f32, min);
            out[j + 16] = scale.mul_add((bytes[j] >> 4) as f32, min);
        }
    } else {
        for j in 0..BLOCK {
            out[j] = scale.mul_add(bytes[j] as f32, min);
        }
    }
}

simd_dispatch! {
    /// Writes the dequantized row into `out` (length = row width).
    pub fn dequant_row(row: QRow, out: &mut [f32]) {
        let bb = block_bytes(row.bits);
        let per_group = row.group / BLOCK;
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let g = b / per_group;
            let block: &mut [f32; BLOCK] = chunk.try_into().expect("32-wide chunk");
            dequant_block(row.bits, &row.data[b * bb..(b + 1) * bb], row.scales[g], row.mins[g], block);
        }
    }
}

/// `Σ w_i x_i` over one quantized row.
pub fn qdot(row: QRow, x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); lengths are checked inside.
        return unsafe { x86::qdot_avx512(row, x) };
    }
    qdot_portable(row, x)
}

fn qdot_portable(row: QRow, x: &[f32]) -> f32 {
    let bb = block_bytes(row.bits);
    let mut w = [0f32; BLOCK];
    let mut acc = [0f32; 8];
    let per_group = row.group / BLOCK;
    for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
        let g = b / per_group;
        dequant_block(
            row.bits,
            &row.data[b * bb..(b + 1) * bb],
            row.scales[g],
            row.mins[g],
            &mut w,
        );
        for (wc, xc) in w.chunks_exact(8).zip(xs.chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += wc[i] * xc[i];
            }
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_bytes, QRow, BLOCK};
    use std::arch::x86_64::*;

    /// Codes of block `b` as two vectors of 16 integers (weights 0–15 and 16–31).
    #[inline(always)]
    unsafe fn codes(bits: u8, pd: *const u8, b: usize) -> (__m512i, __m512i) {
        if bits == 4 {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(pd.add(b * 16) as *const __m128i));
            (
                _mm512_and_si512(v, _mm512_set1_epi32(0x0f)),
                _mm512_srli_epi32(v, 4),
            )
        } else {
            let p = pd.add(b * 32) as *const __m128i;
            (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p)),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(1))),
            )
        }
    }

    /// `acc += w(block b) · x(block b)` into two accumulators.
    #[inline(always)]
    unsafe fn block_fma(
        bits: u8,
        pd: *const u8,
        px: *const f32,
        b: usize,
        (s, m): (__m512, __m512),
        acc: (&mut __m512, &mut __m512),
    ) {
        let (lo, hi) = codes(bits, pd, b);
        let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, m);
        let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, m);
        *acc.0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(px.add(b * BLOCK)), *acc.0);
        *acc.1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(px.add(b * BLOCK + 16)), *acc.1);
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn qdot_avx512(row: QRow, x: &[f32]) -> f32 {
        let blocks = x.len() / BLOCK;
        let per_group = row.group / BLOCK;
        assert!(blocks * BLOCK == x.len() && blocks.is_multiple_of(per_group));
        assert!(row.data.len() >= blocks * block_bytes(row.bits));
        assert!(row.scales.len() >= blocks / per_group && row.mins.len() >= blocks / per_group);
        let (px, pd, bits) = (x.as_ptr(), row.data.as_ptr(), row.bits);
        // Four accumulators in registers, two blocks per step: independent FMA chains.
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let sm = |b: usize| {
            let g = if per_group == 1 { b } else { b / per_group };
            (
                _mm512_set1_ps(*row.scales.get_unchecked(g)),
                _mm512_set1_ps(*row.mins.get_unchecked(g)),
            )
        };
        let mut b = 0;
        while b + 2 <= blocks {
            block_fma(bits, pd, px, b, sm(b), (&mut a0, &mut a1));
            block_fma(bits, pd, px, b + 1, sm(b + 1), (&mut a2, &mut a3));
            b += 2;
        }
        if b < blocks {
            block_fma(bits, pd, px, b, sm(b), (&mut a0, &mut a1));
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bits: u8, group: usize, n: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let data: Vec<u8> = (0..n * bits as usize / 8)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let groups = n / group;
        let scales = (0..groups).map(|g| 0.01 + g as f32 * 0.003).collect();
        let mins = (0..groups).map(|g| -0.05 * g as f32).collect();
        let x = (0..n)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1)
            .collect();
        (data, scales, mins, x)
    }

    /// Independent reading of the layout: unpack q values one by one, then a plain f64 dot.
    fn naive(bits: u8, group: usize, data: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f64 {
        let mut total = 0f64;
        for (i, xi) in x.iter().enumerate() {
            let (b, j) = (i / 32, i % 32);
            let q = if bits == 8 {
                data[i]
            } else if j < 16 {
                data[b * 16 + j] & 15
            } else {
                data[b * 16 + j - 16] >> 4
            };
            let w = s[i / group] * q as f32 + m[i / group];
            total += w as f64 * *xi as f64;
        }
        total
    }

    #[test]
    fn qdot_and_dequant_match_naive_layout() {
        for (bits, group, n) in [(4u8, 32, 576), (4, 64, 1536), (8, 32, 576), (8, 128, 256)] {
            let (data, scales, mins, x) = sample(bits, group, n);
            let row = QRow {
                bits,
                group,
                data: &data,
                scales: &scales,
                mins: &mins,
            };
            let want = naive(bits, group, &data, &scales, &mins, &x);
            for got in [qdot(row, &x), qdot_portable(row, &x)] {
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{bits} {group}"
                );
            }
            let mut w = vec![0f32; n];
            dequant_row(row, &mut w);
            let dot: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((dot - want).abs() < 1e-6 * (1.0 + want.abs()));
        }
    }
}
