//! `y = x · Wᵀ` for a handful of rows (2 to [`SMALL_MAX_ROWS`]): the short sequences of task
//! scoring (a 20-token continuation after a cached context) and of chunked prefill.
//!
//! Why not the GEMM: a GEMM first packs the whole weight into panels, which costs as much as
//! multiplying it by ~25 rows (measured: 55 % of HellaSwag scoring time was faer packing the
//! weights). Here the weight is read in place, row by row: 4 weight rows × 4 input rows share
//! each loaded vector in 16 accumulators (AVX-512; 4 × 2 in AVX2's 16 registers), so the loop
//! does two FMAs per load, twice the matrix-vector kernel's rate, and every weight byte is read
//! once per call (a matrix-vector product per row streams the weight once per row: scoring
//! 4-token ARC answers that way ran at decode speed).

use super::qdot::{dequant_row_at, QRows};
use super::simd::Level;
use rayon::prelude::*;
use std::cell::Cell;

/// The weight of a small-row product: f32 rows, or packed rows expanded [`EXPAND_ROWS`] at a
/// time into a scratch that stays in cache. Packed rows are then read as stored (a sixth of the
/// f32 bytes for Q4_1): with ~20 rows a product is as much memory traffic as arithmetic.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    Packed(QRows<'a>),
}

/// Weight rows expanded per step of the packed product (16 × 576 floats: 36 KiB).
const EXPAND_ROWS: usize = 16;

/// `y[rows, out] = x[rows, inp] · Wᵀ` for a row count [`takes`] accepts; threads split the
/// weight rows, each filling its own slice of the transposed product.
pub fn matmul_t(
    level: Level,
    x: &[f32],
    w: WeightRows,
    (rows, inp, out): (usize, usize, usize),
    y: &mut [f32],
) {
    assert!(x.len() == rows * inp && y.len() == rows * out);
    let mut buffer = TRANSPOSED.with(Cell::take);
    if buffer.len() < rows * out {
        buffer.resize(rows * out, 0.0);
    }
    // Every element is written by the product: stale values need no clearing.
    let yt = &mut buffer[..rows * out];
    let per = out
        .div_ceil(crate::threads::threads())
        .next_multiple_of(EXPAND_ROWS);
    yt.par_chunks_mut(per * rows)
        .enumerate()
        .for_each(|(c, yt)| {
            let mut scratch = EXPANDED.with(Cell::take);
            for (b, yt) in yt.chunks_mut(EXPAND_ROWS * rows).enumerate() {
                let (first, n) = (c * per + b * EXPAND_ROWS, yt.len() / rows);
                let wb: &[f32] = match w {
                    WeightRows::F32(w) => &w[first * inp..(first + n) * inp],
                    WeightRows::Packed(m) => {
                        scratch.resize(n * inp, 0.0);
                        for (i, dst) in scratch.chunks_exact_mut(inp).enumerate() {
                            dequant_row_at(level, m.row(first + i), dst);
                        }
                        &scratch
                    }
                };
                matmul_t_transposed(level, x, wb, inp, yt);
            }
            EXPANDED.with(|c| c.set(scratch));
        });
    for (j, col) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * out + j] = *v;
        }
    }
    TRANSPOSED.with(|c| c.set(buffer));
}

