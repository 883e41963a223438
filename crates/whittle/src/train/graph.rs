//! The forward pass on candle tensors, for training: the same computation as
//! [`crate::model::Model::forward`] (attention, SSM and hybrid layers, meta tokens, sliding
//! windows, KV sharing), over a batch, with gradients. The model's structure is read from the
//! [`Model`]; its weights live in [`Trainable`]'s variables while training and are written back
//! afterwards.
//!
//! Attention, RMSNorm, RoPE and SwiGLU are whittle's fused ops with their own backward passes
//! ([`super::ops`]; candle's fused versions drop gradients silently), the selective scan is
//! [`super::scan_op::SelectiveScan`], and the rest are candle primitives.

use super::grad_sink::GradSink;
use super::mix;
use super::scan_op::SelectiveScan;
use crate::kernels::attention::Mask;
use crate::kernels::matmul::Precision;
use crate::model::names::{hymba, llama, TensorName};
use crate::model::{KvSource, Layer, Model};
use crate::sparsity::maskllm::op::MaskedWeight;
use crate::sparsity::maskllm::{logits_name, Candidates, Schedule};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The model's parameters as candle tensors, by [`Model::visit_parameters`] name: the trained
/// ones as variables, the frozen ones as plain tensors (no gradient is computed for them).
pub struct Trainable {
    /// Names of the trained parameters, in the model's order.
    pub names: Vec<String>,
    pub vars: HashMap<String, Var>,
    pub frozen: HashMap<String, Tensor>,
    /// Dtype of the matrix products (bf16: mixed precision, weights and everything else stay
    /// f32, as PyTorch's autocast does).
    pub matmul_dtype: DType,
    /// How exactly the f32 linears multiply on AMX tiles (forward and both gradients).
    pub precision: Precision,
    /// How linears with mask logits (MaskLLM) sample their soft masks in the next forward pass.
    pub sampling: Option<MaskSampling>,
    /// Each trained parameter's gradient sum (see [`GradSink`]); linears write their weights'
    /// gradients into them, bypassing candle's gradient store, when `weight_sinks` is set (the
    /// trainer sets it; tests of the graph read gradients from candle's store).
    pub sinks: HashMap<String, Arc<GradSink>>,
    pub weight_sinks: bool,
}

/// One forward pass's sampling of MaskLLM's soft masks: the schedule's values and a seed from
/// which each linear draws its own Gumbel noise.
#[derive(Clone)]
pub struct MaskSampling {
    pub candidates: Arc<Candidates>,
    pub schedule: Schedule,
    pub seed: u64,
    /// `Σ ‖W ⊙ M‖²` over the masked linears of the passes since it was reset.
    pub sum_sq: Arc<AtomicU64>,
}

impl Trainable {
    /// Copies every parameter of `model` into a tensor; `trains(name, values)` decides which
    /// become variables. The model is not changed (a frozen packed weight stays packed).
    pub fn new(model: &mut Model, trains: &dyn Fn(&str) -> bool) -> Result<Self> {
        let mut t = Trainable {
            names: Vec::new(),
            vars: HashMap::new(),
            frozen: HashMap::new(),
            matmul_dtype: DType::F32,
            precision: Precision::F32,
            sampling: None,
            sinks: HashMap::new(),
            weight_sinks: false,
        };
        let mut err = None;
        model.visit_parameters(&mut |name, shape, param| {
            let values = param.read();
            let made = if trains(name) {
                Var::from_slice(&values, shape, &Device::Cpu).map(|v| t.insert(name, v))
            } else {
                Tensor::from_slice(&values, shape, &Device::Cpu).map(|v| {
                    t.frozen.insert(name.to_string(), v);
                })
            };
            if let Err(e) = made {
                err = Some(e);
            }
        });
        err.map_or(Ok(t), Err)
    }

    /// Every parameter trained.
    pub fn all(model: &mut Model) -> Result<Self> {
        Self::new(model, &|_| true)
    }

