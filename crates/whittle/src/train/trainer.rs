//! The training loop, for any model: random windows of a token stream (or the windows of a
//! teacher cache), an [`Objective`] (cross-entropy, logit and feature distillation, weighted),
//! parameter groups (frozen, adapters only, per-group learning rates, fixed sparsity masks),
//! gradient accumulation, global-norm clipping, AdamW under a warmup + cosine schedule, periodic
//! validation perplexity and checkpoints that resume exactly.
//!
//! Exact resumption follows from determinism: the caller supplies the same starting model (a
//! preset rebuilt from its seed, or the same student file — checked by fingerprint), which is
//! overwritten with the checkpoint's trained tensors and AdamW moments; the windows of step `s`
//! are a pure function of `(seed, s)`, and feature heads are refitted identically before their
//! trained values are restored, so nothing else needs saving.

use super::grad_sink::update_in_place;
use super::graph::{cross_entropy, forward_with_features, MaskSampling, Trainable};
use super::groups::Groups;
use super::loss_op::mean_over_rows;
use super::mix;
use super::objective::{Divergence, LogitDistillation, Objective, Term};
use super::optim::{adamw_step, learning_rate, AdamWConfig, Moments};
use super::presets::Preset;
use crate::dist::{self, Collective};
use crate::distill::cache::TeacherCache;
use crate::distill::heads::{self, BlockTap, FeatureSpec, Head};
use crate::distill::topk::SparseDistillation;
pub use crate::kernels::matmul::Precision;
use crate::model::{Fingerprint, Logits};
use crate::sparsity::maskllm::{self, Candidates, LearnedMask, MaskLlmConfig};
use crate::{Error, Model, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

mod feature_report;
pub use feature_report::HeadReport;

fn default_objective() -> String {
    "ce".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The preset a run from scratch starts from; `None` for a loaded model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Optimiser steps in the whole run (the cosine schedule ends here).
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    pub seq_len: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    pub adamw: AdamWConfig,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation tokens (whole windows of `seq_len`).
    pub eval_tokens: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub ckpt_every: u64,
    pub seed: u64,
    /// Matrix products in bf16 (mixed precision) instead of f32.
    #[serde(default)]
    pub bf16: bool,
    /// How exactly the f32 products multiply on AMX tiles (see [`Precision`]); CPUs without
    /// AMX always multiply in f32.
    #[serde(default)]
    pub precision: Precision,
    /// The objective, as [`Objective::parse`] reads it.
    #[serde(default = "default_objective")]
    pub objective: String,
    #[serde(default)]
    pub groups: Groups,
    /// Windows the feature heads are fitted on (taken from the training data).
    #[serde(default)]
    pub head_windows: usize,
    /// Learn N:M masks (MaskLLM): mask logits train beside (or instead of) the parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maskllm: Option<MaskLlmConfig>,
}

impl TrainConfig {
    /// The settings as TOML under `[train]`: what a trained model's provenance records.
    pub fn to_toml(&self) -> Result<String> {
        #[derive(Serialize)]
        struct Doc<'a> {
            train: &'a TrainConfig,
        }
        toml::to_string(&Doc { train: self })
            .map_err(|e| Error::Invalid(format!("training settings to TOML: {e}")))
    }

    /// Reads what [`Self::to_toml`] wrote.
    pub fn from_toml(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Doc {
            train: TrainConfig,
        }
        toml::from_str::<Doc>(text)
            .map(|d| d.train)
            .map_err(|e| Error::Invalid(format!("training settings: {e}")))
    }

    /// One line: the objective, steps and batch shape, and what trained.
    pub fn describe(&self) -> String {
        let only = if self.groups.adapters_only {
            ", adapters only"
        } else {
            ""
        };
        let masks = match &self.maskllm {
            Some(m) => format!(", MaskLLM {} masks", m.pattern),
            None => String::new(),
        };
        format!(
            "train {}, {} steps of {} × {} (accum {}), lr {}{only}{masks}",
            self.objective, self.steps, self.batch, self.seq_len, self.accum, self.lr
        )
    }

    /// Optimiser steps that train on `tokens` tokens (at least one).
    pub fn steps_for(tokens: u64, batch: usize, seq_len: usize, accum: usize) -> u64 {
        (tokens / (batch * seq_len * accum).max(1) as u64).max(1)
    }
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub val_ppl: Option<f64>,
    /// Each objective term's value (unweighted), by its label.
    #[serde(default)]
    pub parts: Vec<(String, f64)>,
}

