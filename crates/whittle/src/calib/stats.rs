//! Streaming second-moment statistics of a linear's input: `C = Σ_t x_t x_tᵀ` (f64), its
//! diagonal (squared input column norms, Wanda's `‖X_j‖²`) and the token count. Memory is one
//! `in × in` matrix per input site, whatever the number of calibration tokens.

use crate::kernels::matmul::gemm;
use crate::model::Site;
use crate::{Error, Result};
use faer::linalg::matmul::triangular::BlockStructure;
use faer::{Accum, MatMut, MatRef};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct InputStats {
    pub dim: usize,
    /// `Σ x xᵀ`, `dim × dim` row-major (symmetric).
    pub xtx: Vec<f64>,
    pub tokens: usize,
}

impl InputStats {
    pub fn new(dim: usize) -> Self {
        InputStats {
            dim,
            xtx: vec![0.0; dim * dim],
            tokens: 0,
        }
    }

    /// Adds `rows` input rows. Each chunk's product is formed in f32 by GEMM (fast) and summed
    /// into the f64 total, so rounding does not grow with the number of calibration tokens.
    /// Only the lower triangle is multiplied (the product is symmetric), then mirrored: on
    /// the MLP's 1,536-wide input this product costs as much as the layer's forward pass.
    pub fn add(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let d = self.dim;
        if x.len() != rows * d {
            return Err(Error::Invalid(format!(
                "statistics of width {d}: got {} values for {rows} rows",
                x.len()
            )));
        }
        crate::error::check_finite("calibration activations", x)?;
        let mut part = vec![0f32; d * d];
        let xm = MatRef::from_row_major_slice(x, rows, d);
        faer::linalg::matmul::triangular::matmul(
            MatMut::from_row_major_slice_mut(&mut part, d, d),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm,
            BlockStructure::Rectangular,
            1.0f32,
            crate::threads::gemm_par(),
        );
        for i in 0..d {
            for j in 0..=i {
                let v = self.xtx[i * d + j] + part[i * d + j] as f64;
                self.xtx[i * d + j] = v;
                self.xtx[j * d + i] = v;
            }
        }
        self.tokens += rows;
        Ok(())
    }

    /// `Σ_r m_r C m_rᵀ = ‖M X‖²_F` for `M` (`rows × dim`): the output energy of a weight (or of
    /// a weight error) over the calibration inputs.
    pub fn output_energy(&self, m: &[f32], rows: usize) -> f64 {
        let d = self.dim;
        let c: Vec<f32> = self.xtx.iter().map(|v| *v as f32).collect();
        let mut mc = vec![0f32; rows * d];
        gemm(
            MatMut::from_row_major_slice_mut(&mut mc, rows, d),
            Accum::Replace,
            MatRef::from_row_major_slice(m, rows, d),
            MatRef::from_row_major_slice(&c, d, d),
            crate::threads::gemm_par(),
        );
        mc.iter().zip(m).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// `‖(W − W') X‖² / ‖W X‖²`: the relative output error of replacing `w` by `w2`.
    pub fn relative_error(&self, w: &[f32], w2: &[f32], rows: usize) -> f64 {
        let delta: Vec<f32> = w.iter().zip(w2).map(|(a, b)| a - b).collect();
        self.output_energy(&delta, rows) / self.output_energy(w, rows).max(f64::MIN_POSITIVE)
    }

    /// `diag(C)_j = ‖X_j‖²`.
    pub fn diag(&self) -> Vec<f64> {
        (0..self.dim).map(|j| self.xtx[j * self.dim + j]).collect()
    }

    /// `‖X_j‖₂` per input column (Wanda's activation norm).
    pub fn column_norms(&self) -> Vec<f64> {
        self.diag().into_iter().map(|v| v.max(0.0).sqrt()).collect()
    }
}

/// Statistics of one layer, per input site (q/k/v share `AttnIn`, gate/up share `MlpIn`).
#[derive(Debug, Default)]
pub struct LayerStats {
    pub sites: HashMap<Site, InputStats>,
    /// First error met while observing (reported after the forward pass).
    pub error: Option<Error>,
}

impl LayerStats {
    pub fn get(&self, site: Site) -> Result<&InputStats> {
        self.sites
            .get(&site)
            .ok_or_else(|| Error::Invalid(format!("no calibration statistics for {site:?}")))
    }
}

impl crate::model::Observer for LayerStats {
    fn observe(&mut self, _layer: usize, site: Site, x: &[f32], rows: usize) {
        if self.error.is_some() || !site.feeds_linear() {
            return;
        }
        let dim = x.len() / rows.max(1);
        let s = self
            .sites
            .entry(site)
            .or_insert_with(|| InputStats::new(dim));
        if let Err(e) = s.add(x, rows) {
            self.error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_xtx_like_a_loop() {
        // A small width and one large enough for faer's blocked triangular product.
        for (d, rows) in [(5, 7), (150, 90)] {
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
                .collect();
            let mut s = InputStats::new(d);
            s.add(&x[..3 * d], 3).unwrap();
            s.add(&x[3 * d..], rows - 3).unwrap();
            for a in 0..d {
                for b in 0..d {
                    let want: f64 = (0..rows)
                        .map(|r| x[r * d + a] as f64 * x[r * d + b] as f64)
                        .sum();
                    assert!((s.xtx[a * d + b] - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
            assert_eq!(s.tokens, rows);
        }
        let mut s = InputStats::new(5);
        assert!(s.add(&[f32::NAN; 5], 1).is_err());
        assert!(s.add(&[0.0; 4], 1).is_err());
    }
}
