//! The sequential driver of SparseGPT/GPTQ-style one-shot compression: layer `i` is calibrated on
//! inputs produced by the already-compressed layers `0..i`. For each layer: one pass over the
//! calibration windows collects the input statistics of all its linears (from the layer as it
//! was), the method rewrites the layer, and a second pass computes the compressed layer's
//! outputs, which become the next layer's inputs. Only one layer's activations are held.

use super::stats::{InputStats, LayerStats};
use crate::model::{Layer, Linear};
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

/// A method applied to one linear: `(full name, linear, its input statistics)`; rewrites the
/// linear in place.
pub type LinearMethod<'a> =
    dyn FnMut(&str, &mut Linear, Option<&InputStats>) -> Result<Outcome> + 'a;

/// Whether a linear named `name` is among `targets` (name suffixes such as `q_proj`; empty:
/// every linear).
pub fn targeted(name: &str, targets: &[String]) -> bool {
    targets.is_empty() || targets.iter().any(|t| name.ends_with(t.as_str()))
}

/// Applies `method` to every targeted linear of `layer` (the linear's HF name ends with one of
/// `targets`; empty = all).
pub fn compress_linears(
    index: usize,
    layer: &mut Layer,
    stats: &LayerStats,
    targets: &[String],
    method: &mut LinearMethod,
) -> Result<Vec<LinearReport>> {
    let mut reports = Vec::new();
    for (name, site, lin) in layer.linears_mut() {
        if !targeted(name, targets) {
            continue;
        }
        let start = Instant::now();
        let st = stats.sites.get(&site);
        let before = st.map(|_| lin.dense_weight().into_owned());
        let full = format!("layers.{index}.{name}");
        let outcome = method(&full, lin, st)?;
        lin.check_finite(&full)?;
        let (error_before, rel_error) = match (outcome.errors, st, before) {
            (Some((b, a)), _, _) => (Some(b), Some(a)),
            (None, Some(s), Some(w)) => (
                None,
                Some(s.relative_error(&w, &lin.dense_weight(), lin.out_features)),
            ),
            _ => (None, None),
        };
        reports.push(LinearReport {
            layer: index,
            name: name.to_string(),
            rel_error,
            error_before,
            damp: outcome.damp,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(reports)
}

/// Runs `compress(i, layer, stats)` on every layer in order. Without calibration windows the
/// statistics are empty and no forward pass runs (for data-free methods). `progress(done,
/// total)` is called after each layer. Returns the seconds spent per layer.
pub fn compress_sequential(
    model: &mut Model,
    windows: &[&[u32]],
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
    let mut xs: Vec<Vec<f32>> = windows
        .iter()
        .map(|w| model.embed_tokens(w))
        .collect::<Result<_>>()?;
    let n = model.layers.len();
    let mut seconds = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let mut stats = LayerStats::default();
        crate::threads::install(|| -> Result<()> {
            for (x, w) in xs.iter().zip(windows) {
                // The statistics pass must not change the inputs: run on a copy.
                let mut y = x.clone();
                model.run_layer(i, &mut y, w.len(), Some(&mut stats))?;
            }
            Ok(())
        })?;
        if let Some(e) = stats.error.take() {
            return Err(Error::Invalid(format!("layer {i} calibration: {e}")));
        }
        compress(i, &mut model.layers[i], &stats)?;
        let m: &Model = model;
        crate::threads::install(|| -> Result<()> {
            for (x, w) in xs.iter_mut().zip(windows) {
                m.run_layer(i, x, w.len(), None)?;
            }
            Ok(())
        })?;
        seconds.push(start.elapsed().as_secs_f64());
        progress(i + 1, n);
    }
    Ok(seconds)
}
