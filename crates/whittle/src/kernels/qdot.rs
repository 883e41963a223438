//! Dot products against group-quantized rows, dequantizing on the fly: `w = fma(scale, q, min)`
//! with unsigned `q`, in blocks of 32. This formula reproduces GGUF's Q4_0, Q4_1 and Q8_0
//! dequantization bit for bit (the products are exact in f32 and both round once), so a model
//! kept in its file's blocks computes with exactly the weights of its f32 expansion while
//! reading 5–8.5 bits per weight instead of 32: decode is memory-bound, so that is its speed.
//!
//! Block layouts (32 weights, `4·bits` bytes): 4-bit — byte `j` holds `q[j]` in the low nibble
//! and `q[j+16]` in the high one (GGML's); 8-bit — one byte each; 2, 3, 5, 6, 7 bits — a
//! little-endian bit stream, `q[j]` at bits `j·bits .. (j+1)·bits`. Groups hold a multiple of 32
//! weights; a row's last group may be shorter (576 inputs in groups of 128: 4 × 128 + 64).

use super::simd::{self, madd, Level};

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
    /// `Some(z)` when every min is `−z·scale` (see `Packed`): kernels may skip reading mins.
    pub zero: Option<f32>,
}

/// Consecutive rows of one packed matrix (codes, scales and mins row-major, strides worked out
/// once): what decode hands a kernel, so that the kernel walks the rows itself instead of
/// being called with a freshly built [`QRow`] per row (that bookkeeping, for SmolLM2's
/// 576-wide rows, cost ~8 % of decode).
#[derive(Clone, Copy)]
pub struct QRows<'a> {
    pub bits: u8,
    pub group: usize,
    pub zero: Option<f32>,
    data: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
    row_bytes: usize,
    row_groups: usize,
}

