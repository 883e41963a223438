//! Low-rank compensation of a compression error `ΔW = W_dense − W_compressed`: an adapter
//! `B·A` (`B: out × r`, `A: r × in`) added to the compressed layer, `y = W_c x + B (A x)`.
//! Plain SVD minimises `‖ΔW − BA‖_F`; EoRA minimises the error on the calibration inputs,
//! `‖(ΔW − BA) X‖_F`, by truncating the SVD in the eigenspace of `C = XᵀX`.

pub mod stage;
use crate::calib::stats::LayerStats;
use crate::model::LowRank;
use crate::{Error, Result};
use faer::{Mat, Side};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowRankMethod {
    Svd,
    Eora,
}

impl LowRankMethod {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "svd" => Ok(LowRankMethod::Svd),
            "eora" => Ok(LowRankMethod::Eora),
            other => Err(Error::Invalid(format!(
                "unknown compensation method '{other}' (svd, eora)"
            ))),
        }
    }
}

fn check_rank(name: &str, rank: usize, rows: usize, cols: usize) -> Result<()> {
    if rank == 0 || rank > rows.min(cols) {
        return Err(Error::Invalid(format!(
            "{name}: rank {rank} must be between 1 and min({rows}, {cols})"
        )));
    }
    Ok(())
}

/// `m mᵀ` when `m` has fewer rows than columns, else `mᵀ m`: the smaller Gram matrix, whose
/// eigenpairs are `m`'s squared singular values and left (resp. right) singular vectors.
fn gram(m: &Mat<f64>) -> Mat<f64> {
    if m.nrows() <= m.ncols() {
        m * m.transpose()
    } else {
        m.transpose() * m
    }
}

/// The top-`rank` eigenvectors (columns) of the symmetric `g` and the square roots of their
/// eigenvalues (singular values of the matrix `g` is the Gram of). Values below `1e-14` of the
/// largest count as 0: squaring in the Gram matrix left them at rounding level.
pub(crate) fn top_eigen(g: &Mat<f64>, rank: usize) -> Result<(Mat<f64>, Vec<f64>)> {
    let evd = g
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition did not converge: {e:?}")))?;
    let (vecs, lam) = (evd.U(), evd.S().column_vector());
    let n = lam.nrows();
    // Eigenvalues come in nondecreasing order: the top `rank` are the last ones.
    let floor = lam[n - 1].max(0.0) * 1e-14;
    let sigma = (0..rank)
        .map(|t| lam[n - 1 - t])
        .map(|l| if l > floor { l.sqrt() } else { 0.0 })
        .collect();
    Ok((
        Mat::<f64>::from_fn(n, rank, |i, t| vecs[(i, n - 1 - t)]),
        sigma,
    ))
}

fn half(sigma: &[f64], t: usize) -> f64 {
    sigma[t].sqrt()
}

fn inv_half(sigma: &[f64], t: usize) -> f64 {
    if sigma[t] > 0.0 {
        1.0 / sigma[t].sqrt()
    } else {
        0.0
    }
}

/// `B = U_r Σ^{1/2}` and `A = Σ^{-1/2} U_rᵀ m` from the top eigenpairs of `g = m mᵀ`-like output
/// Gram matrix (`rows × rows`). For `g = m mᵀ` this is `B A = U_r U_rᵀ m`, the best rank-`r`
/// approximation of `m`.
fn output_side(g: &Mat<f64>, m: &Mat<f64>, rank: usize) -> Result<(Mat<f64>, Mat<f64>)> {
    let (u, sigma) = top_eigen(g, rank)?;
    let ut_m = u.transpose() * m;
    Ok((
        Mat::<f64>::from_fn(m.nrows(), rank, |i, t| u[(i, t)] * half(&sigma, t)),
        Mat::<f64>::from_fn(rank, m.ncols(), |t, j| ut_m[(t, j)] * inv_half(&sigma, t)),
    ))
}

