//! `y = x · Wᵀ` for a row-major weight `W` of shape `[out, in]` (the nn.Linear layout every model
//! file uses), and the general GEMM every other product goes through. Many rows (prefill) go to
//! a GEMM: on AMX CPUs the tile path of [`amx`] (f32 accuracy), on x86 with AVX2 or AVX-512
//! faer's x86 micro-kernels asked for that instruction set explicitly, at the scalar level a
//! portable register-blocked GEMM. A few rows (decode) go to a parallel matrix-vector loop,
//! because a GEMM packs the whole weight first and decode is bound by reading the weight once.

use super::amx;
pub use super::amx::Precision;
use super::dot::dot_at;
use super::matmul_small;
use super::simd::{self, Level};
use faer::{Accum, MatMut, MatRef};
use rayon::prelude::*;
use std::cell::RefCell;

/// Fewest outputs for which a weight gradient takes the AMX tiles ([`matmul_tn`]).
const TN_TILES_MIN_OUT: usize = 8192;
/// Below this many rows, a row-by-row matrix-vector product beats packing the weight for a GEMM.
pub const GEMV_MAX_ROWS: usize = 4;
/// Output rows per rayon task in the matrix-vector path (a few KiB of weight each).
pub const GEMV_CHUNK: usize = 64;

/// `y[rows, out] = x[rows, in] · w[out, in]ᵀ`, overwriting `y`.
pub fn matmul_t(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize, y: &mut [f32]) {
    assert_eq!(x.len(), rows * inp);
    assert_eq!(w.len(), out * inp);
    assert_eq!(y.len(), rows * out);
    if rows == 0 || out == 0 {
        return;
    }
    let level = simd::level();
    if rows <= GEMV_MAX_ROWS && !matmul_small::takes(level, rows) {
        for r in 0..rows {
            let xr = &x[r * inp..(r + 1) * inp];
            let yr = &mut y[r * out..(r + 1) * out];
            matvec_rows(yr, |j| dot_at(level, &w[j * inp..(j + 1) * inp], xr));
        }
        return;
    }
    if amx::takes(rows) {
        amx::matmul_t(x, w, (rows, inp, out), y, amx::Precision::F32);
        return;
    }
    let threads = crate::threads::threads();
    if matmul_small::takes(level, rows) {
        let w = matmul_small::WeightRows::F32(w);
        matmul_small::matmul_t(level, x, w, (rows, inp, out), y);
        return;
    }
    let seq = |x: &[f32], y: &mut [f32]| {
        let r = x.len() / inp;
        gemm_at(
            level,
            MatMut::from_row_major_slice_mut(y, r, out),
            Accum::Replace,
            MatRef::from_row_major_slice(x, r, inp),
            MatRef::from_row_major_slice(w, out, inp).transpose(),
            faer::Par::Seq,
        );
    };
    if threads == 1 || rows < ROW_SPLIT_MIN {
        seq(x, y);
        return;
    }
    // Rows are independent: each thread multiplies its own slice of rows with a sequential
    // GEMM. On these shapes this is ~10 % faster than one GEMM parallelised inside (measured on
    // SmolLM2 prefill; the weight is packed once per thread instead of synchronising panels).
    let chunk = rows.div_ceil(threads);
    x.par_chunks(chunk * inp)
        .zip(y.par_chunks_mut(chunk * out))
        .for_each(|(x, y)| seq(x, y));
}

/// Fewest rows for which splitting rows between threads pays.
const ROW_SPLIT_MIN: usize = 64;

/// Rows of a stored weight that [`matmul_t_expanding`] expands per GEMM call: 64 × 1536 f32
/// (393 KB) stays in a core's L2 while the GEMM packs it.
const EXPAND_ROWS: usize = 64;

