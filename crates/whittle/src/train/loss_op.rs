//! Mean next-token cross-entropy as one candle op. Written with primitives it makes a dozen
//! passes over the `[tokens, vocab]` logits (max, subtract, exp, sum, log, gather, and as many
//! in backward), each allocating a tensor as large as the logits: with SmolLM2's 49k vocabulary
//! that dominated a small model's training step. Fused: one pass forward (row max and
//! log-sum-exp) and one backward (`softmax − one-hot`), rows in parallel.

use crate::kernels::exp::{exp_shift_scale, logsumexp};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `mean_r (logsumexp(logits_r) − logits_r[target_r])` over rows `r` of `[rows, vocab]` logits.
pub struct CrossEntropy {
    pub targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: logits must be contiguous")
        };
        if self.targets.len() != rows || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!(
                "cross-entropy: {} targets for {rows} rows of {vocab}",
                self.targets.len()
            );
        }
        let logits = &s.as_slice::<f32>()?[lo..hi];
        let total: f64 = logits
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| (logsumexp(row) - row[t as usize]) as f64)
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / rows as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let g = grad.to_scalar::<f32>()? / rows as f32;
        let x = logits.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .zip(self.targets.par_iter())
            .for_each(|((o, row), &t)| {
                exp_shift_scale(row, logsumexp(row), g, o);
                o[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(out, (rows, vocab), logits.device())?))
    }
}
