//! Fitting emulated updates ("A deeper look at depth pruning of LLMs", arXiv 2407.16286): a
//! removed unit with residual input `x` and update `Δ = f(x)` is replaced by the affine map
//! `Δ ≈ W x + b` fitted by least squares on calibration activations, from streamed sums
//! (`Σx`, `ΣΔ`, `ΣxxᵀΣ`, `ΣxΔᵀ` in f64, as EoRA streams its covariances; no activations kept).
//!
//! - `bias`: `b = E[Δ]` (the constant update);
//! - `linear`: ridge regression on centred data, `W = Cxxλ⁻¹ CxΔ` transposed, `b = E[Δ] − W E[x]`;
//! - `lowrank:r`: reduced-rank regression, the rank-`r` map with the least squared error: the
//!   linear fit projected on the top-`r` eigenvectors `V` of the fitted updates' covariance
//!   `Wᵀ Cxx W`, stored as `A = Vᵀ W` (`r × hidden`) and `B = V` (`hidden × r`).
//!
//! Activations are those of the model before removal, taken in one pass for all removed units.

use super::Unit;
use crate::calib::ridge::{row_major, RidgeSums};
use crate::model::{Emulation, Linear, Observer, Site};
use crate::{Error, Model, Result};

/// How removed units are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmulateKind {
    None,
    Bias,
    Linear,
    LowRank(usize),
}

impl EmulateKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => EmulateKind::None,
            "bias" => EmulateKind::Bias,
            "linear" => EmulateKind::Linear,
            _ => match s.strip_prefix("lowrank:").map(str::parse::<usize>) {
                Some(Ok(r)) if r > 0 => EmulateKind::LowRank(r),
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown emulation '{s}' (none, bias, linear, lowrank:R with R ≥ 1)"
                    )))
                }
            },
        })
    }

    pub fn name(self) -> String {
        match self {
            EmulateKind::None => "none".into(),
            EmulateKind::Bias => "bias".into(),
            EmulateKind::Linear => "linear".into(),
            EmulateKind::LowRank(r) => format!("lowrank:{r}"),
        }
    }
}

/// Streamed least-squares sums of one unit: inputs `x`, targets the updates `Δ = y − x`.
struct UnitSums(RidgeSums);

impl UnitSums {
    fn add(&mut self, x: &[f32], y: &[f32]) {
        let delta: Vec<f32> = y.iter().zip(x).map(|(a, b)| a - b).collect();
        self.0.add(x, &delta);
    }

    fn fit(&self, kind: EmulateKind, name: &str) -> Result<Emulation> {
        let f32s = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        if kind == EmulateKind::Bias {
            return Ok(Emulation {
                maps: vec![],
                bias: f32s(&self.0.mean_y()),
            });
        }
        let fit = self.0.fit(name)?;
        let (w, h) = (&fit.w, fit.mean_x.len());
        let (a, b) = match kind {
            EmulateKind::LowRank(r) => {
                if r > h {
                    return Err(Error::Invalid(format!(
                        "{name}: rank {r} exceeds the hidden width {h}"
                    )));
                }
                let fitted = w.transpose() * &fit.cxx * w;
                let (v, _) = crate::lowrank::top_eigen(&fitted, r)?;
                // A = Vᵀ W̃ᵀ (r × in), B = V (out × r).
                (v.transpose() * w.transpose(), Some(v))
            }
            _ => (w.transpose().to_owned(), None),
        };
        // b = E[Δ] − B A E[x] (or W E[x]).
        let full = match &b {
            Some(v) => v * &a,
            None => a.clone(),
        };
        let bias: Vec<f64> = (0..h)
            .map(|o| fit.mean_y[o] - (0..h).map(|i| full[(o, i)] * fit.mean_x[i]).sum::<f64>())
            .collect();
        let mut maps = vec![Linear::dense(name, row_major(&a), a.nrows(), h)?];
        if let Some(v) = &b {
            maps.push(Linear::dense(name, row_major(v), h, v.ncols())?);
        }
        Ok(Emulation {
            maps,
            bias: f32s(&bias),
        })
    }
}

/// The observer of the fitting pass: for each unit, its input rows when they pass, and the sums
/// once its output passes.
struct Fitter {
    hidden: usize,
    skip: usize,
    units: Vec<(Unit, UnitSums)>,
    block_in: Vec<f32>,
    mixed: Vec<f32>,
}

impl Observer for Fitter {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], rows: usize) {
        let h = self.hidden;
        if !matches!(site, Site::BlockIn | Site::Mixed | Site::BlockOut) || rows <= self.skip {
            return;
        }
        let x = &x[self.skip * h..];
        for (u, sums) in &mut self.units {
            match (*u, site) {
                (Unit::Attn(i), Site::Mixed) if i == layer => sums.add(&self.block_in, x),
                (Unit::Mlp(i), Site::BlockOut) if i == layer => sums.add(&self.mixed, x),
                (Unit::Block(i), Site::BlockOut) if i == layer => sums.add(&self.block_in, x),
                _ => {}
            }
        }
        let keep = match site {
            Site::BlockIn => &mut self.block_in,
            Site::Mixed => &mut self.mixed,
            _ => return,
        };
        keep.clear();
        keep.extend_from_slice(x);
    }
}

/// Emulations of `units` fitted on `windows` with `model` as it is (before removal), in the
/// order of `units`. `progress(done, total)` after each window.
pub fn fit_emulations(
    model: &Model,
    units: &[Unit],
    windows: &[&[u32]],
    kind: EmulateKind,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Emulation>> {
    if kind == EmulateKind::None || units.is_empty() {
        return Ok(Vec::new());
    }
    if windows.is_empty() {
        return Err(Error::Invalid(
            "emulated updates need calibration windows".into(),
        ));
    }
    let h = model.config.hidden;
    let mut fitter = Fitter {
        hidden: h,
        skip: model.config.memory_tokens,
        units: units
            .iter()
            .map(|u| (*u, UnitSums(RidgeSums::new(h, h))))
            .collect(),
        block_in: Vec::new(),
        mixed: Vec::new(),
    };
    for (i, w) in windows.iter().enumerate() {
        model.hidden_states(w, None, Some(&mut fitter))?;
        progress(i + 1, windows.len());
    }
    fitter
        .units
        .iter()
        .map(|(u, s)| s.fit(kind, &format!("emulated update of the {u}")))
        .collect()
}