    /// Copies the trained variables' values back into `model` (frozen ones are left alone).
    pub fn write_back(&self, model: &mut Model) -> Result<()> {
        let mut err = None;
        model.visit_parameters(&mut |name, _, param| {
            if let Some(v) = self.vars.get(name) {
                match v.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
                    Ok(vals) => *param.into_values() = vals,
                    Err(e) => err = Some(e),
                }
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Adds a trained tensor that is no model parameter (a distillation head's projection):
    /// optimised and checkpointed like the others, never written back.
    pub fn add(&mut self, name: &str, values: &[f32], shape: &[usize]) -> Result<()> {
        self.insert(name, Var::from_slice(values, shape, &Device::Cpu)?);
        Ok(())
    }

    fn insert(&mut self, name: &str, v: Var) {
        self.names.push(name.to_string());
        self.vars.insert(name.to_string(), v);
        self.sinks.insert(name.to_string(), Arc::default());
    }

    /// The tensor of parameter `name`, trained or frozen.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor())
            .or_else(|| self.frozen.get(name))
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    fn has(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.frozen.contains_key(name)
    }

    /// The weight of linear `name` as the forward pass uses it — `W ⊙ M` with a sampled soft
    /// mask when it has mask logits, else `W` — and where its gradient goes when it is a
    /// trained variable used as it is.
    fn weight(&self, name: &str) -> Result<(Tensor, Option<Arc<GradSink>>)> {
        let w = self.tensor(name)?;
        let (Some(s), Some(logits)) = (&self.sampling, self.vars.get(&logits_name(name))) else {
            let sink = (self.weight_sinks && self.matmul_dtype == DType::F32)
                .then(|| self.sinks.get(name).cloned())
                .flatten();
            return Ok((w.clone(), sink));
        };
        let seed = name.bytes().fold(s.seed, |h, b| mix(h ^ b as u64));
        let masked = w.apply_op2(
            logits.as_tensor(),
            MaskedWeight {
                candidates: s.candidates.clone(),
                tau: s.schedule.tau,
                kappa: s.schedule.kappa,
                seed,
                reg: s.schedule.reg,
                sum_sq: s.sum_sq.clone(),
            },
        )?;
        Ok((masked, None))
    }

    /// `x · Wᵀ (+ (x · Aᵀ) · Bᵀ)` for the linear `name` and its adapter when it has one.
    fn linear(&self, x: &Tensor, name: &str, dt: DType) -> Result<Tensor> {
        let op = |x: &Tensor, (w, sink)| linear(x, w, (dt, self.precision), sink);
        let y = op(x, self.weight(name)?)?;
        let a = format!("{name}.adapter.a");
        if !self.has(&a) {
            return Ok(y);
        }
        let b = format!("{name}.adapter.b");
        let low = op(x, self.weight(&a)?)?;
        y + op(&low, self.weight(&b)?)?
    }

    /// Trained parameter count.
    pub fn len(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// `x [B, S, in] · Wᵀ` for `w [out, in]`, computed in `dt` (f32 at `precision`) and returned
/// in f32; `W`'s gradient goes to `sink` when it has one.
fn linear(
    x: &Tensor,
    w: Tensor,
    (dt, precision): (DType, Precision),
    sink: Option<Arc<GradSink>>,
) -> Result<Tensor> {
    let (b, s, i) = x.dims3()?;
    let x = x.reshape((b * s, i))?;
    let y = if dt == DType::F32 {
        x.contiguous()?
            .apply_op2(&w, super::ops::Linear { sink, precision })?
    } else {
        x.to_dtype(dt)?
            .matmul(&w.to_dtype(dt)?.t()?)?
            .to_dtype(DType::F32)?
    };
    y.reshape((b, s, w.dim(0)?))
}

/// RMSNorm over the last dimension (one fused op, [`super::ops::RmsNorm`]).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(w, super::ops::RmsNorm { eps: eps as f32 })
}

/// `log(1 + e^x)`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// Logits `[B, T, vocab]` of token ids `[B, T]`.
pub fn forward(model: &Model, p: &Trainable, ids: &Tensor) -> Result<Tensor> {
    Ok(forward_with_features(model, p, ids, &[])?.0)
}

/// Logits `[B, T, vocab]` of token ids `[B, T]`, and the residual stream `[B, T, hidden]` leaving
/// each block in `taps` (0-based, in the order given): the student side of feature distillation.
pub fn forward_with_features(
    model: &Model,
    p: &Trainable,
    ids: &Tensor,
    taps: &[usize],
) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, t) = ids.dims2()?;
    let c = &model.config;
    let (h, m, eps) = (c.hidden, c.memory_tokens, c.rms_eps as f64);
    let embed = p.tensor("embed")?;
    let mut x = embed
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, h))?;
    if m > 0 {
        let mem = p.tensor("memory")?.unsqueeze(0)?.broadcast_as((b, m, h))?;
        x = Tensor::cat(&[&mem, &x], 1)?;
    }
    let s = m + t;
    let ctx = Context::new(model, s, p.matmul_dtype)?;
    let mut shared: Vec<Option<(Tensor, Tensor)>> = vec![None; model.layers.len()];
    let mut features: Vec<Option<Tensor>> = vec![None; taps.len()];
    for (i, layer) in model.layers.iter().enumerate() {
        x = layer_forward(i, layer, model, p, &ctx, &x, &mut shared)?;
        for (slot, _) in features.iter_mut().zip(taps).filter(|(_, l)| **l == i) {
            *slot = Some(x.narrow(1, m, t)?);
        }
    }
    let features = features
        .into_iter()
        .zip(taps)
        .map(|(f, l)| {
            f.ok_or_else(|| candle_core::Error::Msg(format!("no block {l} to take features from")))
        })
        .collect::<Result<Vec<_>>>()?;
    let x = rms_norm(&x.narrow(1, m, t)?, p.tensor("final_norm")?, eps)?;
    let head = if p.has("lm_head") { "lm_head" } else { "embed" };
    Ok((p.linear(&x, head, ctx.dt)?, features))
}

/// Per-call constants: RoPE tables, the matmul dtype.
struct Context {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
    sink: usize,
    dt: DType,
}

impl Context {
    fn new(model: &Model, s: usize, dt: DType) -> Result<Self> {
        let head_dim = model
            .layers
            .iter()
            .find_map(|l| l.attn.as_ref().map(|a| a.shape.head_dim))
            .unwrap_or(2);
        let half = head_dim / 2;
        let theta = model.config.rope_theta;
        let (mut cos, mut sin) = (Vec::with_capacity(s * half), Vec::with_capacity(s * half));
        for pos in 0..s {
            for i in 0..half {
                let angle = pos as f32 / theta.powf((2 * i) as f32 / head_dim as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Context {
            cos,
            sin,
            head_dim,
            sink: model.config.memory_tokens,
            dt,
        })
    }

    /// Rotary embedding of `x [B, S, heads·d]` (one fused op).
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(super::ops::Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            head_dim: self.head_dim,
        })
    }
}

fn layer_forward(
    i: usize,
    layer: &Layer,
    model: &Model,
    p: &Trainable,
    ctx: &Context,
    x: &Tensor,
    shared: &mut [Option<(Tensor, Tensor)>],
) -> Result<Tensor> {
    let eps = model.config.rms_eps as f64;
    let w = |name: &str| p.tensor(&format!("layers.{i}.{name}"));
    let lin = |x: &Tensor, name: &str| p.linear(x, &format!("layers.{i}.{name}"), ctx.dt);
    let hybrid = layer.ssm.is_some();
    let mut x = x.clone();
    if layer.attn.is_some() || layer.ssm.is_some() {
        let normed = rms_norm(&x, w("attn_norm")?, eps)?;
        let attn = match &layer.attn {
            Some(a) => Some(attention(i, a, hybrid, p, ctx, &normed, shared)?),
            None => None,
        };
        let ssm = match &layer.ssm {
            Some(m) => Some(ssm_branch(i, m, p, ctx, &normed, eps)?),
            None => None,
        };
        let (mixed, out_name) = match (attn, ssm) {
            (Some(a), Some(y)) => {
                let a = rms_norm(&a, w("fusion.0")?, eps)?;
                let y = rms_norm(&y, w("fusion.1")?, eps)?;
                (((a + y)? * 0.5)?, hymba::OUT)
            }
            (Some(a), None) => (a, llama::O.hf),
            (None, Some(y)) => (y, hymba::OUT),
            (None, None) => unreachable!(),
        };
        x = (x + lin(&mixed, out_name)?)?;
    } else if let Some(e) = &layer.emulated.mixer {
        x = emulated(&x, e.maps.len(), "mixer", &lin, &w)?;
    }
    if layer.mlp.is_some() {
        let normed = rms_norm(&x, w("mlp_norm")?, eps)?;
        let g = lin(&normed, llama::GATE.hf)?;
        let u = lin(&normed, llama::UP.hf)?;
        x = (x + lin(&g.apply_op2(&u, super::ops::SwiGlu)?, llama::DOWN.hf)?)?;
    } else if let Some(e) = &layer.emulated.mlp {
        x = emulated(&x, e.maps.len(), "mlp", &lin, &w)?;
    }
    Ok(x)
}

/// `x + maps(x) + bias`: an emulated update (see [`crate::model::Emulation`]) whose tensors
/// `emulated.{which}.0`, `.1`, `.bias` are trained like any other.
fn emulated<'a>(
    x: &Tensor,
    maps: usize,
    which: &str,
    lin: &dyn Fn(&Tensor, &str) -> Result<Tensor>,
    w: &dyn Fn(&str) -> Result<&'a Tensor>,
) -> Result<Tensor> {
    let mut y = x.clone();
    for k in 0..maps {
        y = lin(&y, &format!("emulated.{which}.{k}"))?;
    }
    let bias = w(&format!("emulated.{which}.bias"))?;
    let update = if maps == 0 {
        bias.broadcast_as(x.shape())?.contiguous()?
    } else {
        y.broadcast_add(bias)?
    };
    x + update
}