impl<'a> QRows<'a> {
    /// Rows `inp` wide; `data`, `scales` and `mins` hold whole rows.
    pub fn new(
        bits: u8,
        group: usize,
        zero: Option<f32>,
        (data, scales, mins): (&'a [u8], &'a [f32], &'a [f32]),
        inp: usize,
    ) -> Self {
        let (row_bytes, row_groups) = (inp / BLOCK * block_bytes(bits), inp.div_ceil(group));
        assert!(row_bytes > 0 && data.len().is_multiple_of(row_bytes));
        let rows = data.len() / row_bytes;
        assert!(scales.len() == rows * row_groups && mins.len() == scales.len());
        QRows {
            bits,
            group,
            zero,
            data,
            scales,
            mins,
            row_bytes,
            row_groups,
        }
    }

    /// One row as a one-row matrix.
    pub fn single(row: QRow<'a>) -> Self {
        assert!(!row.data.is_empty() && row.mins.len() == row.scales.len());
        QRows {
            bits: row.bits,
            group: row.group,
            zero: row.zero,
            data: row.data,
            scales: row.scales,
            mins: row.mins,
            row_bytes: row.data.len(),
            row_groups: row.scales.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.row_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> QRow<'a> {
        let (rb, rg) = (self.row_bytes, self.row_groups);
        QRow {
            bits: self.bits,
            group: self.group,
            zero: self.zero,
            data: &self.data[r * rb..(r + 1) * rb],
            scales: &self.scales[r * rg..(r + 1) * rg],
            mins: &self.mins[r * rg..(r + 1) * rg],
        }
    }

    /// Rows `range` of these.
    pub fn range(&self, range: std::ops::Range<usize>) -> Self {
        let (rb, rg) = (self.row_bytes, self.row_groups);
        QRows {
            data: &self.data[range.start * rb..range.end * rb],
            scales: &self.scales[range.start * rg..range.end * rg],
            mins: &self.mins[range.start * rg..range.end * rg],
            ..*self
        }
    }

    /// Pointers to row `r`'s codes, scales and mins (for kernels that checked the bounds once).
    pub fn ptrs(&self, r: usize) -> (*const u8, *const f32, *const f32) {
        let (rb, rg) = (self.row_bytes, self.row_groups);
        (
            self.data.as_ptr().wrapping_add(r * rb),
            self.scales.as_ptr().wrapping_add(r * rg),
            self.mins.as_ptr().wrapping_add(r * rg),
        )
    }
}

/// The codes of one block.
#[inline(always)]
pub fn unpack_block(bits: u8, bytes: &[u8], q: &mut [u8; BLOCK]) {
    match bits {
        4 => {
            for j in 0..16 {
                q[j] = bytes[j] & 0x0f;
                q[j + 16] = bytes[j] >> 4;
            }
        }
        8 => q.copy_from_slice(&bytes[..BLOCK]),
        _ => {
            let b = bits as usize;
            let mask = (1u32 << b) - 1;
            for (j, qj) in q.iter_mut().enumerate() {
                let (byte, shift) = (j * b / 8, j * b % 8);
                let lo = bytes[byte] as u32;
                let hi = *bytes.get(byte + 1).unwrap_or(&0) as u32;
                *qj = (((lo | hi << 8) >> shift) & mask) as u8;
            }
        }
    }
}

/// Packs 32 codes (each below `2^bits`) into `4·bits` bytes; the inverse of [`unpack_block`].
pub fn pack_block(bits: u8, q: &[u8; BLOCK], out: &mut [u8]) {
    match bits {
        4 => {
            for j in 0..16 {
                out[j] = q[j] | q[j + 16] << 4;
            }
        }
        8 => out[..BLOCK].copy_from_slice(q),
        _ => {
            let b = bits as usize;
            out[..block_bytes(bits)].fill(0);
            for (j, &qj) in q.iter().enumerate() {
                let (byte, shift) = (j * b / 8, j * b % 8);
                let v = (qj as u32) << shift;
                out[byte] |= v as u8;
                if shift + b > 8 {
                    out[byte + 1] |= (v >> 8) as u8;
                }
            }
        }
    }
}

/// Dequantizes one block (32 weights) into `out`.
#[inline(always)]
fn dequant_block<const FMA: bool>(
    bits: u8,
    bytes: &[u8],
    scale: f32,
    min: f32,
    out: &mut [f32; BLOCK],
) {
    let mut q = [0u8; BLOCK];
    unpack_block(bits, bytes, &mut q);
    for (o, q) in out.iter_mut().zip(q) {
        *o = madd::<FMA>(scale, q as f32, min);
    }
}

simd_dispatch! {
    /// Writes the dequantized row into `out` (length = row width).
    pub fn dequant_row, dequant_row_at(row: QRow, out: &mut [f32]) {
        let bb = block_bytes(row.bits);
        let per_group = row.group / BLOCK;
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let g = b / per_group;
            let block: &mut [f32; BLOCK] = chunk.try_into().expect("32-wide chunk");
            dequant_block::<FMA>(row.bits, &row.data[b * bb..(b + 1) * bb], row.scales[g], row.mins[g], block);
        }
    }
}

/// `Σ w_i x_i` over one quantized row.
pub fn qdot(row: QRow, x: &[f32]) -> f32 {
    qdot_at(simd::level(), row, x)
}

/// [`qdot`] at a given level (resolved once by the caller for all rows of a product). 4- and
/// 8-bit codes (GGUF's Q4_0, Q4_1, Q8_0 and whittle's int4/int8) have hand-written paths for
/// AVX-512, AVX2 and NEON; other widths dequantize a block at a time in the level's vector
/// registers.
#[inline]
pub fn qdot_at(level: Level, row: QRow, x: &[f32]) -> f32 {
    let nibble_or_byte = row.bits == 4 || row.bits == 8;
    match level {
        // SAFETY (all arms): a level is only ever one the CPU runs (`Level::runs_here`);
        // lengths are checked inside.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx if nibble_or_byte => unsafe { x86::qdot_avx512(row, x) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if nibble_or_byte => unsafe { x86::qdot_avx2(row, x) },
        #[cfg(target_arch = "aarch64")]
        Level::Neon if nibble_or_byte => unsafe { arm::qdot_neon(row, x) },
        _ => qdot_blocks_at(level, row, x),
    }
}

simd_dispatch! {
    /// Block by block: dequantize 32 weights, then 8 independent multiply-adds.
    fn _, qdot_blocks_at(row: QRow, x: &[f32]) -> f32 {
        let bb = block_bytes(row.bits);
        let mut w = [0f32; BLOCK];
        let mut acc = [0f32; 8];
        let per_group = row.group / BLOCK;
        for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
            let g = b / per_group;
            dequant_block::<FMA>(
                row.bits,
                &row.data[b * bb..(b + 1) * bb],
                row.scales[g],
                row.mins[g],
                &mut w,
            );
            for (wc, xc) in w.chunks_exact(8).zip(xs.chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] = madd::<FMA>(wc[i], xc[i], acc[i]);
                }
            }
        }
        acc.iter().sum()
    }
}

