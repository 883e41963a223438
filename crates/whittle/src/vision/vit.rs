//! The Vision Transformer: patch embedding, a CLS token, learned position embeddings,
//! pre-norm blocks with optional LayerScale and exact (erf) GELU, a final LayerNorm. One
//! definition serves DINOv2 (the teacher read from ONNX) and the students whittle trains, so
//! the forward is written on candle tensors with gradients. The linears, attention, LayerNorm
//! and GELU are the training graph's fused ops ([`crate::train::ops`]: whittle's GEMMs and
//! attention kernel, hand-written backward passes); written from candle primitives, with
//! candle's own matmul, DINOv2's forward ran at 0.63x onnxruntime's speed on one thread.
//!
//! Tensor names are Hugging Face's `Dinov2Model` names ([`names`]): a student exported as
//! safetensors loads there, and the one table of names and shapes ([`Vit::expected`]) is what
//! loading, checking and random initialisation all read.

use super::resize::resize_cubic;
use crate::error::check_finite;
use crate::kernels::attention::Mask;
use crate::model::AttnShape;
use crate::train::ops::{Attention, Gelu, LayerNorm, Linear};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// The shape of a ViT.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Side of a square patch in pixels.
    pub patch: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Whether each residual branch is scaled by a learned per-channel vector (LayerScale).
    pub layer_scale: bool,
    /// Side of the stored grid of patch position embeddings (other input sizes resize it).
    pub grid: usize,
    pub channels: usize,
}

/// Tensor names, in Hugging Face `Dinov2Model` naming.
pub mod names {
    pub const CLS: &str = "embeddings.cls_token";
    pub const POSITION: &str = "embeddings.position_embeddings";
    pub const PATCH_WEIGHT: &str = "embeddings.patch_embeddings.projection.weight";
    pub const PATCH_BIAS: &str = "embeddings.patch_embeddings.projection.bias";
    pub const NORM_WEIGHT: &str = "layernorm.weight";
    pub const NORM_BIAS: &str = "layernorm.bias";

    /// The linears of a block, by their module path inside the layer.
    pub const QUERY: &str = "attention.attention.query";
    pub const KEY: &str = "attention.attention.key";
    pub const VALUE: &str = "attention.attention.value";
    pub const OUTPUT: &str = "attention.output.dense";
    pub const FC1: &str = "mlp.fc1";
    pub const FC2: &str = "mlp.fc2";
    pub const NORM1: &str = "norm1";
    pub const NORM2: &str = "norm2";
    pub const SCALE1: &str = "layer_scale1.lambda1";
    pub const SCALE2: &str = "layer_scale2.lambda1";

    /// `encoder.layer.{i}.{part}`.
    pub fn layer(i: usize, part: &str) -> String {
        format!("encoder.layer.{i}.{part}")
    }
}

/// A ViT's configuration and parameters (by [`names`]).
pub struct Vit {
    pub config: VitConfig,
    pub params: HashMap<String, Tensor>,
}

impl Vit {
    /// Every parameter's name and shape: the architecture's one table.
    pub fn expected(c: &VitConfig) -> Vec<(String, Vec<usize>)> {
        use names::*;
        let (d, m) = (c.width, c.mlp);
        let mut all = vec![
            (CLS.to_string(), vec![1, 1, d]),
            (POSITION.to_string(), vec![1, 1 + c.grid * c.grid, d]),
            (
                PATCH_WEIGHT.to_string(),
                vec![d, c.channels, c.patch, c.patch],
            ),
            (PATCH_BIAS.to_string(), vec![d]),
        ];
        for i in 0..c.layers {
            let mut add = |part: String, shape: Vec<usize>| all.push((layer(i, &part), shape));
            for norm in [NORM1, NORM2] {
                add(format!("{norm}.weight"), vec![d]);
                add(format!("{norm}.bias"), vec![d]);
            }
            for (lin, out, inp) in [
                (QUERY, d, d),
                (KEY, d, d),
                (VALUE, d, d),
                (OUTPUT, d, d),
                (FC1, m, d),
                (FC2, d, m),
            ] {
                add(format!("{lin}.weight"), vec![out, inp]);
                add(format!("{lin}.bias"), vec![out]);
            }
            if c.layer_scale {
                add(SCALE1.to_string(), vec![d]);
                add(SCALE2.to_string(), vec![d]);
            }
        }
        all.push((NORM_WEIGHT.to_string(), vec![d]));
        all.push((NORM_BIAS.to_string(), vec![d]));
        all
    }

