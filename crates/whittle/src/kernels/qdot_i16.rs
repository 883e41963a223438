//! Integer dot products of 4- and 8-bit rows (GGUF's Q4_0, Q4_1, Q8_0; whittle's int4/int8)
//! with activations quantized to int16 per 32-value block: the decode path of the vector
//! levels.
//!
//! Why: decode multiplies every weight once per token, and the f32 path spends ~6 vector
//! operations per 8 weights (widen the codes twice, convert, dequantize, multiply-add). With
//! integer activations, codes widened once to 16 bits meet the activations in `pmaddwd`, which
//! multiplies 16 pairs and adds neighbours in one instruction, and a block's sum is converted
//! and scaled once: about half the operations per block. The activation vector is quantized
//! once per matrix-vector product and shared by all its rows. (llama.cpp quantizes activations
//! to int8 for `pmaddubsw`; tried here, that moved SmolLM2's last-token logits by 1.5 % of their
//! range through the 576-wide output head, while int16 keeps them within ~1e-5.)
//!
//! Accuracy: the weights are used exactly (the file's codes, scales and mins); only `x` is
//! rounded, to `d_b · round(x / d_b)` with `d_b = max|x_b| / 32767` per block, an error of at
//! most `d_b / 2` per value, so `|Σ w x − result| ≤ Σ_b d_b/2 · Σ_{i∈b} |w_i|` (plus f32
//! rounding; tested below). The mins' term uses the exact block sums of `x`. Prefill and
//! perplexity never take this path.

use super::qdot::{block_bytes, QRow, QRows, BLOCK};
use super::simd::Level;

/// `x` quantized per 32-value block: codes in [-32767, 32767], the block's scale, and the exact
/// sum of its values (for the rows' mins).
pub struct QActs {
    q: Vec<i16>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

/// 1.5·2²³: adding and subtracting it rounds an f32 (|v| < 2²²) to the nearest integer, ties
/// to even, without SSE4.1's `round` (baseline x86-64 would call libm's `roundf`).
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Quantization steps on each side of zero.
const STEPS: f32 = 32767.0;

impl QActs {
    /// Quantizes `x` (a multiple of 32 values long).
    pub fn quantize(x: &[f32]) -> QActs {
        assert!(x.len().is_multiple_of(BLOCK));
        let blocks = x.len() / BLOCK;
        let mut qa = QActs {
            q: vec![0; x.len()],
            d: vec![0.0; blocks],
            sum: vec![0.0; blocks],
        };
        for (b, (xs, qs)) in x
            .chunks_exact(BLOCK)
            .zip(qa.q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / STEPS;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = ((v * inv + ROUND_MAGIC) - ROUND_MAGIC) as i16;
            }
            qa.d[b] = d;
            qa.sum[b] = xs.iter().sum();
        }
        qa
    }

    pub(super) fn blocks(&self) -> usize {
        self.d.len()
    }

    /// The int16 codes, one per input (read by the x86 2:4 integer kernels).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn codes(&self) -> &[i16] {
        &self.q
    }

    /// The scale of each 32-value block (read by the x86 2:4 integer kernels and a test).
    #[cfg(any(target_arch = "x86_64", test))]
    pub(super) fn scales(&self) -> &[f32] {
        &self.d
    }
}

