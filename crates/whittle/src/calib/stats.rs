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
    /// `Σ x xᵀ`, `dim × dim` row-major, over every `sample`-th row: while adding, only the
    /// lower triangle is summed; symmetric after [`symmetrize`](Self::symmetrize) (which
    /// [`LayerStats::finish`] calls).
    pub xtx: Vec<f64>,
    /// `Σ x_j²` per input column over every row (Wanda's `‖X_j‖²`, exact even when `xtx` is
    /// sampled).
    pub sq_norms: Vec<f64>,
    /// Rows seen.
    pub tokens: usize,
    /// Rows summed into `xtx`.
    pub xtx_tokens: usize,
    /// `xtx` sums rows `0, sample, 2·sample, …` of each call to [`add`](Self::add).
    pub sample: usize,
}

impl InputStats {
    pub fn new(dim: usize, sample: usize) -> Self {
        InputStats {
            dim,
            xtx: vec![0.0; dim * dim],
            sq_norms: vec![0.0; dim],
            tokens: 0,
            xtx_tokens: 0,
            sample: sample.max(1),
        }
    }

    /// Statistics with a given (symmetric, complete) covariance over `tokens` rows.
    pub fn from_covariance(dim: usize, xtx: Vec<f64>, tokens: usize) -> Self {
        let sq_norms = (0..dim).map(|j| xtx[j * dim + j]).collect();
        InputStats {
            dim,
            xtx,
            sq_norms,
            tokens,
            xtx_tokens: tokens,
            sample: 1,
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
        let sampled: Vec<f32>;
        let (x_cov, cov_rows) = if self.sample > 1 {
            for row in x.chunks_exact(d) {
                for (s, v) in self.sq_norms.iter_mut().zip(row) {
                    *s += *v as f64 * *v as f64;
                }
            }
            sampled = x
                .chunks_exact(d)
                .step_by(self.sample)
                .flatten()
                .copied()
                .collect();
            (&sampled[..], sampled.len() / d)
        } else {
            (x, rows)
        };
        let mut part = vec![0f32; d * d];
        let xm = MatRef::from_row_major_slice(x_cov, cov_rows, d);
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
            let (acc, new) = (&mut self.xtx[i * d..=i * d + i], &part[i * d..=i * d + i]);
            acc.iter_mut().zip(new).for_each(|(a, b)| *a += *b as f64);
        }
        self.tokens += rows;
        self.xtx_tokens += cov_rows;
        Ok(())
    }

    /// Copies the lower triangle onto the upper one. [`add`](Self::add) sums only the lower
    /// triangle (row-wise, contiguous): mirroring at every call wrote a column per row, 8 % of
    /// a calibration pass on the 1,536-wide MLP input.
    /// Without sampling, the squared column norms are read off the diagonal here.
    pub fn symmetrize(&mut self) {
        let d = self.dim;
        for i in 0..d {
            for j in 0..i {
                self.xtx[j * d + i] = self.xtx[i * d + j];
            }
        }
        if self.sample == 1 {
            self.sq_norms = (0..d).map(|j| self.xtx[j * d + j]).collect();
        }
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

    /// `‖X_j‖₂` per input column (Wanda's activation norm), over every row.
    pub fn column_norms(&self) -> Vec<f64> {
        self.sq_norms.iter().map(|v| v.max(0.0).sqrt()).collect()
    }
}

/// Statistics of one layer, per input site (q/k/v share `AttnIn`, gate/up share `MlpIn`).
#[derive(Debug)]
pub struct LayerStats {
    pub sites: HashMap<Site, InputStats>,
    /// First error met while observing (reported after the forward pass).
    pub error: Option<Error>,
    /// Covariances sum every `sample`-th row (see [`Covariance`]).
    pub sample: usize,
}

impl Default for LayerStats {
    fn default() -> Self {
        LayerStats::new(Covariance::Full)
    }
}

/// What a method needs of the input covariance `XᵀX`. Hessian-based methods (SparseGPT, GPTQ,
/// EoRA) need it exact. Wanda needs only the column norms (always exact); its covariance only
/// measures the reported output error, which is estimated on every `n`-th calibration token:
/// on the 1,536-wide `down_proj` input the full product is a fifth of a calibration pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Covariance {
    Full,
    /// Every `n`-th token of each window.
    Sampled(usize),
}

