//! The sequential driver of SparseGPT/GPTQ-style one-shot compression: layer `i` is calibrated on
//! inputs produced by the already-compressed layers `0..i`. For each layer: one pass over the
//! calibration windows collects the input statistics of all its linears (from the layer as it
//! was), the method rewrites the layer, and a second pass computes the compressed layer's
//! outputs, which become the next layer's inputs. Only one layer's activations are held.

use super::stats::{Covariance, InputStats, LayerStats};
use crate::model::{Layer, Linear, Site};
use crate::{Error, Model, Result};
use std::time::Instant;

/// What happened to one linear.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearReport {
    pub layer: usize,
    pub name: String,
    /// `‖(W − W_c) X‖² / ‖W X‖²` over the calibration inputs (when calibrated); for
    /// compensation, the error left after it, against the reference weight.
    pub rel_error: Option<f64>,
    /// For compensation: the error against the reference weight before it.
    pub error_before: Option<f64>,
    /// Calibration tokens the errors are measured on (fewer than calibrated on when the method
    /// samples its covariance, see [`Covariance`]); none: in weight space.
    pub error_tokens: Option<usize>,
    /// Dampening actually used by a Hessian-based method (raised if needed).
    pub damp: Option<f64>,
    pub seconds: f64,
}

/// What a method reports about one linear besides the rewritten weight.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Dampening actually used by a Hessian-based method.
    pub damp: Option<f64>,
    /// Relative output errors (before, after) against a reference other than the layer's own
    /// input weight (compensation measures against the dense model).
    pub errors: Option<(f64, f64)>,
}

/// A method applied to one linear: `(full name, input site, linear, its input statistics)`;
/// rewrites the linear in place. Linears are independent, so they are compressed in parallel.
pub type LinearMethod<'a> =
    dyn Fn(&str, Site, &mut Linear, Option<&InputStats>) -> Result<Outcome> + Sync + 'a;

/// Builds one layer's [`LinearMethod`] once its statistics are in (`(index, layer, stats)`):
/// most methods return the same rule for every layer; compensation first derives the layer's
/// EoRA weights from its statistics.
pub type LayerMethod<'a> =
    dyn FnMut(usize, &Layer, &LayerStats) -> Result<Box<LinearMethod<'a>>> + 'a;

/// The one-shot driver of every method: [`compress_sequential`] with [`compress_linears`] on
/// each layer, the method built per layer by `method`; returns every linear's report.
pub fn compress_each_linear(
    model: &mut Model,
    windows: &[&[u32]],
    cov: Covariance,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
    method: &mut LayerMethod,
) -> Result<Vec<LinearReport>> {
    let mut reports = Vec::new();
    compress_sequential(model, windows, cov, progress, &mut |i, layer, stats| {
        let rule = method(i, layer, stats)?;
        reports.extend(compress_linears(i, layer, stats, targets, &*rule)?);
        Ok(())
    })?;
    Ok(reports)
}

/// Whether a linear named `name` is among `targets` (name suffixes such as `q_proj`; empty:
/// every linear).
pub fn targeted(name: &str, targets: &[String]) -> bool {
    targets.is_empty() || targets.iter().any(|t| name.ends_with(t.as_str()))
}

/// Applies `method` to every targeted linear of `layer` (the linear's HF name ends with one of
/// `targets`; empty = all). The linears are split between the worker threads, each on one
/// thread: a layer's seven factorisations and column walks are independent, and each is too
/// small (576–1,536 wide) to keep two threads busy on its own.
pub fn compress_linears(
    index: usize,
    layer: &mut Layer,
    stats: &LayerStats,
    targets: &[String],
    method: &LinearMethod,
) -> Result<Vec<LinearReport>> {
    use rayon::prelude::*;
    let one = |(name, site, lin): (&str, Site, &mut Linear)| {
        (|| {
            let start = Instant::now();
            let st = stats.sites.get(&site);
            let before = st.map(|_| lin.dense_weight().into_owned());
            let full = format!("layers.{index}.{name}");
            let outcome = method(&full, site, lin, st)?;
            lin.check_finite(&full)?;
            let (error_before, rel_error) = match (outcome.errors, st, before) {
                (Some((b, a)), _, _) => (Some(b), Some(a)),
                (None, Some(s), Some(w)) => (
                    None,
                    Some(s.relative_error(&w, &lin.dense_weight(), lin.out_features)),
                ),
                _ => (None, None),
            };
            Ok(LinearReport {
                layer: index,
                name: name.to_string(),
                rel_error,
                error_before,
                error_tokens: st.map(|s| s.xtx_tokens),
                damp: outcome.damp,
                seconds: start.elapsed().as_secs_f64(),
            })
        })()
    };
    let todo: Vec<_> = layer
        .linears_mut()
        .into_iter()
        .filter(|(name, _, _)| targeted(name, targets))
        .collect();
    crate::threads::install(|| {
        if crate::threads::threads() == 1 {
            todo.into_iter().map(one).collect()
        } else {
            todo.into_par_iter().map(one).collect()
        }
    })
}

