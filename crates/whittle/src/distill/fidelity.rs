//! How close a student's feature head comes to the teacher, measured in the teacher's own space.
//!
//! Why in the teacher's space: each normaliser trains its head toward another target (PHI-S
//! rotates and rescales, whitening stretches the near-empty directions), so the feature losses
//! of two runs are in different units and cannot rank normalisers. Mapped back through the
//! normaliser's inverse (`x = B z + μ`), every run's predictions are compared with the same raw
//! teacher features: the mean cosine per row, and the squared error over the features' total
//! variance (the normalised MSE: 1 = no better than predicting the teacher's mean row). Both are
//! streamed, so a held-out set of any size costs one row of statistics per channel.

use super::normalizer::Normalizer;

/// Streaming cosine and normalised MSE of predictions against raw teacher rows.
#[derive(Debug, Clone)]
pub struct Fidelity {
    channels: usize,
    rows: u64,
    cos: f64,
    sq_err: f64,
    /// Per-channel sum of the teacher's values, and the sum of their squares over all channels
    /// (the total variance is `Σ t² − Σ_c (Σ t_c)² / rows`).
    sum: Vec<f64>,
    sum_sq: f64,
}

impl Fidelity {
    pub fn new(channels: usize) -> Self {
        Fidelity {
            channels,
            rows: 0,
            cos: 0.0,
            sq_err: 0.0,
            sum: vec![0.0; channels],
            sum_sq: 0.0,
        }
    }

    /// Adds rows of predictions already in the teacher's space and the teacher's rows (both
    /// `rows × channels`).
    pub fn add(&mut self, pred: &[f32], raw: &[f32]) {
        let c = self.channels;
        assert_eq!(
            pred.len(),
            raw.len(),
            "fidelity: predictions and teacher rows differ"
        );
        for (p, t) in pred.chunks_exact(c).zip(raw.chunks_exact(c)) {
            let (mut dot, mut pp, mut tt, mut err) = (0f64, 0f64, 0f64, 0f64);
            for ((a, b), s) in p.iter().zip(t).zip(&mut self.sum) {
                let (a, b) = (*a as f64, *b as f64);
                dot += a * b;
                pp += a * a;
                tt += b * b;
                err += (a - b) * (a - b);
                *s += b;
            }
            self.cos += dot / (pp.sqrt() * tt.sqrt()).max(1e-12);
            self.sq_err += err;
            self.sum_sq += tt;
            self.rows += 1;
        }
    }

    /// Adds predictions in the normaliser's space (what a feature head outputs), mapped back.
    pub fn add_normalised(&mut self, normalizer: &Normalizer, pred: &[f32], raw: &[f32]) {
        self.add(&normalizer.invert(pred), raw);
    }

    /// Mean cosine similarity per row.
    pub fn cosine(&self) -> f64 {
        self.cos / self.rows.max(1) as f64
    }

    /// Squared error over the teacher features' total variance.
    pub fn nmse(&self) -> f64 {
        let n = self.rows.max(1) as f64;
        let var = self.sum_sq - self.sum.iter().map(|s| s * s).sum::<f64>() / n;
        self.sq_err / var.max(1e-30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two figures against a direct two-pass computation, on rows streamed in two parts.
    #[test]
    fn streamed_figures_equal_a_two_pass_computation() {
        let (rows, c) = (37, 5);
        let raw: Vec<f32> = (0..rows * c)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 3.0 + (i % c) as f32 * 20.0)
            .collect();
        let pred: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, v)| v * 0.9 + ((i * 31) % 13) as f32 / 7.0)
            .collect();
        let mut f = Fidelity::new(c);
        f.add(&pred[..10 * c], &raw[..10 * c]);
        f.add(&pred[10 * c..], &raw[10 * c..]);
        let mean: Vec<f64> = (0..c)
            .map(|j| (0..rows).map(|r| raw[r * c + j] as f64).sum::<f64>() / rows as f64)
            .collect();
        let (mut cos, mut err, mut var) = (0f64, 0f64, 0f64);
        for r in 0..rows {
            let (p, t) = (&pred[r * c..(r + 1) * c], &raw[r * c..(r + 1) * c]);
            let dot: f64 = p.iter().zip(t).map(|(a, b)| *a as f64 * *b as f64).sum();
            let np: f64 = p.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let nt: f64 = t.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            cos += dot / (np * nt);
            err += p
                .iter()
                .zip(t)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum::<f64>();
            var += t
                .iter()
                .zip(&mean)
                .map(|(b, m)| (*b as f64 - m).powi(2))
                .sum::<f64>();
        }
        assert!((f.cosine() - cos / rows as f64).abs() < 1e-12);
        assert!((f.nmse() - err / var).abs() < 1e-9 * (err / var));
    }

    /// Predicting every row exactly gives cosine 1 and nMSE 0; predicting the mean row, nMSE 1.
    #[test]
    fn exact_and_mean_predictions() {
        let raw: Vec<f32> = (0..24).map(|i| (i as f32).sin() * 3.0 + 1.0).collect();
        let mut exact = Fidelity::new(4);
        exact.add(&raw, &raw);
        assert!((exact.cosine() - 1.0).abs() < 1e-12 && exact.nmse() < 1e-12);
        let mean: Vec<f32> = (0..4)
            .map(|j| (0..6).map(|r| raw[r * 4 + j]).sum::<f32>() / 6.0)
            .collect();
        let mut m = Fidelity::new(4);
        m.add(&mean.repeat(6), &raw);
        assert!((m.nmse() - 1.0).abs() < 1e-5, "{}", m.nmse());
    }
}
