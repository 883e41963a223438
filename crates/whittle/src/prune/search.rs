//! Automatic architecture choice under a parameter budget (`--target-params`, as ModelOpt's
//! Minitron mode): enumerate uniform width/depth candidates (hidden and MLP widths multiples of
//! 64, whole query heads per KV group, whole blocks dropped by the depth metric; the hidden size
//! a multiple of the query heads, so that transformers loads the result), keep the ones
//! closest below the budget, prune a copy of the model to each and score it by the KL divergence
//! of its next-token distributions from the dense model's on a held-out slice; the lowest wins.

use super::importance::Scores;
use super::width::WidthTarget;
use super::{prune_model, DepthMetric, PruneSpec};
use crate::kernels::exp::logsumexp;
use crate::{Error, Model, Result};
use serde::Serialize;

/// Widths move in steps of this many channels / neurons (kernel- and tile-friendly); models
/// narrower than four steps use a quarter of their width.
pub const STEP: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    pub hidden: usize,
    pub ffn: usize,
    pub heads_per_group: usize,
    pub drop_blocks: usize,
    pub params: usize,
    /// Mean KL(dense ‖ candidate) per token on the held-out slice, once scored.
    pub kl: Option<f64>,
}

impl Candidate {
    pub fn spec(&self, model: &Model, metric: DepthMetric) -> PruneSpec {
        let l0 = model.layers[0].shape();
        let keep = |now: Option<usize>, want: usize| (now != Some(want)).then_some(want);
        PruneSpec {
            width: WidthTarget {
                hidden: keep(Some(model.config.hidden), self.hidden),
                ffn: keep(l0.mlp, self.ffn),
                heads_per_group: keep(
                    l0.attn.map(|a| a.n_heads / a.n_kv_heads),
                    self.heads_per_group,
                ),
            },
            units: vec![],
            drop_blocks: self.drop_blocks,
            drop_attn: 0,
            drop_mlp: 0,
            metric,
            emulate: super::emulate::EmulateKind::None,
        }
    }
}

/// Every uniform candidate of at most `budget` parameters, the largest first (at most `keep`).
pub fn candidates(model: &Model, budget: usize, keep: usize) -> Result<Vec<Candidate>> {
    if let Some(why) = model.irregularity() {
        return Err(Error::Invalid(format!(
            "--target-params searches plain Llama models; this one is not: {why}"
        )));
    }
    let c = &model.config;
    let s = model.layers[0].shape();
    let (a, ffn) = match (s.attn, s.mlp) {
        (Some(a), Some(f)) => (a, f),
        _ => unreachable!("a plain Llama has attention and MLP in every layer"),
    };
    let group = a.n_heads / a.n_kv_heads;
    let n = model.layers.len();
    let widths = |max: usize| -> Vec<usize> {
        let step = STEP.min(max / 4).max(1);
        let mut v: Vec<usize> = (1..=max / step).map(|k| k * step).collect();
        if !max.is_multiple_of(step) {
            v.push(max);
        }
        v
    };
    let heads = c.vocab_size * if c.tie_embeddings { 1 } else { 2 };
    let mut out = Vec::new();
    for h in widths(c.hidden) {
        for f in widths(ffn) {
            for g in 1..=group {
                // transformers' LlamaConfig wants the hidden size a multiple of the heads.
                if !h.is_multiple_of(a.n_kv_heads * g) {
                    continue;
                }
                let q = a.n_kv_heads * g * a.head_dim;
                let layer = 2 * h + 2 * h * q + 2 * h * a.kv_dim() + 3 * h * f;
                for drop in 0..=n / 2 {
                    let params = heads * h + h + (n - drop) * layer;
                    if params <= budget {
                        out.push(Candidate {
                            hidden: h,
                            ffn: f,
                            heads_per_group: g,
                            drop_blocks: drop,
                            params,
                            kl: None,
                        });
                        break; // more dropped blocks only move further below the budget
                    }
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "no uniform candidate fits in {budget} parameters (the model has {})",
            model.n_params()
        )));
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.params));
    out.truncate(keep);
    Ok(out)
}

/// Mean per-token KL(p ‖ q) between two models' next-token distributions over `windows`.
pub fn kl_divergence(p: &Model, q: &Model, windows: &[&[u32]]) -> Result<f64> {
    let vocab = p.config.vocab_size;
    let (mut sum, mut n) = (0f64, 0usize);
    for w in windows {
        let lp = p.forward(w, None, crate::model::Logits::All, None)?;
        let lq = q.forward(w, None, crate::model::Logits::All, None)?;
        for (a, b) in lp.chunks_exact(vocab).zip(lq.chunks_exact(vocab)) {
            let (za, zb) = (logsumexp(a) as f64, logsumexp(b) as f64);
            sum += a
                .iter()
                .zip(b)
                .map(|(&x, &y)| {
                    let lx = x as f64 - za;
                    lx.exp() * (lx - (y as f64 - zb))
                })
                .sum::<f64>();
            n += 1;
        }
    }
    Ok(sum / n.max(1) as f64)
}

/// Scores the top `keep` candidates under `budget` on `slice`; sorted best (lowest KL) first.
/// `progress(done, total)` after each candidate.
pub fn search(
    model: &Model,
    scores: &Scores,
    budget: usize,
    keep: usize,
    metric: DepthMetric,
    slice: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Candidate>> {
    scores.fingerprint.check(model, "the importance scores")?;
    let mut cands = candidates(model, budget, keep)?;
    let total = cands.len();
    for (i, c) in cands.iter_mut().enumerate() {
        let mut m = model.clone();
        prune_model(&mut m, scores, &c.spec(model, metric), &[], &mut |_, _| {})?;
        debug_assert_eq!(m.n_params(), c.params);
        c.kl = Some(kl_divergence(model, &m, slice)?);
        progress(i + 1, total);
    }
    cands.sort_by(|a, b| {
        a.kl.unwrap_or(f64::MAX)
            .total_cmp(&b.kl.unwrap_or(f64::MAX))
    });
    Ok(cands)
}
