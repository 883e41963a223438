//! 2:4-sparse rows of 4- or 8-bit codes on a symmetric grid (`w = scale · c`, signed `c`):
//! the kept codes of every group of four inputs and their 2-bit positions, dotted against
//! int16 activations ([`QActs`]). A 2:4 model quantized with a symmetric grid (GGUF's Q4_0 and
//! Q8_0, whittle's `--sym`, NVIDIA's sparse int4) keeps its zeros as the zero point's code;
//! stored this way it reads half the codes per decoded token plus 4 bits of positions per group
//! of four inputs.
//!
//! Why AVX-512 only: the kept inputs are picked per row, and `vpermt2w` selects 32 int16 lanes
//! out of 64 in one instruction, so a 64-input step costs about as many operations as the dense
//! integer dot's two 32-input blocks while reading ~40 % fewer bytes. On AVX2 the selection
//! needs a `pshufb` and a table load per eight inputs (~15 operations per 32 inputs against ~8
//! for the dense kernel: measured slower, BENCHMARKS "2:4 that decodes faster"), so other
//! levels keep the dense blocks.
//!
//! Layout, per row: `inp / 64` steps of 64 inputs (16 groups of four, 32 kept values). Step `k`
//! holds the codes (8-bit: byte `l` is kept value `l`, two's complement; 4-bit: kept value `l`
//! in the low nibble of byte `l` for `l < 16`, in the high nibble of byte `l − 16` otherwise,
//! two's complement nibbles) and one `u64` of positions (kept value `l`'s position in its group
//! at bit `16·(l % 4) + 2·(l / 4)`). Kept values are in kernel order: value `l` is the first
//! (`l` even) or second kept input of group [`group_of_lane`]`(l)`. That order puts block
//! `i % 2` of the step (inputs `32·(i % 2)..`) in `pmaddwd`'s i32 lane `i`, so one broadcast of
//! the two blocks' scales serves every lane, and lets each int16 lane find its position bits
//! with one variable shift of the broadcast word.

use super::qdot::{unpack_block, BLOCK};
use super::qdot_i16::QActs;
use super::simd::Level;

/// Inputs per step.
pub const STEP: usize = 64;

/// The group of four inputs (0–15 within its step) that kept value `l` belongs to.
pub const fn group_of_lane(l: usize) -> usize {
    8 * ((l / 2) % 2) + l / 4
}

/// The lane of the `slot`-th kept input (0 or 1) of group `g` of a step.
const fn lane_of(g: usize, slot: usize) -> usize {
    4 * (g % 8) + 2 * (g / 8) + slot
}

/// Bit of kept value `l`'s position in its step's word.
const fn position_bit(l: usize) -> usize {
    16 * (l % 4) + 2 * (l / 4)
}

/// Bytes of codes per step.
pub const fn step_bytes(bits: u8) -> usize {
    STEP / 2 * bits as usize / 8
}

/// Whether rows of `bits`-bit codes take this storage at `level` (see the module doc).
pub fn takes(level: Level, bits: u8) -> bool {
    matches!(level, Level::Avx512 | Level::Amx)
        && cfg!(target_arch = "x86_64")
        && (bits == 4 || bits == 8)
}

/// Consecutive rows of one matrix in this layout.
#[derive(Clone, Copy)]
pub struct Rows24<'a> {
    pub bits: u8,
    /// Inputs per scale: 32, or a multiple of 64.
    pub group: usize,
    pub inp: usize,
    pub codes: &'a [u8],
    pub index: &'a [u64],
    pub scales: &'a [f32],
}

impl<'a> Rows24<'a> {
    fn steps(&self) -> usize {
        self.inp / STEP
    }