/// Attention heads `[B, S, n_heads·v_head_dim]` of layer `i` (one fused op over the
/// projections' row layout, [`super::ops::Attention`]).
fn attention(
    i: usize,
    a: &crate::model::Attention,
    hybrid: bool,
    p: &Trainable,
    ctx: &Context,
    normed: &Tensor,
    shared: &mut [Option<(Tensor, Tensor)>],
) -> Result<Tensor> {
    // The names of Layer::linears: Hymba's split in_proj, or Llama's projections.
    let lin = |x: &Tensor, llama: TensorName, hymba: &str| -> Result<Tensor> {
        let name = if hybrid { hymba } else { llama.hf };
        p.linear(x, &format!("layers.{i}.{name}"), ctx.dt)
    };
    let q = ctx.rope(&lin(normed, llama::Q, hymba::Q)?)?;
    let (k, v) = match a.kv {
        KvSource::Own { .. } => {
            let k = ctx.rope(&lin(normed, llama::K, hymba::K)?)?;
            let v = lin(normed, llama::V, hymba::V)?.contiguous()?;
            shared[i] = Some((k.clone(), v.clone()));
            (k, v)
        }
        KvSource::Shared(src) => shared[src]
            .clone()
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {i}: layer {src} has no K/V")))?,
    };
    let mask = Mask {
        window: a.window,
        sink: ctx.sink,
        ..Mask::CAUSAL
    };
    q.apply_op3(
        &k,
        &v,
        super::ops::Attention {
            shape: a.shape,
            mask,
        },
    )
}

