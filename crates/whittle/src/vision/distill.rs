//! Multi-teacher feature distillation into a small ViT (AM-RADIO's recipe with PHI-S's
//! standardisation): each teacher's summary feature of an image is standardised by a
//! normaliser fitted on the training images' features (streamed f64 moments, see
//! [`crate::distill::normalizer`]), the student's summary (CLS) token goes through one linear
//! head per teacher, and the loss is the sum over teachers of the mean squared error to the
//! standardised targets. Which normaliser is used decides whether one teacher's scale dominates
//! the sum: the per-teacher losses and their shares are logged every step.
//!
//! Teachers are frozen, so their features are computed once ([`TeacherTargets`]) and the loop
//! reads them; a checkpoint (student, heads, AdamW moments, step, log) makes a run resumable.

use super::vit::{Vit, VitConfig};
use crate::distill::fidelity::Fidelity;
use crate::distill::normalizer::{FeatureStats, NormKind, Normalizer};
use crate::train::optim::{adamw_step, learning_rate, AdamWConfig, Moments};
use crate::train::params_file;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// ViT-Tiny/16 (DeiT-Tiny's shape: 192 wide, 12 layers, 3 heads, MLP 768; ≈ 5.5 M parameters)
/// for square inputs of `size` pixels.
pub fn vit_tiny(size: usize) -> VitConfig {
    VitConfig {
        patch: 16,
        width: 192,
        layers: 12,
        heads: 3,
        mlp: 768,
        eps: 1e-6,
        layer_scale: false,
        grid: size / 16,
        channels: 3,
    }
}

/// A student with fresh weights: matrices, patch kernel, CLS and position embeddings uniform
/// with standard deviation 0.02 (ViT's initial scale), biases 0, LayerNorm weights 1,
/// LayerScale 0.1.
pub fn random_student(config: VitConfig, seed: u64) -> Result<Vit> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let half_width = 0.02 * 3f32.sqrt();
    let mut values = HashMap::new();
    for (name, shape) in Vit::expected(&config) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("lambda1") {
            vec![0.1; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| rng.random_range(-half_width..half_width))
                .collect()
        };
        values.insert(name, v);
    }
    Vit::from_values(config, values)
}

/// One teacher's features of the training images — its summary vector (`tokens` = 1) or its
/// per-patch features resized to the student's patch grid (`tokens` = the student's patches) —
/// and the normaliser fitted to them.
pub struct TeacherTargets {
    /// The teacher's name, `.dense` appended for per-patch targets.
    pub name: String,
    pub dim: usize,
    /// Feature rows per image.
    pub tokens: usize,
    /// `images × tokens × dim`, raw (the teacher's own space).
    pub features: Vec<f32>,
    pub normalizer: Normalizer,
}

impl TeacherTargets {
    /// Fits `kind` to `features` (`images × tokens × dim`; every row is one sample of the
    /// statistics).
    pub fn new(
        name: &str,
        dim: usize,
        tokens: usize,
        features: Vec<f32>,
        kind: NormKind,
    ) -> Result<Self> {
        if dim == 0 || tokens == 0 || !features.len().is_multiple_of(dim * tokens) {
            return Err(Error::Invalid(format!(
                "teacher {name}: {} feature values are not images of {tokens} × {dim}",
                features.len()
            )));
        }
        let mut stats = FeatureStats::new(dim);
        stats.add(&features)?;
        Ok(TeacherTargets {
            name: name.to_string(),
            dim,
            tokens,
            normalizer: Normalizer::fit(&stats, kind)?,
            features,
        })
    }

    /// The raw rows of the given images, `rows.len() · tokens × dim`.
    fn gather(&self, rows: &[usize]) -> Vec<f32> {
        let n = self.tokens * self.dim;
        rows.iter()
            .flat_map(|&r| self.features[r * n..][..n].iter().copied())
            .collect()
    }
}

/// A target's shape: feature width and rows per image (1: summary; else the student's patches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetShape {
    pub dim: usize,
    pub tokens: usize,
}

impl From<&TeacherTargets> for TargetShape {
    fn from(t: &TeacherTargets) -> Self {
        TargetShape {
            dim: t.dim,
            tokens: t.tokens,
        }
    }
}