/// Checks a row against `x` before a vector kernel reads it with unchecked loads; returns
/// (blocks, blocks per group).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn checked_blocks(row: &QRow, x: &[f32]) -> (usize, usize) {
    let blocks = x.len() / BLOCK;
    let per_group = row.group / BLOCK;
    let groups = blocks.div_ceil(per_group.max(1));
    assert!(blocks * BLOCK == x.len() && per_group > 0);
    assert!(row.data.len() >= blocks * block_bytes(row.bits));
    assert!(row.scales.len() >= groups && row.mins.len() >= groups);
    (blocks, per_group)
}

/// Group of block `b` without a division in the common power-of-two case.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
pub(crate) fn group_of(b: usize, per_group: usize) -> usize {
    if per_group.is_power_of_two() {
        b >> per_group.trailing_zeros()
    } else {
        b / per_group
    }
}

/// Bytes ahead of the current block that the vector kernels prefetch: decode streams the
/// weights once, so ask for the bytes ~2 KiB ahead (the next rows) before the loads wait on
/// memory.
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_AHEAD: usize = 2048;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{block_bytes, checked_blocks, group_of, QRow, BLOCK, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// Codes of block `b` as two vectors of 16 integers (weights 0–15 and 16–31).
    #[inline(always)]
    unsafe fn codes16(bits: u8, pd: *const u8, b: usize) -> (__m512i, __m512i) {
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
    unsafe fn block_fma512(
        bits: u8,
        pd: *const u8,
        px: *const f32,
        b: usize,
        (s, m): (__m512, __m512),
        acc: (&mut __m512, &mut __m512),
    ) {
        let (lo, hi) = codes16(bits, pd, b);
        let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, m);
        let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, m);
        *acc.0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(px.add(b * BLOCK)), *acc.0);
        *acc.1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(px.add(b * BLOCK + 16)), *acc.1);
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn qdot_avx512(row: QRow, x: &[f32]) -> f32 {
        let (blocks, per_group) = checked_blocks(&row, x);
        let (px, pd, bits) = (x.as_ptr(), row.data.as_ptr(), row.bits);
        // Four accumulators in registers, two blocks per step: independent FMA chains.
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let sm = |b: usize| {
            let g = group_of(b, per_group);
            (
                _mm512_set1_ps(*row.scales.get_unchecked(g)),
                _mm512_set1_ps(*row.mins.get_unchecked(g)),
            )
        };
        let mut b = 0;
        let bb = block_bytes(bits);
        while b + 2 <= blocks {
            _mm_prefetch::<_MM_HINT_T0>(pd.wrapping_add(b * bb + PREFETCH_AHEAD) as *const i8);
            block_fma512(bits, pd, px, b, sm(b), (&mut a0, &mut a1));
            block_fma512(bits, pd, px, b + 1, sm(b + 1), (&mut a2, &mut a3));
            b += 2;
        }
        if b < blocks {
            block_fma512(bits, pd, px, b, sm(b), (&mut a0, &mut a1));
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
    }

    /// Codes of block `b` as four vectors of 8 integers (weights 0–7, 8–15, 16–23, 24–31).
    #[inline(always)]
    unsafe fn codes8(bits: u8, pd: *const u8, b: usize) -> [__m256i; 4] {
        if bits == 4 {
            let v = _mm_loadu_si128(pd.add(b * 16) as *const __m128i);
            let nib = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(v, nib);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
            [
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
            ]
        } else {
            let p = pd.add(b * 32);
            [0, 8, 16, 24]
                .map(|o| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(o) as *const __m128i)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn qdot_avx2(row: QRow, x: &[f32]) -> f32 {
        let (blocks, per_group) = checked_blocks(&row, x);
        let (px, pd, bits) = (x.as_ptr(), row.data.as_ptr(), row.bits);
        let bb = block_bytes(bits);
        // One accumulator per 8-weight quarter of a block: four independent FMA chains.
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            _mm_prefetch::<_MM_HINT_T0>(pd.wrapping_add(b * bb + PREFETCH_AHEAD) as *const i8);
            let g = group_of(b, per_group);
            let s = _mm256_set1_ps(*row.scales.get_unchecked(g));
            let m = _mm256_set1_ps(*row.mins.get_unchecked(g));
            for (k, q) in codes8(bits, pd, b).into_iter().enumerate() {
                let w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, m);
                acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(px.add(b * BLOCK + 8 * k)), acc[k]);
            }
        }
        hsum256(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }

    /// The sum of 8 floats.
    #[inline(always)]
    pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{checked_blocks, group_of, QRow, BLOCK};
    use std::arch::aarch64::*;

    /// 16 codes (bytes) to four vectors of 4 floats.
    #[inline(always)]
    unsafe fn floats(c: uint8x16_t) -> [float32x4_t; 4] {
        let (lo, hi) = (vmovl_u8(vget_low_u8(c)), vmovl_high_u8(c));
        [
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
            vcvtq_f32_u32(vmovl_high_u16(lo)),
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
            vcvtq_f32_u32(vmovl_high_u16(hi)),
        ]
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn qdot_neon(row: QRow, x: &[f32]) -> f32 {
        let (blocks, per_group) = checked_blocks(&row, x);
        let (px, pd) = (x.as_ptr(), row.data.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        for b in 0..blocks {
            let g = group_of(b, per_group);
            let s = vdupq_n_f32(*row.scales.get_unchecked(g));
            let m = vdupq_n_f32(*row.mins.get_unchecked(g));
            // Weights 0–15 and 16–31 of the block as bytes.
            let halves = if row.bits == 4 {
                let v = vld1q_u8(pd.add(b * 16));
                [vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(v)]
            } else {
                [vld1q_u8(pd.add(b * 32)), vld1q_u8(pd.add(b * 32 + 16))]
            };
            for (h, codes) in halves.into_iter().enumerate() {
                for (k, q) in floats(codes).into_iter().enumerate() {
                    let w = vfmaq_f32(m, q, s);
                    let xv = vld1q_f32(px.add(b * BLOCK + 16 * h + 4 * k));
                    acc[k] = vfmaq_f32(acc[k], w, xv);
                }
            }
        }
        vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bits: u8, group: usize, n: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let data: Vec<u8> = (0..n * bits as usize / 8)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let groups = n.div_ceil(group);
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
            let q = match bits {
                8 => data[i],
                4 if j < 16 => data[b * 16 + j] & 15,
                4 => data[b * 16 + j - 16] >> 4,
                _ => {
                    // A little-endian bit stream per block, read bit by bit.
                    let start = b * 4 * bits as usize * 8 + j * bits as usize;
                    (0..bits as usize).fold(0u8, |q, k| {
                        let bit = start + k;
                        q | ((data[bit / 8] >> (bit % 8)) & 1) << k
                    })
                }
            };
            let w = s[i / group] * q as f32 + m[i / group];
            total += w as f64 * *xi as f64;
        }
        total
    }

    #[test]
    fn pack_round_trips_for_every_width() {
        for bits in 2..=8u8 {
            let q: [u8; BLOCK] = std::array::from_fn(|j| ((j * 7 + 3) % (1 << bits)) as u8);
            let mut bytes = vec![0u8; block_bytes(bits)];
            pack_block(bits, &q, &mut bytes);
            let mut back = [0u8; BLOCK];
            unpack_block(bits, &bytes, &mut back);
            assert_eq!(q, back, "{bits} bits");
        }
    }

    #[test]
    fn qdot_and_dequant_match_naive_layout_at_every_level() {
        for (bits, group, n) in [
            (4u8, 32, 576),
            (4, 64, 1536),
            (8, 32, 576),
            (8, 128, 256),
            (4, 128, 576),
            (8, 96, 576),
            (2, 64, 256),
            (3, 32, 576),
            (5, 96, 192),
            (6, 128, 576),
            (7, 32, 64),
        ] {
            let (data, scales, mins, x) = sample(bits, group, n);
            let row = QRow {
                bits,
                group,
                data: &data,
                scales: &scales,
                mins: &mins,
                zero: None,
            };
            let want = naive(bits, group, &data, &scales, &mins, &x);
            for level in Level::supported() {
                let got = qdot_at(level, row, &x);
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{bits} {group} at {level}"
                );
                let mut w = vec![0f32; n];
                dequant_row_at(level, row, &mut w);
                let dot: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((dot - want).abs() < 1e-6 * (1.0 + want.abs()), "{level}");
            }
        }
    }
}
