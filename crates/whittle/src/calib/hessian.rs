//! The inverse-Hessian factor of the OBS/GPTQ column walk. For a linear with input covariance
//! `H = Σ x xᵀ` this returns the upper Cholesky factor `U` of `(H + λI)⁻¹` (so `(H+λI)⁻¹ = UᵀU`),
//! with `λ = damp · mean(diag H)`, computed in f64. Inputs that never fire (`H_jj = 0`) get
//! `H_jj = 1` and are reported as dead so their weights can be zeroed, as the reference does.

use crate::{Error, Result};
use faer::{linalg::solvers::DenseSolveCore, Mat, Side};

pub struct InverseHessian {
    /// Upper factor, `n × n` row-major.
    pub upper: Vec<f64>,
    pub dead: Vec<bool>,
    /// The dampening fraction finally used (raised if `H + λI` was not positive definite).
    pub damp: f64,
}

/// Factor of `(H + damp·mean(diag H)·I)⁻¹`. If the damped matrix is not positive definite, the
/// dampening is multiplied by 10 (up to 5 times) and the caller is told through `damp`.
pub fn inverse_hessian(h: &[f64], n: usize, damp: f64) -> Result<InverseHessian> {
    if h.len() != n * n || n == 0 {
        return Err(Error::Invalid(format!(
            "Hessian of {} values is not {n}×{n}",
            h.len()
        )));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: "calibration Hessian".into(),
            count: h.iter().filter(|v| !v.is_finite()).count(),
        });
    }
    if !(damp > 0.0 && damp.is_finite()) {
        return Err(Error::Invalid(format!("dampening {damp} must be positive")));
    }
    let dead: Vec<bool> = (0..n).map(|j| h[j * n + j] == 0.0).collect();
    let mut base = Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j]);
    for (j, d) in dead.iter().enumerate() {
        if *d {
            base[(j, j)] = 1.0;
        }
    }
    let mean_diag = (0..n).map(|j| base[(j, j)]).sum::<f64>() / n as f64;
    let mut frac = damp;
    for _ in 0..6 {
        let mut m = base.clone();
        for j in 0..n {
            m[(j, j)] += frac * mean_diag;
        }
        let Ok(llt) = m.llt(Side::Lower) else {
            frac *= 10.0;
            continue;
        };
        let inv = llt.inverse();
        let Ok(l) = inv.llt(Side::Lower) else {
            frac *= 10.0;
            continue;
        };
        let l = l.L();
        // Upper factor U = Lᵀ of the inverse.
        let upper = (0..n * n).map(|k| l[(k % n, k / n)]).collect();
        return Ok(InverseHessian {
            upper,
            dead,
            damp: frac,
        });
    }
    Err(Error::Invalid(format!(
        "calibration Hessian is not positive definite even with dampening {frac:.1e}; \
         use more calibration tokens"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_factor_reconstructs_damped_inverse() {
        let n = 6;
        let x: Vec<f64> = (0..20 * n)
            .map(|i| ((i * 17 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let mut h = vec![0f64; n * n];
        for r in 0..20 {
            for a in 0..n {
                for b in 0..n {
                    h[a * n + b] += x[r * n + a] * x[r * n + b];
                }
            }
        }
        let f = inverse_hessian(&h, n, 0.01).unwrap();
        assert_eq!(f.damp, 0.01);
        let lambda = 0.01 * (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
        // (H + λI) · UᵀU = I
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0;
                for k in 0..n {
                    let hik = h[i * n + k] + if i == k { lambda } else { 0.0 };
                    let utu: f64 = (0..n)
                        .map(|m| f.upper[m * n + k] * f.upper[m * n + j])
                        .sum();
                    v += hik * utu;
                }
                assert!(
                    (v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9,
                    "{i},{j}: {v}"
                );
            }
            for j in 0..i {
                assert_eq!(f.upper[i * n + j], 0.0);
            }
        }
    }

    #[test]
    fn dead_inputs_and_bad_values() {
        let mut h = vec![0f64; 9];
        h[0] = 2.0;
        h[8] = 3.0;
        let f = inverse_hessian(&h, 3, 0.01).unwrap();
        assert_eq!(f.dead, vec![false, true, false]);
        h[4] = f64::NAN;
        assert!(inverse_hessian(&h, 3, 0.01).is_err());
        // An indefinite matrix is rescued by stronger dampening, which is reported.
        let h = vec![1.0, 2.0, 2.0, 1.0];
        let f = inverse_hessian(&h, 2, 0.01).unwrap();
        assert!(f.damp > 1.0);
    }
}