/// The run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    pub student: VitConfig,
    /// Input side of the student, pixels.
    pub size: usize,
    pub norm: NormKind,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    pub seed: u64,
    pub ckpt_every: u64,
    /// The targets' names, in order (a resumed run must have the same): a teacher's name for
    /// its summary feature, `NAME.dense` for its per-patch features.
    pub teachers: Vec<String>,
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    /// Each target's MSE, in the targets' order.
    pub teacher_loss: Vec<f64>,
    pub grad_norm: f64,
    pub images_per_s: f64,
}

/// The student, one head per teacher, and the optimiser state.
pub struct Distiller {
    pub config: DistillConfig,
    pub student: Vit,
    /// Trained variables by name: the student's (its [`crate::vision::vit::names`]) and the
    /// heads' (`head.{teacher}.weight`, `head.{teacher}.bias`).
    vars: HashMap<String, Var>,
    names: Vec<String>,
    shapes: Vec<TargetShape>,
    moments: HashMap<String, Moments>,
    pub step: u64,
    pub log: Vec<StepLog>,
}

fn head_names(teacher: &str) -> [String; 2] {
    [
        format!("head.{teacher}.weight"),
        format!("head.{teacher}.bias"),
    ]
}

impl Distiller {
    /// A fresh run: a random student and zero-initialised heads (the first predictions are the
    /// standardised targets' mean, 0).
    pub fn new(config: DistillConfig, shapes: &[TargetShape]) -> Result<Self> {
        if config.teachers.len() != shapes.len() || shapes.is_empty() {
            return Err(Error::Invalid(
                "vision distillation needs at least one teacher".into(),
            ));
        }
        if config.batch == 0
            || config.steps == 0
            || !config.size.is_multiple_of(config.student.patch)
        {
            return Err(Error::Invalid(format!(
                "batch {} / steps {} / size {} (a multiple of the {}-pixel patch) are not a run",
                config.batch, config.steps, config.size, config.student.patch
            )));
        }
        let g = config.size / config.student.patch;
        if let Some(bad) = shapes.iter().find(|s| s.tokens != 1 && s.tokens != g * g) {
            return Err(Error::Invalid(format!(
                "per-patch targets of {} rows for a student with {g} × {g} patches",
                bad.tokens
            )));
        }
        let student = random_student(config.student.clone(), config.seed)?;
        let mut vars = HashMap::new();
        let mut names: Vec<String> = Vit::expected(&config.student)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut params = HashMap::new();
        for name in &names {
            let var = Var::from_tensor(&student.params[name])?;
            params.insert(name.clone(), var.as_tensor().clone());
            vars.insert(name.clone(), var);
        }
        let width = config.student.width;
        for (teacher, &TargetShape { dim: d, .. }) in config.teachers.iter().zip(shapes) {
            let [w, b] = head_names(teacher);
            vars.insert(
                w.clone(),
                Var::zeros((d, width), candle_core::DType::F32, &Device::Cpu)?,
            );
            vars.insert(
                b.clone(),
                Var::zeros(d, candle_core::DType::F32, &Device::Cpu)?,
            );
            names.extend([w, b]);
        }
        let student = Vit {
            config: config.student.clone(),
            params,
        };
        Ok(Distiller {
            config,
            student,
            vars,
            names,
            shapes: shapes.to_vec(),
            moments: HashMap::new(),
            step: 0,
            log: Vec::new(),
        })
    }

    /// The images of step `step` (0-based): a seeded permutation per epoch, cut in batches.
    pub fn batch_indices(&self, step: u64, images: usize) -> Vec<usize> {
        let per_epoch = (images / self.config.batch).max(1) as u64;
        let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
        let mut order: Vec<usize> = (0..images).collect();
        order.shuffle(&mut SmallRng::seed_from_u64(
            self.config.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ));
        order
            .into_iter()
            .cycle()
            .skip(k * self.config.batch)
            .take(self.config.batch)
            .collect()
    }

    /// The heads' predictions (standardised teacher space) for a preprocessed batch, each
    /// `batch · tokens × dim`: summary heads read the CLS token, per-patch heads every patch.
    pub fn predict(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        self.predict_from(&self.student.forward(pixels)?)
    }

