//! Streamed least squares `y ≈ Wᵀ x + b` from calibration rows: only the sums `Σx`, `Σy`,
//! `Σxxᵀ`, `Σxyᵀ` are kept (f64), never the activations. Emulated updates of removed blocks and
//! the initial projections of feature distillation are both such fits.

use crate::{Error, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Ridge term, relative to the mean input variance: keeps directions the calibration data never
/// excites at zero instead of at noise.
pub const RIDGE: f64 = 1e-4;

/// Sums of `n` rows of inputs (`inp` wide) and targets (`out` wide).
pub struct RidgeSums {
    n: usize,
    sx: Vec<f64>,
    sy: Vec<f64>,
    xtx: Mat<f64>,
    xty: Mat<f64>,
}

/// A ridge fit on centred data: `y ≈ wᵀ (x − mean_x) + mean_y`.
pub struct RidgeFit {
    /// `inp × out`.
    pub w: Mat<f64>,
    pub mean_x: Vec<f64>,
    pub mean_y: Vec<f64>,
    /// The input covariance (reduced-rank fits weigh directions by it).
    pub cxx: Mat<f64>,
}

impl RidgeSums {
    pub fn new(inp: usize, out: usize) -> Self {
        RidgeSums {
            n: 0,
            sx: vec![0.0; inp],
            sy: vec![0.0; out],
            xtx: Mat::zeros(inp, inp),
            xty: Mat::zeros(inp, out),
        }
    }

    /// Adds rows `x` (`rows × inp`) with targets `y` (`rows × out`).
    pub fn add(&mut self, x: &[f32], y: &[f32]) {
        let (inp, out) = (self.sx.len(), self.sy.len());
        let t = x.len() / inp;
        let xm = Mat::<f64>::from_fn(t, inp, |r, c| x[r * inp + c] as f64);
        let ym = Mat::<f64>::from_fn(t, out, |r, c| y[r * out + c] as f64);
        for r in 0..t {
            (0..inp).for_each(|c| self.sx[c] += xm[(r, c)]);
            (0..out).for_each(|c| self.sy[c] += ym[(r, c)]);
        }
        self.xtx += xm.transpose() * &xm;
        self.xty += xm.transpose() * &ym;
        self.n += t;
    }

    /// The mean target (what a fit without inputs predicts).
    pub fn mean_y(&self) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        self.sy.iter().map(|v| v / n).collect()
    }

    /// Solves `(Cxx + λ I) w = Cxy` with `λ = RIDGE ×` the mean input variance; `name` labels
    /// errors.
    pub fn fit(&self, name: &str) -> Result<RidgeFit> {
        let (inp, out) = (self.sx.len(), self.sy.len());
        let n = self.n.max(1) as f64;
        let mx: Vec<f64> = self.sx.iter().map(|v| v / n).collect();
        let my = self.mean_y();
        let cxx = Mat::<f64>::from_fn(inp, inp, |i, j| self.xtx[(i, j)] / n - mx[i] * mx[j]);
        let cxy = Mat::<f64>::from_fn(inp, out, |i, j| self.xty[(i, j)] / n - mx[i] * my[j]);
        let mean_var = (0..inp).map(|i| cxx[(i, i)]).sum::<f64>() / inp as f64;
        if mean_var.is_nan() || mean_var <= 0.0 {
            return Err(Error::Invalid(format!(
                "{name}: the calibration inputs do not vary; cannot fit a linear map"
            )));
        }
        let damped = Mat::<f64>::from_fn(inp, inp, |i, j| {
            cxx[(i, j)] + if i == j { RIDGE * mean_var } else { 0.0 }
        });
        let llt = damped
            .llt(Side::Lower)
            .map_err(|e| Error::Invalid(format!("{name}: input covariance not definite: {e:?}")))?;
        Ok(RidgeFit {
            w: llt.solve(&cxy),
            mean_x: mx,
            mean_y: my,
            cxx,
        })
    }
}

/// Row-major values of a matrix.
pub fn row_major(m: &Mat<f64>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_affine_map() {
        // y = M x + c with M 2 × 3, from 50 varied rows: the fit returns M (up to the tiny ridge).
        let m = [[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]];
        let c = [0.25, -1.0];
        let mut s = RidgeSums::new(3, 2);
        let mut seed = 1u64;
        for _ in 0..50 {
            let x: Vec<f32> = (0..3)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            let y: Vec<f32> = (0..2)
                .map(|o| (0..3).map(|i| m[o][i] * x[i]).sum::<f32>() + c[o])
                .collect();
            s.add(&x, &y);
        }
        let f = s.fit("test").unwrap();
        for (o, row) in m.iter().enumerate() {
            for (i, want) in row.iter().enumerate() {
                assert!((f.w[(i, o)] - *want as f64).abs() < 1e-3, "{i},{o}");
            }
            let b = f.mean_y[o] - (0..3).map(|i| f.w[(i, o)] * f.mean_x[i]).sum::<f64>();
            assert!((b - c[o] as f64).abs() < 1e-3);
        }
        assert!(RidgeSums::new(2, 1).fit("empty").is_err());
    }
}