thread_local! {
    /// Each task's buffer of expanded weight rows, reused across products.
    static EXPANDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[rows, out] = x · Wᵀ` for a weight stored in another form (quantized blocks, 2:4):
/// `expand(j0..j1, dst)` writes rows `j0..j1` of `W` as f32 into `dst`. Each task expands
/// [`EXPAND_ROWS`] rows of `W` at a time and multiplies them at once, while they are in its
/// cache. Expanding the whole matrix before one GEMM wrote and re-read an f32 copy through
/// memory and made 2:4 and 4-bit products 5–10 % slower than the same product on a dense f32
/// weight; expanded in chunks, they run level with it (`examples/gemm_paths.rs`). With
/// enough rows each thread takes its share of the rows and expands every chunk itself (the
/// expansion is ~3 % of its product); with few rows the threads share out the chunks instead.
pub fn matmul_t_expanding(
    x: &[f32],
    (rows, inp, out): (usize, usize, usize),
    y: &mut [f32],
    expand: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    assert_eq!(x.len(), rows * inp);
    assert_eq!(y.len(), rows * out);
    if rows == 0 || out == 0 {
        return;
    }
    let level = simd::level();
    let task = |x: &[f32], mut y: MatMut<f32>, cols: std::ops::Range<usize>| {
        // Taken out of the thread-local while the task runs: nothing it calls may find it
        // borrowed.
        let mut w = EXPANDED.with_borrow_mut(std::mem::take);
        w.resize(EXPAND_ROWS * inp, 0.0);
        let r = x.len() / inp;
        for j0 in cols.clone().step_by(EXPAND_ROWS) {
            let j1 = (j0 + EXPAND_ROWS).min(cols.end);
            let w = &mut w[..(j1 - j0) * inp];
            expand(j0..j1, w);
            gemm_at(
                level,
                y.as_mut().subcols_mut(j0 - cols.start, j1 - j0),
                Accum::Replace,
                MatRef::from_row_major_slice(x, r, inp),
                MatRef::from_row_major_slice(w, j1 - j0, inp).transpose(),
                faer::Par::Seq,
            );
        }
        EXPANDED.with_borrow_mut(|b| *b = w);
    };
    let threads = crate::threads::threads();
    if threads == 1 {
        return task(x, MatMut::from_row_major_slice_mut(y, rows, out), 0..out);
    }
    if rows >= ROW_SPLIT_MIN {
        let chunk = rows.div_ceil(threads);
        return crate::threads::install(|| {
            x.par_chunks(chunk * inp)
                .zip(y.par_chunks_mut(chunk * out))
                .for_each(|(x, y)| {
                    let y = MatMut::from_row_major_slice_mut(y, x.len() / inp, out);
                    task(x, y, 0..out)
                })
        });
    }
    // Few rows: each thread its share of the chunks, all rows.
    let width = out.div_ceil(threads).next_multiple_of(EXPAND_ROWS);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = MatMut::from_row_major_slice_mut(y, rows, out);
    for at in (0..out).step_by(width) {
        let (part, right) = rest.split_at_col_mut(width.min(out - at));
        parts.push((at..at + part.ncols(), part));
        rest = right;
    }
    crate::threads::install(|| parts.into_par_iter().for_each(|(cols, y)| task(x, y, cols)));
}

/// [`matmul_t`] at `precision`: on AMX tiles at [`Precision::Bf16x3`] (which only the tiles
/// honour), else the f32 product.
pub fn matmul_t_at(
    x: &[f32],
    w: &[f32],
    (rows, inp, out): (usize, usize, usize),
    y: &mut [f32],
    precision: Precision,
) {
    match precision {
        Precision::Bf16x3 if amx::takes(rows) => {
            amx::matmul_t(x, w, (rows, inp, out), y, precision)
        }
        _ => matmul_t(x, w, rows, inp, out, y),
    }
}

/// `dx[rows, inp] = dy[rows, out] · w[out, inp]`, the input gradient of [`matmul_t`]'s product:
/// on AMX tiles at [`Precision::Bf16x3`], else a row-parallel GEMM at the thread's level.
pub fn matmul_nn(
    dy: &[f32],
    w: &[f32],
    (rows, out, inp): (usize, usize, usize),
    dx: &mut [f32],
    precision: Precision,
) {
    match precision {
        Precision::Bf16x3 if amx::takes(rows) => {
            amx::matmul_nn(dy, w, (rows, out, inp), dx, precision)
        }
        _ => gemm_rows(
            MatMut::from_row_major_slice_mut(dx, rows, inp),
            Accum::Replace,
            MatRef::from_row_major_slice(dy, rows, out),
            MatRef::from_row_major_slice(w, out, inp),
        ),
    }
}

/// `dw[out, inp] (+)= dy[rows, out]ᵀ · x[rows, inp]`, the weight gradient of [`matmul_t`]'s
/// product (`acc` says whether it replaces or adds to `dw`: micro-batches sum their gradients
/// in place): a row-parallel GEMM at the thread's level, or on AMX tiles where the CPU has them
/// for a vocabulary-wide output or at [`Precision::Bf16x3`] (which only the tiles honour). faer
/// reads `dyᵀ` across rows `out` floats apart, which for the output head (49,152) costs it half
/// its speed: 2 threads, 4096 rows, 128 GFLOP/s against 235 on tiles; on the blocks' shapes
/// (≤ 1536 outputs) f32-exact tiles were no faster than faer.
pub fn matmul_tn(
    dy: &[f32],
    x: &[f32],
    (rows, out, inp): (usize, usize, usize),
    dw: &mut [f32],
    (acc, precision): (Accum, Precision),
) {
    if (out >= TN_TILES_MIN_OUT || precision == Precision::Bf16x3) && amx::available() {
        if acc == Accum::Replace {
            return amx::matmul_tn(dy, x, (rows, out, inp), dw, precision);
        }
        // The tiles store their sums: a second micro-batch's gradient goes through a buffer.
        let mut part = vec![0f32; dw.len()];
        amx::matmul_tn(dy, x, (rows, out, inp), &mut part, precision);
        return crate::threads::install(|| super::activation::add_in_place(dw, &part, inp));
    }
    gemm_rows(
        MatMut::from_row_major_slice_mut(dw, out, inp),
        acc,
        MatRef::from_row_major_slice(dy, rows, out).transpose(),
        MatRef::from_row_major_slice(x, rows, inp),
    )
}

/// `dst (+)= lhs · rhs` with the rows of `dst` (and `lhs`) split across the threads, each block
/// a sequential GEMM at the current level: the layout [`matmul_t`] found fastest, for products
/// whose operands are views (transposes of row-major data, as training's backward passes take).
pub fn gemm_rows(dst: MatMut<f32>, acc: Accum, lhs: MatRef<f32>, rhs: MatRef<f32>) {
    let level = simd::level();
    let (m, threads) = (dst.nrows(), crate::threads::threads());
    if threads == 1 || m < ROW_SPLIT_MIN {
        return gemm_at(level, dst, acc, lhs, rhs, faer::Par::Seq);
    }
    let chunk = m.div_ceil(threads);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = dst;
    let mut at = 0;
    while at < m {
        let n = chunk.min(m - at);
        let (top, bottom) = rest.split_at_row_mut(n);
        parts.push((at, n, top));
        rest = bottom;
        at += n;
    }
    parts
        .into_par_iter()
        .for_each(|(at, n, d)| gemm_at(level, d, acc, lhs.subrows(at, n), rhs, faer::Par::Seq));
}

/// `dst (+)= lhs · rhs`, scale 1, at the thread's SIMD level.
pub fn gemm(dst: MatMut<f32>, acc: Accum, lhs: MatRef<f32>, rhs: MatRef<f32>, par: faer::Par) {
    gemm_at(simd::level(), dst, acc, lhs, rhs, par)
}

/// [`gemm`] at a given level. faer's own `matmul` picks AVX-512 wherever the CPU has it, so on
/// x86 its micro-kernels (the `private-gemm-x86` crate) are called here with the instruction
/// set of the level; on AArch64 faer's NEON kernels are the baseline and serve every level.
pub fn gemm_at(
    level: Level,
    dst: MatMut<f32>,
    acc: Accum,
    lhs: MatRef<f32>,
    rhs: MatRef<f32>,
    par: faer::Par,
) {
    assert!(dst.nrows() == lhs.nrows() && dst.ncols() == rhs.ncols());
    assert_eq!(lhs.ncols(), rhs.nrows());
    #[cfg(target_arch = "x86_64")]
    {
        use private_gemm_x86 as pg;
        let instr = match level {
            Level::Avx512 | Level::Amx => pg::InstrSet::Avx512,
            Level::Avx2 => pg::InstrSet::Avx256,
            _ => return portable::gemm(dst, acc, lhs, rhs),
        };
        let (m, n, k) = (dst.nrows(), dst.ncols(), lhs.ncols());
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if acc == Accum::Replace {
                let mut dst = dst;
                dst.fill(0.0);
            }
            return;
        }
        let alpha = 1.0f32;
        // SAFETY: the pointers and strides describe the faer views, whose shapes are checked
        // above; the instruction set is one the CPU runs (a level always is).
        unsafe {
            pg::gemm(
                pg::DType::F32,
                pg::IType::U64,
                instr,
                m,
                n,
                k,
                dst.as_ptr_mut() as *mut (),
                dst.row_stride(),
                dst.col_stride(),
                std::ptr::null(),
                std::ptr::null(),
                pg::DstKind::Full,
                match acc {
                    Accum::Replace => pg::Accum::Replace,
                    Accum::Add => pg::Accum::Add,
                },
                lhs.as_ptr() as *const (),
                lhs.row_stride(),
                lhs.col_stride(),
                false,
                std::ptr::null(),
                0,
                rhs.as_ptr() as *const (),
                rhs.row_stride(),
                rhs.col_stride(),
                false,
                &raw const alpha as *const (),
                par.degree(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        faer::linalg::matmul::matmul(dst, acc, lhs, rhs, 1.0f32, par);
    }
}

/// The scalar level's GEMM: portable Rust that the compiler vectorises for the baseline target
/// (SSE2 on x86-64), with separate multiplies and adds (no libm `fmaf`). Classic blocking: a
/// `KC`-deep slice of `rhs` packed into `NR`-wide column panels, `MC` rows of `lhs` packed into
/// `MR`-tall row panels, and an `MR × NR` block of sums held in registers (8 SSE registers).
#[cfg(target_arch = "x86_64")]
mod portable {
    use faer::{Accum, MatMut, MatRef};

    const MR: usize = 4;
    const NR: usize = 8;
    const KC: usize = 256;
    const MC: usize = 64;

    pub fn gemm(mut dst: MatMut<f32>, acc: Accum, lhs: MatRef<f32>, rhs: MatRef<f32>) {
        let (m, n, k) = (dst.nrows(), dst.ncols(), lhs.ncols());
        if acc == Accum::Replace {
            dst.fill(0.0);
        }
        let mut bp = Vec::new();
        let mut ap = vec![0f32; MC.div_ceil(MR) * MR * KC];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            // rhs[p0.., j] for all j, as panels `[j / NR][p][j % NR]` (zero past n).
            bp.clear();
            bp.resize(n.div_ceil(NR) * NR * kc, 0.0);
            for (jp, panel) in bp.chunks_exact_mut(NR * kc).enumerate() {
                for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (c, v) in row.iter_mut().enumerate().take(n - jp * NR) {
                        *v = rhs[(p0 + p, jp * NR + c)];
                    }
                }
            }
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                for (ip, panel) in ap
                    .chunks_exact_mut(MR * kc)
                    .take(mc.div_ceil(MR))
                    .enumerate()
                {
                    for (p, col) in panel.chunks_exact_mut(MR).enumerate() {
                        for (r, v) in col.iter_mut().enumerate() {
                            let i = ip * MR + r;
                            *v = if i < mc { lhs[(i0 + i, p0 + p)] } else { 0.0 };
                        }
                    }
                }
                for (jp, b) in bp.chunks_exact(NR * kc).enumerate() {
                    for (ip, a) in ap.chunks_exact(MR * kc).take(mc.div_ceil(MR)).enumerate() {
                        let block = micro(a, b);
                        let rows = MR.min(mc - ip * MR);
                        let cols = NR.min(n - jp * NR);
                        for (r, sums) in block.iter().enumerate().take(rows) {
                            for (c, s) in sums.iter().enumerate().take(cols) {
                                dst[(i0 + ip * MR + r, jp * NR + c)] += s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// `Σ_p a[p][r] · b[p][c]` for an `MR × NR` block.
    #[inline(always)]
    fn micro(a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
        let mut acc = [[0f32; NR]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for r in 0..MR {
                for c in 0..NR {
                    acc[r][c] += ap[r] * bp[c];
                }
            }
        }
        acc
    }
}

/// `y[j] = row_dot(j)` for every output `j`, split over the worker threads in chunks of rows.
pub fn matvec_rows(y: &mut [f32], row_dot: impl Fn(usize) -> f32 + Sync) {
    matvec_chunks(y, |start, ys| {
        for (j, yj) in ys.iter_mut().enumerate() {
            *yj = row_dot(start + j);
        }
    });
}

/// `chunk(first_row, y_rows)` over chunks of [`GEMV_CHUNK`] outputs, split over the worker
/// threads: for kernels that compute several rows at once.
pub fn matvec_chunks(y: &mut [f32], chunk: impl Fn(usize, &mut [f32]) + Sync) {
    let mut chunks: Vec<(usize, &mut [f32])> = y
        .chunks_mut(GEMV_CHUNK)
        .enumerate()
        .map(|(c, ys)| (c * GEMV_CHUNK, ys))
        .collect();
    crate::threads::for_each_mut(&mut chunks, |(start, ys)| chunk(*start, ys));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * out];
        for r in 0..rows {
            for o in 0..out {
                for k in 0..inp {
                    y[r * out + o] += x[r * inp + k] as f64 * w[o * inp + k] as f64;
                }
            }
        }
        y
    }

    #[test]
    fn gemm_and_gemv_paths_match_naive_loop_at_every_level() {
        crate::kernels::simd::for_each_level(|level| {
            gemm_and_gemv_match(level);
        });
    }

    fn gemm_and_gemv_match(level: Level) {
        let (inp, out) = (300, 130);
        for rows in [1, 3, 4, 5, 33, 70] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i % 7) as f32 - 3.0) * 0.2)
                .collect();
            let mut y = vec![f32::NAN; rows * out];
            matmul_t(&x, &w, rows, inp, out, &mut y);
            for (a, b) in y.iter().zip(naive(&x, &w, rows, inp, out)) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "rows={rows} at {level}: {a} vs {b}"
                );
            }
        }
    }

    /// The weight expanded in chunks (here: a scaled copy, so that a wrong row range shows):
    /// the row split (many rows, two threads), the chunk split (few rows) and one task (one
    /// thread, at every level), with an output count that leaves a partial chunk.
    #[test]
    fn expanding_product_matches_naive_loop() {
        let (inp, out) = (100, 2 * EXPAND_ROWS + 3);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.2)
            .collect();
        let expand = |rows: std::ops::Range<usize>, dst: &mut [f32]| {
            for (v, s) in dst.iter_mut().zip(&w[rows.start * inp..rows.end * inp]) {
                *v = 2.0 * s;
            }
        };
        let check = |rows: usize, level: &str| {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let mut y = vec![f32::NAN; rows * out];
            matmul_t_expanding(&x, (rows, inp, out), &mut y, &expand);
            for (a, b) in y.iter().zip(naive(&x, &w, rows, inp, out)) {
                assert!(
                    (*a as f64 - 2.0 * b).abs() < 1e-4 * (1.0 + b.abs()),
                    "rows={rows} at {level}: {a} vs {}",
                    2.0 * b
                );
            }
        };
        crate::threads::install(|| {
            for rows in [5, ROW_SPLIT_MIN + 7] {
                check(rows, "the default level");
            }
        });
        crate::kernels::simd::for_each_level(|level| check(9, level.name()));
    }

    /// Column-major left operand, transposed right operand, accumulation into existing values;
    /// sizes past every blocking constant of the portable GEMM.
    #[test]
    fn general_gemm_matches_naive_with_strides_and_accumulation_at_every_level() {
        let (m, n, k) = (70, 45, 300);
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 11) as f32 - 5.0) * 0.1).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i % 9) as f32 - 4.0) * 0.3).collect();
        crate::kernels::simd::for_each_level(|level| {
            let mut c = vec![1f32; m * n];
            gemm_at(
                level,
                MatMut::from_row_major_slice_mut(&mut c, m, n),
                Accum::Add,
                MatRef::from_column_major_slice(&a, m, k),
                MatRef::from_row_major_slice(&b, n, k).transpose(),
                faer::Par::Seq,
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = 1.0
                        + (0..k)
                            .map(|p| a[p * m + i] as f64 * b[j * k + p] as f64)
                            .sum::<f64>();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{level} {i} {j}"
                    );
                }
            }
        });
    }
}
