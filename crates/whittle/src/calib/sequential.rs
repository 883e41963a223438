//! The sequential driver of SparseGPT/GPTQ-style one-shot compression: layer `i` is calibrated on
//! inputs produced by the already-compressed layers `0..i`. For each layer: one pass over the
//! calibration windows collects the input statistics of all its linears (from the layer as it
//! was), the method rewrites the layer, and a second pass computes the compressed layer's
//! outputs, which become the next layer's inputs. Only one layer's activations are held.

use super::stats::LayerStats;
use crate::model::Layer;
use crate::{Error, Model, Result};
use std::time::Instant;

/// Runs `compress(i, layer, stats)` on every layer in order. `progress(done, total)` is called
/// after each layer. Returns the seconds spent per layer.
pub fn compress_sequential(
    model: &mut Model,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
    compress: &mut dyn FnMut(usize, &mut Layer, &LayerStats) -> Result<()>,
) -> Result<Vec<f64>> {
    if windows.is_empty() {
        return Err(Error::Invalid("no calibration windows".into()));
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
