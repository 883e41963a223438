//! Reading and writing models: GGUF, HF safetensors layout, tokenizers, and model resolution
//! (file, folder, `hf:` id, or the default model fetched on first use).

pub mod atomic;
pub mod fetch;
pub mod gguf;
mod gguf_check;
pub mod gguf_provenance;
pub mod hub;
pub mod hymba;
pub mod mamba;
pub mod model_card;
pub mod onnx;
pub mod peft;
pub mod resolve;
pub mod safetensors;
pub mod tokenizer;
pub mod torch_pickle;

pub(crate) use atomic::temp_sibling;
