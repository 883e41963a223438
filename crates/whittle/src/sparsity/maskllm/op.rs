//! The differentiable soft mask: `W ⊙ M` with `M` sampled from the mask logits by a
//! Gumbel-softmax, as one candle op. Written with candle's primitives it would keep the noise,
//! the probabilities and the mask of every linear until the backward pass (six values per
//! group, 640 MB each for the 135M model); fused, it keeps only its inputs and output: the
//! backward pass regenerates the same noise from the counter-based seed and recomputes the
//! probabilities.
//!
//! The sparse-weight regulariser `− λ Σ ‖W ⊙ M‖²` is folded in: its gradient with respect to
//! the mask, from `− 2λ W ⊙ M`, is added to the incoming one, and its value is summed into
//! [`MaskedWeight::sum_sq`] for the log (the loss tensor itself carries only the LM or
//! distillation term). As in the paper's code, the regulariser sees the weights detached: it
//! steers which weights a mask keeps, never the weights themselves.

use super::Candidates;
use crate::kernels::gumbel::{group_softmax_at, gumbel_logits_at};
use crate::kernels::simd::{self, Level};
use crate::train::mix;
use crate::train::ops::{contiguous, view};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One sampling of the soft mask of one linear.
#[derive(Clone)]
pub struct MaskedWeight {
    pub candidates: Arc<Candidates>,
    pub tau: f32,
    pub kappa: f32,
    /// Seed of this linear's Gumbel noise in this micro-batch (forward and backward agree).
    pub seed: u64,
    /// λ of the regulariser at this step.
    pub reg: f32,
    /// `Σ ‖W ⊙ M‖²` of the forward passes, as f64 bits (shared by every linear of a step).
    pub sum_sq: Arc<AtomicU64>,
}

/// Adds `v` to an f64 kept as bits in an atomic.
fn add_f64(a: &AtomicU64, v: f64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some((f64::from_bits(b) + v).to_bits())
    });
}

impl MaskedWeight {
    /// The 32-bit key of this sampling's noise.
    fn key(&self) -> u32 {
        let h = mix(self.seed);
        (h >> 32) as u32 ^ h as u32
    }

    /// The candidates' probabilities of every group of row `r` (`logits` its values) into `p`,
    /// and the soft mask of its inputs into `mask`.
    fn soft_row(&self, at: &RowContext, r: usize, logits: &[f32], p: &mut [f32], mask: &mut [f32]) {
        let (k, m) = (self.candidates.len(), self.candidates.m);
        let first = (r * logits.len()) as u32;
        gumbel_logits_at(
            at.level,
            logits,
            at.key,
            first,
            self.kappa,
            1.0 / self.tau,
            p,
        );
        group_softmax_at(at.level, p, k);
        for (pg, mg) in p.chunks_exact(k).zip(mask.chunks_exact_mut(m)) {
            mg.fill(0.0);
            for (pi, t) in pg.iter().zip(at.table.chunks_exact(m)) {
                for (mj, tj) in mg.iter_mut().zip(t) {
                    *mj += pi * tj;
                }
            }
        }
    }

    /// What every row of one call shares.
    fn row_context(&self) -> RowContext {
        let c = &self.candidates;
        RowContext {
            level: simd::level(),
            key: self.key(),
            table: (0..c.len())
                .flat_map(|k| (0..c.m).map(move |j| (k, j)))
                .map(|(k, j)| if c.keeps(k, j) { 1.0 } else { 0.0 })
                .collect(),
        }
    }

    fn shapes(&self, w: &Shape, l: &Shape) -> Result<(usize, usize)> {
        let (rows, cols) = w.dims2()?;
        let c = &self.candidates;
        if l.dims() != [rows, cols / c.m, c.len()] || !cols.is_multiple_of(c.m) {
            candle_core::bail!(
                "mask logits {:?} for a weight {:?} ({}:{} has {} candidates)",
                l.dims(),
                w.dims(),
                c.n,
                c.m,
                c.len()
            );
        }
        Ok((rows, cols))
    }
}

/// The SIMD level (resolved on the calling thread, so that a forced level reaches the
/// workers), the noise key, and the candidates as a 0/1 table `[candidates, m]`.
struct RowContext {
    level: Level,
    key: u32,
    table: Vec<f32>,
}

/// Per-worker buffers of one row: probabilities and soft mask.
fn scratch(pn: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    (vec![0f32; pn], vec![0f32; cols])
}