thread_local! {
    /// The transposed product and the expanded weight rows, kept per thread for the next call:
    /// allocating and zeroing them per call was 7 % of task scoring. Taken out of the cell
    /// while in use, so a nested call on the same thread (rayon work stealing) gets its own.
    static TRANSPOSED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static EXPANDED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Most rows this path takes; above, packing the weight for a GEMM pays (measured on SmolLM2's
/// 576 × 1536 shapes).
pub const SMALL_MAX_ROWS: usize = 48;

/// Whether `rows` rows at `level` take this path (the vector levels of x86; elsewhere the
/// GEMM).
pub fn takes(level: Level, rows: usize) -> bool {
    (2..=SMALL_MAX_ROWS).contains(&rows)
        && matches!(level, Level::Avx2 | Level::Avx512 | Level::Amx)
        && cfg!(target_arch = "x86_64")
}

/// `yt[j·rows + r] = W[j] · x[r]` for the weight rows `W` (`w.len() / inp` of them): the
/// product transposed, so that threads own disjoint slices of it.
fn matmul_t_transposed(level: Level, x: &[f32], w: &[f32], inp: usize, yt: &mut [f32]) {
    let (rows, outs) = (x.len() / inp, w.len() / inp);
    assert!(x.len() == rows * inp && w.len() == outs * inp && yt.len() == rows * outs);
    assert!(
        takes(level, rows),
        "no small-row product for {rows} rows at {level}"
    );
    // SAFETY: `takes` admits only x86 vector levels, and a level is only ever one the CPU runs;
    // the lengths are checked above.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match level {
            Level::Avx2 => x86::product::<false>(x, w, inp, yt),
            _ => x86::product::<true>(x, w, inp, yt),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One register of `AVX512` ? 16 : 8 floats, with the operations the block needs.
    trait Vector: Copy {
        const LANES: usize;
        unsafe fn zero() -> Self;
        /// Loads `n ≤ LANES` floats (the rest zero).
        unsafe fn load(p: *const f32, n: usize) -> Self;
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32, n: usize) -> Self {
            if n == 16 {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
            }
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32, n: usize) -> Self {
            if n == 8 {
                _mm256_loadu_ps(p)
            } else {
                let mut v = [0f32; 8];
                std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n);
                _mm256_loadu_ps(v.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// `WR` weight rows × `XR` input rows, all `inp` long: `out[i][r] = w_i · x_r`.
    #[inline(always)]
    unsafe fn block<V: Vector, const WR: usize, const XR: usize>(
        w: [*const f32; WR],
        x: [*const f32; XR],
        inp: usize,
    ) -> [[f32; XR]; WR] {
        let mut acc = [[V::zero(); XR]; WR];
        let mut k = 0;
        while k < inp {
            let n = V::LANES.min(inp - k);
            let xv: [V; XR] = std::array::from_fn(|r| V::load(x[r].add(k), n));
            for i in 0..WR {
                let wv = V::load(w[i].add(k), n);
                for r in 0..XR {
                    acc[i][r] = V::fmadd(wv, xv[r], acc[i][r]);
                }
            }
            k += V::LANES;
        }
        std::array::from_fn(|i| std::array::from_fn(|r| acc[i][r].sum()))
    }

    /// Every weight row against every input row, in `WR × XR` blocks, then the leftover input
    /// rows one at a time and the leftover weight rows one at a time.
    #[inline(always)]
    unsafe fn product_with<V: Vector, const WR: usize, const XR: usize>(
        x: &[f32],
        w: &[f32],
        inp: usize,
        yt: &mut [f32],
    ) {
        let (rows, outs) = (x.len() / inp, w.len() / inp);
        let (px, pw, py) = (x.as_ptr(), w.as_ptr(), yt.as_mut_ptr());
        let x_row = |r: usize| px.add(r * inp);
        let w_row = |j: usize| pw.add(j * inp);
        let full_w = outs - outs % WR;
        let full_x = rows - rows % XR;
        for j in (0..full_w).step_by(WR) {
            let wr: [_; WR] = std::array::from_fn(|i| w_row(j + i));
            for r in (0..full_x).step_by(XR) {
                let out = block::<V, WR, XR>(wr, std::array::from_fn(|q| x_row(r + q)), inp);
                for (i, o) in out.iter().enumerate() {
                    for (q, v) in o.iter().enumerate() {
                        *py.add((j + i) * rows + r + q) = *v;
                    }
                }
            }
            for r in full_x..rows {
                let out = block::<V, WR, 1>(wr, [x_row(r)], inp);
                for (i, o) in out.iter().enumerate() {
                    *py.add((j + i) * rows + r) = o[0];
                }
            }
        }
        for j in full_w..outs {
            for r in 0..rows {
                *py.add(j * rows + r) = block::<V, 1, 1>([w_row(j)], [x_row(r)], inp)[0][0];
            }
        }
    }

    /// AVX-512 (`WIDE`): 4 × 4 blocks in 16 of its 32 registers; AVX2: 4 × 2 in 8 of 16.
    pub unsafe fn product<const WIDE: bool>(x: &[f32], w: &[f32], inp: usize, yt: &mut [f32]) {
        if WIDE {
            product512(x, w, inp, yt)
        } else {
            product256(x, w, inp, yt)
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn product512(x: &[f32], w: &[f32], inp: usize, yt: &mut [f32]) {
        product_with::<__m512, 4, 4>(x, w, inp, yt)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn product256(x: &[f32], w: &[f32], inp: usize, yt: &mut [f32]) {
        product_with::<__m256, 4, 2>(x, w, inp, yt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed rows expanded block by block give the product of their f32 expansion, exactly,
    /// with more weight rows than one expansion step and threads splitting them.
    #[test]
    fn packed_rows_multiply_as_their_expansion() {
        let (rows, out, inp) = (6, 37, 64);
        let data: Vec<u8> = (0..out * inp / 2).map(|i| (i * 29 % 256) as u8).collect();
        let scales: Vec<f32> = (0..out * 2).map(|g| 0.01 + g as f32 * 1e-3).collect();
        let mins: Vec<f32> = scales.iter().map(|s| -7.5 * s).collect();
        let m = QRows::new(4, 32, None, (&data, &scales, &mins), inp);
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.1)
            .collect();
        for level in Level::supported().into_iter().filter(|l| takes(*l, rows)) {
            // Expanded at the same level (its multiply-add may be fused or not).
            let mut w = vec![0f32; out * inp];
            for (r, dst) in w.chunks_exact_mut(inp).enumerate() {
                dequant_row_at(level, m.row(r), dst);
            }
            let (mut a, mut b) = (vec![0f32; rows * out], vec![0f32; rows * out]);
            matmul_t(level, &x, WeightRows::Packed(m), (rows, inp, out), &mut a);
            matmul_t(level, &x, WeightRows::F32(&w), (rows, inp, out), &mut b);
            assert_eq!(a, b, "{level}");
            let naive: f32 = (0..inp).map(|k| x[inp + k] * w[5 * inp + k]).sum();
            assert!((a[out + 5] - naive).abs() < 1e-4);
        }
    }

    /// Every block shape and tail (weight rows not a multiple of 4, input rows not a multiple
    /// of the block, widths not a multiple of the vector) against an f64 loop.
    #[test]
    fn matches_f64_loop_at_every_level() {
        for (rows, outs, inp) in [
            (2, 5, 20),
            (5, 9, 576),
            (7, 4, 33),
            (16, 13, 64),
            (48, 6, 15),
        ] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let w: Vec<f32> = (0..outs * inp)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0)
                .collect();
            for level in Level::supported().into_iter().filter(|l| takes(*l, rows)) {
                let mut yt = vec![0f32; rows * outs];
                matmul_t_transposed(level, &x, &w, inp, &mut yt);
                for j in 0..outs {
                    for r in 0..rows {
                        let exact: f64 = (0..inp)
                            .map(|k| x[r * inp + k] as f64 * w[j * inp + k] as f64)
                            .sum();
                        let got = yt[j * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                            "{rows}×{outs}×{inp} at {level}: ({j}, {r}) {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
