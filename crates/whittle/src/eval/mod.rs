//! Measuring a model: perplexity and speed.

pub mod kernel_speed;
pub mod perplexity;
pub mod speed;
