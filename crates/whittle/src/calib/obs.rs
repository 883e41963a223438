//! The Optimal-Brain-Surgeon column walk shared by SparseGPT (pruning) and GPTQ (quantization):
//! columns left to right in blocks; each column is replaced by its compressed value and the
//! error, scaled by the inverse-Hessian factor, is pushed onto the columns not yet processed —
//! inside the block immediately, beyond it in one GEMM at the block's end ("lazy batch").

use crate::kernels::matmul::gemm;
use faer::{Accum, MatMut, MatRef};

/// The weight during the walk: the current block's columns live in a column-major buffer (each
/// column contiguous, so the per-column work vectorises and stays in cache), the others in the
/// row-major weight (columns after the block carry the updates of the blocks before it).
pub struct WalkView<'a> {
    w: &'a [f32],
    block: &'a [f32],
    rows: usize,
    cols: usize,
    /// The block's columns.
    span: std::ops::Range<usize>,
}

impl WalkView<'_> {
    /// Current `W[r, c]` for a column `c` not yet walked.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> f32 {
        if self.span.contains(&c) {
            self.block[(c - self.span.start) * self.rows + r]
        } else {
            self.w[r * self.cols + c]
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// What a method does to each column.
pub trait ColumnRule {
    /// Called before column `j` (within block `j..block_end`) is compressed; `w` shows the
    /// current, error-updated weight and `hinv_diag` is the factor's diagonal.
    fn prepare(&mut self, w: &WalkView, j: usize, block_end: usize, hinv_diag: &[f32]);
    /// The compressed values of column `j` (current values `col`, one per row) into `out`. A
    /// whole column per call, so that a rule's arithmetic runs in one vectorisable loop.
    fn apply_column(&self, j: usize, col: &[f32], out: &mut [f32]);
}

/// Runs the walk over `w` (`rows × cols`, row-major) with the upper factor `u` (`cols × cols`,
/// row-major, f32) of the damped inverse Hessian, in blocks of `block` columns.
pub fn obs_walk(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    u: &[f32],
    block: usize,
    rule: &mut dyn ColumnRule,
) {
    let diag: Vec<f32> = (0..cols).map(|j| u[j * cols + j]).collect();
    let block = block.max(1);
    // Column-major: the block's current columns, then each walked column's scaled error.
    let mut cur = vec![0f32; rows * block];
    let mut err = vec![0f32; rows * block];
    let mut compressed = vec![0f32; rows];
    for i1 in (0..cols).step_by(block) {
        let i2 = (i1 + block).min(cols);
        let bs = i2 - i1;
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (k, v) in row[i1..i2].iter().enumerate() {
                cur[k * rows + r] = *v;
            }
        }
        for j in i1..i2 {
            let k = j - i1;
            let view = WalkView {
                w,
                block: &cur,
                rows,
                cols,
                span: i1..i2,
            };
            rule.prepare(&view, j, i2, &diag);
            let (done, rest) = cur.split_at_mut((k + 1) * rows);
            let col = &mut done[k * rows..];
            rule.apply_column(j, col, &mut compressed);
            let e = &mut err[k * rows..(k + 1) * rows];
            for ((e, x), q) in e.iter_mut().zip(col.iter_mut()).zip(&compressed) {
                *e = (*x - q) / diag[j];
                *x = *q;
            }
            for (later, h) in rest
                .chunks_exact_mut(rows)
                .zip(&u[j * cols + j + 1..j * cols + i2])
            {
                later
                    .iter_mut()
                    .zip(e.iter())
                    .for_each(|(x, e)| *x -= e * h);
            }
        }
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            for (k, v) in row[i1..i2].iter_mut().enumerate() {
                *v = cur[k * rows + r];
            }
        }
        if i2 < cols {
            // W[:, i2..] -= E · U[i1..i2, i2..]. The product goes to a contiguous buffer first:
            // faer 0.24.4 accumulates wrongly (and writes out of bounds) into a strided
            // destination with `Accum::Add` — see the regression test below.
            let rest = cols - i2;
            let e = MatRef::from_column_major_slice(&err[..rows * bs], rows, bs);
            let ub = MatRef::from_row_major_slice_with_stride(&u[i1 * cols + i2..], bs, rest, cols);
            let mut upd = vec![0f32; rows * rest];
            gemm(
                MatMut::from_row_major_slice_mut(&mut upd, rows, rest),
                Accum::Replace,
                e,
                ub,
                crate::threads::gemm_par(),
            );
            for (row, d) in w.chunks_exact_mut(cols).zip(upd.chunks_exact(rest)) {
                row[i2..].iter_mut().zip(d).for_each(|(x, d)| *x -= d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pruning a fixed pattern: the result must not depend on the block size (the lazy batch
    /// update is exact), which also guards against the faer strided-accumulate bug.
    struct Fixed;
    impl ColumnRule for Fixed {
        fn prepare(&mut self, _: &WalkView, _: usize, _: usize, _: &[f32]) {}
        fn apply_column(&self, j: usize, col: &[f32], out: &mut [f32]) {
            for (r, (o, x)) in out.iter_mut().zip(col).enumerate() {
                *o = if (r + j).is_multiple_of(3) { 0.0 } else { *x };
            }
        }
    }

    #[test]
    fn blocking_does_not_change_result() {
        let (rows, cols) = (5, 37);
        let w0: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let u: Vec<f32> = (0..cols * cols)
            .map(|k| {
                let (i, j) = (k / cols, k % cols);
                match i.cmp(&j) {
                    std::cmp::Ordering::Equal => 1.0 + i as f32 * 0.1,
                    std::cmp::Ordering::Less => 0.05 * ((i + 2 * j) % 5) as f32,
                    std::cmp::Ordering::Greater => 0.0,
                }
            })
            .collect();
        let mut one = w0.clone();
        obs_walk(&mut one, rows, cols, &u, cols, &mut Fixed);
        for block in [1, 8, 16, 32] {
            let mut b = w0.clone();
            obs_walk(&mut b, rows, cols, &u, block, &mut Fixed);
            for i in 0..rows * cols {
                assert!(
                    (one[i] - b[i]).abs() < 1e-4,
                    "block {block}, {i}: {} {}",
                    one[i],
                    b[i]
                );
            }
        }
    }
}

/// An independent, slow statement of the same algorithm for tests: f64, one row at a time, the
/// inverse Hessian kept explicitly and the processed column eliminated from it after each step
/// (the textbook OBS update), no Cholesky factor and no blocking.
#[cfg(test)]
pub(crate) mod reference {
    /// `(H + damp·mean(diag H)·I)⁻¹` by Gauss-Jordan elimination.
    pub fn damped_inverse(h: &[f64], n: usize, damp: f64) -> Vec<f64> {
        let lambda = damp * (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
        let mut a: Vec<f64> = h.to_vec();
        for j in 0..n {
            a[j * n + j] += lambda;
        }
        let mut inv = vec![0f64; n * n];
        for j in 0..n {
            inv[j * n + j] = 1.0;
        }
        for c in 0..n {
            let p = a[c * n + c];
            for k in 0..n {
                a[c * n + k] /= p;
                inv[c * n + k] /= p;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for k in 0..n {
                        a[r * n + k] -= f * a[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        inv
    }

    /// Walks one row left to right. `compress(row, j, pivots)` says whether to prune column `j`
    /// (for pruning rules) — see `naive_obs_with` for a general replacement value.
    pub fn naive_obs(
        w: &[f32],
        hinv: &[f64],
        mut prune: impl FnMut(&[f64], usize, &[f64]) -> bool,
    ) -> Vec<f64> {
        naive_obs_with(
            w,
            hinv,
            |row, j, pivots| if prune(row, j, pivots) { 0.0 } else { row[j] },
        )
    }

    /// As [`naive_obs`], with `compress(row, j, pivots)` giving the new value of column `j`.
    /// `pivots[k]` is `[H⁻¹]_kk` after eliminating columns `< k` (what the saliency divides by);
    /// the row passed is the current, error-updated one.
    pub fn naive_obs_with(
        w: &[f32],
        hinv: &[f64],
        mut compress: impl FnMut(&[f64], usize, &[f64]) -> f64,
    ) -> Vec<f64> {
        let n = w.len();
        let mut row: Vec<f64> = w.iter().map(|v| *v as f64).collect();
        // Pivots do not depend on the weights: eliminate once to get them.
        let mut pivots = vec![0f64; n];
        let mut hi = hinv.to_vec();
        for j in 0..n {
            pivots[j] = hi[j * n + j];
            eliminate(&mut hi, n, j);
        }
        let mut hi = hinv.to_vec();
        for j in 0..n {
            let q = compress(&row, j, &pivots);
            let e = (row[j] - q) / hi[j * n + j];
            for k in j..n {
                row[k] -= e * hi[j * n + k];
            }
            row[j] = q;
            eliminate(&mut hi, n, j);
        }
        row
    }

    fn eliminate(hi: &mut [f64], n: usize, j: usize) {
        let p = hi[j * n + j];
        let col: Vec<f64> = (0..n).map(|r| hi[r * n + j]).collect();
        let rowj: Vec<f64> = hi[j * n..(j + 1) * n].to_vec();
        for r in 0..n {
            for k in 0..n {
                hi[r * n + k] -= col[r] * rowj[k] / p;
            }
        }
    }
}
