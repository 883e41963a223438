//! The one model representation every loader produces and every method reads and writes: a
//! decoder-only transformer whose layers each have an optional attention sublayer and an optional
//! MLP, with their own widths, and whose linears may carry any [`Weight`] storage.

pub mod config;
pub mod emulated;
pub mod fingerprint;
mod forward;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod names;
pub mod packed;
pub mod params;
pub mod provenance;
pub mod random;
pub mod sampling;
pub mod sparse;
pub mod ssm;

pub use config::{Arch, AttnShape, KvDtype, LayerShape, ModelConfig, SsmShape, WindowRule};
pub use emulated::{Emulated, Emulation};
pub use fingerprint::Fingerprint;
pub use forward::{Logits, Observer, Site};
pub use kv_cache::KvCache;
pub use linear::{Linear, LowRank, Weight};
pub use packed::Packed;
pub use provenance::Provenance;
pub use ssm::{Ssm, SsmState};

use crate::error::check_finite;
use crate::kernels::rope::RopeTable;
use crate::{Error, Result};
use names::{hymba, llama};

#[derive(Clone)]
pub struct Attention {
    pub shape: AttnShape,
    pub q: Linear,
    pub kv: KvSource,
    /// Output projection. In a hybrid (attention ∥ SSM) layer it maps the fused branches, i.e.
    /// Hymba's `out_proj`.
    pub o: Linear,
    /// Sliding window `W` (see [`crate::model::WindowRule`]); `None` for global attention.
    pub window: Option<usize>,
}

/// Where a layer's keys and values come from.
// One per layer: the size difference between the variants is not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum KvSource {
    /// Its own K/V projections.
    Own { k: Linear, v: Linear },
    /// The post-RoPE K/V of an earlier layer (Hymba's cross-layer KV sharing): the layer stores
    /// nothing in the cache.
    Shared(usize),
}

#[derive(Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// One pre-norm residual block: `x += mixer(norm(x)); x += mlp(norm(x))`. The mixer is attention
/// (Llama), an SSM (Mamba) or both in parallel on the same input (Hymba): then each branch is
/// RMS-normalised with its own weights (`fusion`), the two are averaged and `attn.o` projects them.
#[derive(Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn: Option<Attention>,
    pub ssm: Option<Ssm>,
    /// RMSNorm weights of the [attention, SSM] branch outputs of a hybrid layer.
    pub fusion: Option<[Vec<f32>; 2]>,
    pub mlp_norm: Vec<f32>,
    pub mlp: Option<Mlp>,
    /// Affine stand-ins for removed units (depth pruning with emulated updates).
    pub emulated: Emulated,
}

/// The body of [`Layer::linears`] and [`Layer::linears_mut`], which differ only in `mut`.
macro_rules! layer_linears {
    ($layer:expr $(, $m:ident)?) => {{
        let layer = $layer;
        let mut v = Vec::with_capacity(12);
        let hybrid = layer.ssm.is_some();
        if let Some(a) = & $($m)? layer.attn {
            let n = |llama, hymba| if hybrid { hymba } else { llama };
            v.push((n(llama::Q.hf, hymba::Q), Site::AttnIn, & $($m)? a.q));
            if let KvSource::Own { k, v: vp } = & $($m)? a.kv {
                v.push((n(llama::K.hf, hymba::K), Site::AttnIn, k));
                v.push((n(llama::V.hf, hymba::V), Site::AttnIn, vp));
            }
            v.push((n(llama::O.hf, hymba::OUT), Site::AttnOut, & $($m)? a.o));
        }
        if let Some(m) = & $($m)? layer.ssm {
            v.extend([
                (hymba::X, Site::AttnIn, & $($m)? m.in_x),
                (hymba::Z, Site::AttnIn, & $($m)? m.in_z),
                (hymba::X_PROJ, Site::SsmConv, & $($m)? m.x_proj),
                (hymba::DT_PROJ, Site::SsmDt, & $($m)? m.dt_proj),
            ]);
            if let Some(o) = & $($m)? m.out {
                v.push((hymba::OUT, Site::AttnOut, o));
            }
        }
        if let Some(m) = & $($m)? layer.mlp {
            v.extend([
                (llama::GATE.hf, Site::MlpIn, & $($m)? m.gate),
                (llama::UP.hf, Site::MlpIn, & $($m)? m.up),
                (llama::DOWN.hf, Site::MlpDown, & $($m)? m.down),
            ]);
        }
        v
    }};
}

