//! Teacher-feature standardisation before a feature-distillation loss. Features of different
//! teachers, or of different layers of one teacher, differ in scale by orders of magnitude; a
//! plain MSE is then dominated by the loudest source. Each normaliser here is an affine map
//! `y = A (x − μ)` fitted from streamed first and second moments (f64), with its inverse, so a
//! student head that regresses `y` can be mapped back to the teacher's space.
//!
//! PHI-S (arXiv 2410.01680): `A = (1/α) H Uᵀ` with `Σ = U diag(λ) Uᵀ`, `H` a normalised Hadamard
//! matrix and `α = sqrt(Σλ / C)`. The rotation by `H` spreads every principal component evenly
//! over all channels (each `H` entry is ±1/√C), so every output channel has variance exactly
//! `mean(λ) / α² = 1`, with one scalar and no division by small eigenvalues. The baselines of the
//! paper are here too: global and per-channel standardisation, PCA, ZCA and Hadamard whitening
//! (whitening divides by every eigenvalue; eigenvalues below 1e-12 of the largest are floored
//! there, which is exactly where the paper finds whitening fails on low-rank teachers).

use super::hadamard::hadamard;
use crate::{Error, Result};
use faer::{Mat, Side};
use serde::{Deserialize, Serialize};

/// Which standardisation; `phis` is PHI-S.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormKind {
    None,
    Global,
    PerChannel,
    Pca,
    Zca,
    HadamardWhitening,
    Phis,
}

impl NormKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => NormKind::None,
            "global" => NormKind::Global,
            "per-channel" | "channel" => NormKind::PerChannel,
            "pca" | "pca-white" => NormKind::Pca,
            "zca" => NormKind::Zca,
            "hadamard-whitening" | "hca" => NormKind::HadamardWhitening,
            "phis" | "phi-s" => NormKind::Phis,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown feature normaliser '{other}' \
                     (none, global, per-channel, pca, zca, hadamard-whitening, phis)"
                )))
            }
        })
    }
}

/// Streamed mean and second moment of `C`-channel feature rows.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    channels: usize,
    rows: u64,
    sum: Vec<f64>,
    /// `Σ x xᵀ`, row-major `C × C`.
    outer: Vec<f64>,
}

impl FeatureStats {
    pub fn new(channels: usize) -> Self {
        FeatureStats {
            channels,
            rows: 0,
            sum: vec![0.0; channels],
            outer: vec![0.0; channels * channels],
        }
    }

    /// Adds `x` (`rows × C`, row-major).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let c = self.channels;
        if c == 0 || !x.len().is_multiple_of(c) {
            return Err(Error::Invalid(format!(
                "feature statistics: {} values are not rows of {c} channels",
                x.len()
            )));
        }
        crate::error::check_finite("features", x)?;
        for row in x.chunks_exact(c) {
            for (i, &a) in row.iter().enumerate() {
                self.sum[i] += a as f64;
                let out = &mut self.outer[i * c..(i + 1) * c];
                for (o, &b) in out.iter_mut().zip(row) {
                    *o += a as f64 * b as f64;
                }
            }
        }
        self.rows += (x.len() / c) as u64;
        Ok(())
    }

    fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.rows as f64).collect()
    }

    /// Population covariance `E[x xᵀ] − μ μᵀ`.
    fn covariance(&self) -> Mat<f64> {
        let (c, n, mu) = (self.channels, self.rows as f64, self.mean());
        Mat::from_fn(c, c, |i, j| self.outer[i * c + j] / n - mu[i] * mu[j])
    }
}

/// A fitted map `y = A (x − μ)` and its inverse `x = B y + μ`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Normalizer {
    pub kind: NormKind,
    pub channels: usize,
    pub mean: Vec<f32>,
    /// `A`, row-major `C × C`.
    pub forward: Vec<f32>,
    /// `B = A⁻¹` (for whitening of a rank-deficient source: the inverse on its range).
    pub inverse: Vec<f32>,
}

