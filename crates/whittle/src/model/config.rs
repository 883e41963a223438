//! Model configuration. Global settings live in [`ModelConfig`]; everything that pruning may change
//! per layer (heads, KV heads, MLP width, removed sublayers) lives in [`LayerShape`], so a pruned
//! model is still the same type as the dense one.

use serde::{Deserialize, Serialize};

/// Architecture families whittle implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    /// Hymba: attention and SSM heads in parallel in every layer, meta tokens, sliding windows
    /// and cross-layer KV sharing.
    Hymba,
    /// Mamba: SSM-only layers (built from the same parts as Hymba's SSM branch).
    Mamba,
}

impl Arch {
    /// The name GGUF metadata and whittle's reports use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Hymba => "hymba",
            Arch::Mamba => "mamba",
        }
    }

    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            // whittle's name for a Llama that transformers cannot load (see `io::safetensors`).
            "llama" | "LlamaForCausalLM" | "whittle_llama" | "WhittleLlamaForCausalLM" => {
                Ok(Arch::Llama)
            }
            // whittle's name for a Hymba whose widths the official config cannot state.
            "hymba" | "HymbaForCausalLM" | "whittle_hymba" | "WhittleHymbaForCausalLM" => {
                Ok(Arch::Hymba)
            }
            "mamba" | "MambaForCausalLM" | "whittle_mamba" | "WhittleMambaForCausalLM" => {
                Ok(Arch::Mamba)
            }
            other => Err(crate::Error::UnknownArchitecture(other.to_string())),
        }
    }
}

/// Shape of the attention sublayer of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query/key head width.
    pub head_dim: usize,
    /// Value head width: equal to `head_dim` in Llama; Hymba's is the SSM inner width per head.
    pub v_head_dim: usize,
}

impl AttnShape {
    /// A shape whose value heads are as wide as its query/key heads.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim: head_dim,
        }
    }
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Width of the key rows (`n_kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Width of the value rows (`n_kv_heads · v_head_dim`).
    pub fn v_dim(&self) -> usize {
        self.n_kv_heads * self.v_head_dim
    }
    /// Width of the attention output (`n_heads · v_head_dim`).
    pub fn out_dim(&self) -> usize {
        self.n_heads * self.v_head_dim
    }
}

/// Shape of a selective-state-space (Mamba-1) branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsmShape {
    /// Inner width `E` (channels of the conv and the scan).
    pub inner: usize,
    /// State size `N` per channel.
    pub d_state: usize,
    /// Causal conv kernel width `K`.
    pub d_conv: usize,
    /// Rank `R` of the Δ projection.
    pub dt_rank: usize,
}

/// Shape of one layer; `None` means the sublayer was removed (depth pruning at sublayer level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LayerShape {
    pub attn: Option<AttnShape>,
    /// SSM heads, alone (Mamba) or in parallel with the attention heads (Hymba).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm: Option<SsmShape>,
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
    /// Learned meta tokens prepended to every sequence (Hymba); they take positions `0..M`.
    #[serde(default)]
    pub memory_tokens: usize,
    /// How sliding-window layers count their window during cached decoding.
    #[serde(default)]
    pub window_rule: WindowRule,
    /// What the decode cache stores its K/V rows in.
    #[serde(default)]
    pub kv_cache: KvDtype,
}

/// Element type of the decode cache's K/V rows. `F32` keeps decode equal to a full forward
/// pass; `F16` halves the cache (llama.cpp's default), moving SmolLM2's decode logits by
/// 7.5e-4 of their range (keys and values rounded to 11 significant bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Sliding-window semantics. A windowed layer with window `W` lets position `i` see key `j` when
/// `j ≤ i` and (`i − j ≤ W` or `j` is a meta token), i.e. `W + 1` positions, on a full forward
/// pass. Hymba's upstream cached decode keeps only `W` positions (itself included): an
/// off-by-one that changes decode logits. `Upstream` reproduces it (the default, for parity with
/// published generations); `Consistent` keeps `W + 1` so decode equals a full forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowRule {
    #[default]
    Upstream,
    Consistent,
}

impl WindowRule {
    /// Positions (including the current one) a decode step sees in a layer with window `w`.
    pub fn decode_positions(self, w: usize) -> usize {
        match self {
            WindowRule::Upstream => w,
            WindowRule::Consistent => w + 1,
        }
    }
}

/// The most layers a model file may declare (the deepest published LLMs have ~200).
pub const MAX_LAYERS: usize = 1 << 16;

impl ModelConfig {
    /// Checks the global invariants the forward pass relies on.
    /// Fails unless `n` layers, as a file's header declares them, can be real: at most
    /// [`MAX_LAYERS`], so that a corrupt count fails before anything is sized by it.
    pub fn check_layer_count(n: usize) -> crate::Result<()> {
        if n == 0 || n > MAX_LAYERS {
            return Err(crate::Error::Invalid(format!(
                "model config: {n} layers (whittle reads 1 to {MAX_LAYERS})"
            )));
        }
        Ok(())
    }

    pub fn validate(&self) -> crate::Result<()> {
        if self.vocab_size == 0 || self.hidden == 0 || self.context_length == 0 {
            return Err(crate::Error::Invalid(
                "model config: vocab size, hidden size and context length must be positive".into(),
            ));
        }
        if self.memory_tokens >= self.context_length {
            return Err(crate::Error::Invalid(format!(
                "model config: {} meta tokens leave no room in a context of {}",
                self.memory_tokens, self.context_length
            )));
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
            if a.n_heads == 0
                || a.n_kv_heads == 0
                || a.head_dim == 0
                || a.head_dim % 2 != 0
                || a.v_head_dim == 0
            {
                return bad("heads must be positive and head_dim even".into());
            }
            if a.n_heads % a.n_kv_heads != 0 {
                return bad(format!(
                    "{} query heads not a multiple of {} KV heads",
                    a.n_heads, a.n_kv_heads
                ));
            }
        }
        if let Some(s) = self.ssm {
            if s.inner == 0 || s.d_state == 0 || s.d_conv == 0 || s.dt_rank == 0 {
                return bad(format!("SSM dimensions must be positive: {s:?}"));
            }
            if let Some(a) = self.attn {
                if a.out_dim() != s.inner {
                    return bad(format!(
                        "attention output width {} differs from the SSM width {} it is fused with",
                        a.out_dim(),
                        s.inner
                    ));
                }
            }
        }
        if self.mlp == Some(0) {
            return bad("MLP width 0 (remove the MLP instead)".into());
        }
        Ok(())
    }
}
