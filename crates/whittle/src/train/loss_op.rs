//! Losses over `[rows, vocab]` logits as single candle ops. Written with primitives, a
//! cross-entropy or a KL makes a dozen passes over the logits (max, subtract, exp, sum, log,
//! gather, and as many in backward), each allocating a tensor as large as the logits: with
//! SmolLM2's 49k vocabulary that dominated a small model's training step. Here every loss is a
//! [`RowLoss`] — one term per row whose gradient needs that row alone — and [`MeanOverRows`]
//! turns it into one op: one pass forward, one backward, rows in parallel.

use crate::kernels::exp::{exp_shift_scale, logsumexp};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A loss that is `factor · mean_r term(r, logits_r)`.
pub trait RowLoss: Send + Sync {
    fn name(&self) -> &'static str;
    /// Fails unless `[rows, vocab]` logits are what the loss was built for.
    fn check(&self, rows: usize, vocab: usize) -> Result<()>;
    /// Row `r`'s term; with `grad = (scale, out)`, also `scale · ∂term/∂logits_r` into `out`.
    fn row(&self, r: usize, logits: &[f32], grad: Option<(f32, &mut [f32])>) -> f64;
    /// The factor in front of the mean (`T²` for distillation).
    fn factor(&self) -> f32 {
        1.0
    }
}

/// The candle op of a [`RowLoss`]: a scalar.
pub struct MeanOverRows<L>(pub L);

/// `loss` of `logits` as a differentiable scalar.
pub fn mean_over_rows<L: RowLoss + 'static>(logits: &Tensor, loss: L) -> Result<Tensor> {
    logits.apply_op1(MeanOverRows(loss))
}

impl<L: RowLoss> CustomOp1 for MeanOverRows<L> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: logits must be contiguous", self.0.name())
        };
        self.0.check(rows, vocab)?;
        let logits = &s.as_slice::<f32>()?[lo..hi];
        let total: f64 = logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(r, row)| self.0.row(r, row, None))
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let mean = self.0.factor() as f64 * total / rows as f64;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let g = grad.to_scalar::<f32>()? * self.0.factor() / rows as f32;
        let logits = logits.contiguous()?;
        let x = super::ops::view(&logits)?;
        let x = x.slice();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .enumerate()
            .for_each(|(r, (o, row))| {
                self.0.row(r, row, Some((g, o)));
            });
        Ok(Some(Tensor::from_vec(out, (rows, vocab), logits.device())?))
    }
}

/// Next-token cross-entropy `logsumexp(logits_r) − logits_r[target_r]`.
pub struct CrossEntropy {
    pub targets: Vec<u32>,
}

impl RowLoss for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn check(&self, rows: usize, vocab: usize) -> Result<()> {
        if self.targets.len() != rows || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!(
                "cross-entropy: {} targets for {rows} rows of {vocab}",
                self.targets.len()
            );
        }
        Ok(())
    }

    fn row(&self, r: usize, logits: &[f32], grad: Option<(f32, &mut [f32])>) -> f64 {
        let (t, lse) = (self.targets[r] as usize, logsumexp(logits));
        if let Some((scale, out)) = grad {
            // softmax − one-hot
            exp_shift_scale(logits, lse, scale, out);
            out[t] -= scale;
        }
        (lse - logits[t]) as f64
    }
}
