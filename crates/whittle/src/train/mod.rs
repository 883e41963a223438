//! Training on candle autograd: the forward pass as a differentiable graph over the one model
//! representation, the selective scan as a custom op with its own backward, AdamW with a
//! warmup + cosine schedule, and a resumable training loop.

pub mod grad_sink;
pub mod graph;
pub mod groups;
pub mod loss_op;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod params_file;
pub mod presets;
pub mod scan_op;
pub mod trainer;

/// SplitMix64: counter-based randomness, a pure function of its input (the window offsets of a
/// step, the Gumbel noise of a mask logit), so that a resumed run or a backward pass draws the
/// same values again.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

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