impl Layer {
    pub fn shape(&self) -> LayerShape {
        LayerShape {
            attn: self.attn.as_ref().map(|a| a.shape),
            ssm: self.ssm.as_ref().map(|m| m.shape),
            mlp: self.mlp.as_ref().map(|m| m.gate.out_features),
        }
    }

    /// The layer's linears with their names relative to the layer (HF names for Llama layers:
    /// `self_attn.q_proj`, ...; Hymba's `in_proj` appears split into its row blocks
    /// `mamba.in_proj.{q,k,v,x,z}`) and the site whose input they read.
    pub fn linears(&self) -> Vec<(&'static str, Site, &Linear)> {
        layer_linears!(self)
    }

    /// [`Layer::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, Site, &mut Linear)> {
        layer_linears!(self, mut)
    }
}

#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// Token embeddings as a `vocab × hidden` linear (rows are looked up); also the output head
    /// when tied.
    pub embed: Linear,
    /// Meta tokens `[memory_tokens, hidden]` prepended to every sequence (empty without).
    pub memory: Vec<f32>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// Untied output head `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
    /// Where the model came from and what was done to it; written with every export.
    pub provenance: Provenance,
    rope: RopeTable,
}

impl Model {
    /// Assembles a model, checking every shape against the config and that all weights are finite.
    /// Meta tokens (`config.memory_tokens` of them) start at zero; see [`Model::with_memory`].
    pub fn new(
        config: ModelConfig,
        embed: Linear,
        layers: Vec<Layer>,
        final_norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        let rope = check_parts(&config, &embed, &layers, &final_norm, lm_head.as_ref())?;
        Ok(Model {
            memory: vec![0.0; config.memory_tokens * config.hidden],
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            provenance: Provenance::default(),
            rope,
        })
    }

    /// Checks the model again after its parts were rewritten in place (pruning): the checks of
    /// [`Model::new`], and the RoPE table rebuilt for the head width now in use.
    pub fn revalidate(&mut self) -> Result<()> {
        self.rope = check_parts(
            &self.config,
            &self.embed,
            &self.layers,
            &self.final_norm,
            self.lm_head.as_ref(),
        )?;
        expect_len(
            "memory_tokens",
            &self.memory,
            &[self.config.memory_tokens, self.config.hidden],
        )
    }

    /// Sets the meta tokens (`[M, hidden]`, row-major; `M` must equal `config.memory_tokens`).
    pub fn with_memory(mut self, memory: Vec<f32>) -> Result<Self> {
        expect_len(
            "memory_tokens",
            &memory,
            &[self.config.memory_tokens, self.config.hidden],
        )?;
        check_finite("memory_tokens", &memory)?;
        self.memory = memory;
        Ok(self)
    }

    /// Converts every packed weight to f32 (for f32-only measurements).
    pub fn densify(&mut self) {
        self.embed.densify();
        if let Some(h) = &mut self.lm_head {
            h.densify();
        }
        for l in &mut self.layers {
            for (_, _, lin) in l.linears_mut() {
                lin.densify();
            }
        }
    }

    /// Whether any weight is kept packed (quantized blocks) rather than as f32.
    pub fn has_packed(&self) -> bool {
        self.embed.is_packed()
            || self.lm_head.as_ref().is_some_and(Linear::is_packed)
            || self
                .layers
                .iter()
                .any(|l| l.linears().iter().any(|(_, _, x)| x.is_packed()))
    }

