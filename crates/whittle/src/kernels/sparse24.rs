//! Dot products with 2:4-sparse rows stored packed: the two kept values of every group of four
//! inputs, and their positions as a nibble (`first | second << 2`, first < second), two groups a
//! byte (the lower group in the low nibble). Decode streams the weights once per token, so the
//! packed form (2.25 bytes a weight instead of 4) is what makes a 2:4 model decode faster; the
//! kept values pick their inputs with one in-register permute per two groups on AVX2.
//!
//! Kept values are f32, or bf16 when every one of them is exactly a bf16 (a model read from
//! bf16 weights, the usual dtype of published 2:4 checkpoints): the same values in 1.25 bytes a
//! weight, widened by a shift in the register.

use super::simd::{self, Level};

/// A kept value as stored.
pub trait Kept: Copy + Default + Send + Sync + 'static {
    fn get(self) -> f32;
}

impl Kept for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

/// A bf16 value (its f32 bits' upper half). The shift by hand: `half`'s conversion, which also
/// quiets NaNs, made the portable 2:4 dot 1.7x slower (237 against 144 µs, one 1536 × 576 row set).
impl Kept for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// One packed row's kept values.
#[derive(Clone, Copy)]
pub enum KeptRow<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// The two kept positions of a nibble.
#[inline(always)]
fn positions(nibble: u8) -> (usize, usize) {
    ((nibble & 3) as usize, (nibble >> 2 & 3) as usize)
}

/// The two kept positions of a group of four (`first < second`), given which inputs are
/// nonzero; a group with fewer than two nonzeros keeps some of its zero positions (their
/// values are zero). `None` when more than two are nonzero.
pub fn kept_pair(nonzero: [bool; 4]) -> Option<[usize; 2]> {
    let mut kept = [0usize; 2];
    let mut n = 0;
    for (j, _) in nonzero.iter().enumerate().filter(|(_, nz)| **nz) {
        if n == 2 {
            return None;
        }
        kept[n] = j;
        n += 1;
    }
    if n < 2 {
        let taken = kept;
        let free = (0..4).filter(|j| !taken[..n].contains(j));
        for (slot, j) in (n..2).zip(free) {
            kept[slot] = j;
        }
        kept.sort_unstable();
    }
    Some(kept)
}

/// Packs a 2:4 row (every group of four holds at most two nonzeros) into `values` (two per
/// group) and `index` (a nibble per group, `ceil(groups / 2)` bytes). A group with fewer than
/// two nonzeros keeps zeros at unused positions. Returns false (and leaves the outputs
/// partly written) when some group has more than two nonzeros.
pub fn pack_row(row: &[f32], values: &mut [f32], index: &mut [u8]) -> bool {
    index.fill(0);
    for (g, grp) in row.chunks_exact(4).enumerate() {
        let Some(kept) = kept_pair([0, 1, 2, 3].map(|j| grp[j] != 0.0)) else {
            return false;
        };
        values[2 * g] = grp[kept[0]];
        values[2 * g + 1] = grp[kept[1]];
        index[g / 2] |= ((kept[0] | kept[1] << 2) as u8) << (4 * (g % 2));
    }
    true
}

/// Expands a packed row back into `row` (zeros elsewhere). Prefill expands every packed matrix
/// before its product, so this is on the prefill path: at the x86 vector levels one permute
/// and one store per eight outputs (the portable loop made a 2:4 model prefill ~8 % slower
/// than its dense twin).
pub fn unpack_row_at(level: Level, values: KeptRow, index: &[u8], row: &mut [f32]) {
    match values {
        KeptRow::F32(v) => unpack_row_of(level, v, index, row),
        KeptRow::Bf16(v) => unpack_row_of(level, v, index, row),
    }
}

fn unpack_row_of<V: lanes::Lanes>(level: Level, values: &[V], index: &[u8], row: &mut [f32]) {
    assert!(row.len().is_multiple_of(4) && values.len() * 2 == row.len());
    assert!(index.len() * 8 >= row.len());
    match level {
        // SAFETY: a level is only ever one the CPU runs; lengths are checked above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512 | Level::Amx => unsafe { x86::unpack_avx2(values, index, row) },
        _ => unpack_portable(values, index, row, 0),
    }
}