    /// [`Distiller::predict`] from the student's output tokens `[batch, 1 + patches, width]`
    /// (an evaluation that also wants the summary token runs the student once).
    pub fn predict_from(&self, tokens: &Tensor) -> Result<Vec<Tensor>> {
        let (b, n, width) = tokens.dims3()?;
        let summary = tokens.narrow(1, 0, 1)?.squeeze(1)?;
        let patches = tokens.narrow(1, 1, n - 1)?.reshape((b * (n - 1), width))?;
        self.config
            .teachers
            .iter()
            .zip(&self.shapes)
            .map(|(t, shape)| {
                let [w, bias] = head_names(t);
                let x = if shape.tokens == 1 {
                    &summary
                } else {
                    &patches
                };
                Ok(x.matmul(&self.vars[&w].as_tensor().t()?)?
                    .broadcast_add(self.vars[&bias].as_tensor())?)
            })
            .collect()
    }

    /// One optimiser step on a batch: `pixels` `[batch, 3, size, size]`, `rows` the batch's
    /// image indices into every teacher's targets.
    pub fn train_step(
        &mut self,
        pixels: &Tensor,
        rows: &[usize],
        targets: &[TeacherTargets],
    ) -> Result<StepLog> {
        let start = std::time::Instant::now();
        let preds = self.predict(pixels)?;
        let mut total: Option<Tensor> = None;
        let mut teacher_loss = Vec::with_capacity(targets.len());
        for (pred, t) in preds.iter().zip(targets) {
            let raw = t.gather(rows);
            let target = Tensor::from_vec(
                t.normalizer.apply(&raw),
                (rows.len() * t.tokens, t.dim),
                &Device::Cpu,
            )?;
            let loss = (pred - target)?.sqr()?.mean_all()?;
            teacher_loss.push(loss.to_scalar::<f32>()? as f64);
            total = Some(match total {
                Some(acc) => (acc + loss)?,
                None => loss,
            });
        }
        let total = total.ok_or_else(|| Error::Invalid("no teacher".into()))?;
        let loss = total.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "loss became {loss} at step {} (no update made): lower the learning rate",
                self.step + 1
            )));
        }
        let grads = total.backward()?;
        let mut flat: Vec<(String, Vec<f32>)> = Vec::with_capacity(self.names.len());
        for name in &self.names {
            if let Some(g) = grads.get(self.vars[name].as_tensor()) {
                flat.push((name.clone(), g.flatten_all()?.to_vec1()?));
            }
        }
        let norm = flat
            .iter()
            .flat_map(|(_, g)| g.iter())
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let c = &self.config;
        let scale = if c.clip > 0.0 && norm > c.clip {
            (c.clip / norm) as f32
        } else {
            1.0
        };
        let lr = learning_rate(self.step, c.warmup, c.steps, c.lr, c.min_lr);
        for (name, g) in flat {
            let var = &self.vars[&name];
            let shape = var.dims().to_vec();
            let mut theta = var.flatten_all()?.to_vec1::<f32>()?;
            // Matrices decay; biases, norms, CLS/position embeddings and LayerScale do not.
            let decays = shape.len() >= 2
                && !name.starts_with("embeddings.cls")
                && !name.starts_with("embeddings.position");
            adamw_step(
                &c.adamw,
                self.step + 1,
                lr,
                decays,
                &mut theta,
                (&g, scale),
                self.moments.entry(name).or_default(),
            );
            var.set(&Tensor::from_vec(theta, shape, &Device::Cpu)?)?;
        }
        self.step += 1;
        let row = StepLog {
            step: self.step,
            lr,
            loss,
            teacher_loss,
            grad_norm: norm,
            images_per_s: rows.len() as f64 / start.elapsed().as_secs_f64(),
        };
        self.log.push(row.clone());
        Ok(row)
    }

    /// Writes `dir/checkpoint` (variables, moments, state) atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::atomic::write_dir(
            &dir.join("checkpoint"),
            crate::io::atomic::Existing::Replace,
            |tmp| {
                params_file::save(
                    &tmp.join("params.safetensors"),
                    &self.names,
                    &self.vars,
                    &self.moments,
                )?;
                let state = serde_json::json!({ "config": self.config, "step": self.step, "log": self.log });
                let path = tmp.join("state.json");
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&state).unwrap_or_default(),
                )
                .map_err(|e| Error::io(&path, e))
            },
        )
    }

    /// Continues the run in `dir/checkpoint`; its settings must equal `config` (so a resumed
    /// run is the run that was started).
    pub fn resume(dir: &Path, config: DistillConfig, shapes: &[TargetShape]) -> Result<Self> {
        let ck = dir.join("checkpoint");
        let sj = ck.join("state.json");
        let text = std::fs::read_to_string(&sj).map_err(|e| Error::io(&sj, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&sj, e))?;
        let saved: DistillConfig =
            serde_json::from_value(state["config"].clone()).map_err(|e| Error::format(&sj, e))?;
        if saved != config {
            return Err(Error::Invalid(format!(
                "{} holds a run with other settings; use a new --out or the same settings",
                dir.display()
            )));
        }
        let mut d = Distiller::new(config, shapes)?;
        params_file::load(
            &ck.join("params.safetensors"),
            &d.names,
            &d.vars,
            &mut d.moments,
        )?;
        d.step = state["step"].as_u64().unwrap_or(0);
        d.log = serde_json::from_value(state["log"].clone()).map_err(|e| Error::format(&sj, e))?;
        Ok(d)
    }

    /// Whether `dir` holds a checkpoint.
    pub fn has_checkpoint(dir: &Path) -> bool {
        dir.join("checkpoint").join("state.json").is_file()
    }
}