    /// Parameter count: embeddings, meta tokens, each layer, norms, and the head if untied.
    pub fn n_params(&self) -> usize {
        self.embed.n_params()
            + self.memory.len()
            + self.final_norm.len()
            + self.lm_head.as_ref().map_or(0, Linear::n_params)
            + self.layers.iter().map(layer_params).sum::<usize>()
    }

    /// Why the model is not a plain Llama (every layer with the same attention and MLP widths,
    /// nothing removed, nothing emulated), which is what transformers, vLLM and llama.cpp load
    /// with no custom code; `None` when it is one. Exports that cannot represent the difference
    /// refuse with this reason instead of writing a file that loads wrong.
    pub fn irregularity(&self) -> Option<String> {
        if self.config.arch != Arch::Llama {
            return Some(format!("a {} model", self.config.arch.name()));
        }
        let first = self.layers[0].shape();
        for (i, l) in self.layers.iter().enumerate() {
            let s = l.shape();
            if !l.emulated.is_empty() {
                return Some(format!("layer {i} has an emulated update"));
            }
            if s.attn.is_none() || s.mlp.is_none() {
                return Some(format!(
                    "layer {i} has no {}",
                    if s.attn.is_none() { "attention" } else { "MLP" }
                ));
            }
            if s != first {
                return Some(format!(
                    "layer {i}'s widths {s:?} differ from layer 0's {first:?}"
                ));
            }
        }
        None
    }

    /// Whether any layer attends through a sliding window.
    pub fn has_window(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.attn.as_ref().is_some_and(|a| a.window.is_some()))
    }
}

/// Every check of [`Model::new`]; returns the RoPE table for the model's head width.
fn check_parts(
    config: &ModelConfig,
    embed: &Linear,
    layers: &[Layer],
    final_norm: &[f32],
    lm_head: Option<&Linear>,
) -> Result<RopeTable> {
    config.validate()?;
    let h = config.hidden;
    if layers.is_empty() {
        return Err(Error::Invalid("model has no layers".into()));
    }
    check_linear(llama::EMBED.hf, embed, config.vocab_size, h)?;
    expect_len("norm", final_norm, &[h])?;
    check_finite("norm", final_norm)?;
    if let Some(head) = lm_head {
        check_linear("lm_head", head, config.vocab_size, h)?;
    }
    let mut head_dim = None;
    for (i, l) in layers.iter().enumerate() {
        check_layer(i, l, &layers[..i], h)?;
        if let Some(a) = &l.attn {
            let d = a.shape.head_dim;
            if *head_dim.get_or_insert(d) != d {
                return Err(Error::Invalid(format!(
                    "layer {i}: head_dim {d} differs from earlier layers' {}",
                    head_dim.unwrap_or_default()
                )));
            }
        }
    }
    Ok(RopeTable::new(
        head_dim.unwrap_or(2),
        config.rope_theta,
        config.context_length,
    ))
}

fn layer_params(l: &Layer) -> usize {
    l.attn_norm.len()
        + l.mlp_norm.len()
        + l.fusion.as_ref().map_or(0, |f| f[0].len() + f[1].len())
        + l.ssm.as_ref().map_or(0, Ssm::extra_params)
        + l.linears()
            .iter()
            .map(|(_, _, x)| x.n_params())
            .sum::<usize>()
        + l.emulated.named().map(|(_, e)| e.n_params()).sum::<usize>()
}

