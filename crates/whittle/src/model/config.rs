//! Model configuration. Global settings live in [`ModelConfig`]; everything that pruning may change
//! per layer (heads, KV heads, MLP width, removed sublayers) lives in [`LayerShape`], so a pruned
//! model is still the same type as the dense one.

use serde::{Deserialize, Serialize};

/// Architecture families whittle implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
}

impl Arch {
    /// The name GGUF metadata and whittle's reports use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
        }
    }

    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            other => Err(crate::Error::UnknownArchitecture(other.to_string())),
        }
    }
}

/// Shape of the attention sublayer of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Shape of one layer; `None` means the sublayer was removed (depth pruning at sublayer level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    pub attn: Option<AttnShape>,
    /// MLP intermediate width.
    pub mlp: Option<usize>,
}

/// Settings shared by the whole model. Per-layer widths are not here: they are read off the layers
/// themselves ([`crate::model::Layer::shape`]) so that they can never disagree with the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Checks the global invariants the forward pass relies on.
    pub fn validate(&self) -> crate::Result<()> {
        if self.vocab_size == 0 || self.hidden == 0 || self.context_length == 0 {
            return Err(crate::Error::Invalid(
                "model config: vocab size, hidden size and context length must be positive".into(),
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0 && self.rope_theta > 0.0) {
            return Err(crate::Error::Invalid(format!(
                "model config: rms_eps {} / rope_theta {} out of range",
                self.rms_eps, self.rope_theta
            )));
        }
        Ok(())
    }
}

impl LayerShape {
    /// Checks the invariants the attention kernels rely on.
    pub fn validate(&self, layer: usize) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Invalid(format!("layer {layer}: {m}")));
        if let Some(a) = self.attn {
            if a.n_heads == 0 || a.n_kv_heads == 0 || a.head_dim == 0 || a.head_dim % 2 != 0 {
                return bad("heads must be positive and head_dim even".into());
            }
            if a.n_heads % a.n_kv_heads != 0 {
                return bad(format!(
                    "{} query heads not a multiple of {} KV heads",
                    a.n_heads, a.n_kv_heads
                ));
            }
        }
        if self.mlp == Some(0) {
            return bad("MLP width 0 (remove the MLP instead)".into());
        }
        Ok(())
    }
}
