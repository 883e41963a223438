//! Feature-distillation heads: for each distilled student block, the teacher block it learns
//! from (same relative depth), the normaliser fitted to that teacher block's outputs, and a
//! learned affine projection from the student's width to the teacher's.
//!
//! The projection starts at the least-squares map from the student's features to the teacher's
//! normalised ones on the calibration windows (streamed, [`crate::calib::ridge`]): a zero or
//! random start would give the student no useful gradient at the small learning rates of
//! recovery, and any fixed start would be wrong after a rotating normaliser such as PHI-S. The
//! normalisers and the trained projections are exported, so a student head can be mapped back to
//! the teacher's space (`x = B y + μ`).

use super::features::{layer_map, FeatureLoss};
use super::normalizer::{FeatureStats, NormKind, Normalizer};
use crate::calib::ridge::RidgeSums;
use crate::model::{Observer, Site};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What feature distillation does: which student blocks (0-based outputs), how the teacher's
/// features are normalised, and the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub layers: Vec<usize>,
    pub norm: NormKind,
    pub loss: FeatureLoss,
}

/// One distilled layer pair.
pub struct Head {
    pub student: usize,
    pub teacher: usize,
    pub normalizer: Normalizer,
    /// Initial projection `[teacher width, student width]`, row-major, and its bias.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// An observer that keeps the residual stream leaving each of `layers` for the current pass.
pub struct BlockTap {
    pub layers: Vec<usize>,
    /// Meta-token rows at the front of every observed block output, dropped.
    pub skip: usize,
    pub hidden: usize,
    /// Per entry of `layers`, the last pass's rows (`tokens × hidden`).
    pub out: Vec<Vec<f32>>,
}

impl BlockTap {
    pub fn new(model: &Model, layers: &[usize]) -> Self {
        BlockTap {
            layers: layers.to_vec(),
            skip: model.config.memory_tokens,
            hidden: model.config.hidden,
            out: vec![Vec::new(); layers.len()],
        }
    }
}

impl Observer for BlockTap {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], _rows: usize) {
        if site != Site::BlockOut {
            return;
        }
        for (l, out) in self.layers.iter().zip(&mut self.out) {
            if *l == layer {
                out.clear();
                out.extend_from_slice(&x[self.skip * self.hidden..]);
            }
        }
    }
}

/// Fits the heads of `spec` on `windows`: one pass of teacher and student each.
pub fn fit(
    teacher: &Model,
    student: &Model,
    spec: &FeatureSpec,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Head>> {
    let pairs = layer_map(&spec.layers, student.layers.len(), teacher.layers.len())?;
    if windows.is_empty() {
        return Err(Error::Invalid(
            "feature distillation needs calibration windows to fit its heads".into(),
        ));
    }
    let (ht, hs) = (teacher.config.hidden, student.config.hidden);
    let t_layers: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let mut ttap = BlockTap::new(teacher, &t_layers);
    let mut stap = BlockTap::new(student, &spec.layers);
    let mut stats: Vec<FeatureStats> = pairs.iter().map(|_| FeatureStats::new(ht)).collect();
    let mut sums: Vec<RidgeSums> = pairs.iter().map(|_| RidgeSums::new(hs, ht)).collect();
    for (i, w) in windows.iter().enumerate() {
        teacher.hidden_states(w, None, Some(&mut ttap))?;
        student.hidden_states(w, None, Some(&mut stap))?;
        for k in 0..pairs.len() {
            stats[k].add(&ttap.out[k])?;
            crate::error::check_finite("student features", &stap.out[k])?;
            sums[k].add(&stap.out[k], &ttap.out[k]);
        }
        progress(i + 1, windows.len());
    }
    pairs
        .iter()
        .zip(stats.iter().zip(&sums))
        .map(|(&(s, t), (st, sum))| {
            let normalizer = Normalizer::fit(st, spec.norm)?;
            let fit = sum.fit(&format!("feature head of student block {s}"))?;
            // Raw fit y ≈ Wᵀ (x − m_x) + m_y; normalised z = A (y − μ) ≈ (A Wᵀ) x + A (m_y − Wᵀ m_x − μ).
            let a = &normalizer.forward;
            let wt = |o: usize, i: usize| fit.w[(i, o)];
            let mut weight = vec![0f32; ht * hs];
            let raw_bias: Vec<f64> = (0..ht)
                .map(|o| {
                    let mx: f64 = (0..hs).map(|i| wt(o, i) * fit.mean_x[i]).sum();
                    fit.mean_y[o] - mx - normalizer.mean[o] as f64
                })
                .collect();
            let mut bias = vec![0f32; ht];
            for r in 0..ht {
                let arow = &a[r * ht..(r + 1) * ht];
                bias[r] = arow
                    .iter()
                    .zip(&raw_bias)
                    .map(|(x, y)| *x as f64 * y)
                    .sum::<f64>() as f32;
                for i in 0..hs {
                    weight[r * hs + i] = arow
                        .iter()
                        .enumerate()
                        .map(|(o, x)| *x as f64 * wt(o, i))
                        .sum::<f64>() as f32;
                }
            }
            Ok(Head {
                student: s,
                teacher: t,
                normalizer,
                weight,
                bias,
            })
        })
        .collect()
}

/// Writes the heads (each normaliser's `mean`, `forward`, `inverse`, and the projections as
/// trained: `proj` holds `(weight, bias)` per head) to `path` as safetensors, with the layer
/// pairs and the normaliser kind in its metadata.
pub fn save(path: &Path, heads: &[Head], proj: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, (h, (w, b))) in heads.iter().zip(proj).enumerate() {
        let (c, hs) = (
            h.normalizer.channels,
            w.len() / h.normalizer.channels.max(1),
        );
        let n = &h.normalizer;
        owned.push((format!("head.{k}.norm.mean"), vec![c], bytes(&n.mean)));
        owned.push((
            format!("head.{k}.norm.forward"),
            vec![c, c],
            bytes(&n.forward),
        ));
        owned.push((
            format!("head.{k}.norm.inverse"),
            vec![c, c],
            bytes(&n.inverse),
        ));
        owned.push((format!("head.{k}.proj.weight"), vec![c, hs], bytes(w)));
        owned.push((format!("head.{k}.proj.bias"), vec![c], bytes(b)));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("feature heads: {e}")))
        })
        .collect::<Result<_>>()?;
    let pairs: Vec<String> = heads
        .iter()
        .map(|h| format!("{}:{}", h.student, h.teacher))
        .collect();
    let kind = heads
        .first()
        .map(|h| format!("{:?}", h.normalizer.kind))
        .unwrap_or_default();
    let meta = std::collections::HashMap::from([
        ("pairs".to_string(), pairs.join(",")),
        ("normalizer".to_string(), kind),
        (
            "map".to_string(),
            "z = forward (x_teacher - mean); student head = weight x_student + bias ≈ z; \
             x_teacher = inverse z + mean"
                .to_string(),
        ),
    ]);
    crate::io::atomic::write_file(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    })
}