/// [`unpack_row_at`] from the pair of groups `first / 2` on (`first` even): two groups per
/// index byte through [`PAIRS`], then a last odd group alone.
fn unpack_portable<V: Kept>(values: &[V], index: &[u8], row: &mut [f32], first: usize) {
    let groups = row.len() / 4;
    let pairs = row[4 * first..]
        .chunks_exact_mut(8)
        .zip(values[2 * first..].chunks_exact(4))
        .zip(&index[first / 2..]);
    for ((out, v), byte) in pairs {
        let t = PAIRS[*byte as usize];
        out.fill(0.0);
        for l in 0..4 {
            out[(t[l] & 7) as usize] = v[l].get();
        }
    }
    if groups % 2 == 1 && groups > first {
        let g = groups - 1;
        let (a, b) = positions(index[g / 2] & 15);
        let out = &mut row[4 * g..4 * g + 4];
        out.fill(0.0);
        out[a] = values[2 * g].get();
        out[b] = values[2 * g + 1].get();
    }
}

/// Whether packed 2:4 rows decode faster than dense ones at `level`: on AVX2 and AVX-512 (the
/// permute kernel; 1.3x the dense decode of SmolLM2-135M), not on the portable path, which
/// picks inputs one at a time (0.73x).
pub fn packed_is_faster(level: Level) -> bool {
    matches!(level, Level::Avx2 | Level::Avx512 | Level::Amx)
}

/// `Σ_g v[2g]·x[4g + a_g] + v[2g+1]·x[4g + b_g]` for one packed row of `x.len()` inputs.
pub fn dot24(values: KeptRow, index: &[u8], x: &[f32]) -> f32 {
    dot24_at(simd::level(), values, index, x)
}

/// [`dot24`] at a level resolved by the caller.
#[inline]
pub fn dot24_at(level: Level, values: KeptRow, index: &[u8], x: &[f32]) -> f32 {
    match values {
        KeptRow::F32(v) => dot24_of(level, v, index, x),
        KeptRow::Bf16(v) => dot24_of(level, v, index, x),
    }
}

#[inline]
fn dot24_of<V: lanes::Lanes>(level: Level, values: &[V], index: &[u8], x: &[f32]) -> f32 {
    assert!(x.len().is_multiple_of(4) && values.len() * 2 == x.len());
    assert!(index.len() * 8 >= x.len());
    match level {
        // SAFETY: a level is only ever one the CPU runs (`Level::runs_here`), and AVX-512
        // machines run AVX2.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dot24_avx2(values, index, x) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Amx => unsafe { x86::dot24_avx512(values, index, x) },
        _ => dot24_portable(values, index, x, 0),
    }
}

