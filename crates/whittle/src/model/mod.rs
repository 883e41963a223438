//! The one model representation every loader produces and every method reads and writes: a
//! decoder-only transformer whose layers each have an optional attention sublayer and an optional
//! MLP, with their own widths, and whose linears may carry any [`Weight`] storage.

pub mod config;
mod forward;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod packed;
pub mod random;
pub mod sampling;

pub use config::{Arch, AttnShape, LayerShape, ModelConfig};
pub use forward::{Logits, Observer, Site};
pub use kv_cache::KvCache;
pub use linear::{Linear, LowRank, Weight};
pub use packed::Packed;

use crate::error::check_finite;
use crate::kernels::rope::RopeTable;
use crate::{Error, Result};

pub struct Attention {
    pub shape: AttnShape,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// One pre-norm residual block: `x += attn(norm(x)); x += mlp(norm(x))`.
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn: Option<Attention>,
    pub mlp_norm: Vec<f32>,
    pub mlp: Option<Mlp>,
}

impl Layer {
    pub fn shape(&self) -> LayerShape {
        LayerShape {
            attn: self.attn.as_ref().map(|a| a.shape),
            mlp: self.mlp.as_ref().map(|m| m.gate.out_features),
        }
    }

    /// The layer's linears with their HF names relative to the layer (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut v = Vec::with_capacity(7);
        if let Some(a) = &self.attn {
            v.extend([
                ("self_attn.q_proj", &a.q),
                ("self_attn.k_proj", &a.k),
                ("self_attn.v_proj", &a.v),
                ("self_attn.o_proj", &a.o),
            ]);
        }
        if let Some(m) = &self.mlp {
            v.extend([
                ("mlp.gate_proj", &m.gate),
                ("mlp.up_proj", &m.up),
                ("mlp.down_proj", &m.down),
            ]);
        }
        v
    }

    /// The layer's linears, mutable, with their names and the site whose input they read.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, Site, &mut Linear)> {
        let mut v = Vec::with_capacity(7);
        if let Some(a) = &mut self.attn {
            v.extend([
                ("self_attn.q_proj", Site::AttnIn, &mut a.q),
                ("self_attn.k_proj", Site::AttnIn, &mut a.k),
                ("self_attn.v_proj", Site::AttnIn, &mut a.v),
                ("self_attn.o_proj", Site::AttnOut, &mut a.o),
            ]);
        }
        if let Some(m) = &mut self.mlp {
            v.extend([
                ("mlp.gate_proj", Site::MlpIn, &mut m.gate),
                ("mlp.up_proj", Site::MlpIn, &mut m.up),
                ("mlp.down_proj", Site::MlpDown, &mut m.down),
            ]);
        }
        v
    }
}

pub struct Model {
    pub config: ModelConfig,
    /// Token embeddings as a `vocab × hidden` linear (rows are looked up); also the output head
    /// when tied.
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// Untied output head `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
    rope: RopeTable,
}

impl Model {
    /// Assembles a model, checking every shape against the config and that all weights are finite.
    pub fn new(
        config: ModelConfig,
        embed: Linear,
        layers: Vec<Layer>,
        final_norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        config.validate()?;
        let h = config.hidden;
        if layers.is_empty() {
            return Err(Error::Invalid("model has no layers".into()));
        }
        check_linear("embed_tokens", &embed, config.vocab_size, h)?;
        expect_len("norm", &final_norm, &[h])?;
        check_finite("norm", &final_norm)?;
        if let Some(head) = &lm_head {
            check_linear("lm_head", head, config.vocab_size, h)?;
        }
        let mut head_dim = None;
        for (i, l) in layers.iter().enumerate() {
            l.shape().validate(i)?;
            expect_len(&format!("layers.{i}.input_layernorm"), &l.attn_norm, &[h])?;
            expect_len(
                &format!("layers.{i}.post_attention_layernorm"),
                &l.mlp_norm,
                &[h],
            )?;
            check_finite(&format!("layers.{i}.input_layernorm"), &l.attn_norm)?;
            check_finite(&format!("layers.{i}.post_attention_layernorm"), &l.mlp_norm)?;
            if let Some(a) = &l.attn {
                let s = a.shape;
                let n = |p: &str| format!("layers.{i}.self_attn.{p}");
                check_linear(&n("q_proj"), &a.q, s.q_dim(), h)?;
                check_linear(&n("k_proj"), &a.k, s.kv_dim(), h)?;
                check_linear(&n("v_proj"), &a.v, s.kv_dim(), h)?;
                check_linear(&n("o_proj"), &a.o, h, s.q_dim())?;
                if *head_dim.get_or_insert(s.head_dim) != s.head_dim {
                    return Err(Error::Invalid(format!(
                        "layer {i}: head_dim {} differs from earlier layers' {}",
                        s.head_dim,
                        head_dim.unwrap_or_default()
                    )));
                }
            }
            if let Some(m) = &l.mlp {
                let w = m.gate.out_features;
                let n = |p: &str| format!("layers.{i}.mlp.{p}");
                check_linear(&n("gate_proj"), &m.gate, w, h)?;
                check_linear(&n("up_proj"), &m.up, w, h)?;
                check_linear(&n("down_proj"), &m.down, h, w)?;
            }
        }
        let rope = RopeTable::new(
            head_dim.unwrap_or(2),
            config.rope_theta,
            config.context_length,
        );
        Ok(Model {
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
        })
    }

    /// Converts every packed weight to f32 (for f32-only measurements).
    pub fn densify(&mut self) {
        self.embed.densify();
        if let Some(h) = &mut self.lm_head {
            h.densify();
        }
        for l in &mut self.layers {
            if let Some(a) = &mut l.attn {
                [&mut a.q, &mut a.k, &mut a.v, &mut a.o]
                    .into_iter()
                    .for_each(Linear::densify);
            }
            if let Some(m) = &mut l.mlp {
                [&mut m.gate, &mut m.up, &mut m.down]
                    .into_iter()
                    .for_each(Linear::densify);
            }
        }
    }

    /// Parameter count: embeddings, each layer, norms, and the head if untied.
    pub fn n_params(&self) -> usize {
        self.embed.n_params()
            + self.final_norm.len()
            + self.lm_head.as_ref().map_or(0, Linear::n_params)
            + self.layers.iter().map(layer_params).sum::<usize>()
    }
}

fn layer_params(l: &Layer) -> usize {
    l.attn_norm.len()
        + l.mlp_norm.len()
        + l.linears().iter().map(|(_, x)| x.n_params()).sum::<usize>()
}

fn expect_len(name: &str, v: &[f32], shape: &[usize]) -> Result<()> {
    if v.len() != shape.iter().product::<usize>() {
        return Err(Error::Shape {
            name: name.into(),
            expected: shape.to_vec(),
            found: vec![v.len()],
        });
    }
    Ok(())
}

fn check_linear(name: &str, l: &Linear, out: usize, inp: usize) -> Result<()> {
    if (l.out_features, l.in_features) != (out, inp) {
        return Err(Error::Shape {
            name: name.into(),
            expected: vec![out, inp],
            found: vec![l.out_features, l.in_features],
        });
    }
    l.check_finite(name)
}