/// The token sampling of [`Covariance::Sampled`] that Wanda uses: 256 tokens of each 2,048-token
/// window (2,048 tokens at the 8-window budget, 32,768 at the default 128).
pub const ERROR_SAMPLE: usize = 8;

impl LayerStats {
    pub fn new(cov: Covariance) -> Self {
        LayerStats {
            sites: HashMap::new(),
            error: None,
            sample: match cov {
                Covariance::Full => 1,
                Covariance::Sampled(n) => n.max(1),
            },
        }
    }

    /// Adds `other`'s sums into these (statistics of disjoint windows, from different threads).
    pub fn merge(&mut self, other: LayerStats) {
        if self.error.is_none() {
            self.error = other.error;
        }
        for (site, o) in other.sites {
            match self.sites.entry(site) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(o);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let s = e.get_mut();
                    if s.dim != o.dim {
                        self.error.get_or_insert(Error::Invalid(format!(
                            "{site:?} statistics of widths {} and {}",
                            s.dim, o.dim
                        )));
                        continue;
                    }
                    s.xtx.iter_mut().zip(&o.xtx).for_each(|(a, b)| *a += b);
                    s.sq_norms
                        .iter_mut()
                        .zip(&o.sq_norms)
                        .for_each(|(a, b)| *a += b);
                    s.tokens += o.tokens;
                    s.xtx_tokens += o.xtx_tokens;
                }
            }
        }
    }

    /// Sums these statistics over `comm`'s ranks (each accumulated its own windows), sites in
    /// a fixed order; an error on any rank becomes an error on every rank.
    pub fn all_reduce(&mut self, comm: &dyn crate::dist::Collective) -> Result<()> {
        if comm.size() == 1 {
            return Ok(());
        }
        crate::dist::share_error(comm, &mut self.error, "calibration")?;
        let mut sites: Vec<Site> = self.sites.keys().copied().collect();
        sites.sort_by_key(|s| format!("{s:?}"));
        let names = format!("{sites:?}").into_bytes();
        crate::dist::check_agreement(comm, &[("calibration sites", names)])?;
        for site in sites {
            let s = self.sites.get_mut(&site).expect("listed above");
            crate::dist::all_reduce_f64(comm, &mut s.xtx)?;
            crate::dist::all_reduce_f64(comm, &mut s.sq_norms)?;
            let mut counts = [s.tokens as f64, s.xtx_tokens as f64];
            comm.sum_f64(&mut counts)?;
            (s.tokens, s.xtx_tokens) = (counts[0] as usize, counts[1] as usize);
        }
        Ok(())
    }

    /// Ends a calibration pass: the first error met, else every matrix made symmetric.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.sites.values_mut().for_each(InputStats::symmetrize);
        Ok(())
    }

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
            .or_insert_with(|| InputStats::new(dim, self.sample));
        if let Err(e) = s.add(x, rows) {
            self.error = Some(e);
        }
    }

    fn needs_output(&self) -> bool {
        false
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
            let mut s = InputStats::new(d, 1);
            s.add(&x[..3 * d], 3).unwrap();
            s.add(&x[3 * d..], rows - 3).unwrap();
            s.symmetrize();
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
        // Sampled: the covariance of every 3rd row of each call, column norms of all rows.
        let (d, rows) = (4, 10);
        let x: Vec<f32> = (0..rows * d).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut s = InputStats::new(d, 3);
        s.add(&x, rows).unwrap();
        s.symmetrize();
        for a in 0..d {
            let all: f64 = (0..rows).map(|r| (x[r * d + a] as f64).powi(2)).sum();
            assert_eq!(s.sq_norms[a], all);
            for b in 0..d {
                let want: f64 = (0..rows)
                    .step_by(3)
                    .map(|r| x[r * d + a] as f64 * x[r * d + b] as f64)
                    .sum();
                assert_eq!(s.xtx[a * d + b], want);
            }
        }
        assert_eq!((s.tokens, s.xtx_tokens), (10, 4));
        let mut s = InputStats::new(5, 1);
        assert!(s.add(&[f32::NAN; 5], 1).is_err());
        assert!(s.add(&[0.0; 4], 1).is_err());
    }
}
