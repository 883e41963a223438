//! Measuring a model: perplexity, downstream task accuracy, speed.

pub mod kernel_speed;
pub mod perplexity;
pub mod speed;
pub mod tasks;