/// Tokenised training and validation text.
#[derive(Default)]
pub struct TokenData {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

/// Where the teacher's outputs come from.
pub enum Teacher {
    None,
    /// Run on each batch, without gradients (logits and features).
    Live(Box<Model>),
    /// Read from a cache: its windows are the training data, its top-k logits the targets.
    Cached(Box<TeacherCache>),
}

/// The model a run starts from.
pub enum Start {
    /// `config.preset` built for this vocabulary from `config.seed`.
    Preset {
        vocab: usize,
    },
    Model(Box<Model>),
}

pub struct Trainer {
    pub config: TrainConfig,
    pub model: Model,
    objective: Objective,
    params: Trainable,
    /// 1 where a trained matrix may change, 0 at its fixed zeros.
    masks: HashMap<String, Vec<f32>>,
    moments: HashMap<String, Moments>,
    teacher: Teacher,
    heads: Vec<FittedHead>,
    /// The starting model's fingerprint (a resumed run must start from the same model).
    start: Fingerprint,
    pub step: u64,
    pub log: Vec<LogRow>,
    tokens_seen: u64,
    /// The step of the newest checkpoint on disk.
    saved: Option<u64>,
    masked: Option<Masked>,
    /// The ranks this run is data-parallel over (one process alone by default).
    comm: Arc<dyn Collective>,
    /// Gradient elements each rank sent in the last step's reduction.
    reduced: usize,
}

/// What a MaskLLM run masks: the candidates and the linears `(name, rows, cols)`.
struct Masked {
    candidates: Arc<Candidates>,
    linears: Vec<(String, usize, usize)>,
}

/// A feature head with its normaliser as tensors: `z = (x − μ) Aᵀ`.
struct FittedHead {
    head: Head,
    mean: Tensor,
    forward_t: Tensor,
}

impl FittedHead {
    /// Raw teacher features `[rows, C]` in the normaliser's space, `(x − μ) Aᵀ`.
    fn normalise(&self, raw: Tensor) -> candle_core::Result<Tensor> {
        raw.broadcast_sub(&self.mean)?.matmul(&self.forward_t)
    }
}

impl Trainer {
    /// Head `k`'s prediction from student features `[rows, hidden]`: `x Wᵀ + b`.
    fn project(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        let (wn, bn) = head_names(k);
        Ok(x.matmul(&self.params.tensor(&wn)?.t()?)?
            .broadcast_add(self.params.tensor(&bn)?)?)
    }
}

/// The parameter names of head `k`'s projection.
fn head_names(k: usize) -> (String, String) {
    (
        format!("distill.head.{k}.weight"),
        format!("distill.head.{k}.bias"),
    )
}

/// Whether AdamW decays a parameter: weight matrices yes; norms, biases, A, D, conv taps and
/// meta tokens no.
fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.ends_with("A_log.0") && !name.contains("conv1d") && name != "memory"
}

/// The label of a term in logs.
fn label(t: &Term) -> &'static str {
    match t {
        Term::CrossEntropy => "ce",
        Term::Logits {
            divergence: Divergence::ForwardKl,
            ..
        } => "kd",
        Term::Logits {
            divergence: Divergence::ReverseKl,
            ..
        } => "rkl",
        Term::Logits {
            divergence: Divergence::Jsd { .. },
            ..
        } => "jsd",
        Term::Features(_) => "feat",
    }
}

/// What the teacher says about one micro-batch.
struct TeacherOut {
    dense: Option<Arc<Vec<f32>>>,
    sparse: Option<Arc<crate::distill::topk::TopK>>,
    /// Per head, normalised features `[rows, teacher hidden]`.
    features: Vec<Tensor>,
}

impl Trainer {
    /// A new run of `config` from `start`, distilling from `teacher` when the objective asks;
    /// feature heads are fitted on the first windows of `data.train` (or of the cache).
    pub fn new(
        config: TrainConfig,
        start: Start,
        teacher: Teacher,
        data: &TokenData,
    ) -> Result<Self> {
        if config.batch == 0 || config.accum == 0 || config.seq_len < 2 || config.steps == 0 {
            return Err(Error::Invalid(
                "training needs batch, accumulation, steps ≥ 1 and a sequence length ≥ 2".into(),
            ));
        }
        let objective = Objective::parse(&config.objective)?;
        let mut model = match start {
            // Room for 8k positions, so that trained models can be measured at long context.
            Start::Preset { vocab } => config
                .preset
                .ok_or_else(|| Error::Invalid("a run from scratch needs a preset".into()))?
                .build(vocab, config.seq_len.max(8192), config.seed)?,
            Start::Model(m) => *m,
        };
        if config.seq_len > model.config.context_length {
            return Err(Error::Invalid(format!(
                "sequence length {} exceeds the model's context length {}",
                config.seq_len, model.config.context_length
            )));
        }
        check_teacher(&objective, &teacher, &model, &config)?;
        let start_print = model.fingerprint();
        let groups = config.groups.clone();
        let mut params = Trainable::new(&mut model, &|name| groups.trains(name))?;
        params.weight_sinks = true;
        let masked = match &config.maskllm {
            Some(mc) => Some(add_mask_logits(&mut params, &model, mc, config.seed)?),
            None => None,
        };
        groups.check(params.names.len())?;
        if config.bf16 {
            params.matmul_dtype = candle_core::DType::BF16;
        }
        params.precision = config.precision;
        let mut masks = HashMap::new();
        for name in &params.names {
            let v = &params.vars[name];
            let values = v.flatten_all()?.to_vec1::<f32>()?;
            if let Some(m) = groups.mask(name, v.dims(), &values) {
                masks.insert(name.clone(), m);
            }
        }
        let mut t = Trainer {
            config,
            model,
            objective,
            params,
            masks,
            moments: HashMap::new(),
            teacher,
            heads: Vec::new(),
            start: start_print,
            step: 0,
            log: Vec::new(),
            tokens_seen: 0,
            saved: None,
            masked,
            comm: dist::single(),
            reduced: 0,
        };
        if let Some(spec) = t.objective.features()?.cloned() {
            t.fit_heads(&spec, data)?;
        }
        Ok(t)
    }

