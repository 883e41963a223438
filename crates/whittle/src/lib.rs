//! whittle: load a small language model, measure it, compress it, and run it.
//!
//! The library is laid out by what a reader looks for: [`model`] (the one model representation,
//! forward pass, KV cache, sampling), [`io`] (GGUF, safetensors, HF config and tokenizer, the
//! default-model fetch), [`data`] (text corpora and windows), [`eval`] (perplexity, speed), and
//! [`kernels`] (the numeric kernels of the forward pass).

#[macro_use]
pub mod kernels;
pub mod calib;
pub mod data;
pub mod dist;
pub mod distill;
pub mod error;
pub mod eval;
pub mod io;
pub mod lowrank;
pub mod model;
pub mod prune;
pub mod quant;
pub mod recipe;
pub mod sparsity;
pub mod threads;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
pub use model::Model;