impl Normalizer {
    /// Fits `kind` to the statistics.
    pub fn fit(stats: &FeatureStats, kind: NormKind) -> Result<Self> {
        let c = stats.channels;
        if stats.rows < 2 {
            return Err(Error::Invalid(format!(
                "feature normaliser: {} feature rows, at least 2 are needed",
                stats.rows
            )));
        }
        let cov = stats.covariance();
        let diag = |f: &dyn Fn(usize) -> f64| {
            let a = Mat::<f64>::from_fn(c, c, |i, j| if i == j { f(i) } else { 0.0 });
            let b = Mat::<f64>::from_fn(c, c, |i, j| if i == j { 1.0 / f(i) } else { 0.0 });
            (a, b)
        };
        let positive = |v: f64| if v > 0.0 { v } else { 1.0 };
        let (a, b) = match kind {
            NormKind::None => diag(&|_| 1.0),
            NormKind::Global => {
                let var = (0..c).map(|i| cov[(i, i)]).sum::<f64>() / c as f64;
                let s = 1.0 / positive(var).sqrt();
                diag(&|_| s)
            }
            NormKind::PerChannel => diag(&|i| 1.0 / positive(cov[(i, i)]).sqrt()),
            _ => rotations(&cov, kind)?,
        };
        let flat = |m: &Mat<f64>| -> Vec<f32> {
            (0..c)
                .flat_map(|i| (0..c).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect()
        };
        Ok(Normalizer {
            kind,
            channels: c,
            mean: stats.mean().iter().map(|&m| m as f32).collect(),
            forward: flat(&a),
            inverse: flat(&b),
        })
    }

    /// `y = A (x − μ)` for rows `x` (`rows × C`).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        affine(&self.forward, x, self.channels, Some(&self.mean), None)
    }

    /// `x = B y + μ`.
    pub fn invert(&self, y: &[f32]) -> Vec<f32> {
        affine(&self.inverse, y, self.channels, None, Some(&self.mean))
    }
}

/// `m (x − sub) + add` per row, accumulated in f64.
fn affine(m: &[f32], x: &[f32], c: usize, sub: Option<&[f32]>, add: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let mut centred = vec![0.0f64; c];
    for (row, y) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        for (k, v) in centred.iter_mut().enumerate() {
            *v = row[k] as f64 - sub.map_or(0.0, |s| s[k] as f64);
        }
        for (i, yi) in y.iter_mut().enumerate() {
            let dot: f64 = m[i * c..(i + 1) * c]
                .iter()
                .zip(&centred)
                .map(|(a, b)| *a as f64 * b)
                .sum();
            *yi = (dot + add.map_or(0.0, |a| a[i] as f64)) as f32;
        }
    }
    out
}