    /// Fits the feature heads and adds their projections to the trained parameters.
    fn fit_heads(&mut self, spec: &FeatureSpec, data: &TokenData) -> Result<()> {
        let Teacher::Live(teacher) = &self.teacher else {
            return Err(Error::Invalid(
                "feature distillation needs a live teacher (a cache holds only logits)".into(),
            ));
        };
        let n = self.config.head_windows.max(1);
        let windows: Vec<&[u32]> = data
            .train
            .chunks_exact(self.config.seq_len)
            .take(n)
            .collect();
        let fitted = heads::fit(teacher, &self.model, spec, &windows, &mut |_, _| {})?;
        for (k, head) in fitted.into_iter().enumerate() {
            let c = head.normalizer.channels;
            let hs = head.weight.len() / c;
            let (w, b) = head_names(k);
            self.params.add(&w, &head.weight, &[c, hs])?;
            self.params.add(&b, &head.bias, &[c])?;
            self.heads.push(FittedHead {
                mean: Tensor::from_slice(&head.normalizer.mean, c, &Device::Cpu)?,
                forward_t: Tensor::from_slice(&head.normalizer.forward, (c, c), &Device::Cpu)?
                    .t()?
                    .contiguous()?,
                head,
            });
        }
        Ok(())
    }

    /// The step of the newest checkpoint this trainer wrote or resumed from.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.saved
    }

    /// Makes this trainer one rank of `comm`, which every rank calls after building its trainer
    /// (new or resumed) from the same model, teacher, data and settings: checks that they are
    /// the same on every rank, then takes rank 0's state (a resumed run's trained tensors,
    /// optimiser moments, step and log), so that only rank 0 needs the checkpoint and a run
    /// resumes with any number of ranks. The run's batch is `accum` micro-batches over all
    /// ranks, so each rank needs at least one.
    pub fn join(&mut self, comm: Arc<dyn Collective>, data: &TokenData) -> Result<()> {
        fn json(v: &impl Serialize) -> Vec<u8> {
            serde_json::to_vec(v).unwrap_or_default()
        }
        let tokens = |ids: &[u32]| {
            ids.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let teacher = match &self.teacher {
            Teacher::Live(m) => json(&m.fingerprint()),
            Teacher::Cached(c) => json(&c.meta),
            Teacher::None => Vec::new(),
        };
        dist::check_agreement(
            &*comm,
            &[
                (
                    "whittle version",
                    env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
                ),
                ("settings", json(&self.config)),
                ("starting model", json(&self.start)),
                ("teacher", teacher),
                ("training tokens", tokens(&data.train)),
                ("validation tokens", tokens(&data.valid)),
            ],
        )?;
        if comm.size() > self.config.accum {
            return Err(Error::Invalid(format!(
                "{} ranks share {} micro-batches a step: raise --accum to at least the number of \
                 ranks (it counts the micro-batches of all ranks together)",
                comm.size(),
                self.config.accum
            )));
        }
        self.take_state_of_rank0(&*comm)?;
        self.comm = comm;
        Ok(())
    }

    /// Rank 0's step, log, trained tensors and moments to every rank.
    fn take_state_of_rank0(&mut self, comm: &dyn Collective) -> Result<()> {
        let with_moments: Vec<&String> = self.moments.keys().collect();
        let mut head = serde_json::to_vec(&serde_json::json!({
            "step": self.step, "tokens": self.tokens_seen, "saved": self.saved,
            "log": self.log, "moments": with_moments,
        }))
        .map_err(|e| Error::Invalid(format!("training state: {e}")))?;
        dist::broadcast(comm, &mut head)?;
        let head: serde_json::Value = serde_json::from_slice(&head)
            .map_err(|e| Error::Invalid(format!("rank 0's training state: {e}")))?;
        let bad = |e: serde_json::Error| Error::Invalid(format!("rank 0's training state: {e}"));
        self.step = serde_json::from_value(head["step"].clone()).map_err(bad)?;
        self.tokens_seen = serde_json::from_value(head["tokens"].clone()).map_err(bad)?;
        self.saved = serde_json::from_value(head["saved"].clone()).map_err(bad)?;
        self.log = serde_json::from_value(head["log"].clone()).map_err(bad)?;
        let moment_names: Vec<String> =
            serde_json::from_value(head["moments"].clone()).map_err(bad)?;
        for name in &self.params.names {
            let var = &self.params.vars[name];
            let mut v = var.flatten_all()?.to_vec1::<f32>()?;
            dist::broadcast_f32(comm, &mut v)?;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
        for name in moment_names {
            let n = self.params.vars.get(&name).map_or(0, |v| v.elem_count());
            let mom = self.moments.entry(name).or_default();
            mom.m.resize(n, 0.0);
            mom.v.resize(n, 0.0);
            dist::broadcast_f32(comm, &mut mom.m)?;
            dist::broadcast_f32(comm, &mut mom.v)?;
        }
        Ok(self.params.write_back(&mut self.model)?)
    }

    /// Gradient elements this rank sent to the others in the last step (0 alone).
    pub fn reduced_per_step(&self) -> usize {
        self.reduced
    }

    /// This run's ranks.
    pub fn collective(&self) -> &dyn Collective {
        &*self.comm
    }

    /// Parameters being trained.
    pub fn n_params(&self) -> usize {
        self.params.len()
    }

    /// Index of the `r`-th sequence of micro-batch `micro` of step `step` among all sequences.
    fn sequence(&self, step: u64, micro: usize, r: usize) -> u64 {
        let c = &self.config;
        step * (c.accum * c.batch) as u64 + (micro * c.batch + r) as u64
    }

    /// Inputs and targets `[batch, seq_len]` of micro-batch `micro` of step `step`, as ids.
    fn batch(&self, data: &[u32], step: u64, micro: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let (b, t) = (self.config.batch, self.config.seq_len);
        let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for r in 0..b {
            let window = match &self.teacher {
                Teacher::Cached(c) => c.tokens(self.sequence(step, micro, r) as usize),
                _ => {
                    let span = data
                        .len()
                        .checked_sub(t + 1)
                        .filter(|s| *s > 0)
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "training text has {} tokens, fewer than one window of {}",
                                data.len(),
                                t + 1
                            ))
                        })?;
                    let key = self.config.seed ^ mix(step ^ mix((micro * b + r) as u64));
                    let at = (mix(key) % span as u64) as usize;
                    data[at..at + t + 1].to_vec()
                }
            };
            x.extend_from_slice(&window[..t]);
            y.extend_from_slice(&window[1..t + 1]);
        }
        Ok((x, y))
    }

    /// The teacher's outputs for the inputs `x` of micro-batch `micro` of step `step`.
    fn teacher_out(&self, x: &[u32], step: u64, micro: usize) -> Result<Option<TeacherOut>> {
        let t = self.config.seq_len;
        match &self.teacher {
            Teacher::None => Ok(None),
            Teacher::Cached(c) => {
                let mut top = c.empty_topk();
                for r in 0..self.config.batch {
                    c.extend_topk(self.sequence(step, micro, r) as usize, &mut top);
                }
                Ok(Some(TeacherOut {
                    dense: None,
                    sparse: Some(Arc::new(top)),
                    features: Vec::new(),
                }))
            }
            Teacher::Live(m) => {
                let layers: Vec<usize> = self.heads.iter().map(|h| h.head.teacher).collect();
                let mut tap = BlockTap::new(m, &layers);
                let mut logits = Vec::with_capacity(x.len() * m.config.vocab_size);
                let mut feats = vec![Vec::new(); layers.len()];
                for row in x.chunks_exact(t) {
                    logits.extend(m.forward(row, None, Logits::All, Some(&mut tap))?);
                    for (f, o) in feats.iter_mut().zip(&tap.out) {
                        f.extend_from_slice(o);
                    }
                }
                let features = feats
                    .into_iter()
                    .zip(&self.heads)
                    .map(|(f, h)| {
                        let c = h.head.normalizer.channels;
                        h.normalise(Tensor::from_vec(f, (x.len(), c), &Device::Cpu)?)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Some(TeacherOut {
                    dense: Some(Arc::new(logits)),
                    sparse: None,
                    features,
                }))
            }
        }
    }

    /// The objective's value on one micro-batch, and each term's value.
    fn loss(&self, x: &[u32], y: &[u32], step: u64, micro: usize) -> Result<(Tensor, Vec<f64>)> {
        let (b, t) = (self.config.batch, self.config.seq_len);
        let teacher = self.teacher_out(x, step, micro)?;
        let taps: Vec<usize> = self.heads.iter().map(|h| h.head.student).collect();
        let ids = Tensor::from_slice(x, (b, t), &Device::Cpu)?;
        let (logits, feats) = forward_with_features(&self.model, &self.params, &ids, &taps)?;
        let vocab = logits.dim(2)?;
        let rows = logits.reshape((b * t, vocab))?;
        let mut total: Option<Tensor> = None;
        let mut parts = Vec::new();
        for (w, term) in &self.objective.terms {
            let value = match term {
                Term::CrossEntropy => {
                    cross_entropy(&logits, &Tensor::from_slice(y, (b, t), &Device::Cpu)?)?
                }
                Term::Logits {
                    divergence,
                    temperature,
                } => {
                    let out = teacher.as_ref().expect("checked: a teacher");
                    match (&out.dense, &out.sparse) {
                        (Some(d), _) => mean_over_rows(
                            &rows,
                            LogitDistillation {
                                teacher: d.clone(),
                                divergence: *divergence,
                                temperature: *temperature,
                            },
                        )?,
                        (None, Some(s)) => mean_over_rows(
                            &rows,
                            SparseDistillation {
                                teacher: s.clone(),
                                temperature: *temperature,
                            },
                        )?,
                        (None, None) => unreachable!("a teacher gives logits"),
                    }
                }
                Term::Features(spec) => {
                    let out = teacher.as_ref().expect("checked: a live teacher");
                    let mut sum: Option<Tensor> = None;
                    for (k, (f, target)) in feats.iter().zip(&out.features).enumerate() {
                        let proj = self.project(k, &f.reshape((b * t, f.dim(2)?))?)?;
                        let l = spec.loss.loss(&proj, target)?;
                        sum = Some(match sum {
                            None => l,
                            Some(s) => (s + l)?,
                        });
                    }
                    (sum.expect("at least one layer") / feats.len() as f64)?
                }
            };
            parts.push(value.to_scalar::<f32>()? as f64);
            let weighted = (value * *w as f64)?;
            total = Some(match total {
                None => weighted,
                Some(s) => (s + weighted)?,
            });
        }
        Ok((total.expect("an objective has a term"), parts))
    }

    /// One optimiser step; returns its log row.
    pub fn train_step(&mut self, data: &TokenData) -> Result<LogRow> {
        let start = Instant::now();
        let accum = self.config.accum;
        let mut loss_sum = 0f64;
        let mut parts = vec![0f64; self.objective.terms.len()];
        let sum_sq = Arc::new(AtomicU64::new(0f64.to_bits()));
        // Data-parallel: each rank runs its share of the step's micro-batches (the same windows
        // as one process running them all), then the sums are reduced over the ranks.
        let (rank, ranks) = (self.comm.rank(), self.comm.size());
        for micro in dist::shard(accum, rank, ranks) {
            let (x, y) = self.batch(&data.train, self.step, micro)?;
            if let (Some(m), Some(mc)) = (&self.masked, &self.config.maskllm) {
                self.params.sampling = Some(MaskSampling {
                    candidates: m.candidates.clone(),
                    schedule: mc.at(self.step, self.config.steps),
                    seed: mix(self.config.seed ^ mix(self.step ^ mix(micro as u64 + 1))),
                    sum_sq: sum_sq.clone(),
                });
            }
            let (loss, p) = self.loss(&x, &y, self.step, micro)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            parts
                .iter_mut()
                .zip(&p)
                .for_each(|(a, b)| *a += b / accum as f64);
            // The linears' weight gradients went to their sinks during the backward pass; the
            // rest leave candle's store one by one after the graph (every activation) is freed.
            let mut g = loss.backward()?;
            drop(loss);
            for name in &self.params.names {
                let var = &self.params.vars[name];
                if let Some(gt) = g.remove(var.as_tensor()) {
                    let gv = gt.flatten_all()?.to_vec1::<f32>()?;
                    self.params.sinks[name].add_values(gv);
                }
            }
        }
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        for name in &self.params.names {
            let Some(mut gv) = self.params.sinks[name].take() else {
                continue;
            };
            if let Some(m) = self.masks.get(name) {
                gv.iter_mut().zip(m).for_each(|(g, m)| *g *= m);
            }
            grads.insert(name.clone(), gv);
        }
        let mut scalars = vec![loss_sum, f64::from_bits(sum_sq.load(Ordering::Relaxed))];
        scalars.extend(&parts);
        self.comm.sum_f64(&mut scalars)?;
        parts.copy_from_slice(&scalars[2..]);
        // In the model's order (a map's order differs between processes).
        let mut ordered: Vec<(String, Vec<f32>)> = (self.params.names.iter())
            .filter_map(|n| grads.remove_entry(n))
            .collect();
        let mut refs: Vec<&mut Vec<f32>> = ordered.iter_mut().map(|(_, g)| g).collect();
        self.reduced = dist::all_reduce_buckets(&*self.comm, &mut refs)?;
        grads.extend(ordered);
        // The objective's value; MaskLLM's regulariser (its gradient came from the mask op) is
        // logged beside it as `mask_l2`, `Σ ‖W ⊙ M‖²`, which would swamp the loss curve.
        let loss = scalars[0] / accum as f64;
        let mask_l2 = scalars[1] / accum as f64;
        if !loss.is_finite() {
            let kept = match self.saved {
                Some(s) => format!("the checkpoint of step {s} is kept"),
                None => "no checkpoint was written yet".into(),
            };
            return Err(Error::Invalid(format!(
                "loss became {loss} at step {} (no update made; {kept}): lower the learning rate",
                self.step + 1
            )));
        }
        // Chunk sums in parallel, added in a fixed order (the model's, then the chunks'): the
        // clipping scale, hence every later step, is the same in every run and on every rank.
        let squares: Vec<f64> = crate::threads::install(|| {
            (self.params.names.iter().filter_map(|n| grads.get(n)))
                .flat_map(|g| g.chunks(1 << 16))
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|c| c.iter().map(|v| (*v as f64).powi(2)).sum::<f64>())
                .collect()
        });
        let norm = squares.iter().sum::<f64>().sqrt() / accum as f64;
        let clip = if self.config.clip > 0.0 && norm > self.config.clip {
            self.config.clip / norm
        } else {
            1.0
        };
        let scale = (clip / accum as f64) as f32;
        let c = &self.config;
        let lr = learning_rate(self.step, c.warmup, c.steps, c.lr, c.min_lr);
        for name in &self.params.names {
            let (Some(g), var) = (grads.get(name), &self.params.vars[name]) else {
                continue;
            };
            let mom = self.moments.entry(name.clone()).or_default();
            let decay = decays(name, var.dims());
            let lr = lr * c.groups.scale(name);
            update_in_place(var.as_tensor(), |theta| {
                adamw_step(&c.adamw, self.step + 1, lr, decay, theta, (g, scale), mom);
                // Decay acts on zeros too, but only as a product: masked values stay exactly
                // zero.
                if let Some(m) = self.masks.get(name) {
                    theta.iter_mut().zip(m).for_each(|(t, m)| *t *= m);
                }
            })?;
        }
        self.step += 1;
        let tokens = (c.batch * c.seq_len * accum) as u64;
        self.tokens_seen += tokens;
        let row = LogRow {
            step: self.step,
            lr,
            loss,
            grad_norm: norm,
            tokens: self.tokens_seen,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
            val_ppl: None,
            parts: self
                .objective
                .terms
                .iter()
                .zip(parts)
                .map(|((_, t), v)| (label(t).to_string(), v))
                .chain(
                    self.masked
                        .as_ref()
                        .map(|_| ("mask_l2".to_string(), mask_l2)),
                )
                .collect(),
        };
        self.log.push(row.clone());
        Ok(row)
    }

    /// Validation perplexity of the current weights (the inference forward pass over
    /// `eval_tokens` of the validation text).
    pub fn validate(&mut self, data: &TokenData) -> Result<f64> {
        self.params.write_back(&mut self.model)?;
        // Learned masks are measured as they would be written: the argmax candidates applied.
        let masked = match self.learned_mask()? {
            Some(mask) => {
                let mut m = self.model.clone();
                mask.apply(&mut m)?;
                Some(m)
            }
            None => None,
        };
        // Each rank scores its share of the windows.
        let seq = self.config.seq_len;
        let wins = crate::data::text::windows(&data.valid, seq, Some(self.config.eval_tokens))?;
        let (rank, ranks) = (self.comm.rank(), self.comm.size());
        let mine: Vec<&[u32]> = dist::shard(wins.len(), rank, ranks)
            .map(|i| wins[i])
            .collect();
        let model = masked.as_ref().unwrap_or(&self.model);
        let mut nll = [crate::eval::perplexity::windows_nll(
            model,
            &mine,
            &mut |_, _| {},
        )?];
        self.comm.sum_f64(&mut nll)?;
        let ppl = (nll[0] / (wins.len() * (seq - 1)) as f64).exp();
        if let Some(last) = self.log.last_mut() {
            last.val_ppl = Some(ppl);
        }
        Ok(ppl)
    }

    /// Runs until `config.steps` (or `stop_at`, or the first step boundary after `deadline`,
    /// whichever comes first), validating and checkpointing as configured; the last step run is
    /// always checkpointed when `dir` is given. `report` sees every row.
    pub fn run(
        &mut self,
        data: &TokenData,
        dir: Option<&Path>,
        stop_at: Option<u64>,
        deadline: Option<Instant>,
        report: &mut dyn FnMut(&LogRow),
    ) -> Result<()> {
        let end = stop_at.unwrap_or(self.config.steps).min(self.config.steps);
        while self.step < end {
            // Every rank stops at the same step: the first whose clock passed the deadline
            // decides for all.
            let mut late = [deadline.is_some_and(|d| Instant::now() >= d) as u8 as f64];
            self.comm.sum_f64(&mut late)?;
            if late[0] > 0.0 {
                if let Some(dir) = dir {
                    self.save(dir)?;
                }
                break;
            }
            self.train_step(data)?;
            let (s, c) = (self.step, self.config.clone());
            let last = s == c.steps;
            if last || (c.eval_every > 0 && s % c.eval_every == 0) {
                self.validate(data)?;
            }
            if let Some(dir) = dir {
                if last || s == end || (c.ckpt_every > 0 && s % c.ckpt_every == 0) {
                    self.save(dir)?;
                }
            }
            report(self.log.last().expect("a row per step"));
        }
        self.params.write_back(&mut self.model)?;
        Ok(())
    }

    /// The masks learned so far (each group's highest logit), when the run learns masks.
    pub fn learned_mask(&self) -> Result<Option<LearnedMask>> {
        let Some(Masked {
            candidates: c,
            linears,
        }) = &self.masked
        else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(linears.len());
        for (name, rows, cols) in linears {
            let logits = self.params.tensor(&maskllm::logits_name(name))?;
            let v = logits.flatten_all()?.to_vec1::<f32>()?;
            let bad = v.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                return Err(Error::NonFinite {
                    name: maskllm::logits_name(name),
                    count: bad,
                });
            }
            out.push((name.clone(), *rows, *cols, c.argmax(&v)));
        }
        Ok(Some(LearnedMask {
            n: c.n,
            m: c.m,
            linears: out,
            arch: self.model.config.arch.name().into(),
        }))
    }

    /// Seeds the mask logits with a prior mask (a fresh run only: a resumed one restores its
    /// logits), `strength` standard deviations for the prior's own candidate.
    pub fn set_prior(&mut self, prior: &LearnedMask, strength: f64) -> Result<()> {
        let Some(Masked {
            candidates: c,
            linears,
        }) = &self.masked
        else {
            return Err(Error::Invalid("this run learns no masks".into()));
        };
        if (prior.n, prior.m) != (c.n, c.m) {
            return Err(Error::Invalid(format!(
                "the prior is a {}:{} mask, the run learns {}:{}",
                prior.n, prior.m, c.n, c.m
            )));
        }
        prior.check(&self.model)?;
        for (i, (name, rows, cols)) in linears.iter().enumerate() {
            let idx = prior
                .linears
                .iter()
                .find(|l| &l.0 == name)
                .map(|l| l.3.as_slice())
                .ok_or_else(|| Error::Invalid(format!("the prior has no mask for {name}")))?;
            let groups = rows * cols / c.m;
            let v = maskllm::init_logits(
                c,
                groups,
                logit_seed(self.config.seed, i),
                Some(idx),
                strength,
            )?;
            let var = &self.params.vars[&maskllm::logits_name(name)];
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Writes the feature heads (normalisers and trained projections) to `path`; nothing when
    /// the objective has no feature term.
    pub fn save_heads(&self, path: &Path) -> Result<bool> {
        if self.heads.is_empty() {
            return Ok(false);
        }
        let proj = (0..self.heads.len())
            .map(|k| {
                let (w, b) = head_names(k);
                Ok((
                    self.params.tensor(&w)?.flatten_all()?.to_vec1::<f32>()?,
                    self.params.tensor(&b)?.to_vec1::<f32>()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let heads: Vec<Head> = self
            .heads
            .iter()
            .map(|h| Head {
                student: h.head.student,
                teacher: h.head.teacher,
                normalizer: h.head.normalizer.clone(),
                weight: Vec::new(),
                bias: Vec::new(),
            })
            .collect();
        heads::save(path, &heads, &proj)?;
        Ok(true)
    }

    /// Writes the checkpoint into `dir` (`params.safetensors` with the trained tensors and AdamW
    /// moments, `state.json` with the configuration, step, log and the starting model's
    /// fingerprint), atomically: an interrupted write leaves the previous checkpoint.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        // Rank 0 writes; the others hold the same state.
        if self.comm.rank() != 0 {
            self.saved = Some(self.step);
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let target = dir.join("checkpoint");
        crate::io::atomic::write_dir(&target, crate::io::atomic::Existing::Replace, |tmp| {
            self.write_checkpoint(tmp)
        })?;
        self.saved = Some(self.step);
        Ok(())
    }

    fn write_checkpoint(&self, tmp: &Path) -> Result<()> {
        let st = tmp.join(CHECKPOINT_TENSORS);
        super::params_file::save(&st, &self.params.names, &self.params.vars, &self.moments)?;
        let state = serde_json::json!({
            "config": self.config, "step": self.step, "tokens": self.tokens_seen, "log": self.log,
            "start": self.start,
        });
        let sj = tmp.join("state.json");
        std::fs::write(
            &sj,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&sj, e))
    }

    /// Drops the tensors of the checkpoint in `dir` (trained values and AdamW moments: 1.6 GB
    /// for SmolLM2) once the run has finished and its results are written: they only serve to
    /// resume, and a finished run has nothing left to. The state (configuration, log) stays,
    /// for `whittle plot` and [`Trainer::finished`]. Returns the bytes freed.
    pub fn retire_checkpoint(dir: &Path) -> Result<u64> {
        let st = dir.join("checkpoint").join(CHECKPOINT_TENSORS);
        let Ok(meta) = std::fs::metadata(&st) else {
            return Ok(0);
        };
        std::fs::remove_file(&st).map_err(|e| Error::io(&st, e))?;
        Ok(meta.len())
    }

    /// Whether `dir` holds a run that reached its last step and retired its checkpoint
    /// ([`Trainer::retire_checkpoint`]).
    pub fn finished(dir: &Path) -> Result<bool> {
        if !dir.join("checkpoint").join("state.json").is_file() {
            return Ok(false);
        }
        let (config, state) = read_state(dir)?;
        Ok(state["step"].as_u64() == Some(config.steps)
            && !dir.join("checkpoint").join(CHECKPOINT_TENSORS).exists())
    }

    /// The configuration of the run checkpointed in `dir`.
    pub fn saved_config(dir: &Path) -> Result<TrainConfig> {
        let (config, _) = read_state(dir)?;
        Ok(config)
    }

    /// Continues the run saved in `dir/checkpoint`, from the same `start` and `teacher` as the
    /// run that wrote it.
    pub fn resume(dir: &Path, start: Start, teacher: Teacher, data: &TokenData) -> Result<Self> {
        let (config, state) = read_state(dir)?;
        let ck = dir.join("checkpoint");
        let sj = ck.join("state.json");
        if let (Start::Model(m), Some(fp)) = (&start, state.get("start")) {
            let fp: Fingerprint =
                serde_json::from_value(fp.clone()).map_err(|e| Error::format(&sj, e))?;
            fp.check(m, &format!("the checkpoint in {}", dir.display()))?;
        }
        let mut t = Trainer::new(config, start, teacher, data)?;
        t.step = state["step"].as_u64().unwrap_or(0);
        t.tokens_seen = state["tokens"].as_u64().unwrap_or(0);
        t.saved = Some(t.step);
        t.log = serde_json::from_value(state["log"].clone()).map_err(|e| Error::format(&sj, e))?;
        let st = ck.join(CHECKPOINT_TENSORS);
        super::params_file::load(&st, &t.params.names, &t.params.vars, &mut t.moments)?;
        t.params.write_back(&mut t.model)?;
        Ok(t)
    }
}

/// The checkpoint's file of trained tensors and AdamW moments (beside `state.json`).
const CHECKPOINT_TENSORS: &str = "params.safetensors";

/// The seed of the initial logits of the `i`-th masked linear.
fn logit_seed(seed: u64, i: usize) -> u64 {
    mix(seed ^ mix(0x6d61_736b ^ i as u64))
}

/// Adds N(0, 0.01) mask logits for every linear `config` masks to the trained parameters.
fn add_mask_logits(
    params: &mut Trainable,
    model: &Model,
    config: &MaskLlmConfig,
    seed: u64,
) -> Result<Masked> {
    config.check()?;
    let c = config.candidates()?;
    let linears = maskllm::masked_linears(model, config)?;
    for (i, (name, rows, cols)) in linears.iter().enumerate() {
        let v = maskllm::init_logits(&c, rows * cols / c.m, logit_seed(seed, i), None, 0.0)?;
        params.add(
            &maskllm::logits_name(name),
            &v,
            &[*rows, cols / c.m, c.len()],
        )?;
    }
    Ok(Masked {
        candidates: Arc::new(c),
        linears,
    })
}

/// The configuration and state of the checkpoint in `dir`.
fn read_state(dir: &Path) -> Result<(TrainConfig, serde_json::Value)> {
    let sj = dir.join("checkpoint").join("state.json");
    let text = std::fs::read_to_string(&sj).map_err(|e| Error::io(&sj, e))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&sj, e))?;
    let config: TrainConfig =
        serde_json::from_value(state["config"].clone()).map_err(|e| Error::format(&sj, e))?;
    Ok((config, state))
}

/// Fails unless `teacher` can give what `objective` asks, for this student.
fn check_teacher(
    objective: &Objective,
    teacher: &Teacher,
    student: &Model,
    config: &TrainConfig,
) -> Result<()> {
    match teacher {
        Teacher::None if objective.needs_teacher() => Err(Error::Invalid(format!(
            "objective '{}' needs a teacher",
            config.objective
        ))),
        Teacher::Live(t) if t.config.vocab_size != student.config.vocab_size => {
            Err(Error::Invalid(format!(
                "teacher and student vocabularies differ ({} against {} tokens); distillation \
                 needs the same tokenizer",
                t.config.vocab_size, student.config.vocab_size
            )))
        }
        Teacher::Cached(c) => {
            if c.meta.seq_len != config.seq_len {
                return Err(Error::Invalid(format!(
                    "the teacher cache in {} has windows of {} tokens; train with --seq-len {}",
                    c.dir.display(),
                    c.meta.seq_len,
                    c.meta.seq_len
                )));
            }
            if c.meta.vocab != student.config.vocab_size {
                return Err(Error::Invalid(format!(
                    "the teacher cache in {} is over {} tokens, the student has {}",
                    c.dir.display(),
                    c.meta.vocab,
                    student.config.vocab_size
                )));
            }
            let other = objective.terms.iter().find(|(_, t)| {
                matches!(
                    t,
                    Term::Logits {
                        divergence: Divergence::ReverseKl | Divergence::Jsd { .. },
                        ..
                    }
                )
            });
            if other.is_some() {
                return Err(Error::Invalid(
                    "a teacher cache keeps top-k logits, which serve forward KL (kd) only; \
                     use a live teacher for rkl or jsd"
                        .into(),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;
    use crate::train::presets::Size;

    /// A tiny Llama's run (4 steps of two accumulated micro-batches of 48 rows: the tile path
    /// where the CPU has AMX) on a token stream: its losses and final weights.
    fn tiny_run(precision: Precision, sinks: bool) -> (Vec<f64>, Vec<f32>) {
        let stream: Vec<u32> = (0..3000u32).map(|i| (i * 7 + i / 5) % 40).collect();
        let data = TokenData {
            train: stream[..2600].to_vec(),
            valid: stream[2600..].to_vec(),
        };
        let config = TrainConfig {
            preset: Some(Preset {
                arch: Arch::Llama,
                size: Size::Tiny,
                meta_tokens: false,
                kv_sharing: false,
            }),
            steps: 4,
            batch: 2,
            seq_len: 24,
            accum: 2,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 1,
            clip: 1.0,
            adamw: AdamWConfig::default(),
            eval_every: 0,
            eval_tokens: 48,
            ckpt_every: 0,
            seed: 3,
            bf16: false,
            precision,
            objective: "ce".into(),
            groups: Default::default(),
            head_windows: 0,
            maskllm: None,
        };
        let start = Start::Preset { vocab: 40 };
        let mut t = Trainer::new(config, start, Teacher::None, &data).unwrap();
        t.params.weight_sinks = sinks;
        let losses: Vec<f64> = (0..4).map(|_| t.train_step(&data).unwrap().loss).collect();
        t.params.write_back(&mut t.model).unwrap();
        let mut weights = Vec::new();
        t.model
            .visit_parameters(&mut |_, _, p| weights.extend(p.read().iter().copied()));
        (losses, weights)
    }

    /// The weight gradients summed in the linears' sinks train exactly as the same gradients
    /// taken from candle's store did: the same losses and weights after a few steps of two
    /// accumulated micro-batches (sums in another order: equal to f32 rounding).
    #[test]
    fn weight_sinks_train_like_candles_gradient_store() {
        let (la, _) = same_run(
            tiny_run(Precision::F32, true),
            tiny_run(Precision::F32, false),
            (1e-5, 1e-5),
        );
        assert_ne!(la[0], la[3], "the run trained");
    }

    /// Asserts that two [`tiny_run`]s agree: losses within `loss_rel` of each other, weights
    /// within `weight_abs`; their losses.
    fn same_run(
        (la, wa): (Vec<f64>, Vec<f32>),
        (lb, wb): (Vec<f64>, Vec<f32>),
        (loss_rel, weight_abs): (f64, f32),
    ) -> (Vec<f64>, Vec<f64>) {
        for (a, b) in la.iter().zip(&lb) {
            assert!(
                (a - b).abs() < loss_rel * b.abs(),
                "losses {la:?} against {lb:?}"
            );
        }
        let worst = wa
            .iter()
            .zip(&wb)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < weight_abs, "weights differ by {worst}");
        (la, lb)
    }

    /// bf16x3 products (forward and both gradients on AMX tiles) train like f32 ones: losses
    /// within 1e-4 and weights within 1e-3 of an f32 run's after four steps (AdamW's first
    /// steps move each weight by about the learning rate whatever the gradient's size, so
    /// the weights are the sensitive check); without AMX both runs are the same.
    #[test]
    fn bf16x3_products_train_like_f32_ones() {
        let (la, lb) = same_run(
            tiny_run(Precision::Bf16x3, true),
            tiny_run(Precision::F32, true),
            (1e-4, 1e-3),
        );
        assert_eq!(la != lb, crate::kernels::amx::available(), "{la:?}, {lb:?}");
    }
}