/// `B = U_r Σ_r^{1/2}`, `A = Σ_r^{1/2} V_rᵀ · post` for the top-`rank` singular triplets of
/// `m` (`rows × k`). They come from the self-adjoint eigendecomposition of the smaller Gram
/// matrix rather than a full SVD: every linear here has one side of 576, so this is a 576-wide
/// eigenproblem instead of a 576 × 1,536 SVD, ~3x faster (BENCHMARKS.md). Squaring costs
/// accuracy only in the smallest singular values (relative to `σ_max`, ~1e-8 in f64), which a
/// truncation drops; directions below that level get a zero adapter row instead of noise.
fn truncated(m: &Mat<f64>, rank: usize, post: Option<&Mat<f64>>) -> Result<LowRank> {
    let (b, a0) = if m.nrows() <= m.ncols() {
        output_side(&gram(m), m, rank)?
    } else {
        // Input side: V_r from `mᵀ m`; B = m V_r Σ^{-1/2} (= U_r Σ^{1/2}), A = Σ^{1/2} V_rᵀ.
        let (v, sigma) = top_eigen(&gram(m), rank)?;
        let mv = m * &v;
        (
            Mat::<f64>::from_fn(m.nrows(), rank, |i, t| mv[(i, t)] * inv_half(&sigma, t)),
            Mat::<f64>::from_fn(rank, m.ncols(), |t, j| v[(j, t)] * half(&sigma, t)),
        )
    };
    Ok(low_rank(
        &b,
        &match post {
            Some(p) => &a0 * p,
            None => a0,
        },
    ))
}

fn low_rank(b: &Mat<f64>, a: &Mat<f64>) -> LowRank {
    let (rank, rows, cols) = (a.nrows(), b.nrows(), a.ncols());
    LowRank {
        rank,
        a: (0..rank * cols)
            .map(|x| a[(x / cols, x % cols)] as f32)
            .collect(),
        b: (0..rows * rank)
            .map(|x| b[(x / rank, x % rank)] as f32)
            .collect(),
    }
}

/// Best rank-`r` approximation of `dw` (`rows × cols`) in Frobenius norm.
pub fn svd_lowrank(
    name: &str,
    dw: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<LowRank> {
    check_rank(name, rank, rows, cols)?;
    crate::error::check_finite(name, dw)?;
    let m = Mat::<f64>::from_fn(rows, cols, |i, j| dw[i * cols + j] as f64);
    truncated(&m, rank, None)
}

/// EoRA's weighting of one input site (linears that read one site share it).
///
/// EoRA keeps the best rank-`r` approximation of `ΔW S` for a square root `S` of the input
/// covariance (`C = S Sᵀ`) and maps it back with `S⁻¹`. The result does not depend on the root:
/// with `ΔW S = U Σ Vᵀ`, `[ΔW S]_r S⁻¹ = U_r U_rᵀ ΔW`, where `U_r` are the top eigenvectors of
/// `ΔW C ΔWᵀ`. So a linear with no more outputs than inputs (q, k, v, o, down) needs `C` alone —
/// an `out × out` eigenproblem, no decomposition of `C` (the 1,536-wide one was most of EoRA's
/// linear algebra). A taller linear (gate, up) works in the input space, `(ΔW S)ᵀ(ΔW S)`, with
/// `S` the Cholesky factor of `C`. Where `C` is only semi-definite (inputs the calibration never
/// excites) Cholesky fails and `S = Q Λ^{1/2}` from the eigendecomposition, eigenvalues ≤ 0
/// clamped to the smallest positive one as the reference does; the output-space form gives those
/// unseen directions weight 0 instead of that smallest eigenvalue, a difference confined to
/// inputs with no calibration energy. Tests compare every route with the eigenbasis form.
pub struct EoraWeight {
    c: Mat<f64>,
    /// `(S, S⁻¹)`, when a linear reading this site is taller than wide.
    root: Option<(Mat<f64>, Mat<f64>)>,
}

impl EoraWeight {
    /// `need_root`: some linear reading this site has more outputs than inputs.
    pub fn new(name: &str, xtx: &[f64], cols: usize, need_root: bool) -> Result<Self> {
        if xtx.len() != cols * cols || xtx.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "{name}: input covariance must be {cols}×{cols} and finite"
            )));
        }
        let c = Mat::<f64>::from_fn(cols, cols, |i, j| xtx[i * cols + j]);
        if (0..cols).all(|j| c[(j, j)] == 0.0) {
            return Err(Error::Invalid(format!(
                "{name}: calibration inputs are all zero"
            )));
        }
        let root = match need_root {
            false => None,
            true => Some(match cholesky_root(&c) {
                Some(r) => r,
                None => eigen_root(name, &c)?,
            }),
        };
        Ok(EoraWeight { c, root })
    }
}