thread_local! {
    static F32_ACTIVATIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's matrix-vector products of packed rows against f32 activations
/// (the expanded weights' exact products) instead of int16 ones: for scoring, where a
/// log-likelihood must match the f32 model to 1e-3 (int16 activations moved one by 6e-3 on
/// SmolLM2) and speed matters less than in decode.
pub fn with_f32_activations<R>(f: impl FnOnce() -> R) -> R {
    let before = F32_ACTIVATIONS.with(|c| c.replace(true));
    let r = f();
    F32_ACTIVATIONS.with(|c| c.set(before));
    r
}

/// Whether [`with_f32_activations`] is in force on this thread.
pub fn f32_activations() -> bool {
    F32_ACTIVATIONS.with(|c| c.get())
}

/// Whether rows of `bits`-bit codes take the integer path at `level`: 4- and 8-bit codes at
/// the vector levels. The scalar level keeps f32 activations (it is the plain reference every
/// level is checked against).
pub fn takes(level: Level, bits: u8) -> bool {
    let vector = match level {
        Level::Scalar => false,
        Level::Neon => cfg!(target_arch = "aarch64"),
        Level::Avx2 | Level::Avx512 | Level::Amx => cfg!(target_arch = "x86_64"),
    };
    vector && (bits == 4 || bits == 8)
}

/// `Σ w_i x_i` of one 4- or 8-bit row against quantized activations, at a level [`takes`]
/// accepts.
pub fn qdot_i16_at(level: Level, row: QRow, x: &QActs) -> f32 {
    let mut out = [0f32];
    qdot_i16_rows_at(level, QRows::single(row), x, &mut out);
    out[0]
}

/// `out[i] = rows[i] · x`: on x86 four rows at a time share each block's activations and
/// bookkeeping (per-row overhead was ~10 % of decode).
pub fn qdot_i16_rows_at(level: Level, rows: QRows, x: &QActs, out: &mut [f32]) {
    assert_eq!(rows.len(), out.len());
    if rows.is_empty() {
        return;
    }
    assert!(
        takes(level, rows.bits),
        "no integer dot for {} bits at {level}",
        rows.bits
    );
    let blocks = x.blocks();
    let per_group = rows.group / BLOCK;
    assert!(per_group > 0);
    let row = rows.row(0);
    assert!(row.data.len() == blocks * block_bytes(rows.bits));
    assert!(row.scales.len() == blocks.div_ceil(per_group));
    // SAFETY: `takes` admits AVX2 and above on x86-64 and NEON on AArch64, and a level is only
    // ever one the CPU runs (`avx512` and `amx` include AVX-512 F + BW); every row is as long
    // as the first (`QRows`), checked above.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match level {
            Level::Avx512 | Level::Amx => x86::dot_rows_avx512(rows, x, per_group, out),
            _ => x86::dot_rows_avx2(rows, x, per_group, out),
        }
    }
    #[cfg(target_arch = "aarch64")]
    for (r, o) in out.iter_mut().enumerate() {
        *o = unsafe { arm::dot(rows.row(r), x, per_group) };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    unreachable!("`takes` is false on this architecture")
}