    pub fn len(&self) -> usize {
        self.index.len() / self.steps()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Rows `range` of these.
    pub fn range(&self, range: std::ops::Range<usize>) -> Self {
        let (cb, s, g) = (
            self.steps() * step_bytes(self.bits),
            self.steps(),
            self.inp.div_ceil(self.group),
        );
        Rows24 {
            codes: &self.codes[range.start * cb..range.end * cb],
            index: &self.index[range.start * s..range.end * s],
            scales: &self.scales[range.start * g..range.end * g],
            ..*self
        }
    }

    /// Scale of block `b` (32 inputs) of row 0.
    fn scale(&self, b: usize) -> f32 {
        self.scales[b * BLOCK / self.group]
    }

    /// Signed code of kept value `l` of step `k` of row 0.
    fn code(&self, k: usize, l: usize) -> i8 {
        let c = &self.codes[k * step_bytes(self.bits)..];
        match self.bits {
            8 => c[l] as i8,
            _ => {
                let byte = c[l % 16];
                let nibble = if l < 16 { byte << 4 } else { byte & 0xf0 };
                nibble as i8 >> 4
            }
        }
    }

    /// Input (within the row) that kept value `l` of step `k` of row 0 multiplies.
    fn input(&self, k: usize, l: usize) -> usize {
        let pos = (self.index[k] >> position_bit(l)) & 3;
        STEP * k + 4 * group_of_lane(l) + pos as usize
    }

    /// Writes row 0's unsigned codes (`zero` in the dropped places) into `q` (`inp` long).
    pub fn unpack_codes(&self, zero: u8, q: &mut [u8]) {
        q.fill(zero);
        for k in 0..self.steps() {
            for l in 0..STEP / 2 {
                q[self.input(k, l)] = (zero as i16 + self.code(k, l) as i16) as u8;
            }
        }
    }

    /// Writes row 0 as f32 (zeros elsewhere) into `out` (`inp` long), at `level`: prefill
    /// expands every matrix before its product, and one element at a time that cost a third of
    /// a 128-token prefill (AVX-512: 16 outputs per masked permute).
    pub fn unpack_row_at(&self, level: Level, out: &mut [f32]) {
        assert_eq!(out.len(), self.inp);
        assert!(!self.is_empty());
        match level {
            // SAFETY: a level is only ever one the CPU runs; lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Amx => unsafe { x86::unpack_row(self, out) },
            _ => self.unpack_row(out),
        }
    }

    /// [`Self::unpack_row_at`], one element at a time (the reference).
    fn unpack_row(&self, out: &mut [f32]) {
        out.fill(0.0);
        for k in 0..self.steps() {
            for l in 0..STEP / 2 {
                let b = 2 * k + group_of_lane(l) / 8;
                out[self.input(k, l)] = self.scale(b) * self.code(k, l) as f32;
            }
        }
    }
}

/// Packs one row of unsigned codes (`inp` long, a multiple of 64; `zero` is the code of 0)
/// into `codes` and `index` (one step's worth each per 64 inputs). Returns false when some
/// group of four holds more than two nonzero codes, or a kept code does not fit the signed
/// width (outputs then partly written).
pub fn pack_codes(bits: u8, zero: u8, q: &[u8], codes: &mut [u8], index: &mut [u64]) -> bool {
    let half = 1i16 << (bits - 1);
    codes.fill(0);
    for (k, (qs, word)) in q.chunks_exact(STEP).zip(index.iter_mut()).enumerate() {
        *word = 0;
        let step = &mut codes[k * step_bytes(bits)..(k + 1) * step_bytes(bits)];
        for (g, grp) in qs.chunks_exact(4).enumerate() {
            let nonzero = [0, 1, 2, 3].map(|j| grp[j] != zero);
            let Some(kept) = super::sparse24::kept_pair(nonzero) else {
                return false;
            };
            for (slot, &j) in kept.iter().enumerate() {
                let c = grp[j] as i16 - zero as i16;
                if !(-half..half).contains(&c) {
                    return false;
                }
                let l = lane_of(g, slot);
                *word |= (j as u64) << position_bit(l);
                let c = c as u8;
                match bits {
                    8 => step[l] = c,
                    _ if l < 16 => step[l] |= c & 0x0f,
                    _ => step[l - 16] |= c << 4,
                }
            }
        }
    }
    true
}

/// The unsigned codes of a packed row (`data` in 32-weight blocks) into `q`.
pub fn row_codes(bits: u8, data: &[u8], q: &mut [u8]) {
    let bb = super::qdot::block_bytes(bits);
    let mut block = [0u8; BLOCK];
    for (bytes, out) in data.chunks_exact(bb).zip(q.chunks_exact_mut(BLOCK)) {
        unpack_block(bits, bytes, &mut block);
        out.copy_from_slice(&block);
    }
}

/// `out[i] = rows[i] · x` against int16 activations, at a level [`takes`] accepts.
pub fn dot_rows_at(level: Level, rows: Rows24, x: &QActs, out: &mut [f32]) {
    assert_eq!(rows.len(), out.len());
    assert!(takes(level, rows.bits), "no 2:4 integer dot at {level}");
    assert!(rows.group == BLOCK || rows.group.is_multiple_of(STEP));
    assert_eq!(x.blocks() * BLOCK, rows.inp);
    // SAFETY: `takes` admits the AVX-512 levels on x86-64 only, and a level is only ever one
    // the CPU runs; the row lengths are those of `Rows24` (checked where it was built) and the
    // activations are `inp` long (checked above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::dot_rows(rows, x, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("`takes` is false on this architecture")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{position_bit, step_bytes, QActs, Rows24, STEP};
    use crate::kernels::qdot::PREFETCH_AHEAD;
    use std::arch::x86_64::*;

    /// Per int16 lane: the right shift that brings its position bits to the bottom of its
    /// 16-bit part of the broadcast word.
    static SHIFT: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut l = 0;
        while l < 32 {
            t[l] = (position_bit(l) - 16 * (l % 4)) as u16;
            l += 1;
        }
        t
    };