/// `(L, L⁻¹)` for `C = L Lᵀ`, if `C` is numerically positive definite.
fn cholesky_root(c: &Mat<f64>) -> Option<(Mat<f64>, Mat<f64>)> {
    let n = c.nrows();
    let llt = c.llt(Side::Lower).ok()?;
    let l = llt.L().to_owned();
    let max_diag = (0..n).map(|j| c[(j, j)]).fold(0.0, f64::max);
    if (0..n).any(|j| l[(j, j)].powi(2) <= 1e-12 * max_diag) {
        return None;
    }
    let mut inv = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(
        inv.as_mut(),
        l.as_ref(),
        crate::threads::gemm_par(),
    );
    Some((l, inv))
}

/// `(Q Λ^{1/2}, Λ^{-1/2} Qᵀ)` from `C = Q Λ Qᵀ`, eigenvalues ≤ 0 (directions the calibration
/// never excites, or rounding) clamped to the smallest positive one, as the reference does.
fn eigen_root(name: &str, c: &Mat<f64>) -> Result<(Mat<f64>, Mat<f64>)> {
    let cols = c.nrows();
    let evd = c
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("{name}: eigendecomposition failed: {e:?}")))?;
    let (q, lam) = (evd.U(), evd.S().column_vector());
    let min_pos = (0..cols)
        .map(|i| lam[i])
        .filter(|l| *l > 0.0)
        .fold(f64::INFINITY, f64::min);
    if !min_pos.is_finite() {
        return Err(Error::Invalid(format!(
            "{name}: calibration inputs are all zero"
        )));
    }
    let sq: Vec<f64> = (0..cols)
        .map(|i| if lam[i] > 0.0 { lam[i] } else { min_pos }.sqrt())
        .collect();
    Ok((
        Mat::<f64>::from_fn(cols, cols, |i, j| q[(i, j)] * sq[j]),
        Mat::<f64>::from_fn(cols, cols, |i, j| q[(j, i)] / sq[i]),
    ))
}

/// EoRA: the rank-`r` adapter minimising `‖(ΔW − BA) X‖_F` (see [`EoraWeight`]).
pub fn eora_lowrank(
    name: &str,
    dw: &[f32],
    rows: usize,
    cols: usize,
    weight: &EoraWeight,
    rank: usize,
) -> Result<LowRank> {
    check_rank(name, rank, rows, cols)?;
    crate::error::check_finite(name, dw)?;
    if weight.c.nrows() != cols {
        return Err(Error::Invalid(format!(
            "{name}: input covariance is not {cols} wide"
        )));
    }
    let dwm = Mat::<f64>::from_fn(rows, cols, |i, j| dw[i * cols + j] as f64);
    if rows <= cols {
        let (b, a) = output_side(&(&dwm * &weight.c * dwm.transpose()), &dwm, rank)?;
        return Ok(low_rank(&b, &a));
    }
    let (s, s_inv) = root_of(name, weight)?;
    truncated(&(&dwm * s), rank, Some(s_inv))
}

fn root_of<'a>(name: &str, w: &'a EoraWeight) -> Result<(&'a Mat<f64>, &'a Mat<f64>)> {
    w.root
        .as_ref()
        .map(|(s, i)| (s, i))
        .ok_or_else(|| Error::Invalid(format!("{name}: no covariance root for a tall linear")))
}

/// Singular values of what each method truncates (`ΔW` for SVD, `ΔW S` for EoRA): the error
/// left at rank `r` is the root of the sum of squares of those past `r` — in Frobenius norm for
/// SVD, on the calibration inputs for EoRA.
fn spectrum(
    name: &str,
    dw: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&EoraWeight>,
) -> Result<Vec<f64>> {
    let dwm = Mat::<f64>::from_fn(rows, cols, |i, j| dw[i * cols + j] as f64);
    let g = match weight {
        None => gram(&dwm),
        Some(w) if rows <= cols => &dwm * &w.c * dwm.transpose(),
        Some(w) => gram(&(&dwm * root_of(name, w)?.0)),
    };
    let mut lam = g
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition did not converge: {e:?}")))?;
    lam.reverse();
    Ok(lam.into_iter().map(|l| l.max(0.0).sqrt()).collect())
}

