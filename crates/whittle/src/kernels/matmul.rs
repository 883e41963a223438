//! `y = x · Wᵀ` for a row-major weight `W` of shape `[out, in]` (the nn.Linear layout every model
//! file uses). Many rows (prefill) go to faer's GEMM, which reaches ~93 % of peak here; a few rows
//! (decode) go to a parallel matrix-vector loop, because a GEMM packs the whole weight first and
//! decode is bound by reading the weight once. On CPUs with AMX, many rows go to the tile path
//! of [`amx`] instead (f32 accuracy, faster than faer there).

use super::amx;
use super::dot::dot;
use faer::{Accum, MatMut, MatRef};
use rayon::prelude::*;

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
    if rows <= GEMV_MAX_ROWS {
        for r in 0..rows {
            gemv(
                &x[r * inp..(r + 1) * inp],
                w,
                inp,
                &mut y[r * out..(r + 1) * out],
            );
        }
        return;
    }
    if amx::takes(rows) {
        amx::matmul_t(x, w, rows, inp, out, y);
        return;
    }
    let threads = crate::threads::threads();
    let seq = |x: &[f32], y: &mut [f32]| {
        let r = x.len() / inp;
        gemm(
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

/// `dst (+)= lhs · rhs` with faer, scale 1.
pub fn gemm(dst: MatMut<f32>, acc: Accum, lhs: MatRef<f32>, rhs: MatRef<f32>, par: faer::Par) {
    faer::linalg::matmul::matmul(dst, acc, lhs, rhs, 1.0f32, par);
}

fn gemv(x: &[f32], w: &[f32], inp: usize, y: &mut [f32]) {
    matvec_rows(y, |j| dot(&w[j * inp..(j + 1) * inp], x));
}

/// `y[j] = row_dot(j)` for every output `j`, split over the worker threads in chunks of rows.
pub fn matvec_rows(y: &mut [f32], row_dot: impl Fn(usize) -> f32 + Sync) {
    let work = |(c, ys): (usize, &mut [f32])| {
        for (j, yj) in ys.iter_mut().enumerate() {
            *yj = row_dot(c * GEMV_CHUNK + j);
        }
    };
    if crate::threads::threads() == 1 {
        y.chunks_mut(GEMV_CHUNK).enumerate().for_each(work);
    } else {
        y.par_chunks_mut(GEMV_CHUNK).enumerate().for_each(work);
    }
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
    fn gemm_and_gemv_paths_match_naive_loop() {
        let (inp, out) = (37, 130);
        for rows in [1, 3, 4, 5, 33] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i % 7) as f32 - 3.0) * 0.2)
                .collect();
            let mut y = vec![f32::NAN; rows * out];
            matmul_t(&x, &w, rows, inp, out, &mut y);
            for (a, b) in y.iter().zip(naive(&x, &w, rows, inp, out)) {
                assert!((*a as f64 - b).abs() < 1e-4, "rows={rows}: {a} vs {b}");
            }
        }
    }
}
