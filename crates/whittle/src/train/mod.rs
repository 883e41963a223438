//! Training on candle autograd: the forward pass as a differentiable graph over the one model
//! representation, the selective scan as a custom op with its own backward, AdamW with a
//! warmup + cosine schedule, and a resumable training loop.

pub mod graph;
pub mod groups;
pub mod loss_op;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod presets;
pub mod scan_op;
pub mod trainer;

/// The gradient of `loss` with respect to `var`, flattened: what every test of a
/// differentiable op compares with its closed form or finite differences.
#[cfg(test)]
pub(crate) fn grad_of(loss: &candle_core::Tensor, var: &candle_core::Var) -> Vec<f32> {
    loss.backward()
        .unwrap()
        .get(var)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