/// Ranks that spend a budget of adapter parameters where they remove the most error: every
/// singular value `σ` of every linear is a candidate costing `in + out` parameters and removing
/// `σ²` (for EoRA: squared output error on the calibration inputs); candidates are taken by
/// decreasing `σ² / cost` while they fit. Measured on SmolLM2 (BENCHMARKS.md): raw errors
/// allocate better than errors relative to each linear's output energy. Since each linear's
/// values are sorted, this takes a prefix of each spectrum, i.e. a rank per linear (possibly 0).
pub fn allocate_ranks(
    spectra: &[(String, usize, Vec<f64>)],
    budget: usize,
) -> HashMap<String, usize> {
    let mut cands: Vec<(f64, usize, usize)> = spectra
        .iter()
        .enumerate()
        .flat_map(|(k, (_, cost, s))| s.iter().map(move |v| (v * v / *cost as f64, *cost, k)))
        .collect();
    cands.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut ranks: HashMap<String, usize> =
        spectra.iter().map(|(n, _, _)| (n.clone(), 0)).collect();
    let mut left = budget;
    for (_, cost, k) in cands {
        if cost > left {
            break;
        }
        left -= cost;
        *ranks
            .get_mut(&spectra[k].0)
            .expect("every linear has an entry") += 1;
    }
    ranks
}