/// Runs `compress(i, layer, stats)` on every layer in order. Without calibration windows the
/// statistics are empty and no forward pass runs (for data-free methods); `cov` says how much
/// of the covariance the method needs. `progress(done, total)` is called after each layer.
/// Returns the seconds spent per layer.
///
/// Under [`crate::dist::scoped`], each rank runs its share of the windows (its activations
/// stay its own), the layer's statistics are summed over the ranks, and every rank compresses
/// the layer from the same sums; the ranks then check that they computed the same weights (a
/// rank on another CPU could round differently: then the job stops with an error rather than
/// continuing from layers that differ).
pub fn compress_sequential(
    model: &mut Model,
    windows: &[&[u32]],
    cov: Covariance,
    progress: &mut dyn FnMut(usize, usize),
    compress: &mut dyn FnMut(usize, &mut Layer, &LayerStats) -> Result<()>,
) -> Result<Vec<f64>> {
    if windows.is_empty() {
        let n = model.layers.len();
        let mut seconds = Vec::with_capacity(n);
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let start = Instant::now();
            compress(i, layer, &LayerStats::default())?;
            seconds.push(start.elapsed().as_secs_f64());
            progress(i + 1, n);
        }
        return Ok(seconds);
    }
    let comm = crate::dist::current();
    // Decided alike on every rank (a rank that returned alone would leave the others waiting).
    if windows.len() < comm.size() {
        return Err(Error::Invalid(format!(
            "{} calibration windows for {} ranks: every rank needs at least one",
            windows.len(),
            comm.size()
        )));
    }
    let mine: Vec<&[u32]> = crate::dist::shard(windows.len(), comm.rank(), comm.size())
        .map(|i| windows[i])
        .collect();
    let windows = &mine[..];
    let mut xs: Vec<Vec<f32>> = windows
        .iter()
        .map(|w| model.embed_tokens(w))
        .collect::<Result<_>>()?;
    let n = model.layers.len();
    let mut seconds = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let m: &Model = model;
        // The statistics pass must not change the inputs: it runs on a copy, and stops before
        // the layer's output (the statistics observer needs none).
        let new_stats = || LayerStats::new(cov);
        let mut stats = over_windows(&mut xs, windows, new_stats, LayerStats::merge, {
            &|st: &mut LayerStats, x: &mut Vec<f32>, w: &[u32]| {
                m.run_layer(i, &mut x.clone(), w.len(), Some(st))
            }
        })?;
        stats
            .all_reduce(&*comm)
            .and_then(|_| stats.finish())
            .map_err(|e| Error::Invalid(format!("layer {i} calibration: {e}")))?;
        compress(i, &mut model.layers[i], &stats)?;
        if comm.size() > 1 {
            let what = format!("layer {i}'s compressed weights");
            crate::dist::check_agreement(&*comm, &[(&what, layer_bytes(&model.layers[i]))])?;
        }
        let m: &Model = model;
        over_windows(&mut xs, windows, || (), |_, _| (), {
            &|_: &mut (), x: &mut Vec<f32>, w: &[u32]| m.run_layer(i, x, w.len(), None)
        })?;
        seconds.push(start.elapsed().as_secs_f64());
        progress(i + 1, n);
    }
    Ok(seconds)
}

/// The values of a layer's linears (weights and adapters), for comparing ranks' layers.
fn layer_bytes(layer: &Layer) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, _, lin) in layer.linears() {
        let adapter = lin.adapter.iter().flat_map(|a| a.a.iter().chain(&a.b));
        for v in lin.dense_weight().iter().chain(adapter) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// One window's work in [`over_windows`]: `(accumulator, activations, token ids)`.
type WindowStep<'a, A> = dyn Fn(&mut A, &mut Vec<f32>, &[u32]) -> Result<()> + Sync + 'a;

/// Runs `step(acc, x, window)` on every calibration window's activations `x` and returns the
/// merged accumulators. Windows are split between the worker threads, each window on one thread
/// ([`crate::threads::one_thread`]): on 2 cores this is ~20 % faster than running each window's
/// kernels on both threads (BENCHMARKS.md). The split is fixed (one run of consecutive windows
/// per thread, merged in order), so results do not depend on scheduling; windows left over when
/// they do not divide evenly run one at a time on all threads.
fn over_windows<A: Send>(
    xs: &mut [Vec<f32>],
    windows: &[&[u32]],
    init: impl Fn() -> A + Sync + Send,
    merge: impl Fn(&mut A, A) + Sync + Send,
    step: &WindowStep<'_, A>,
) -> Result<A> {
    use rayon::prelude::*;
    let n = crate::threads::threads();
    let whole = if n > 1 { xs.len() / n * n } else { 0 };
    let (head, tail) = xs.split_at_mut(whole);
    crate::threads::install(|| -> Result<A> {
        let mut acc = head
            .par_iter_mut()
            .zip(&windows[..whole])
            .with_min_len((whole / n).max(1))
            .try_fold(&init, |mut a, (x, w)| {
                crate::threads::one_thread(|| step(&mut a, x, w)).map(|_| a)
            })
            .try_reduce(&init, |mut a, b| {
                merge(&mut a, b);
                Ok(a)
            })?;
        for (x, w) in tail.iter_mut().zip(&windows[whole..]) {
            step(&mut acc, x, w)?;
        }
        Ok(acc)
    })
}
