//! The training loop: random windows of a token stream, gradient accumulation, global-norm
//! clipping, AdamW under a warmup + cosine schedule, periodic validation perplexity and
//! checkpoints that resume exactly.
//!
//! Exact resumption follows from determinism: the model is rebuilt from its preset and seed, then
//! overwritten with the checkpoint's parameters and AdamW moments; the windows of step `s` are a
//! pure function of `(seed, s)`, so nothing else needs saving.

use super::graph::{cross_entropy, forward, Trainable};
use super::optim::{adamw_step, learning_rate, AdamWConfig, Moments};
use super::presets::Preset;
use crate::{Error, Model, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub preset: Preset,
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
}

/// Tokenised training and validation text.
pub struct TokenData {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

/// SplitMix64: the window offsets of a step as a pure function of `(seed, step, index)`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub struct Trainer {
    pub config: TrainConfig,
    pub model: Model,
    params: Trainable,
    moments: HashMap<String, Moments>,
    pub step: u64,
    pub log: Vec<LogRow>,
    tokens_seen: u64,
}

/// Whether AdamW decays a parameter: weight matrices yes; norms, biases, A, D, conv taps and
/// meta tokens no.
fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.ends_with("A_log.0") && !name.contains("conv1d") && name != "memory"
}

impl Trainer {
    /// A fresh run: the preset's model initialised from `config.seed`.
    pub fn new(config: TrainConfig, vocab: usize) -> Result<Self> {
        if config.batch == 0 || config.accum == 0 || config.seq_len < 2 || config.steps == 0 {
            return Err(Error::Invalid(
                "training needs batch, accumulation, steps ≥ 1 and a sequence length ≥ 2".into(),
            ));
        }
        // Room for 8k positions, so that trained models can be measured at long context.
        let mut model = config
            .preset
            .build(vocab, config.seq_len.max(8192), config.seed)?;
        let mut params = Trainable::new(&mut model)?;
        if config.bf16 {
            params.matmul_dtype = candle_core::DType::BF16;
        }
        Ok(Trainer {
            config,
            model,
            params,
            moments: HashMap::new(),
            step: 0,
            log: Vec::new(),
            tokens_seen: 0,
        })
    }

    /// Parameters being trained.
    pub fn n_params(&self) -> usize {
        self.params.len()
    }

    /// Inputs and targets `[batch, seq_len]` of micro-batch `micro` of step `step`.
    fn batch(&self, data: &[u32], step: u64, micro: usize) -> Result<(Tensor, Tensor)> {
        let (b, t) = (self.config.batch, self.config.seq_len);
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
        let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for r in 0..b {
            let key = self.config.seed ^ mix(step ^ mix((micro * b + r) as u64));
            let at = (mix(key) % span as u64) as usize;
            x.extend_from_slice(&data[at..at + t]);
            y.extend_from_slice(&data[at + 1..at + t + 1]);
        }
        Ok((
            Tensor::from_vec(x, (b, t), &Device::Cpu)?,
            Tensor::from_vec(y, (b, t), &Device::Cpu)?,
        ))
    }

