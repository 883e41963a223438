//! Tensor names, one table per architecture: every loader, exporter, the parameter visitor and
//! the training graph name tensors through these constants, so a name is written once and a
//! typo or rename fails at compile time.
//!
//! Layer tensors are relative to the layer (`model.layers.{i}.` in HF files, `blk.{i}.` in GGUF
//! files; whittle's own names are the HF ones under `layers.{i}.`); the others are whole names
//! without the `.weight` suffix.

/// One tensor's names in the formats whittle reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorName {
    /// Hugging Face (transformers) name, also whittle's own.
    pub hf: &'static str,
    /// GGUF (llama.cpp) name.
    pub gguf: &'static str,
}

const fn name(hf: &'static str, gguf: &'static str) -> TensorName {
    TensorName { hf, gguf }
}

/// Llama (`LlamaForCausalLM`).
pub mod llama {
    use super::{name, TensorName};

    pub const EMBED: TensorName = name("model.embed_tokens", "token_embd");
    pub const FINAL_NORM: TensorName = name("model.norm", "output_norm");
    pub const LM_HEAD: TensorName = name("lm_head", "output");

    pub const ATTN_NORM: TensorName = name("input_layernorm", "attn_norm");
    pub const MLP_NORM: TensorName = name("post_attention_layernorm", "ffn_norm");
    pub const Q: TensorName = name("self_attn.q_proj", "attn_q");
    pub const K: TensorName = name("self_attn.k_proj", "attn_k");
    pub const V: TensorName = name("self_attn.v_proj", "attn_v");
    pub const O: TensorName = name("self_attn.o_proj", "attn_output");
    pub const GATE: TensorName = name("mlp.gate_proj", "ffn_gate");
    pub const UP: TensorName = name("mlp.up_proj", "ffn_up");
    pub const DOWN: TensorName = name("mlp.down_proj", "ffn_down");
}

/// Hymba (`HymbaForCausalLM`): its fused `in_proj` appears split into row blocks, as whittle
/// keeps it (`mamba.in_proj.{q,k,v,x,z}`); the MLP and norms use the Llama names.
pub mod hymba {
    pub const Q: &str = "mamba.in_proj.q";
    pub const K: &str = "mamba.in_proj.k";
    pub const V: &str = "mamba.in_proj.v";
    pub const X: &str = "mamba.in_proj.x";
    pub const Z: &str = "mamba.in_proj.z";
    pub const OUT: &str = "mamba.out_proj";
    pub const X_PROJ: &str = "mamba.x_proj.0";
    pub const DT_PROJ: &str = "mamba.dt_proj.0";
}