    /// A ViT from named f32 values; every tensor of [`Vit::expected`] must be there with its
    /// shape and finite values, and nothing else.
    pub fn from_values(config: VitConfig, mut values: HashMap<String, Vec<f32>>) -> Result<Self> {
        if config.heads == 0 || !config.width.is_multiple_of(config.heads) {
            return Err(Error::Invalid(format!(
                "ViT width {} is not a multiple of its {} heads",
                config.width, config.heads
            )));
        }
        let mut params = HashMap::new();
        for (name, shape) in Self::expected(&config) {
            let v = values.remove(&name).ok_or_else(|| Error::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: vec![],
            })?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Shape {
                    name,
                    expected: shape,
                    found: vec![v.len()],
                });
            }
            check_finite(&name, &v)?;
            params.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        }
        if let Some(extra) = values.keys().min() {
            return Err(Error::Invalid(format!(
                "tensor '{extra}' is not part of a ViT with this configuration"
            )));
        }
        Ok(Vit { config, params })
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("ViT has no tensor '{name}'")))
    }

    /// Token features after the final LayerNorm: `[batch, 1 + patches, width]` for images
    /// `[batch, channels, height, width]` (normalised pixels); token 0 is CLS.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        use names::*;
        let c = &self.config;
        let mut x = self.embed(images)?;
        for i in 0..c.layers {
            let l = |part: &str| self.p(&layer(i, part));
            let lin = |x: &Tensor, name: &str| {
                linear(
                    x,
                    l(&format!("{name}.weight"))?,
                    l(&format!("{name}.bias"))?,
                )
            };
            let norm = |x: &Tensor, name: &str| {
                layer_norm(
                    x,
                    l(&format!("{name}.weight"))?,
                    l(&format!("{name}.bias"))?,
                    c.eps,
                )
            };
            let scale = |y: Tensor, name: &str| -> Result<Tensor> {
                Ok(if c.layer_scale {
                    y.broadcast_mul(l(name)?)?
                } else {
                    y
                })
            };
            let h = norm(&x, NORM1)?;
            let att = self.attention(&lin(&h, QUERY)?, &lin(&h, KEY)?, &lin(&h, VALUE)?)?;
            x = (x + scale(lin(&att, OUTPUT)?, SCALE1)?)?;
            let h = lin(&norm(&x, NORM2)?, FC1)?.apply_op1(Gelu)?;
            x = (&x + scale(lin(&h, FC2)?, SCALE2)?)?;
        }
        layer_norm(&x, self.p(NORM_WEIGHT)?, self.p(NORM_BIAS)?, c.eps)
    }

    /// Patches (a strided convolution with stride = kernel, written as a matrix product) plus
    /// the CLS token, plus position embeddings resized to the input's grid when it differs.
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = images.dims4()?;
        let p = c.patch;
        if ch != c.channels || h % p != 0 || w % p != 0 {
            return Err(Error::Invalid(format!(
                "images of shape [{b}, {ch}, {h}, {w}]: the ViT takes {} channels and sides that \
                 are multiples of its {p}-pixel patches",
                c.channels
            )));
        }
        let (gh, gw) = (h / p, w / p);
        let patches = images
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, ch * p * p))?;
        let kernel = self
            .p(names::PATCH_WEIGHT)?
            .reshape((c.width, ch * p * p))?;
        let patches = linear(&patches, &kernel, self.p(names::PATCH_BIAS)?)?.reshape((
            b,
            gh * gw,
            c.width,
        ))?;
        let cls = self.p(names::CLS)?.broadcast_as((b, 1, c.width))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        Ok(x.broadcast_add(&self.positions(gh, gw)?)?)
    }

    /// `[1, 1 + gh·gw, width]` position embeddings. The stored grid is used as it is for its
    /// own size and resized bicubically otherwise (as DINOv2 does; not differentiated).
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let (g, d) = (self.config.grid, self.config.width);
        let stored = self.p(names::POSITION)?;
        if (gh, gw) == (g, g) {
            return Ok(stored.clone());
        }
        let cls = stored.narrow(1, 0, 1)?;
        // [g·g, d] → d planes of g × g, resized, back to tokens.
        let planes = stored.narrow(1, 1, g * g)?.reshape((g * g, d))?.t()?;
        let resized = resize_cubic(&planes.flatten_all()?.to_vec1()?, d, g, g, gh, gw);
        let grid = Tensor::from_vec(resized, (d, gh * gw), &Device::Cpu)?
            .t()?
            .unsqueeze(0)?;
        Ok(Tensor::cat(&[&cls, &grid], 1)?)
    }

    /// Multi-head self-attention over all tokens (no mask), `[b, n, d]` in and out.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let heads = self.config.heads;
        let shape = AttnShape::new(heads, heads, q.dim(2)? / heads);
        Ok(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            Attention {
                shape,
                mask: Mask::BIDIRECTIONAL,
            },
        )?)
    }
}

/// `x W^T + b` over the last dimension of `x` (any leading dims); `w` is `[out, in]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inp = *dims.last().expect("linear input has a last dimension");
    let rows = x.elem_count() / inp;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = w.dim(0)?;
    Ok(x.reshape((rows, inp))?
        .contiguous()?
        .apply_op2(&w.contiguous()?, Linear::default())?
        .broadcast_add(b)?
        .reshape(out_dims)?)
}

/// LayerNorm over the last dimension.
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(w, b, LayerNorm { eps: eps as f32 })?)
}
