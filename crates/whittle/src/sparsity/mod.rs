//! Sparsification: magnitude, Wanda and SparseGPT, to N:M or unstructured patterns. Pruned
//! weights are exact zeros in the layer's dense weight.

pub mod maskllm;
pub mod pattern;
pub mod sparsegpt;
pub mod stage;

pub use pattern::Pattern;

use crate::calib::stats::InputStats;
use crate::{Error, Result};
use pattern::{nm_prune_mask, row_prune_mask};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SparsityMethod {
    /// Score `|W_ij|`; needs no calibration.
    Magnitude,
    /// Score `|W_ij| · ‖X_j‖₂`.
    Wanda,
    /// OBS column walk with mask selection on `w² / [H⁻¹]_jj²`.
    SparseGpt { block: usize, damp: f64 },
}

impl SparsityMethod {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "magnitude" => Ok(SparsityMethod::Magnitude),
            "wanda" => Ok(SparsityMethod::Wanda),
            "sparsegpt" => Ok(SparsityMethod::SparseGpt {
                block: 128,
                damp: 0.01,
            }),
            other => Err(Error::Invalid(format!(
                "unknown sparsity method '{other}' (magnitude, wanda, sparsegpt)"
            ))),
        }
    }

    pub fn needs_calibration(&self) -> bool {
        !matches!(self, SparsityMethod::Magnitude)
    }
}

/// Prunes `w` (`rows × cols`, row-major) in place. `stats` (the layer input's statistics) is
/// required by Wanda and SparseGPT. Returns the dampening SparseGPT finally used, if any.
pub fn prune(
    name: &str,
    w: &mut [f32],
    rows: usize,
    cols: usize,
    pattern: Pattern,
    method: SparsityMethod,
    stats: Option<&InputStats>,
) -> Result<Option<f64>> {
    pattern.check(name, cols)?;
    let need = || {
        stats.filter(|s| s.dim == cols).ok_or_else(|| {
            Error::Invalid(format!(
                "{name}: {method:?} needs calibration statistics of width {cols}"
            ))
        })
    };
    match method {
        SparsityMethod::Magnitude => {
            let scores: Vec<f32> = w.iter().map(|v| v.abs()).collect();
            apply_scores(w, &scores, cols, pattern);
            Ok(None)
        }
        SparsityMethod::Wanda => {
            let norms = need()?.column_norms();
            let scores: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, v)| v.abs() * norms[i % cols] as f32)
                .collect();
            apply_scores(w, &scores, cols, pattern);
            Ok(None)
        }
        SparsityMethod::SparseGpt { block, damp } => {
            sparsegpt::sparsegpt(w, rows, cols, &need()?.xtx, pattern, block, damp).map(Some)
        }
    }
}

/// Zeroes the weights whose scores are lowest under `pattern`, row by row.
fn apply_scores(w: &mut [f32], scores: &[f32], cols: usize, pattern: Pattern) {
    use rayon::prelude::*;
    w.par_chunks_exact_mut(cols)
        .zip(scores.par_chunks_exact(cols))
        .for_each_init(
            || vec![false; cols],
            |mask, (row, s)| {
                match pattern {
                    Pattern::NM { n, m } => nm_prune_mask(s, n, m, mask),
                    Pattern::Unstructured { ratio } => row_prune_mask(s, ratio, mask),
                }
                for (v, pruned) in row.iter_mut().zip(mask.iter()) {
                    if *pruned {
                        *v = 0.0;
                    }
                }
            },
        );
}

/// Sparsifies the targeted linears of every layer (sequentially calibrated on `windows` when
/// the method needs data). Returns one report per linear.
pub fn sparsify_model(
    model: &mut crate::Model,
    windows: &[&[u32]],
    method: SparsityMethod,
    pattern: Pattern,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<crate::calib::sequential::LinearReport>> {
    use crate::calib::sequential::compress_each_linear;
    use crate::calib::stats::{Covariance, InputStats, ERROR_SAMPLE};
    use crate::model::{Linear, Site};
    if method.needs_calibration() && windows.is_empty() {
        return Err(Error::Invalid(format!(
            "{method:?} needs calibration windows"
        )));
    }
    let windows = if method.needs_calibration() {
        windows
    } else {
        &[]
    };
    // Wanda reads only column norms: its covariance just measures the reported error.
    let cov = match method {
        SparsityMethod::Wanda => Covariance::Sampled(ERROR_SAMPLE),
        _ => Covariance::Full,
    };
    compress_each_linear(model, windows, cov, targets, progress, &mut |_, _, _| {
        Ok(Box::new(
            move |name: &str, _: Site, lin: &mut Linear, st: Option<&InputStats>| {
                let (rows, cols) = (lin.out_features, lin.in_features);
                let w = lin.dense_weight_mut();
                let damp = prune(name, w, rows, cols, pattern, method, st)?;
                Ok(crate::calib::sequential::Outcome { damp, errors: None })
            },
        ))
    })
}
