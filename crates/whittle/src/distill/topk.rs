//! A teacher's next-token distribution kept sparse: its `k` largest logits and the log-sum-exp
//! of all the others, a few hundred bytes per token instead of a 49k-float row, so teacher
//! logits can be computed once and reused by every student run. Logit distillation against it
//! compares `k + 1` buckets: the teacher's top-k tokens one by one, and everything else as one
//! bucket whose student mass is `1 − Σ_topk q`.
//!
//! At temperature `T ≠ 1` the rest bucket's logit is taken as `lse_rest / T` (as if the rest were
//! one token): exact at `T = 1`, an approximation otherwise, because the other logits are not
//! kept.

use crate::kernels::exp::logsumexp;
use crate::train::loss_op::RowLoss;
use crate::train::objective::dist;
use crate::{Error, Result};

/// Top-k logits per token: `ids` and `logits` are `[rows, k]`, `rest` is `[rows]`
/// (`-inf` when `k` is the whole vocabulary).
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub vocab: usize,
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub rest: Vec<f32>,
}

impl TopK {
    /// Keeps the `k` largest of each `vocab`-wide row of `logits`.
    pub fn from_logits(logits: &[f32], vocab: usize, k: usize) -> Result<Self> {
        if k == 0 || k > vocab || vocab == 0 || !logits.len().is_multiple_of(vocab) {
            return Err(Error::Invalid(format!(
                "top-k teacher: k = {k} of a {vocab}-token vocabulary ({} logits)",
                logits.len()
            )));
        }
        let rows = logits.len() / vocab;
        let mut out = TopK {
            k,
            vocab,
            ids: Vec::with_capacity(rows * k),
            logits: Vec::with_capacity(rows * k),
            rest: Vec::with_capacity(rows),
        };
        // Any permutation serves the next row's selection: `order` is never reset.
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        let mut others = Vec::with_capacity(vocab - k);
        for row in logits.chunks_exact(vocab) {
            order.select_nth_unstable_by(k - 1, |a, b| {
                row[*b as usize].total_cmp(&row[*a as usize])
            });
            let top = &mut order[..k];
            top.sort_unstable();
            out.ids.extend_from_slice(top);
            out.logits.extend(top.iter().map(|&i| row[i as usize]));
            others.clear();
            others.extend(order[k..].iter().map(|&i| row[i as usize]));
            out.rest.push(if others.is_empty() {
                f32::NEG_INFINITY
            } else {
                logsumexp(&others)
            });
        }
        Ok(out)
    }

    fn rows(&self) -> usize {
        self.rest.len()
    }
}

/// `T² · mean_rows KL(p̂ ‖ q̂)` over the `k + 1` buckets, for student logits `[rows, vocab]`.
pub struct SparseDistillation {
    pub teacher: std::sync::Arc<TopK>,
    pub temperature: f32,
}