impl CustomOp2 for MaskedWeight {
    fn name(&self) -> &'static str {
        "masked-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = self.shapes(l1.shape(), l2.shape())?;
        let w = contiguous(s1, l1, "masked-weight")?;
        let logits = contiguous(s2, l2, "masked-weight")?;
        let pn = cols / self.candidates.m * self.candidates.len();
        let at = self.row_context();
        let mut out = vec![0f32; rows * cols];
        let sum_sq: f64 = crate::threads::install(|| {
            out.par_chunks_mut(cols)
                .zip(w.par_chunks(cols))
                .enumerate()
                .map_init(
                    || scratch(pn, cols),
                    |(p, mask), (r, (o, w))| {
                        self.soft_row(&at, r, &logits[r * pn..][..pn], p, mask);
                        let mut sq = 0f64;
                        for ((o, w), mk) in o.iter_mut().zip(w).zip(mask.iter()) {
                            *o = w * mk;
                            sq += (*o * *o) as f64;
                        }
                        sq
                    },
                )
                .sum()
        });
        add_f64(&self.sum_sq, sum_sq);
        Ok((CpuStorage::F32(out), Shape::from((rows, cols))))
    }

    /// `dL/dlogit_k = (κ/τ) p_k (dp_k − Σ_i p_i dp_i)` with `dp_k = Σ_{j kept by k} d_j w_j`,
    /// `d = dy − 2λ W ⊙ M`; `dW = dy ⊙ M` when the weights train too.
    fn bwd(
        &self,
        w: &Tensor,
        logits: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, cols) = self.shapes(w.shape(), logits.shape())?;
        let (m, k) = (self.candidates.m, self.candidates.len());
        let groups = cols / m;
        let (w, logits, dy) = (w.contiguous()?, logits.contiguous()?, dy.contiguous()?);
        let (wv, lv, gv) = (view(&w)?, view(&logits)?, view(&dy)?);
        let (wv, lv, gv) = (wv.slice(), lv.slice(), gv.slice());
        let weights_train = w.track_op();
        let mut dl = vec![0f32; rows * groups * k];
        let mut dw = vec![0f32; if weights_train { rows * cols } else { 0 }];
        let scale = self.kappa / self.tau;
        let cx = self.row_context();
        let pn = groups * k;
        let row =
            |r: usize, dl: &mut [f32], dw: &mut [f32], (p, mask): &mut (Vec<f32>, Vec<f32>)| {
                self.soft_row(&cx, r, &lv[r * pn..][..pn], p, mask);
                for g in 0..groups {
                    let at = r * cols + g * m;
                    // e_j = ∂L/∂mask_j: the incoming gradient and the regulariser's, times w_j.
                    let mut e = [0f32; super::MAX_GROUP];
                    for j in 0..m {
                        let mj = mask[g * m + j];
                        e[j] = (gv[at + j] - 2.0 * self.reg * wv[at + j] * mj) * wv[at + j];
                        if !dw.is_empty() {
                            dw[g * m + j] = gv[at + j] * mj;
                        }
                    }
                    let (dl, p) = (&mut dl[g * k..][..k], &p[g * k..][..k]);
                    let mut dot = 0f32;
                    for ((dli, pi), t) in dl.iter_mut().zip(p).zip(cx.table.chunks_exact(m)) {
                        *dli = t.iter().zip(&e).map(|(t, e)| t * e).sum();
                        dot += pi * *dli;
                    }
                    for (dli, pi) in dl.iter_mut().zip(p) {
                        *dli = scale * pi * (*dli - dot);
                    }
                }
            };
        let init = || scratch(pn, cols);
        crate::threads::install(|| {
            if weights_train {
                dl.par_chunks_mut(pn)
                    .zip(dw.par_chunks_mut(cols))
                    .enumerate()
                    .for_each_init(init, |s, (r, (dl, dw))| row(r, dl, dw, s));
            } else {
                dl.par_chunks_mut(pn)
                    .enumerate()
                    .for_each_init(init, |s, (r, dl)| row(r, dl, &mut [], s));
            }
        });
        let dw = match weights_train {
            true => Some(Tensor::from_vec(dw, (rows, cols), w.device())?),
            false => None,
        };
        Ok((
            dw,
            Some(Tensor::from_vec(dl, logits.shape(), logits.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn op(reg: f32) -> MaskedWeight {
        MaskedWeight {
            candidates: Arc::new(Candidates::new(2, 4).unwrap()),
            tau: 0.7,
            kappa: 3.0,
            seed: 11,
            reg,
            sum_sq: Arc::new(AtomicU64::new(0f64.to_bits())),
        }
    }

    fn lcg(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The forward pass against the formula written out with candle's primitives (the same
    /// noise), and each group's soft mask keeping exactly n = 2 inputs' worth of probability.
    #[test]
    fn forward_matches_the_gumbel_softmax_formula() {
        let (rows, cols) = (3, 8);
        let o = op(0.0);
        let w = Tensor::from_vec(lcg(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let l = Tensor::from_vec(lcg(rows * 2 * 6, 2), (rows, 2, 6), &Device::Cpu).unwrap();
        let y = w.apply_op2(&l, o.clone()).unwrap();
        let mut noise = vec![0f32; rows * 2 * 6];
        crate::kernels::gumbel::gumbel_logits(&noise.clone(), o.key(), 0, 0.0, 1.0, &mut noise);
        let noise = Tensor::from_vec(noise, (rows, 2, 6), &Device::Cpu).unwrap();
        let z = ((l * 3.0).unwrap() + noise)
            .unwrap()
            .affine(1.0 / 0.7, 0.0)
            .unwrap();
        let e = z
            .broadcast_sub(&z.max_keepdim(2).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap();
        let c = Candidates::new(2, 4).unwrap();
        let table: Vec<f32> = (0..6)
            .flat_map(|k| (0..4).map(move |j| (k, j)))
            .map(|(k, j)| if c.keeps(k, j) { 1.0 } else { 0.0 })
            .collect();
        let table = Tensor::from_vec(table, (6, 4), &Device::Cpu).unwrap();
        let mask = p.reshape((rows * 2, 6)).unwrap().matmul(&table).unwrap();
        let sums = mask.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 2.0).abs() < 1e-5), "{sums:?}");
        let want = (w.reshape((rows * 2, 4)).unwrap() * mask).unwrap();
        let got = y.reshape((rows * 2, 4)).unwrap();
        let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    /// Gradients of `Σ c ⊙ (W ⊙ M) − λ Σ (W ⊙ M)²` for the logits, and of the first term (the
    /// regulariser's weights are detached) for the weights, against central finite differences
    /// (the noise is fixed by the seed, so the loss is smooth).
    #[test]
    fn gradients_match_finite_differences() {
        let (rows, cols) = (2, 8);
        let o = op(0.3);
        let wv = lcg(rows * cols, 3);
        let lv = lcg(rows * 2 * 6, 4);
        let c = Tensor::from_vec(lcg(rows * cols, 5), (rows, cols), &Device::Cpu).unwrap();
        let loss = |w: &Tensor, l: &Tensor| -> (Tensor, f64, f64) {
            let y = w.apply_op2(l, o.clone()).unwrap();
            let lin = (y.clone() * &c).unwrap().sum_all().unwrap();
            let reg = y
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let lin_value = lin.to_scalar::<f32>().unwrap() as f64;
            (lin, lin_value, reg)
        };
        let w = Var::from_vec(wv.clone(), (rows, cols), &Device::Cpu).unwrap();
        let l = Var::from_vec(lv.clone(), (rows, 2, 6), &Device::Cpu).unwrap();
        let (lin, _, _) = loss(w.as_tensor(), l.as_tensor());
        let g = lin.backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (gw, gl) = (flat(g.get(&w).unwrap()), flat(g.get(&l).unwrap()));
        let eps = 1e-2f32;
        let numeric = |vals: &[f32], i: usize, is_w: bool| {
            let at = |d: f32| {
                let mut v = vals.to_vec();
                v[i] += d;
                let (wt, lt) = if is_w {
                    (v, lv.clone())
                } else {
                    (wv.clone(), v)
                };
                let wt = Tensor::from_vec(wt, (rows, cols), &Device::Cpu).unwrap();
                let lt = Tensor::from_vec(lt, (rows, 2, 6), &Device::Cpu).unwrap();
                let (_, lin, reg) = loss(&wt, &lt);
                match is_w {
                    true => lin,
                    false => lin - 0.3 * reg,
                }
            };
            ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32
        };
        for (i, g) in gl.iter().enumerate() {
            let n = numeric(&lv, i, false);
            assert!((g - n).abs() < 2e-3 + 2e-2 * n.abs(), "logit {i}: {g} {n}");
        }
        for (i, g) in gw.iter().enumerate() {
            let n = numeric(&wv, i, true);
            assert!((g - n).abs() < 2e-3 + 2e-2 * n.abs(), "weight {i}: {g} {n}");
        }
    }

    /// A frozen weight (a plain tensor) gets no gradient computed; the logits still do.
    #[test]
    fn frozen_weights_get_no_gradient() {
        let w = Tensor::from_vec(lcg(16, 6), (2, 8), &Device::Cpu).unwrap();
        let l = Var::from_vec(lcg(24, 7), (2, 2, 6), &Device::Cpu).unwrap();
        let y = w.apply_op2(l.as_tensor(), op(0.0)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none() && g.get(&l).is_some());
        let bad = Tensor::zeros((2, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(w.apply_op2(&bad, op(0.0)).is_err());
    }
}