/// Checks layer `i` against the hidden width and the layers before it (KV sharing reads them).
fn check_layer(i: usize, l: &Layer, earlier: &[Layer], h: usize) -> Result<()> {
    l.shape().validate(i)?;
    for (name, w) in [
        (llama::ATTN_NORM.hf, &l.attn_norm),
        (llama::MLP_NORM.hf, &l.mlp_norm),
    ] {
        let name = format!("layers.{i}.{name}");
        expect_len(&name, w, &[h])?;
        check_finite(&name, w)?;
    }
    for (name, _, lin) in l.linears() {
        // Widths were validated through the shape; here each linear's own dims are checked.
        let (out, inp) = expected_dims(l, name, h);
        check_linear(&format!("layers.{i}.{name}"), lin, out, inp)?;
    }
    for (name, e) in l.emulated.named() {
        let replaces_present = match name {
            "mixer" => l.attn.is_some() || l.ssm.is_some(),
            _ => l.mlp.is_some(),
        };
        if replaces_present {
            return Err(Error::Invalid(format!(
                "layer {i}: an emulated {name} update stands in for a {name} that is present"
            )));
        }
        e.validate(&format!("layers.{i}.emulated.{name}"), h)?;
    }
    if let (Some(a), Some(m)) = (&l.attn, &l.ssm) {
        let fusion = l.fusion.as_ref().ok_or_else(|| {
            Error::Invalid(format!("layer {i}: hybrid layer without branch norms"))
        })?;
        for (k, w) in fusion.iter().enumerate() {
            let name = format!("layers.{i}.mamba.pre_avg_layernorm{}", k + 1);
            expect_len(&name, w, &[a.shape.out_dim()])?;
            check_finite(&name, w)?;
        }
        if m.out.is_some() {
            return Err(Error::Invalid(format!(
                "layer {i}: a hybrid layer projects through the attention's output only"
            )));
        }
    }
    if let Some(m) = &l.ssm {
        m.validate(i, h)?;
        if l.attn.is_none() && m.out.is_none() {
            return Err(Error::Invalid(format!(
                "layer {i}: SSM-only layer without an output projection"
            )));
        }
    }
    if let Some(Attention {
        kv: KvSource::Shared(p),
        shape,
        window,
        ..
    }) = &l.attn
    {
        let producer = earlier.get(*p).and_then(|l| l.attn.as_ref());
        let ok = producer.is_some_and(|pa| {
            matches!(pa.kv, KvSource::Own { .. })
                && pa.window == *window
                && (pa.shape.n_kv_heads, pa.shape.head_dim, pa.shape.v_head_dim)
                    == (shape.n_kv_heads, shape.head_dim, shape.v_head_dim)
        });
        if !ok {
            return Err(Error::Invalid(format!(
                "layer {i}: shares the K/V of layer {p}, which is not an earlier layer with its \
                 own K/V of the same shape and window"
            )));
        }
    }
    Ok(())
}

/// `(out, in)` a linear of layer `l` named `name` must have.
fn expected_dims(l: &Layer, name: &str, h: usize) -> (usize, usize) {
    let a = l.attn.as_ref().map(|a| a.shape);
    let s = l.ssm.as_ref().map(|m| m.shape);
    let mlp = l.mlp.as_ref().map_or(0, |m| m.gate.out_features);
    let (a_q, a_k, a_v, a_o) = a.map_or((0, 0, 0, 0), |a| {
        (a.q_dim(), a.kv_dim(), a.v_dim(), a.out_dim())
    });
    let e = s.map_or(0, |s| s.inner);
    match name {
        n if n == llama::Q.hf || n == hymba::Q => (a_q, h),
        n if n == llama::K.hf || n == hymba::K => (a_k, h),
        n if n == llama::V.hf || n == hymba::V => (a_v, h),
        n if n == llama::O.hf => (h, a_o),
        hymba::OUT => (h, if a.is_some() { a_o } else { e }),
        hymba::X | hymba::Z => (e, h),
        hymba::X_PROJ => s.map_or((0, 0), |s| (s.dt_rank + 2 * s.d_state, e)),
        hymba::DT_PROJ => s.map_or((0, 0), |s| (e, s.dt_rank)),
        n if n == llama::GATE.hf || n == llama::UP.hf => (mlp, h),
        _ => (h, mlp),
    }
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