impl RowLoss for SparseDistillation {
    fn name(&self) -> &'static str {
        "sparse-logit-distillation"
    }

    fn check(&self, rows: usize, vocab: usize) -> candle_core::Result<()> {
        if rows != self.teacher.rows() || vocab != self.teacher.vocab {
            candle_core::bail!(
                "sparse distillation: teacher has {} rows of {}, student {rows} of {vocab}",
                self.teacher.rows(),
                self.teacher.vocab
            );
        }
        Ok(())
    }

    fn factor(&self) -> f32 {
        self.temperature * self.temperature
    }

    /// The row's divergence; with `grad`, `scale · ∂KL/∂s` into `out`.
    fn row(&self, r: usize, student: &[f32], grad: Option<(f32, &mut [f32])>) -> f64 {
        let (t, k) = (self.temperature, self.teacher.k);
        let ids = &self.teacher.ids[r * k..(r + 1) * k];
        // Teacher buckets: top-k, then the rest (absent when k is the vocabulary).
        let mut buckets = self.teacher.logits[r * k..(r + 1) * k].to_vec();
        let rest = self.teacher.rest[r];
        let has_rest = rest.is_finite();
        if has_rest {
            buckets.push(rest);
        }
        let p = dist(&buckets, t);
        // Student: full softmax, then bucketed.
        let q = dist(student, t);
        let q_top: f64 = ids.iter().map(|&i| q.prob[i as usize] as f64).sum();
        let q_rest = (1.0 - q_top).max(1e-30);
        let mut d: f64 = ids
            .iter()
            .zip(p.prob.iter().zip(&p.log))
            .map(|(&i, (pb, lp))| *pb as f64 * (*lp as f64 - q.log[i as usize] as f64))
            .sum();
        let p_rest = if has_rest { p.prob[k] as f64 } else { 0.0 };
        if p_rest > 0.0 {
            d += p_rest * (p.log[k] as f64 - q_rest.ln());
        }
        if let Some((scale, out)) = grad {
            // ∂KL/∂s_j = (q_j − p_j) / T on the top-k, q_j (1 − p_rest / q_rest) / T elsewhere.
            let s = scale / t;
            let rest_factor = (1.0 - p_rest / q_rest) as f32;
            for (o, qj) in out.iter_mut().zip(&q.prob) {
                *o = s * qj * rest_factor;
            }
            for (&i, pb) in ids.iter().zip(&p.prob) {
                out[i as usize] = s * (q.prob[i as usize] - pb);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::objective::{Divergence, LogitDistillation};
    use candle_core::{Device, Var};

    fn data(rows: usize, vocab: usize) -> (Vec<f32>, Vec<f32>) {
        let s = (0..rows * vocab)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4)
            .collect();
        let t = (0..rows * vocab)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.5)
            .collect();
        (s, t)
    }

    fn loss_and_grad(
        op: impl RowLoss + 'static,
        s: &[f32],
        rows: usize,
        vocab: usize,
    ) -> (f32, Vec<f32>) {
        let var = Var::from_vec(s.to_vec(), (rows, vocab), &Device::Cpu).unwrap();
        let loss = crate::train::loss_op::mean_over_rows(var.as_tensor(), op).unwrap();
        let g = crate::train::grad_of(&loss, &var);
        (loss.to_scalar::<f32>().unwrap(), g)
    }

    #[test]
    fn the_whole_vocabulary_as_top_k_is_the_dense_kl() {
        let (rows, vocab) = (3, 9);
        let (s, t) = data(rows, vocab);
        for temperature in [1.0f32, 2.0] {
            let top = TopK::from_logits(&t, vocab, vocab).unwrap();
            let sparse = SparseDistillation {
                teacher: std::sync::Arc::new(top),
                temperature,
            };
            let dense = LogitDistillation {
                teacher: std::sync::Arc::new(t.clone()),
                divergence: Divergence::ForwardKl,
                temperature,
            };
            let (a, ga) = loss_and_grad(sparse, &s, rows, vocab);
            let (b, gb) = loss_and_grad(dense, &s, rows, vocab);
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn top_k_buckets_match_their_definition_and_gradient() {
        let (rows, vocab, k) = (2, 10, 3);
        let (s, t) = data(rows, vocab);
        let top = TopK::from_logits(&t, vocab, k).unwrap();
        // The kept ids are the k largest of each row.
        for r in 0..rows {
            let row = &t[r * vocab..(r + 1) * vocab];
            let min_kept = top.ids[r * k..(r + 1) * k]
                .iter()
                .map(|&i| row[i as usize])
                .fold(f32::MAX, f32::min);
            let above = row.iter().filter(|v| **v > min_kept).count();
            assert!(above < k);
        }
        // KL over buckets in f64 at T = 1, where the rest bucket is exact.
        let f = |x: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    let row_t: Vec<f64> = t[r * vocab..(r + 1) * vocab]
                        .iter()
                        .map(|v| *v as f64)
                        .collect();
                    let row_s = &x[r * vocab..(r + 1) * vocab];
                    let soft = |z: &[f64]| {
                        let m = z.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
                    };
                    let (p, q) = (soft(&row_t), soft(row_s));
                    let ids = &top.ids[r * k..(r + 1) * k];
                    let (mut pt, mut qt, mut d) = (0.0, 0.0, 0.0);
                    for &i in ids {
                        let (pi, qi) = (p[i as usize], q[i as usize]);
                        d += pi * (pi / qi).ln();
                        pt += pi;
                        qt += qi;
                    }
                    d + (1.0 - pt) * ((1.0 - pt) / (1.0 - qt)).ln()
                })
                .sum::<f64>()
                / rows as f64
        };
        let op = SparseDistillation {
            teacher: std::sync::Arc::new(top.clone()),
            temperature: 1.0,
        };
        let (got, g) = loss_and_grad(op, &s, rows, vocab);
        let x: Vec<f64> = s.iter().map(|v| *v as f64).collect();
        assert!((got as f64 - f(&x)).abs() < 1e-5, "{got} vs {}", f(&x));
        for i in 0..x.len() {
            let h = 1e-6;
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (f(&up) - f(&down)) / (2.0 * h);
            assert!((g[i] as f64 - fd).abs() < 1e-4, "[{i}] {} vs {fd}", g[i]);
        }
        assert!(TopK::from_logits(&t, vocab, 0).is_err());
        assert!(TopK::from_logits(&t, vocab, vocab + 1).is_err());
    }
}