    /// Per int16 lane: the first input of its group within the step (a multiple of 4, so
    /// OR-ing the position adds it).
    static BASE: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut l = 0;
        while l < 32 {
            t[l] = 4 * super::group_of_lane(l) as u16;
            l += 1;
        }
        t
    };

    /// Row 0 of `rows` expanded into `out`: per step, the 32 kept codes as f32 in two
    /// registers (kept values 0–15 and 16–31); each 16-output register (four groups) takes one
    /// of them, where each output lane compares its position in its group with the group's two
    /// kept positions, picks the matching kept value with a masked permute (zero where neither
    /// matches) and is scaled by its block's scale.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn unpack_row(rows: &Rows24, out: &mut [f32]) {
        let (bits, sb) = (rows.bits, step_bytes(rows.bits));
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let three = _mm512_set1_epi32(3);
        // Each lane's position in its group, and the shifts that bring its group's first and
        // second kept positions down (two bits per group, seconds eight bits above).
        let pos = _mm512_and_si512(lane, three);
        let first = _mm512_slli_epi32::<1>(_mm512_srli_epi32::<2>(lane));
        let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        let group_start = _mm512_andnot_si512(three, lane);
        let one = _mm512_set1_epi32(1);
        let (pc, po) = (rows.codes.as_ptr(), out.as_mut_ptr());
        for k in 0..rows.inp / STEP {
            let c = pc.add(k * sb);
            let kept = if bits == 8 {
                [
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(c as *const __m128i)),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(c.add(16) as *const __m128i)),
                ]
            } else {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(c as *const __m128i));
                [
                    _mm512_srai_epi32::<28>(_mm512_slli_epi32::<28>(b)),
                    _mm512_srai_epi32::<28>(_mm512_slli_epi32::<24>(b)),
                ]
            }
            .map(|v| _mm512_cvtepi32_ps(v));
            let word = rows.index[k];
            for j in 0..4 {
                let at = 32 * (j / 2) + 8 * (j % 2);
                let both = (word >> at & 0xff) | (word >> (at + 16) & 0xff) << 8;
                let v = _mm512_set1_epi32(both as i32);
                let a = _mm512_and_si512(_mm512_srlv_epi32(v, first), three);
                let b = _mm512_and_si512(_mm512_srlv_epi32(v, second), three);
                let (ea, eb) = (
                    _mm512_cmpeq_epi32_mask(a, pos),
                    _mm512_cmpeq_epi32_mask(b, pos),
                );
                let base = _mm512_add_epi32(group_start, _mm512_set1_epi32(2 * (j / 2) as i32));
                let idx = _mm512_mask_add_epi32(base, eb, base, one);
                let val = _mm512_maskz_permutexvar_ps(ea | eb, idx, kept[j % 2]);
                let s = _mm512_set1_ps(rows.scale(2 * k + j / 2));
                _mm512_storeu_ps(po.add(STEP * k + 16 * j), _mm512_mul_ps(val, s));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn dot_rows(rows: Rows24, x: &QActs, out: &mut [f32]) {
        let quads = out.len() / 4;
        for q in 0..quads {
            let o = dot::<4>(&rows, 4 * q, x);
            out[4 * q..4 * q + 4].copy_from_slice(&o);
        }
        for (r, o) in out.iter_mut().enumerate().skip(4 * quads) {
            *o = dot::<1>(&rows, r, x)[0];
        }
    }

    /// The 32 signed codes of one step in int16 lanes.
    #[inline(always)]
    unsafe fn codes(bits: u8, p: *const u8) -> __m512i {
        if bits == 8 {
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i))
        } else {
            // Bytes 0–15 in lanes 0–15 and again in 16–31; the low nibble is shifted to the
            // top of the lane in the lower half, the high nibble in the upper, then an
            // arithmetic shift brings either down with its sign.
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
            let up = _mm512_inserti64x4::<1>(_mm512_set1_epi16(12), _mm256_set1_epi16(8));
            _mm512_srai_epi16::<12>(_mm512_sllv_epi16(_mm512_cvtepu8_epi16(v), up))
        }
    }

    /// Two f32 at `p` broadcast as pairs: `[p0, p1, p0, p1, …]`.
    #[inline(always)]
    unsafe fn pairs(p: *const f32) -> __m512 {
        _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned()))
    }

    /// Rows `first..first + N`: each step's 64 activations and their scales are loaded once for
    /// all rows; per row, one permute picks its 32 kept activations.
    #[inline(always)]
    unsafe fn dot<const N: usize>(rows: &Rows24, first: usize, x: &QActs) -> [f32; N] {
        let (bits, steps) = (rows.bits, rows.inp / STEP);
        let sb = step_bytes(bits);
        let per_row_scales = rows.inp.div_ceil(rows.group);
        let ptrs: [_; N] = std::array::from_fn(|r| {
            let r = first + r;
            (
                rows.codes.as_ptr().add(r * steps * sb),
                rows.index.as_ptr().add(r * steps),
                rows.scales.as_ptr().add(r * per_row_scales),
            )
        });
        let shift = _mm512_loadu_si512(SHIFT.as_ptr().cast());
        let base = _mm512_loadu_si512(BASE.as_ptr().cast());
        let three = _mm512_set1_epi16(3);
        let mut acc = [_mm512_setzero_ps(); N];
        let (pq, pd) = (x.codes().as_ptr(), x.scales().as_ptr());
        for k in 0..steps {
            let lo = _mm512_loadu_si512(pq.add(STEP * k).cast());
            let hi = _mm512_loadu_si512(pq.add(STEP * k + 32).cast());
            let d = pairs(pd.add(2 * k));
            for (r, &(pc, pi, ps)) in ptrs.iter().enumerate() {
                if (k * sb).is_multiple_of(64) {
                    let ahead = pc.wrapping_add(k * sb + PREFETCH_AHEAD);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                let word = _mm512_set1_epi64(*pi.add(k) as i64);
                let at = _mm512_srlv_epi16(word, shift);
                // (at & 3) | base: the input each lane takes.
                let idx = _mm512_ternarylogic_epi32::<0xEA>(at, three, base);
                let xs = _mm512_permutex2var_epi16(lo, idx, hi);
                let sums = _mm512_madd_epi16(codes(bits, pc.add(k * sb)), xs);
                let s = if rows.group == super::BLOCK {
                    pairs(ps.add(2 * k))
                } else {
                    _mm512_set1_ps(*ps.add(STEP * k / rows.group))
                };
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, d), acc[r]);
            }
        }
        std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2:4 matrix of codes (some groups with fewer than two nonzeros) at both widths and with
    /// both kinds of groups.
    fn sample(bits: u8, rows: usize, inp: usize) -> Vec<u8> {
        let zero = 1u8 << (bits - 1);
        let mut r = 11u32;
        let mut next = || {
            r = r.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            r >> 8
        };
        let mut q = vec![zero; rows * inp];
        for g in q.chunks_exact_mut(4) {
            let pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
            let (a, b) = pairs[(next() % 6) as usize];
            let max = 1u32 << bits;
            g[a] = (next() % max) as u8;
            if next() % 5 != 0 {
                g[b] = (next() % max) as u8;
            }
        }
        q
    }

    /// Packed rows expand to exactly their codes times their scales at every level; the integer
    /// dot at every level that has it is within the activation-rounding bound of the exact dot
    /// (as the dense integer dot, `qdot_i16`), and four rows at a time equal one at a time.
    #[test]
    fn packed_code_rows_expand_and_dot_exactly() {
        for (bits, group) in [(4u8, 32), (8, 32), (4, 128), (8, 64)] {
            let (rows, inp) = (6, 576);
            let zero = 1u8 << (bits - 1);
            let q = sample(bits, rows, inp);
            let steps = inp / STEP;
            let mut codes = vec![0u8; rows * steps * step_bytes(bits)];
            let mut index = vec![0u64; rows * steps];
            for ((qr, c), i) in q
                .chunks_exact(inp)
                .zip(codes.chunks_exact_mut(steps * step_bytes(bits)))
                .zip(index.chunks_exact_mut(steps))
            {
                assert!(pack_codes(bits, zero, qr, c, i));
            }
            let groups = inp.div_ceil(group);
            let scales: Vec<f32> = (0..rows * groups)
                .map(|g| 0.01 + (g % 7) as f32 * 0.004)
                .collect();
            let m = Rows24 {
                bits,
                group,
                inp,
                codes: &codes,
                index: &index,
                scales: &scales,
            };
            let x: Vec<f32> = (0..inp)
                .map(|i| {
                    let mag = [1.0, 0.01, 30.0, 0.0][(i / 32) % 4];
                    ((i * 13 % 29) as f32 - 14.0) * 0.1 * mag
                })
                .collect();
            let xa = QActs::quantize(&x);
            let mut int_rows = vec![0f32; rows];
            for level in Level::supported().into_iter().filter(|l| takes(*l, bits)) {
                dot_rows_at(level, m, &xa, &mut int_rows);
                let mut tail = vec![0f32; 2];
                dot_rows_at(level, m.range(4..6), &xa, &mut tail);
                assert_eq!(tail, int_rows[4..], "{bits} bits at {level}");
            }
            for r in 0..rows {
                let row = m.range(r..r + 1);
                let mut w = vec![1f32; inp];
                row.unpack_row(&mut w);
                for level in Level::supported() {
                    let mut at = vec![1f32; inp];
                    row.unpack_row_at(level, &mut at);
                    assert_eq!(at, w, "{bits} bits, row {r} at {level}");
                }
                for (i, v) in w.iter().enumerate() {
                    let s = scales[r * groups + i / group];
                    let want = s * (q[r * inp + i] as f32 - zero as f32);
                    assert_eq!(*v, want, "{bits} bits, row {r}, input {i}");
                }
                let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let size: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                if Level::supported().into_iter().any(|l| takes(l, bits)) {
                    let bound: f64 = (0..inp / 32)
                        .map(|b| {
                            let ws: f64 = w[b * 32..][..32].iter().map(|v| v.abs() as f64).sum();
                            xa.scales()[b] as f64 / 2.0 * ws
                        })
                        .sum();
                    let got = int_rows[r] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-5 * size,
                        "{bits} bits, group {group}, row {r}: {got} vs {exact} (bound {bound})"
                    );
                    assert!(bound < 1e-4 * size);
                }
            }
        }
    }

    /// Three nonzero codes in a group, or a kept code outside the signed range, are refused.
    #[test]
    fn rows_that_do_not_fit_are_refused() {
        let mut q = vec![8u8; 64];
        q[0..3].copy_from_slice(&[1, 2, 3]);
        let (mut c, mut i) = (vec![0u8; 16], vec![0u64; 1]);
        assert!(!pack_codes(4, 8, &q, &mut c, &mut i));
        // An asymmetric zero point (3): code 15 is 12 steps above it, past a signed nibble.
        let mut q = vec![3u8; 64];
        q[0] = 15;
        assert!(!pack_codes(4, 3, &q, &mut c, &mut i));
    }
}