/// Per-teacher fidelity of predictions mapped back to the teacher's space: mean cosine
/// similarity to the teacher's features, and MSE divided by the features' total variance
/// (1 = no better than predicting the mean); see [`Fidelity`].
pub fn fidelity(pred_std: &[f32], teacher: &TeacherTargets, raw: &[f32]) -> (f64, f64) {
    let mut f = Fidelity::new(teacher.dim);
    f.add_normalised(&teacher.normalizer, pred_std, raw);
    (f.cosine(), f.nmse())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> VitConfig {
        VitConfig {
            patch: 4,
            width: 8,
            layers: 2,
            heads: 2,
            mlp: 16,
            eps: 1e-6,
            layer_scale: true,
            grid: 2,
            channels: 3,
        }
    }

    fn pixels(n: usize, seed: u64) -> Tensor {
        let mut rng = SmallRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * 3 * 64)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (n, 3, 8, 8), &Device::Cpu).unwrap()
    }

    /// The ViT's gradient (the fused LayerNorm, linear and attention ops, GELU, LayerScale,
    /// patch embedding, position embeddings) against central differences.
    #[test]
    fn vit_gradients_match_finite_differences() {
        let vit = random_student(tiny_config(), 3).unwrap();
        let x = pixels(2, 5);
        let names = [
            "encoder.layer.1.attention.attention.query.weight",
            "encoder.layer.0.norm1.weight",
            "embeddings.patch_embeddings.projection.weight",
            "encoder.layer.1.layer_scale2.lambda1",
            "embeddings.position_embeddings",
        ];
        let probe = Tensor::from_vec(
            (0..2 * 5 * 8)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
                .collect::<Vec<_>>(),
            (2, 5, 8),
            &Device::Cpu,
        )
        .unwrap();
        for name in names {
            let var = Var::from_tensor(&vit.params[name]).unwrap();
            let mut params = vit.params.clone();
            params.insert(name.to_string(), var.as_tensor().clone());
            let model = Vit {
                config: vit.config.clone(),
                params,
            };
            let loss = |m: &Vit| -> Tensor {
                (m.forward(&x).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grad: Vec<f32> = loss(&model)
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            let shape = var.dims().to_vec();
            for i in [0, base.len() / 2, base.len() - 1] {
                let eps = 1e-2f32;
                let at = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model).to_scalar::<f32>().unwrap() as f64
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                let g = grad[i] as f64;
                assert!(
                    (g - fd).abs() <= 2e-2 * (1.0 + fd.abs()),
                    "{name}[{i}]: autograd {g}, finite differences {fd}"
                );
            }
        }
    }

    /// Two teachers whose features are fixed functions of the image at scales 1 and 1000: the
    /// student learns both (PHI-S keeps the loud one from owning the loss), and a run stopped
    /// and resumed equals the uninterrupted one bit for bit.
    #[test]
    fn learns_two_teachers_and_resumes_exactly() {
        let n = 24;
        let images = pixels(n, 11);
        let flat: Vec<f32> = images.flatten_all().unwrap().to_vec1().unwrap();
        let teacher = |dim: usize, scale: f32, seed: u64| -> Vec<f32> {
            let mut rng = SmallRng::seed_from_u64(seed);
            let proj: Vec<f32> = (0..dim * 192)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            (0..n)
                .flat_map(|i| {
                    let img = &flat[i * 192..][..192];
                    (0..dim)
                        .map(|d| {
                            scale
                                * (0..192)
                                    .map(|k| proj[d * 192 + k] * img[k])
                                    .sum::<f32>()
                                    .tanh()
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // Per-patch features: 4 values per 4 × 4 patch (a 2 × 2 grid), functions of its pixels.
        let patch_features = || -> Vec<f32> {
            let mut out = Vec::new();
            for i in 0..n {
                for (py, px) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let mut sums = [0f32; 4];
                    for c in 0..3 {
                        for y in 0..4 {
                            for x in 0..4 {
                                let v = flat[i * 192 + c * 64 + (4 * py + y) * 8 + 4 * px + x];
                                sums[(c + y) % 4] += v / 12.0;
                            }
                        }
                    }
                    out.extend(sums.iter().map(|s| s.tanh()));
                }
            }
            out
        };
        let targets = vec![
            TeacherTargets::new("quiet", 2, 1, teacher(2, 1.0, 1), NormKind::Phis).unwrap(),
            TeacherTargets::new("loud", 4, 1, teacher(4, 1000.0, 3), NormKind::Phis).unwrap(),
            TeacherTargets::new("quiet.dense", 4, 4, patch_features(), NormKind::Phis).unwrap(),
        ];
        let config = DistillConfig {
            student: tiny_config(),
            size: 8,
            norm: NormKind::Phis,
            steps: 60,
            batch: 8,
            lr: 1e-2,
            min_lr: 1e-4,
            warmup: 4,
            adamw: AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            clip: 1.0,
            seed: 7,
            ckpt_every: 0,
            teachers: vec!["quiet".into(), "loud".into(), "quiet.dense".into()],
        };
        let shapes: Vec<TargetShape> = targets.iter().map(TargetShape::from).collect();
        let run = |d: &mut Distiller, steps: u64| {
            for _ in 0..steps {
                let rows = d.batch_indices(d.step, n);
                let idx = Tensor::from_vec(
                    rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    rows.len(),
                    &Device::Cpu,
                )
                .unwrap();
                d.train_step(&images.index_select(&idx, 0).unwrap(), &rows, &targets)
                    .unwrap();
            }
        };
        let mut full = Distiller::new(config.clone(), &shapes).unwrap();
        run(&mut full, 60);
        let first = &full.log[0];
        let last = &full.log[59];
        for t in 0..3 {
            assert!(
                last.teacher_loss[t] < 0.9 * first.teacher_loss[t],
                "teacher {t}: {first:?} → {last:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let mut part = Distiller::new(config.clone(), &shapes).unwrap();
        run(&mut part, 15);
        part.save(dir.path()).unwrap();
        let mut resumed = Distiller::resume(dir.path(), config.clone(), &shapes).unwrap();
        run(&mut resumed, 45);
        // Everything but the speed is identical.
        let values = |log: &[StepLog]| -> Vec<(u64, f64, f64, Vec<f64>, f64)> {
            log.iter()
                .map(|r| (r.step, r.lr, r.loss, r.teacher_loss.clone(), r.grad_norm))
                .collect()
        };
        assert_eq!(values(&resumed.log), values(&full.log));
        let other = DistillConfig {
            lr: 1e-3,
            ..config.clone()
        };
        assert!(Distiller::resume(dir.path(), other, &shapes).is_err());
        // Per-patch targets must have one row per student patch.
        let mut wrong = shapes.clone();
        wrong[2].tokens = 9;
        let e = Distiller::new(config, &wrong).err().unwrap().to_string();
        assert!(e.contains("2 × 2 patches"), "{e}");
    }
}