/// One calibration pass over the compressed `model` (left unchanged) collecting, for every
/// targeted linear, `(name, in + out, spectrum)` as [`allocate_ranks`] takes them.
pub fn spectra(
    model: &mut crate::Model,
    reference: &crate::Model,
    windows: &[&[u32]],
    method: LowRankMethod,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(String, usize, Vec<f64>)>> {
    use crate::calib::sequential::compress_sequential;
    let mut out = Vec::new();
    compress_sequential(
        model,
        windows,
        crate::calib::stats::Covariance::Full,
        progress,
        &mut |i, layer, stats| {
            let refs = reference.layers[i].linears();
            let bases = eora_weights(method, i, layer, stats, targets)?;
            for (name, site, lin) in layer.linears() {
                let full = format!("layers.{i}.{name}");
                if !crate::calib::sequential::targeted(&full, targets) {
                    continue;
                }
                let (_, _, w_ref) = refs.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
                    Error::Invalid(format!("{full}: no such linear in the reference model"))
                })?;
                let (rows, cols) = (lin.out_features, lin.in_features);
                let dw: Vec<f32> = w_ref
                    .dense_weight()
                    .iter()
                    .zip(lin.dense_weight().iter())
                    .map(|(a, b)| a - b)
                    .collect();
                let basis = bases.get(&site);
                out.push((
                    full.clone(),
                    rows + cols,
                    spectrum(&full, &dw, rows, cols, basis)?,
                ));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// EoRA's weighting of every input site read by a targeted linear of layer `index` (linears that
/// read one site share it), computed in parallel, one site per thread.
/// None for plain SVD.
fn eora_weights(
    method: LowRankMethod,
    index: usize,
    layer: &crate::model::Layer,
    stats: &LayerStats,
    targets: &[String],
) -> Result<HashMap<crate::model::Site, EoraWeight>> {
    use rayon::prelude::*;
    if method == LowRankMethod::Svd {
        return Ok(HashMap::new());
    }
    // (site, a linear's name, width, whether a linear reading it is taller than wide)
    let mut sites: Vec<(crate::model::Site, String, usize, bool)> = Vec::new();
    for (name, site, lin) in layer.linears() {
        let full = format!("layers.{index}.{name}");
        if !crate::calib::sequential::targeted(&full, targets) {
            continue;
        }
        let tall = lin.out_features > lin.in_features;
        match sites.iter_mut().find(|s| s.0 == site) {
            Some(s) => s.3 |= tall,
            None => sites.push((site, full, lin.in_features, tall)),
        }
    }
    crate::threads::install(|| {
        sites
            .into_par_iter()
            .map(|(site, full, cols, tall)| {
                let weight = crate::threads::one_thread(|| {
                    EoraWeight::new(&full, &stats.get(site)?.xtx, cols, tall)
                })?;
                Ok((site, weight))
            })
            .collect()
    })
}

/// Adds (or, with `fold`, merges into dense weights) low-rank compensation to every targeted
/// linear of `model`, a compressed version of `reference`. Layers are processed in order with
/// calibration inputs from the already-compensated earlier layers; `ΔW = W_reference − W_model`.
/// SVD needs no data: with no windows it runs without a forward pass and reports its errors in
/// weight space; EoRA requires windows.
#[allow(clippy::too_many_arguments)]
pub fn compensate_model(
    model: &mut crate::Model,
    reference: &crate::Model,
    windows: &[&[u32]],
    method: LowRankMethod,
    rank: usize,
    fold: bool,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<crate::calib::sequential::LinearReport>> {
    let ranks = Ranks::Fixed(rank);
    compensate_with_ranks(
        model, reference, windows, method, &ranks, fold, targets, progress,
    )
}

/// How the user sets ranks: one for all, or a total of adapter parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankChoice {
    Fixed(usize),
    Budget(usize),
}

/// Compensation with ranks as chosen; for a budget, one calibration pass measures the spectra
/// ([`spectra`]), [`allocate_ranks`] splits the budget, and a second pass compensates. Returns
/// the reports and the rank given to each linear.
#[allow(clippy::too_many_arguments)]
pub fn compensate_choice(
    model: &mut crate::Model,
    reference: &crate::Model,
    windows: &[&[u32]],
    method: LowRankMethod,
    choice: RankChoice,
    fold: bool,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<crate::calib::sequential::LinearReport>, Ranks)> {
    let ranks = match choice {
        RankChoice::Fixed(r) => Ranks::Fixed(r),
        RankChoice::Budget(budget) => {
            let spec = spectra(model, reference, windows, method, targets, progress)?;
            Ranks::PerLinear(allocate_ranks(&spec, budget))
        }
    };
    let reports = compensate_with_ranks(
        model, reference, windows, method, &ranks, fold, targets, progress,
    )?;
    Ok((reports, ranks))
}

/// The rank of each linear's adapter.
pub enum Ranks {
    Fixed(usize),
    /// By full linear name (`layers.{i}.{name}`); 0 leaves a linear without adapter.
    PerLinear(HashMap<String, usize>),
}

/// [`compensate_model`] with a rank per linear (e.g. from [`allocate_ranks`]).
#[allow(clippy::too_many_arguments)]
pub fn compensate_with_ranks(
    model: &mut crate::Model,
    reference: &crate::Model,
    windows: &[&[u32]],
    method: LowRankMethod,
    ranks: &Ranks,
    fold: bool,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<crate::calib::sequential::LinearReport>> {
    use crate::calib::sequential::{compress_each_linear, Outcome};
    use crate::calib::stats::InputStats;
    use crate::model::{Linear, Site};
    if windows.is_empty() && method == LowRankMethod::Eora {
        return Err(Error::Invalid(
            "EoRA needs calibration windows (its input covariance)".into(),
        ));
    }
    if reference.layers.len() != model.layers.len() {
        return Err(Error::Invalid(format!(
            "reference has {} layers, the compressed model {}",
            reference.layers.len(),
            model.layers.len()
        )));
    }
    compress_each_linear(
        model,
        windows,
        crate::calib::stats::Covariance::Full,
        targets,
        progress,
        &mut |i, layer, stats| {
            let refs = reference.layers[i].linears();
            let bases = eora_weights(method, i, layer, stats, targets)?;
            Ok(Box::new(
                move |name: &str, site: Site, lin: &mut Linear, st: Option<&InputStats>| {
                    let rel = name.trim_start_matches(&format!("layers.{i}."));
                    let (_, _, w_ref) =
                        refs.iter().find(|(n, _, _)| *n == rel).ok_or_else(|| {
                            Error::Invalid(format!("{name}: no such linear in the reference model"))
                        })?;
                    let (rows, cols) = (lin.out_features, lin.in_features);
                    let rank = match ranks {
                        Ranks::Fixed(r) => *r,
                        Ranks::PerLinear(m) => m.get(name).copied().unwrap_or(0),
                    };
                    if (w_ref.out_features, w_ref.in_features) != (rows, cols) {
                        return Err(Error::Invalid(format!("{name}: reference shape differs")));
                    }
                    // Errors on the calibration inputs; without calibration (data-free SVD), in
                    // weight space (‖·‖_F², i.e. X = I).
                    let energy_of = |m: &[f32]| match st {
                        Some(st) => st.output_energy(m, rows),
                        None => m.iter().map(|v| (*v as f64).powi(2)).sum(),
                    };
                    let w = w_ref.dense_weight();
                    let dw: Vec<f32> = w
                        .iter()
                        .zip(lin.dense_weight().iter())
                        .map(|(a, b)| a - b)
                        .collect();
                    let energy = energy_of(&w).max(f64::MIN_POSITIVE);
                    if rank == 0 {
                        let e = energy_of(&dw) / energy;
                        return Ok(Outcome {
                            damp: None,
                            errors: Some((e, e)),
                        });
                    }
                    let lr = match method {
                        LowRankMethod::Svd => svd_lowrank(name, &dw, rows, cols, rank)?,
                        LowRankMethod::Eora => {
                            let basis = bases.get(&site).ok_or_else(|| {
                                Error::Invalid(format!("{name}: no calibration statistics"))
                            })?;
                            eora_lowrank(name, &dw, rows, cols, basis, rank)?
                        }
                    };
                    let ba: Vec<f32> = {
                        let mut m = vec![0f32; rows * cols];
                        crate::kernels::matmul::matmul_t(
                            &lr.b,
                            &transpose(&lr.a, rank, cols),
                            rows,
                            rank,
                            cols,
                            &mut m,
                        );
                        m
                    };
                    let rest: Vec<f32> = dw.iter().zip(&ba).map(|(d, x)| d - x).collect();
                    let errors = (energy_of(&dw) / energy, energy_of(&rest) / energy);
                    if fold {
                        let merged: Vec<f32> = lin
                            .dense_weight()
                            .iter()
                            .zip(&ba)
                            .map(|(a, b)| a + b)
                            .collect();
                        lin.set_weight(crate::model::Weight::Dense(merged));
                    } else {
                        lin.adapter = Some(lr);
                    }
                    Ok(Outcome {
                        damp: None,
                        errors: Some(errors),
                    })
                },
            ))
        },
    )
}

/// Transpose of a row-major `rows × cols` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|k| m[(k % rows) * cols + k / rows])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::stats::InputStats;

    fn apply(lr: &LowRank, rows: usize, cols: usize) -> Vec<f32> {
        let r = lr.rank;
        (0..rows * cols)
            .map(|k| {
                (0..r)
                    .map(|t| lr.b[(k / cols) * r + t] * lr.a[t * cols + k % cols])
                    .sum()
            })
            .collect()
    }

    #[test]
    fn svd_is_exact_at_full_rank_and_rejects_bad_rank() {
        let (rows, cols) = (6, 4);
        let dw: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let lr = svd_lowrank("w", &dw, rows, cols, 4).unwrap();
        for (a, b) in apply(&lr, rows, cols).iter().zip(&dw) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(svd_lowrank("w", &dw, rows, cols, 5).is_err());
        assert!(svd_lowrank("w", &dw, rows, cols, 0).is_err());
    }

    /// Eckart–Young, checked against faer's full SVD (an independent computation): the
    /// Gram-based truncation leaves exactly the energy of the dropped singular values, for
    /// wide and tall matrices, and the spectrum equals the SVD's.
    #[test]
    fn truncation_leaves_the_dropped_singular_energy() {
        for (rows, cols) in [(12, 30), (30, 12)] {
            let dw: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01 * (1.0 + (i % cols) as f32))
                .collect();
            let m = Mat::<f64>::from_fn(rows, cols, |i, j| dw[i * cols + j] as f64);
            let sv = m.singular_values().unwrap();
            let spec = spectrum("w", &dw, rows, cols, None).unwrap();
            // Through the Gram matrix, squares agree to f64 rounding of `σ_max²`.
            for (a, b) in sv.iter().zip(&spec) {
                assert!((a * a - b * b).abs() < 1e-12 * sv[0] * sv[0], "{a} vs {b}");
            }
            for rank in [1, 5, 12] {
                let ba = apply(
                    &svd_lowrank("w", &dw, rows, cols, rank).unwrap(),
                    rows,
                    cols,
                );
                let left: f64 = dw
                    .iter()
                    .zip(&ba)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let want: f64 = sv[rank..].iter().map(|s| s * s).sum();
                assert!(
                    (left - want).abs() < 1e-4 * sv[0] * sv[0],
                    "{left} vs {want}"
                );
            }
        }
    }

    /// The property EoRA exists for: on anisotropic inputs its projected error is never above
    /// plain SVD's at the same rank.
    #[test]
    fn eora_projected_error_is_at_most_svds() {
        // Tall (input-space route with a Cholesky root) and wide (output-space route).
        for (rows, cols) in [(24, 16), (16, 24)] {
            for seed in 0..5 {
                let (w, _) = crate::sparsity::sparsegpt::tests::layer(rows, cols, 10 + seed);
                let (_, h) = crate::sparsity::sparsegpt::tests::layer(4, cols, 20 + seed);
                let stats = InputStats::from_covariance(cols, h.clone(), 64);
                let weight = EoraWeight::new("w", &h, cols, rows > cols).unwrap();
                let dw: Vec<f32> = w.iter().map(|v| v * 0.1).collect();
                for rank in [1, 4, 8] {
                    let err = |lr: &LowRank| {
                        let ba = apply(lr, rows, cols);
                        let rest: Vec<f32> = dw.iter().zip(&ba).map(|(a, b)| a - b).collect();
                        stats.output_energy(&rest, rows)
                    };
                    let (s, e) = (
                        err(&svd_lowrank("w", &dw, rows, cols, rank).unwrap()),
                        err(&eora_lowrank("w", &dw, rows, cols, &weight, rank).unwrap()),
                    );
                    assert!(
                        e <= s * (1.0 + 1e-4),
                        "{rows}x{cols} seed {seed} rank {rank}: eora {e} > svd {s}"
                    );
                }
                // At full rank both reconstruct ΔW.
                let full = rows.min(cols);
                let lr = eora_lowrank("w", &dw, rows, cols, &weight, full).unwrap();
                for (a, b) in apply(&lr, rows, cols).iter().zip(&dw) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
        }
    }

    /// Every route (output space from `C` alone; input space with a Cholesky root; with the
    /// clamped eigen-root of a semi-definite `C`) gives the adapter of EoRA's textbook form,
    /// `[ΔW Q Λ^{1/2}]_r Λ^{-1/2} Qᵀ`, and the spectra agree.
    #[test]
    fn eora_routes_equal_the_eigenbasis_form() {
        for (rows, cols, tokens) in [(12, 20, 40), (20, 12, 40), (20, 12, 8)] {
            let x: Vec<f64> = (0..tokens * cols)
                .map(|i| ((i * 29 % 23) as f64 - 11.0) * (1.0 + (i % cols) as f64 * 0.2))
                .collect();
            let mut h = vec![0f64; cols * cols];
            for t in 0..tokens {
                for a in 0..cols {
                    for b in 0..cols {
                        h[a * cols + b] += x[t * cols + a] * x[t * cols + b];
                    }
                }
            }
            let dw: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 17 % 31) as f32 - 15.0) * 0.01)
                .collect();
            let c = Mat::<f64>::from_fn(cols, cols, |i, j| h[i * cols + j]);
            let (s, s_inv) = eigen_root("w", &c).unwrap();
            let dwm = Mat::<f64>::from_fn(rows, cols, |i, j| dw[i * cols + j] as f64);
            let weight = EoraWeight::new("w", &h, cols, rows > cols).unwrap();
            // 8 tokens for 12 inputs: C is singular, Cholesky must fail over to the eigen root.
            assert_eq!(cholesky_root(&c).is_some(), tokens > cols);
            let rank = 3;
            let want = apply(
                &truncated(&(&dwm * &s), rank, Some(&s_inv)).unwrap(),
                rows,
                cols,
            );
            let got = apply(
                &eora_lowrank("w", &dw, rows, cols, &weight, rank).unwrap(),
                rows,
                cols,
            );
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * scale,
                    "{rows}x{cols}/{tokens}: {a} vs {b}"
                );
            }
            let sv = (&dwm * &s).singular_values().unwrap();
            let spec = spectrum("w", &dw, rows, cols, Some(&weight)).unwrap();
            for (a, b) in sv.iter().zip(&spec) {
                assert!((a * a - b * b).abs() < 1e-9 * sv[0] * sv[0], "{a} vs {b}");
            }
        }
    }
}
