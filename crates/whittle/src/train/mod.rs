//! Training on candle autograd: the forward pass as a differentiable graph over the one model
//! representation, the selective scan as a custom op with its own backward, AdamW with a
//! warmup + cosine schedule, and a resumable training loop.

pub mod graph;
pub mod loss_op;
pub mod objective;
pub mod optim;
pub mod presets;
pub mod scan_op;
pub mod trainer;
