//! The inverse-Hessian factor of the OBS/GPTQ column walk. For a linear with input covariance
//! `H = Σ x xᵀ` this returns the upper Cholesky factor `U` of `(H + λI)⁻¹` (so `(H+λI)⁻¹ = UᵀU`),
//! with `λ = damp · mean(diag H)`, computed in f64. Inputs that never fire (`H_jj = 0`) get
//! `H_jj = 1` and are reported as dead so their weights can be zeroed, as the reference does.

use crate::{Error, Result};
use faer::linalg::triangular_inverse::invert_upper_triangular;
use faer::{MatMut, MatRef, Side};

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
    let diag = |j: usize| if dead[j] { 1.0 } else { h[j * n + j] };
    let mean_diag = (0..n).map(diag).sum::<f64>() / n as f64;
    // With `J` the order-reversing permutation and `J H J = L̃ L̃ᵀ`, the upper factor of the
    // inverse is `U = J L̃⁻¹ J` (`UᵀU = J L̃⁻ᵀ L̃⁻¹ J = H⁻¹`, and Cholesky factors are unique):
    // one factorisation and one triangular inverse, a third of the work of inverting `H` and
    // factoring the inverse as the reference does. Reversing a row-major array's values
    // reverses both indices, so `J H J` is `h` reversed, which read column-major (faer's
    // layout) is the same matrix since `H` is symmetric: every step is a contiguous copy.
    let last = n - 1;
    let mut frac = damp;
    for _ in 0..6 {
        let mut m: Vec<f64> = h.iter().rev().copied().collect();
        for j in 0..n {
            m[j * n + j] = diag(last - j) + frac * mean_diag;
        }
        let max_diag = (0..n).map(|j| m[j * n + j]).fold(0.0, f64::max);
        let Ok(llt) = MatRef::from_column_major_slice(&m, n, n).llt(Side::Lower) else {
            frac *= 10.0;
            continue;
        };
        // A pivot lost in rounding (a numerically singular damped matrix) passes the
        // factorisation; it would blow up the inverse, so it counts as a failure too.
        if (0..n).any(|j| llt.L()[(j, j)].powi(2) <= 1e-14 * max_diag) {
            frac *= 10.0;
            continue;
        }
        // `(L̃ᵀ)⁻¹` stored column-major is `L̃⁻¹` row-major; reversed, `J L̃⁻¹ J` row-major.
        let mut upper = vec![0f64; n * n];
        invert_upper_triangular(
            MatMut::from_column_major_slice_mut(&mut upper, n, n),
            llt.L().transpose(),
            crate::threads::gemm_par(),
        );
        upper.reverse();
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