/// The eigenvector-based maps (PCA, ZCA, Hadamard whitening, PHI-S) and their inverses.
fn rotations(cov: &Mat<f64>, kind: NormKind) -> Result<(Mat<f64>, Mat<f64>)> {
    let c = cov.nrows();
    let evd = cov.self_adjoint_eigen(Side::Lower).map_err(|e| {
        Error::Invalid(format!(
            "feature covariance: eigendecomposition failed: {e:?}"
        ))
    })?;
    let (u, lam) = (evd.U(), evd.S().column_vector());
    let top = (0..c).map(|i| lam[i]).fold(0.0f64, f64::max);
    if top <= 0.0 {
        return Err(Error::Invalid(
            "feature normaliser: the features do not vary (zero covariance)".into(),
        ));
    }
    let floor = top * 1e-12;
    let lam: Vec<f64> = (0..c).map(|i| lam[i].max(floor)).collect();
    let ut = u.transpose().to_owned();
    let scaled =
        |s: &dyn Fn(f64) -> f64, m: &Mat<f64>| Mat::from_fn(c, c, |i, j| s(lam[i]) * m[(i, j)]);
    let h = || -> Result<Mat<f64>> {
        let h = hadamard(c).map_err(|e| {
            Error::Invalid(format!(
                "{kind:?} needs a Hadamard matrix of the width: {e}"
            ))
        })?;
        let norm = 1.0 / (c as f64).sqrt();
        Ok(Mat::from_fn(c, c, |i, j| h[i * c + j] * norm))
    };
    Ok(match kind {
        // Λ^{-1/2} Uᵀ ; U Λ^{1/2}
        NormKind::Pca => {
            let a = scaled(&|l| 1.0 / l.sqrt(), &ut);
            let b = scaled(&|l| l.sqrt(), &ut).transpose().to_owned();
            (a, b)
        }
        // U Λ^{-1/2} Uᵀ ; U Λ^{1/2} Uᵀ
        NormKind::Zca => {
            let a = u * scaled(&|l| 1.0 / l.sqrt(), &ut);
            let b = u * scaled(&|l| l.sqrt(), &ut);
            (a, b)
        }
        // H Λ^{-1/2} Uᵀ ; U Λ^{1/2} Hᵀ
        NormKind::HadamardWhitening => {
            let h = h()?;
            let a = &h * scaled(&|l| 1.0 / l.sqrt(), &ut);
            let b = scaled(&|l| l.sqrt(), &ut).transpose() * h.transpose();
            (a, b)
        }
        // (1/α) H Uᵀ ; α U Hᵀ, α = sqrt(mean λ)
        _ => {
            let h = h()?;
            let alpha = (lam.iter().sum::<f64>() / c as f64).sqrt();
            let a = (&h * &ut) * faer::Scale(1.0 / alpha);
            let b = (u * h.transpose()) * faer::Scale(alpha);
            (a, b)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `rows × c` features of rank `rank` (plus tiny noise), channels scaled over 4 decades.
    fn low_rank(rows: usize, c: usize, rank: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let basis: Vec<f64> = (0..rank * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let scale: Vec<f64> = (0..c)
            .map(|i| 10f64.powf(4.0 * i as f64 / c as f64))
            .collect();
        let mut x = vec![0.0f32; rows * c];
        for row in x.chunks_exact_mut(c) {
            let z: Vec<f64> = (0..rank).map(|_| rng.random_range(-1.0..1.0)).collect();
            for (j, v) in row.iter_mut().enumerate() {
                let s: f64 = (0..rank).map(|k| z[k] * basis[k * c + j]).sum();
                *v = ((s + 1e-3 * rng.random_range(-1.0..1.0)) * scale[j] + 3.0) as f32;
            }
        }
        x
    }

    fn moments(y: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
        let n = (y.len() / c) as f64;
        let mean: Vec<f64> = (0..c)
            .map(|j| y.chunks_exact(c).map(|r| r[j] as f64).sum::<f64>() / n)
            .collect();
        let var = (0..c)
            .map(|j| {
                y.chunks_exact(c)
                    .map(|r| (r[j] as f64 - mean[j]).powi(2))
                    .sum::<f64>()
                    / n
            })
            .collect();
        (mean, var)
    }

    /// Largest relative difference between `x` and `invert(apply(x))`.
    fn round_trip_error(n: &Normalizer, x: &[f32]) -> f32 {
        let back = n.invert(&n.apply(x));
        x.iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) / a.abs().max(1.0)).abs())
            .fold(0.0, f32::max)
    }

    fn fit(x: &[f32], c: usize, kind: NormKind) -> Normalizer {
        let mut s = FeatureStats::new(c);
        s.add(x).unwrap();
        Normalizer::fit(&s, kind).unwrap()
    }

    #[test]
    fn phis_gives_every_channel_unit_variance_on_low_rank_features() {
        let c = 12;
        let x = low_rank(4000, c, 3, 1);
        let n = fit(&x, c, NormKind::Phis);
        let (mean, var) = moments(&n.apply(&x), c);
        for j in 0..c {
            assert!(mean[j].abs() < 1e-3, "channel {j}: mean {}", mean[j]);
            assert!(
                (var[j] - 1.0).abs() < 1e-3,
                "channel {j}: variance {}",
                var[j]
            );
        }
        // A rotation and one scale: invertible on every input.
        let worst = round_trip_error(&n, &x);
        assert!(worst < 1e-3, "{worst}");
    }

    /// SmolLM2's width: the Hadamard matrix comes from 8 × Paley I (71), the fit streams.
    #[test]
    fn phis_at_the_models_width() {
        let c = 576;
        let x = low_rank(1200, c, 16, 3);
        let mut s = FeatureStats::new(c);
        for part in x.chunks(300 * c) {
            s.add(part).unwrap();
        }
        let n = Normalizer::fit(&s, NormKind::Phis).unwrap();
        let (_, var) = moments(&n.apply(&x), c);
        let worst = var.iter().map(|v| (v - 1.0).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-2, "{worst}");
    }

    #[test]
    fn standardisers_and_whiteners_do_what_they_promise() {
        let c = 8;
        let x = low_rank(6000, c, c, 2); // full rank
        let (_, var) = moments(&fit(&x, c, NormKind::PerChannel).apply(&x), c);
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        let (_, var) = moments(&fit(&x, c, NormKind::Global).apply(&x), c);
        assert!((var.iter().sum::<f64>() / c as f64 - 1.0).abs() < 1e-3);
        for kind in [NormKind::Pca, NormKind::Zca, NormKind::HadamardWhitening] {
            let n = fit(&x, c, kind);
            let y = n.apply(&x);
            // Whitened: covariance = I.
            let mut s = FeatureStats::new(c);
            s.add(&y).unwrap();
            let cov = s.covariance();
            for i in 0..c {
                for j in 0..c {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (cov[(i, j)] - want).abs() < 2e-3,
                        "{kind:?} ({i},{j}) {}",
                        cov[(i, j)]
                    );
                }
            }
            let worst = round_trip_error(&n, &x);
            assert!(worst < 1e-2, "{kind:?}: {worst}");
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(NormKind::parse("whiten").is_err());
        let mut s = FeatureStats::new(6);
        assert!(s.add(&[1.0; 7]).is_err());
        s.add(&[1.0; 12]).unwrap();
        // Six channels: no Hadamard matrix of order 6; and the features do not vary.
        assert!(Normalizer::fit(&s, NormKind::Phis).is_err());
        assert!(s.add(&[f32::NAN; 6]).is_err());
    }
}
