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
use crate::model::{Emulation, Linear, Observer, Site};
use crate::{Error, Model, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Ridge term, relative to the mean input variance: keeps directions the calibration data never
/// excites at zero instead of at noise.
const RIDGE: f64 = 1e-4;

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

/// Streamed least-squares sums of one unit.
struct UnitSums {
    n: usize,
    sx: Vec<f64>,
    sd: Vec<f64>,
    xtx: Mat<f64>,
    xtd: Mat<f64>,
}

impl UnitSums {
    fn new(h: usize) -> Self {
        UnitSums {
            n: 0,
            sx: vec![0.0; h],
            sd: vec![0.0; h],
            xtx: Mat::zeros(h, h),
            xtd: Mat::zeros(h, h),
        }
    }

    fn add(&mut self, x: &[f32], y: &[f32], h: usize) {
        let t = x.len() / h;
        let xm = Mat::<f64>::from_fn(t, h, |r, c| x[r * h + c] as f64);
        let dm = Mat::<f64>::from_fn(t, h, |r, c| (y[r * h + c] - x[r * h + c]) as f64);
        for r in 0..t {
            for c in 0..h {
                self.sx[c] += xm[(r, c)];
                self.sd[c] += dm[(r, c)];
            }
        }
        self.xtx += xm.transpose() * &xm;
        self.xtd += xm.transpose() * &dm;
        self.n += t;
    }

    fn fit(&self, kind: EmulateKind, name: &str) -> Result<Emulation> {
        let h = self.sx.len();
        let n = self.n.max(1) as f64;
        let mx: Vec<f64> = self.sx.iter().map(|v| v / n).collect();
        let md: Vec<f64> = self.sd.iter().map(|v| v / n).collect();
        let f32s = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        if kind == EmulateKind::Bias {
            return Ok(Emulation {
                maps: vec![],
                bias: f32s(&md),
            });
        }
        let cxx = Mat::<f64>::from_fn(h, h, |i, j| self.xtx[(i, j)] / n - mx[i] * mx[j]);
        let cxd = Mat::<f64>::from_fn(h, h, |i, j| self.xtd[(i, j)] / n - mx[i] * md[j]);
        let mean_var = (0..h).map(|i| cxx[(i, i)]).sum::<f64>() / h as f64;
        if mean_var.is_nan() || mean_var <= 0.0 {
            return Err(Error::Invalid(format!(
                "{name}: the calibration inputs do not vary; cannot fit an emulated update"
            )));
        }
        let damped = Mat::<f64>::from_fn(h, h, |i, j| {
            cxx[(i, j)] + if i == j { RIDGE * mean_var } else { 0.0 }
        });
        let llt = damped
            .llt(Side::Lower)
            .map_err(|e| Error::Invalid(format!("{name}: input covariance not definite: {e:?}")))?;
        // in × out: Δ ≈ xᵀ W̃.
        let w = llt.solve(&cxd);
        let (a, b) = match kind {
            EmulateKind::LowRank(r) => {
                if r > h {
                    return Err(Error::Invalid(format!(
                        "{name}: rank {r} exceeds the hidden width {h}"
                    )));
                }
                let fitted = w.transpose() * &cxx * &w;
                let (v, _) = crate::lowrank::top_eigen(&fitted, r)?;
                // A = Vᵀ W̃ᵀ (r × in), B = V (out × r).
                (v.transpose() * w.transpose(), Some(v))
            }
            _ => (w.transpose().to_owned(), None),
        };
        let map = |m: &Mat<f64>| -> Vec<f32> {
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
                .collect()
        };
        // b = E[Δ] − B A E[x] (or W E[x]).
        let full = match &b {
            Some(v) => v * &a,
            None => a.clone(),
        };
        let bias: Vec<f64> = (0..h)
            .map(|o| md[o] - (0..h).map(|i| full[(o, i)] * mx[i]).sum::<f64>())
            .collect();
        let mut maps = vec![Linear::dense(name, map(&a), a.nrows(), h)?];
        if let Some(v) = &b {
            maps.push(Linear::dense(name, map(v), h, v.ncols())?);
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
                (Unit::Attn(i), Site::Mixed) if i == layer => sums.add(&self.block_in, x, h),
                (Unit::Mlp(i), Site::BlockOut) if i == layer => sums.add(&self.mixed, x, h),
                (Unit::Block(i), Site::BlockOut) if i == layer => sums.add(&self.block_in, x, h),
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
        units: units.iter().map(|u| (*u, UnitSums::new(h))).collect(),
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