/// The gated SSM output `[B, S, E]` of layer `i`.
fn ssm_branch(
    i: usize,
    m: &crate::model::Ssm,
    p: &Trainable,
    ctx: &Context,
    normed: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let w = |name: &str| p.tensor(&format!("layers.{i}.{name}"));
    let lin = |x: &Tensor, name: &str| p.linear(x, &format!("layers.{i}.{name}"), ctx.dt);
    let m_ = |name: &str| format!("mamba.{name}");
    let (b, s, _) = normed.dims3()?;
    let sh = m.shape;
    let (e, n, k, r) = (sh.inner, sh.d_state, sh.d_conv, sh.dt_rank);
    let xs = lin(normed, hymba::X)?;
    let z = lin(normed, hymba::Z)?;
    // Depthwise causal conv: K shifted copies of the zero-padded input, each scaled per channel.
    let padded = xs.pad_with_zeros(1, k - 1, 0)?;
    let conv_w = w(&m_("conv1d.weight"))?;
    let mut xc = w(&m_("conv1d.bias"))?
        .reshape((1, 1, e))?
        .broadcast_as((b, s, e))?
        .clone();
    for j in 0..k {
        let tap = conv_w.narrow(1, j, 1)?.reshape((1, 1, e))?;
        xc = (xc + padded.narrow(1, j, s)?.broadcast_mul(&tap)?)?;
    }
    let xc = xc.silu()?;
    let proj = lin(&xc, hymba::X_PROJ)?;
    let (mut dt_r, mut bm, mut cm) = (
        proj.narrow(2, 0, r)?,
        proj.narrow(2, r, n)?,
        proj.narrow(2, r + n, n)?,
    );
    if m.inner_norms.is_some() {
        dt_r = rms_norm(&dt_r, w(&m_("dt_layernorm"))?, eps)?;
        bm = rms_norm(&bm, w(&m_("B_layernorm"))?, eps)?;
        cm = rms_norm(&cm, w(&m_("C_layernorm"))?, eps)?;
    }
    let delta = softplus(&lin(&dt_r, hymba::DT_PROJ)?.broadcast_add(w(&m_("dt_proj.0.bias"))?)?)?;
    let u = (&delta * &xc)?;
    let a = w(&m_("A_log.0"))?.exp()?.neg()?;
    let du = Tensor::cat(&[&delta, &u], 2)?.contiguous()?;
    let bc = Tensor::cat(&[&bm, &cm], 2)?.contiguous()?;
    let y = du.apply_op3(&a.contiguous()?, &bc, SelectiveScan)?;
    let y = (y + xc.broadcast_mul(w(&m_("D.0"))?)?)?;
    y * z.silu()?
}

/// Mean next-token cross-entropy of `logits [B, T, V]` against `targets [B, T]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    logits
        .reshape((b * t, v))?
        .contiguous()?
        .apply_op1(super::loss_op::MeanOverRows(super::loss_op::CrossEntropy {
            targets,
        }))
}