/// `Σ_b (s_{g(b)} · d_b · Σ_{i∈b} q_i x16_i + m_{g(b)} · Σ_{i∈b} x_i)`.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QActs, QRows, BLOCK};
    use crate::kernels::qdot::{group_of, x86::hsum256, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// How wide one block's integer product runs. AVX2 takes a 32-weight block as two halves
    /// of 16 lanes; AVX-512 BW takes it whole (codes widened to 32 i16 lanes, one `vpmaddwd`,
    /// one conversion and one FMA per block and row instead of two, three and one). Decode is
    /// mostly bound by reading the weights, so the fewer operations gave only ~3 % on Q8_0
    /// (Xeon, 3 interleaved rounds: 113-116 against 109-112 tok/s; Q4_1 within noise).
    trait Width {
        /// A block's activations, loaded once for all rows.
        type X: Copy;
        /// Accumulated `s_b·d_b·Σ q x` lanes of one row.
        type Acc: Copy;
        unsafe fn zero() -> Self::Acc;
        unsafe fn load(px: *const i16) -> Self::X;
        /// `acc + sd · Σ_{lanes} codes(b) · x`, lane-wise.
        unsafe fn block(
            bits: u8,
            pd: *const u8,
            b: usize,
            x: Self::X,
            sd: &f32,
            acc: Self::Acc,
        ) -> Self::Acc;
        unsafe fn sum(acc: Self::Acc) -> f32;
    }

    struct Avx2;
    impl Width for Avx2 {
        type X = (__m256i, __m256i);
        type Acc = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(px: *const i16) -> Self::X {
            (
                _mm256_loadu_si256(px as *const __m256i),
                _mm256_loadu_si256(px.add(16) as *const __m256i),
            )
        }
        /// The 32 codes as two vectors of 16 i16 (codes 0–15, 16–31). 4-bit: the 16 bytes are
        /// widened once, and each 16-bit lane then holds both nibbles of its byte.
        #[inline(always)]
        unsafe fn block(
            bits: u8,
            pd: *const u8,
            b: usize,
            x: Self::X,
            sd: &f32,
            acc: __m256,
        ) -> __m256 {
            let (q0, q1) = if bits == 4 {
                let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(pd.add(b * 16) as *const __m128i));
                (
                    _mm256_and_si256(v, _mm256_set1_epi16(0x0f)),
                    _mm256_srli_epi16(v, 4),
                )
            } else {
                let p = pd.add(b * 32) as *const __m128i;
                (
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(p)),
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(1))),
                )
            };
            let sums = _mm256_add_epi32(_mm256_madd_epi16(q0, x.0), _mm256_madd_epi16(q1, x.1));
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(sd), acc)
        }
        #[inline(always)]
        unsafe fn sum(acc: __m256) -> f32 {
            hsum256(acc)
        }
    }

    struct Avx512;
    impl Width for Avx512 {
        type X = __m512i;
        type Acc = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(px: *const i16) -> __m512i {
            _mm512_loadu_si512(px as *const __m512i)
        }
        /// The 32 codes in 32 i16 lanes. 4-bit: the 16 bytes go to both halves and the upper
        /// half is shifted by 4, so lanes 0–15 hold the low nibbles (codes 0–15) and 16–31 the
        /// high ones.
        #[inline(always)]
        unsafe fn block(
            bits: u8,
            pd: *const u8,
            b: usize,
            x: __m512i,
            sd: &f32,
            acc: __m512,
        ) -> __m512 {
            let q = if bits == 4 {
                let v =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(pd.add(b * 16) as *const __m128i));
                let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
                _mm512_and_si512(
                    _mm512_srlv_epi16(_mm512_cvtepu8_epi16(v), shift),
                    _mm512_set1_epi16(0x0f),
                )
            } else {
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(pd.add(b * 32) as *const __m256i))
            };
            let sums = _mm512_madd_epi16(q, x);
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(*sd), acc)
        }
        #[inline(always)]
        unsafe fn sum(acc: __m512) -> f32 {
            _mm512_reduce_add_ps(acc)
        }
    }

    /// Every row of `rows` against `x`, four at a time, blocks as two 16-lane halves.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows_avx2(rows: QRows, x: &QActs, per_group: usize, out: &mut [f32]) {
        dot_rows::<Avx2>(rows, x, per_group, out)
    }

    /// Every row of `rows` against `x`, four at a time, whole blocks in 32 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_rows_avx512(rows: QRows, x: &QActs, per_group: usize, out: &mut [f32]) {
        dot_rows::<Avx512>(rows, x, per_group, out)
    }

    /// Symmetric rows (a zero point, no mins to read) and rows with mins each get their own
    /// body.
    #[inline(always)]
    unsafe fn dot_rows<W: Width>(rows: QRows, x: &QActs, per_group: usize, out: &mut [f32]) {
        if rows.zero.is_some() {
            rows_of::<W, true>(rows, x, per_group, out)
        } else {
            rows_of::<W, false>(rows, x, per_group, out)
        }
    }

    #[inline(always)]
    unsafe fn rows_of<W: Width, const SYM: bool>(
        rows: QRows,
        x: &QActs,
        per_group: usize,
        out: &mut [f32],
    ) {
        let quads = out.len() / 4;
        for q in 0..quads {
            let o = dot::<W, 4, SYM>(&rows, 4 * q, x, per_group);
            out[4 * q..4 * q + 4].copy_from_slice(&o);
        }
        for (r, o) in out.iter_mut().enumerate().skip(4 * quads) {
            *o = dot::<W, 1, SYM>(&rows, r, x, per_group)[0];
        }
    }

    /// Rows `first..first + N` against `x`: each block's activations are loaded once for all
    /// rows, and the rows' sums are independent chains. `SYM`: every row's mins are
    /// `−zero·scale`, so the mins' term is `−zero · Σ_b s_b·Σx_b` and the mins are not read.
    ///
    /// With one scale per block (GGUF's Q4_0/Q4_1/Q8_0) blocks go eight at a time: the eight
    /// `s_b·d_b` products and the mins' term are one vector operation each, and a block's
    /// product is then a broadcast from memory (a load, no ALU work) — the scalar multiply,
    /// broadcast and mins' multiply-add per row and block were a third of the operations of
    /// an 8-bit block. Prefetches go once per cache line instead of once per block.
    #[inline(always)]
    unsafe fn dot<W: Width, const N: usize, const SYM: bool>(
        rows: &QRows,
        first: usize,
        x: &QActs,
        per_group: usize,
    ) -> [f32; N] {
        const CHUNK: usize = 8;
        let bits = rows.bits;
        let bb = super::block_bytes(bits);
        let ptrs: [_; N] = std::array::from_fn(|r| rows.ptrs(first + r));
        let mut acc = [W::zero(); N];
        let mut vmins = [_mm256_setzero_ps(); N];
        let mut mins = [0f32; N];
        let mut b = 0;
        if per_group == 1 {
            let mut sd = [[0f32; CHUNK]; N];
            while b + CHUNK <= x.blocks() {
                let d = _mm256_loadu_ps(x.d.as_ptr().add(b));
                let sum = _mm256_loadu_ps(x.sum.as_ptr().add(b));
                for r in 0..N {
                    let (pd, ps, pm) = ptrs[r];
                    let s = _mm256_loadu_ps(ps.add(b));
                    _mm256_storeu_ps(sd[r].as_mut_ptr(), _mm256_mul_ps(s, d));
                    let m = if SYM { s } else { _mm256_loadu_ps(pm.add(b)) };
                    vmins[r] = _mm256_fmadd_ps(m, sum, vmins[r]);
                    for line in (0..CHUNK * bb).step_by(64) {
                        let ahead = pd.wrapping_add(b * bb + line + PREFETCH_AHEAD);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
                for (j, b) in (b..b + CHUNK).enumerate() {
                    let xb = W::load(x.q.as_ptr().add(b * BLOCK));
                    for r in 0..N {
                        acc[r] = W::block(bits, ptrs[r].0, b, xb, &sd[r][j], acc[r]);
                    }
                }
                b += CHUNK;
            }
        }
        for b in b..x.blocks() {
            let xb = W::load(x.q.as_ptr().add(b * BLOCK));
            let (d, sum) = (*x.d.get_unchecked(b), *x.sum.get_unchecked(b));
            let g = group_of(b, per_group);
            for r in 0..N {
                let (pd, ps, pm) = ptrs[r];
                _mm_prefetch::<_MM_HINT_T0>(pd.wrapping_add(b * bb + PREFETCH_AHEAD) as *const i8);
                let s = *ps.add(g);
                acc[r] = W::block(bits, pd, b, xb, &(s * d), acc[r]);
                mins[r] += if SYM { s } else { *pm.add(g) } * sum;
            }
        }
        let zero = rows.zero.unwrap_or(0.0);
        std::array::from_fn(|r| {
            let m = hsum256(vmins[r]) + mins[r];
            W::sum(acc[r]) + if SYM { -zero * m } else { m }
        })
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{QActs, QRow, BLOCK};
    use crate::kernels::qdot::group_of;
    use std::arch::aarch64::*;

    /// Σ of 16 code × activation products (codes as u8, activations as i16), as 4 i32 lanes.
    #[inline(always)]
    unsafe fn dot16(q: uint8x16_t, x: *const i16) -> int32x4_t {
        let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(q)));
        let hi = vreinterpretq_s16_u16(vmovl_high_u8(q));
        let (x0, x1) = (vld1q_s16(x), vld1q_s16(x.add(8)));
        let acc = vmull_s16(vget_low_s16(lo), vget_low_s16(x0));
        let acc = vmlal_high_s16(acc, lo, x0);
        let acc = vmlal_s16(acc, vget_low_s16(hi), vget_low_s16(x1));
        vmlal_high_s16(acc, hi, x1)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot(row: QRow, x: &QActs, per_group: usize) -> f32 {
        let (pd, px) = (row.data.as_ptr(), x.q.as_ptr());
        let mut acc = vdupq_n_f32(0.0);
        let mut mins = 0f32;
        for b in 0..x.blocks() {
            let g = group_of(b, per_group);
            let (s, m) = (*row.scales.get_unchecked(g), *row.mins.get_unchecked(g));
            let (q0, q1) = if row.bits == 4 {
                let v = vld1q_u8(pd.add(b * 16));
                (vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(v))
            } else {
                (vld1q_u8(pd.add(b * 32)), vld1q_u8(pd.add(b * 32 + 16)))
            };
            let sums = vaddq_s32(
                dot16(q0, px.add(b * BLOCK)),
                dot16(q1, px.add(b * BLOCK + 16)),
            );
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(sums), s * *x.d.get_unchecked(b));
            mins += m * *x.sum.get_unchecked(b);
        }
        vaddvq_f32(acc) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qdot::qdot_at;

    /// Rows of every supported width and group against the exact f64 dot, within the bound of
    /// the module doc (activation rounding) plus f32 slack.
    #[test]
    fn integer_dot_is_within_the_activation_rounding_bound() {
        let cases = [(4u8, 32, 576), (4, 128, 1536), (8, 32, 576), (8, 64, 192)];
        // Each case with free mins, and with symmetric ones (`−2^(bits−1)·scale`, read as such).
        for ((bits, group, n), sym) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let data: Vec<u8> = (0..n * bits as usize / 8)
                .map(|i| (i * 37 % 251) as u8)
                .collect();
            let groups = n.div_ceil(group);
            let scales: Vec<f32> = (0..groups).map(|g| 0.01 + g as f32 * 0.003).collect();
            let z = (1u32 << (bits - 1)) as f32;
            let mins: Vec<f32> = (0..groups)
                .map(|g| {
                    if sym {
                        -(scales[g] * z)
                    } else {
                        -0.05 * g as f32 - 0.3
                    }
                })
                .collect();
            // Blocks of very different magnitudes, and one all-zero block.
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let mag = [1.0, 0.01, 30.0, 0.0][(i / 32) % 4];
                    ((i * 13 % 29) as f32 - 14.0) * 0.1 * mag
                })
                .collect();
            let row = QRow {
                bits,
                group,
                data: &data,
                scales: &scales,
                mins: &mins,
                zero: sym.then_some(z),
            };
            let mut w = vec![0f32; n];
            crate::kernels::qdot::dequant_row(row, &mut w);
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let xa = QActs::quantize(&x);
            let bound: f64 = (0..n / 32)
                .map(|b| {
                    let wsum: f64 = w[b * 32..(b + 1) * 32].iter().map(|v| v.abs() as f64).sum();
                    xa.d[b] as f64 / 2.0 * wsum
                })
                .sum();
            let scale: f64 = w
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            for level in Level::supported() {
                if !takes(level, bits) {
                    continue;
                }
                let got = qdot_i16_at(level, row, &xa) as f64;
                assert!(
                    (got - exact).abs() <= bound + 1e-5 * scale,
                    "{bits} bits, group {group}, sym {sym} at {level}: {got} vs {exact} (bound {bound})"
                );
                // The bound is not vacuous: far below the size of the terms.
                assert!(bound < 1e-4 * scale, "{bound} vs {scale}");
                // And the f32 path of the same level is closer still.
                let f = qdot_at(level, row, &x) as f64;
                assert!((f - exact).abs() <= 1e-5 * scale);
            }
        }
    }

    /// A matrix walked four rows at a time (plus a remainder) gives each row's own dot; with
    /// one scale per block (group 32: ten blocks, one chunk of eight and two single ones) and
    /// with longer groups.
    #[test]
    fn rows_of_a_matrix_match_their_single_row_dots() {
        let (rows, n) = (7, 320);
        for (bits, group) in [4u8, 8].into_iter().flat_map(|b| [(b, 32), (b, 64)]) {
            let data: Vec<u8> = (0..rows * n * bits as usize / 8)
                .map(|i| (i * 53 % 241) as u8)
                .collect();
            let scales: Vec<f32> = (0..rows * n / group)
                .map(|g| 0.02 + g as f32 * 1e-3)
                .collect();
            let mins: Vec<f32> = scales.iter().map(|s| -s * 3.0).collect();
            let m = QRows::new(bits, group, None, (&data, &scales, &mins), n);
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.3).collect();
            let xa = QActs::quantize(&x);
            for level in Level::supported().into_iter().filter(|l| takes(*l, bits)) {
                let mut out = vec![0f32; rows];
                qdot_i16_rows_at(level, m, &xa, &mut out);
                for (r, o) in out.iter().enumerate() {
                    assert_eq!(
                        *o,
                        qdot_i16_at(level, m.row(r), &xa),
                        "{bits} bits, row {r}"
                    );
                }
                let mut tail = vec![0f32; 3];
                qdot_i16_rows_at(level, m.range(4..7), &xa, &mut tail);
                assert_eq!(tail, out[4..]);
            }
        }
    }

    #[test]
    fn quantized_activations_round_to_the_nearest_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let xa = QActs::quantize(&x);
        for (i, v) in x.iter().enumerate() {
            let d = xa.d[i / 32];
            assert!((xa.q[i] as f32 * d - v).abs() <= d / 2.0 + 1e-6, "{i}");
            assert!(xa.q[i].unsigned_abs() <= 32767);
        }
        assert!((xa.sum[0] - x[..32].iter().sum::<f32>()).abs() < 1e-5);
    }
}
