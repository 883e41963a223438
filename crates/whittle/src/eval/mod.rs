//! Measuring a model: perplexity and speed.

pub mod perplexity;
pub mod speed;