    /// One optimiser step; returns its log row.
    pub fn train_step(&mut self, data: &TokenData) -> Result<LogRow> {
        let start = Instant::now();
        let accum = self.config.accum;
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        let mut loss_sum = 0f64;
        for micro in 0..accum {
            let (x, y) = self.batch(&data.train, self.step, micro)?;
            let loss = cross_entropy(&forward(&self.model, &self.params, &x)?, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            for name in &self.params.names {
                let var = &self.params.vars[name];
                let Some(gt) = g.get(var.as_tensor()) else {
                    continue;
                };
                let gv = gt.flatten_all()?.to_vec1::<f32>()?;
                match grads.get_mut(name) {
                    Some(acc) => acc.iter_mut().zip(&gv).for_each(|(a, b)| *a += b),
                    None => {
                        grads.insert(name.clone(), gv);
                    }
                }
            }
        }
        let loss = loss_sum / accum as f64;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "loss became {loss} at step {}: lower the learning rate",
                self.step
            )));
        }
        let norm = grads
            .values()
            .flat_map(|g| g.iter())
            .map(|v| (*v as f64 / accum as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let clip = if self.config.clip > 0.0 && norm > self.config.clip {
            self.config.clip / norm
        } else {
            1.0
        };
        let scale = (clip / accum as f64) as f32;
        let c = &self.config;
        let lr = learning_rate(self.step, c.warmup, c.steps, c.lr, c.min_lr);
        for name in &self.params.names {
            let (Some(g), var) = (grads.get_mut(name), &self.params.vars[name]) else {
                continue;
            };
            g.iter_mut().for_each(|v| *v *= scale);
            let mut theta = var.flatten_all()?.to_vec1::<f32>()?;
            let shape = var.dims().to_vec();
            let mom = self.moments.entry(name.clone()).or_default();
            adamw_step(
                &c.adamw,
                self.step + 1,
                lr,
                decays(name, &shape),
                &mut theta,
                g,
                mom,
            );
            var.set(&Tensor::from_vec(theta, shape, &Device::Cpu)?)?;
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
        };
        self.log.push(row.clone());
        Ok(row)
    }

    /// Validation perplexity of the current weights (the inference forward pass over
    /// `eval_tokens` of the validation text).
    pub fn validate(&mut self, data: &TokenData) -> Result<f64> {
        self.params.write_back(&mut self.model)?;
        let r = crate::eval::perplexity::perplexity(
            &self.model,
            &data.valid,
            self.config.seq_len,
            Some(self.config.eval_tokens),
            &mut |_, _| {},
        )?;
        if let Some(last) = self.log.last_mut() {
            last.val_ppl = Some(r.ppl);
        }
        Ok(r.ppl)
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
            if deadline.is_some_and(|d| Instant::now() >= d) {
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

    /// Writes the checkpoint into `dir` (`params.safetensors` with the parameters and AdamW
    /// moments, `state.json` with the configuration, step and log), atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let target = dir.join("checkpoint");
        crate::io::atomic::write_dir(&target, crate::io::atomic::Existing::Replace, |tmp| {
            self.write_checkpoint(tmp)
        })
    }

    fn write_checkpoint(&self, tmp: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for name in &self.params.names {
            let var = &self.params.vars[name];
            tensors.push((format!("param/{name}"), var.as_tensor().clone()));
            if let Some(m) = self.moments.get(name) {
                let shape = var.dims().to_vec();
                tensors.push((
                    format!("m/{name}"),
                    Tensor::from_slice(&m.m, shape.clone(), &Device::Cpu)?,
                ));
                tensors.push((
                    format!("v/{name}"),
                    Tensor::from_slice(&m.v, shape, &Device::Cpu)?,
                ));
            }
        }
        let st = tmp.join("params.safetensors");
        candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &st)?;
        let state = serde_json::json!({
            "config": self.config, "step": self.step, "tokens": self.tokens_seen, "log": self.log,
        });
        let sj = tmp.join("state.json");
        std::fs::write(
            &sj,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&sj, e))
    }

    /// Continues the run saved in `dir/checkpoint`.
    pub fn resume(dir: &Path, vocab: usize) -> Result<Self> {
        let ck = dir.join("checkpoint");
        let sj = ck.join("state.json");
        let text = std::fs::read_to_string(&sj).map_err(|e| Error::io(&sj, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&sj, e))?;
        let config: TrainConfig =
            serde_json::from_value(state["config"].clone()).map_err(|e| Error::format(&sj, e))?;
        let mut t = Trainer::new(config, vocab)?;
        t.step = state["step"].as_u64().unwrap_or(0);
        t.tokens_seen = state["tokens"].as_u64().unwrap_or(0);
        t.log = serde_json::from_value(state["log"].clone()).map_err(|e| Error::format(&sj, e))?;
        let st = ck.join("params.safetensors");
        let saved =
            candle_core::safetensors::load(&st, &Device::Cpu).map_err(|e| Error::format(&st, e))?;
        for name in &t.params.names {
            let var = &t.params.vars[name];
            let p = saved
                .get(&format!("param/{name}"))
                .ok_or_else(|| Error::format(&st, format!("parameter {name} missing")))?;
            if p.dims() != var.dims() {
                return Err(Error::format(
                    &st,
                    format!(
                        "parameter {name}: shape {:?}, model has {:?}",
                        p.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(p)?;
            if let (Some(m), Some(v)) = (
                saved.get(&format!("m/{name}")),
                saved.get(&format!("v/{name}")),
            ) {
                if m.dims() != var.dims() || v.dims() != var.dims() {
                    return Err(Error::format(
                        &st,
                        format!("optimizer moments of {name} do not match its shape"),
                    ));
                }
                t.moments.insert(
                    name.clone(),
                    Moments {
                        m: m.flatten_all()?
                            .to_dtype(candle_core::DType::F32)?
                            .to_vec1()?,
                        v: v.flatten_all()?
                            .to_dtype(candle_core::DType::F32)?
                            .to_vec1()?,
                    },
                );
            }
        }
        t.params.write_back(&mut t.model)?;
        Ok(t)
    }
}