/// For each index byte (two groups, eight inputs), the positions of the four kept inputs:
/// `[a0, b0, 4 + a1, 4 + b1]`.
const PAIRS: [[u8; 4]; 256] = {
    let mut t = [[0u8; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let (lo, hi) = ((b & 15) as u8, (b >> 4) as u8);
        t[b] = [lo & 3, lo >> 2 & 3, 4 + (hi & 3), 4 + (hi >> 2 & 3)];
        b += 1;
    }
    t
};

/// The groups from `first` (even) on: two groups per index byte, the four kept inputs read
/// through [`PAIRS`] into four accumulators (no bounds checks: positions are masked to the
/// eight-input chunk), then a last odd group alone.
#[inline(always)]
fn dot24_portable<V: Kept>(values: &[V], index: &[u8], x: &[f32], first: usize) -> f32 {
    let mut acc = [0f32; 4];
    let pairs = x[4 * first..]
        .chunks_exact(8)
        .zip(values[2 * first..].chunks_exact(4))
        .zip(&index[first / 2..]);
    for ((xc, v), byte) in pairs {
        let t = PAIRS[*byte as usize];
        for l in 0..4 {
            acc[l] += v[l].get() * xc[(t[l] & 7) as usize];
        }
    }
    let mut total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    let groups = x.len() / 4;
    if groups % 2 == 1 && groups > first {
        let g = groups - 1;
        let (a, b) = positions(index[g / 2] & 15);
        total += values[2 * g].get() * x[4 * g + a] + values[2 * g + 1].get() * x[4 * g + b];
    }
    total
}

/// How the x86 kernels load kept values: four or eight at a time, widened to f32 lanes.
/// Elsewhere the bound is [`Kept`] alone.
#[cfg(target_arch = "x86_64")]
mod lanes {
    use std::arch::x86_64::*;

    pub trait Lanes: super::Kept {
        unsafe fn load4(p: *const Self) -> __m128;
        unsafe fn load8(p: *const Self) -> __m256;
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load4(p: *const f32) -> __m128 {
            _mm_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Lanes for u16 {
        #[inline(always)]
        unsafe fn load4(p: *const u16) -> __m128 {
            let v = _mm_cvtepu16_epi32(_mm_loadl_epi64(p as *const __m128i));
            _mm_castsi128_ps(_mm_slli_epi32::<16>(v))
        }
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
        }
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod lanes {
    pub trait Lanes: super::Kept {}
    impl<T: super::Kept> Lanes for T {}
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::lanes::Lanes;
    use std::arch::x86_64::*;

    /// For each index byte (two groups), the `permutevar8x32` lanes that bring the four kept
    /// inputs of eight to the front: `[a0, b0, 4 + a1, 4 + b1]`, repeated in the upper half so
    /// that the same entry serves a permute whose result lands there.
    static LANES: [[i32; 8]; 256] = {
        let mut t = [[0i32; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let (lo, hi) = (b & 15, b >> 4);
            let q = [
                (lo & 3) as i32,
                (lo >> 2 & 3) as i32,
                4 + (hi & 3) as i32,
                4 + (hi >> 2 & 3) as i32,
            ];
            t[b] = [q[0], q[1], q[2], q[3], q[0], q[1], q[2], q[3]];
            b += 1;
        }
        t
    };

    /// For each index byte, where each of the eight outputs takes its value from: the kept
    /// value's slot (0–3) or 4, a zero lane.
    static SCATTER: [[i32; 8]; 256] = {
        let mut t = [[4i32; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let (lo, hi) = (b & 15, b >> 4);
            t[b][lo & 3] = 0;
            t[b][lo >> 2 & 3] = 1;
            t[b][4 + (hi & 3)] = 2;
            t[b][4 + (hi >> 2 & 3)] = 3;
            b += 1;
        }
        t
    };

    /// Eight outputs per index byte: the four kept values in the low half of a register whose
    /// upper half is zero, one permute to their places, one store.
    #[target_feature(enable = "avx2")]
    pub unsafe fn unpack_avx2<V: Lanes>(values: &[V], index: &[u8], row: &mut [f32]) {
        let n = row.len() / 8 * 8;
        let (pv, pr) = (values.as_ptr(), row.as_mut_ptr());
        for (k, byte) in index.iter().take(n / 8).enumerate() {
            let v = _mm256_zextps128_ps256(V::load4(pv.add(4 * k)));
            let to = _mm256_loadu_si256(SCATTER[*byte as usize].as_ptr().cast());
            _mm256_storeu_ps(pr.add(8 * k), _mm256_permutevar8x32_ps(v, to));
        }
        super::unpack_portable(values, index, row, n / 4);
    }

    /// Kept values prefetched 8 KiB ahead of the current position (as the dense dot product:
    /// decode streams the weights from memory, and without it the packed rows decoded barely
    /// faster than dense ones), and index bytes 512 ahead (f32 values: the same groups).
    const AHEAD_BYTES: usize = 8192;

    /// Sixteen inputs (four groups, eight kept values, two index bytes) per step: two permutes
    /// select the kept inputs of each half, a blend joins them, one FMA with the values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot24_avx2<V: Lanes>(values: &[V], index: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pv, px, pi) = (values.as_ptr(), x.as_ptr(), index.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 32 <= n {
            // One cache line of values (16) per 32 inputs; index bytes cover 64 lines per line.
            let ahead = pv.wrapping_add(i / 2 + AHEAD_BYTES / std::mem::size_of::<V>());
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            if i % 512 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(pi.wrapping_add(i / 8 + AHEAD_BYTES / 16) as *const i8);
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 16 * k;
                let l0 = _mm256_loadu_si256(LANES[index[at / 8] as usize].as_ptr().cast());
                let l1 = _mm256_loadu_si256(LANES[index[at / 8 + 1] as usize].as_ptr().cast());
                let p0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(px.add(at)), l0);
                let p1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(px.add(at + 8)), l1);
                let sel = _mm256_blend_ps::<0xF0>(p0, p1);
                *acc = _mm256_fmadd_ps(sel, V::load8(pv.add(at / 2)), *acc);
            }
            i += 32;
        }
        let s = _mm256_add_ps(acc[0], acc[1]);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum::<f32>() + super::dot24_portable(values, index, x, i / 4)
    }

    /// [`dot24_avx2`] in 512-bit lanes: the 16 kept values of 32 inputs pick their inputs with
    /// one two-source permute, whose lane indices come from the four index bytes by shifts
    /// (value `j` sits at `4·(j / 2) + (bits 2j..2j+2 of the word)`), with no table: the AVX2
    /// loop spends three shuffles per 16 inputs, and that, not the memory, bound it.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot24_avx512<V: Lanes>(values: &[V], index: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (pv, px, pi) = (values.as_ptr(), x.as_ptr(), index.as_ptr());
        let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        let three = _mm512_set1_epi32(3);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i + 64 <= n {
            if i % 512 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(pi.wrapping_add(i / 8 + AHEAD_BYTES / 16) as *const i8);
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 32 * k;
                // 16 kept values: one cache line of f32 (half a line of bf16).
                let ahead = pv.wrapping_add(at / 2 + AHEAD_BYTES / std::mem::size_of::<V>());
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                let word = (pi.add(at / 8) as *const u32).read_unaligned();
                let pos = _mm512_srlv_epi32(_mm512_set1_epi32(word as i32), shifts);
                let lanes = _mm512_add_epi32(_mm512_and_si512(pos, three), base);
                let (lo, hi) = (
                    _mm512_loadu_ps(px.add(at)),
                    _mm512_loadu_ps(px.add(at + 16)),
                );
                let sel = _mm512_permutex2var_ps(lo, lanes, hi);
                *acc = _mm512_fmadd_ps(sel, V::load16(pv.add(at / 2)), *acc);
            }
            i += 64;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
            + super::dot24_portable(values, index, x, i / 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2:4 row (some groups with fewer than two nonzeros) packs, unpacks to itself at every
    /// level, and its dot product matches the dense f64 one at every level, for widths with
    /// tails of every length, with f32 and with bf16 kept values; a row with three nonzeros in a
    /// group is refused.
    #[test]
    fn packed_rows_round_trip_and_dot_at_every_level() {
        for n in [4usize, 8, 12, 28, 32, 36, 64, 100, 576, 1536] {
            let mut r = 7u32;
            let mut next = || {
                r = r.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                r
            };
            let mut row = vec![0f32; n];
            for g in row.chunks_exact_mut(4) {
                let keep = next() % 6;
                let pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
                let (a, b) = pairs[keep as usize];
                g[a] = (next() % 200) as f32 / 50.0 - 2.0;
                g[b] = if next() % 5 == 0 {
                    0.0
                } else {
                    (next() % 200) as f32 / 50.0 - 2.0
                };
            }
            let x: Vec<f32> = (0..n).map(|_| (next() % 100) as f32 / 25.0 - 2.0).collect();
            let mut values = vec![0f32; n / 2];
            let mut index = vec![0u8; n.div_ceil(8)];
            assert!(pack_row(&row, &mut values, &mut index));
            // The same row with its values cut to bf16, kept as bf16 bits.
            let bf16 = |v: &f32| half::bf16::from_f32(*v);
            let row16: Vec<f32> = row.iter().map(|v| bf16(v).to_f32()).collect();
            let bits: Vec<u16> = values.iter().map(|v| bf16(v).to_bits()).collect();
            for (kept, row) in [
                (KeptRow::F32(&values), &row),
                (KeptRow::Bf16(&bits), &row16),
            ] {
                for level in Level::supported() {
                    let mut back = vec![1f32; n];
                    unpack_row_at(level, kept, &index, &mut back);
                    assert_eq!(&back, row, "n={n} {level}");
                }
                let exact: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                for level in Level::supported() {
                    let got = dot24_at(level, kept, &index, &x);
                    assert!(
                        (got as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                        "{n} {level}"
                    );
                }
            }
        }
        let mut values = [0f32; 2];
        let mut index = [0u8; 1];
        assert!(!pack_row(&[1.0, 2.0, 0.0, 3.0], &mut values, &mut index));
    }
}
