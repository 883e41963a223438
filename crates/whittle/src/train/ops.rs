//! The training graph's hot layers as single candle ops with hand-written backward passes:
//! causal GQA attention (bidirectional for the ViT), RMSNorm, LayerNorm, SwiGLU, GELU and
//! rotary embedding. Written with candle's primitives, each is a chain of elementwise ops
//! whose every intermediate autograd keeps until the backward pass: attention alone kept five
//! `[B, heads, T, T]` score tensors per layer, and the 135M model at batch 8 × 512 needed
//! 24 GB. Fused, an op keeps only its inputs and output (attention recomputes its
//! probabilities per head in backward, as FlashAttention does), and the forward passes reuse
//! the inference kernels.
//!
//! Every op works on contiguous f32 rows; the tests compare values and gradients with the
//! primitive formulas.

use super::grad_sink::GradSink;
use crate::kernels::activation::{gelu, gelu_backward, swiglu_backward, swiglu_in_place};
use crate::kernels::attention::{causal_attention, Mask};
use crate::kernels::exp::softmax_in_place;
use crate::kernels::matmul::{gemm, matmul_nn, matmul_t_at, matmul_tn, Precision};
use crate::kernels::norm::{layer_norm, moments, rms_norm};
use crate::model::AttnShape;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::sync::Arc;

/// The values of a contiguous f32 input.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(&s.as_slice::<f32>()?[lo..hi]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

fn row_major(x: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(x, r, c)
}

/// A tensor's f32 values borrowed from its storage: backward passes read activations as large
/// as the logits (800 MB at batch 8 × 512), which a copy would double.
pub(crate) struct View<G> {
    guard: G,
    lo: usize,
    hi: usize,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> View<G> {
    pub(crate) fn slice(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[self.lo..self.hi],
            _ => unreachable!("checked by view"),
        }
    }
}

/// A view of a contiguous f32 CPU tensor (make it contiguous first).
pub(crate) fn view(
    t: &Tensor,
) -> Result<View<impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((lo, hi)) = layout.contiguous_offsets() else {
        candle_core::bail!("view of a non-contiguous tensor")
    };
    if !matches!(&*guard, candle_core::Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("training ops run on f32 CPU tensors");
    }
    Ok(View { guard, lo, hi })
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `y = x · Wᵀ` for `x [rows, in]` and `W [out, in]`, on whittle's kernels: the forward pass is
/// the inference product (AMX tiles where the CPU has them), the backward passes `dx = dy W` and
/// `dW = dyᵀ x` ([`matmul_tn`]) are row-parallel GEMMs at the dispatched SIMD level. candle's own
/// CPU matmul uses AVX2 kernels on every x86 CPU; this was half of a training step on AVX-512.
/// With a sink, `dW` is added to it and candle gets no gradient for `W` (see [`GradSink`]).
/// At [`Precision::Bf16x3`] all three products run on AMX tiles with three bf16 products each
/// (f32 GEMMs where the CPU has no AMX).
#[derive(Default)]
pub struct Linear {
    pub sink: Option<Arc<GradSink>>,
    pub precision: Precision,
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous(s1, l1, "linear")?, contiguous(s2, l2, "linear")?);
        let (rows, inp) = l1.shape().dims2()?;
        let (out, win) = l2.shape().dims2()?;
        if win != inp {
            candle_core::bail!("linear: input {:?} for weight {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; rows * out];
        crate::threads::install(|| matmul_t_at(x, w, (rows, inp, out), &mut y, self.precision));
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        let dy = dy.contiguous()?;
        let (xv, wv, gv) = (view(x)?, view(w)?, view(&dy)?);
        let (xv, wv, gv) = (xv.slice(), wv.slice(), gv.slice());
        // A frozen weight (no variable behind it) needs no gradient: skipping `dW` halves the
        // backward cost of every frozen linear (adapter training, frozen MLPs).
        let weight_grad = w.track_op();
        let mut dx = vec![0f32; rows * inp];
        let dims = (rows, out, inp);
        let p = self.precision;
        let dw = crate::threads::install(|| {
            matmul_nn(gv, wv, dims, &mut dx, p);
            match (&self.sink, weight_grad) {
                (_, false) => None,
                (Some(sink), true) => {
                    sink.accumulate(out * inp, |dw, acc| matmul_tn(gv, xv, dims, dw, (acc, p)));
                    None
                }
                (None, true) => {
                    let mut dw = vec![0f32; out * inp];
                    matmul_tn(gv, xv, dims, &mut dw, (Accum::Replace, p));
                    Some(dw)
                }
            }
        });
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
            .transpose()?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw))
    }
}

/// `y = x / rms(x) ⊙ w` over the last dimension.
pub struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            contiguous(s1, l1, "rms-norm")?,
            contiguous(s2, l2, "rms-norm")?,
        );
        if l1.shape().dims().last() != Some(&w.len()) {
            candle_core::bail!(
                "rms-norm: weight of {} for rows of {:?}",
                w.len(),
                l1.shape()
            );
        }
        let mut y = vec![0f32; x.len()];
        rms_norm(x, w, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With `g = dy ⊙ w` and `r = 1 / rms(x)`: `dx = r g − x r³ ⟨g, x⟩ / h`, `dw = Σ dy ⊙ x r`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (xv, wv, gv) = (view(x)?, view(w)?, view(&dy)?);
        let (xv, wv, gv) = (xv.slice(), wv.slice(), gv.slice());
        let h = wv.len();
        let eps = self.eps as f64;
        let (dx, [dw]) = norm_backward(xv, gv, h, |xr, gr, dxr, [dw]| {
            let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            let r = 1.0 / (ms + eps).sqrt();
            let dot: f64 = (0..h).map(|i| (gr[i] * wv[i]) as f64 * xr[i] as f64).sum();
            let c = r * r * r * dot / h as f64;
            for i in 0..h {
                dxr[i] = (r * (gr[i] * wv[i]) as f64 - xr[i] as f64 * c) as f32;
                dw[i] += gr[i] as f64 * xr[i] as f64 * r;
            }
        });
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

/// The backward pass of a row-wise norm over `h`-wide rows: `row(x, dy, dx, sums)` writes one
/// row's input gradient and adds its terms to the `K` per-channel sums (the parameters'
/// gradients). Chunks of rows run on the worker threads, each with its own f64 sums, added in
/// chunk order (the same result whatever the thread count).
fn norm_backward<const K: usize>(
    x: &[f32],
    dy: &[f32],
    h: usize,
    row: impl Fn(&[f32], &[f32], &mut [f32], &mut [Vec<f64>; K]) + Sync,
) -> (Vec<f32>, [Vec<f32>; K]) {
    let parts: Vec<(Vec<f32>, [Vec<f64>; K])> = x
        .par_chunks(h * 64)
        .zip(dy.par_chunks(h * 64))
        .map(|(xb, gb)| {
            let mut dx = vec![0f32; xb.len()];
            let mut sums = std::array::from_fn(|_| vec![0f64; h]);
            for ((xr, gr), dxr) in xb.chunks(h).zip(gb.chunks(h)).zip(dx.chunks_mut(h)) {
                row(xr, gr, dxr, &mut sums);
            }
            (dx, sums)
        })
        .collect();
    let mut total: [Vec<f64>; K] = std::array::from_fn(|_| vec![0f64; h]);
    let mut dx = Vec::with_capacity(x.len());
    for (part, sums) in parts {
        dx.extend(part);
        for (t, s) in total.iter_mut().zip(sums) {
            t.iter_mut().zip(s).for_each(|(t, v)| *t += v);
        }
    }
    (dx, total.map(|t| t.into_iter().map(|v| v as f32).collect()))
}

/// `y = (x − mean x) / sqrt(var x + eps) ⊙ w + b` over the last dimension (the ViT's norm).
pub struct LayerNorm {
    pub eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            contiguous(s1, l1, "layer-norm")?,
            contiguous(s2, l2, "layer-norm")?,
            contiguous(s3, l3, "layer-norm")?,
        );
        if l1.shape().dims().last() != Some(&w.len()) || b.len() != w.len() {
            candle_core::bail!(
                "layer-norm: weight of {} and bias of {} for rows of {:?}",
                w.len(),
                b.len(),
                l1.shape()
            );
        }
        let mut y = vec![0f32; x.len()];
        crate::threads::install(|| layer_norm(x, w, b, self.eps, &mut y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With `x̂ = (x − μ) r` and `g = dy ⊙ w`: `dx = r (g − mean g − x̂ · mean(g ⊙ x̂))`,
    /// `dw = Σ dy ⊙ x̂`, `db = Σ dy`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (xv, wv, gv) = (view(x)?, view(w)?, view(&dy)?);
        let (xv, wv, gv) = (xv.slice(), wv.slice(), gv.slice());
        let h = wv.len();
        let (dx, [dw, db]) = crate::threads::install(|| {
            norm_backward(xv, gv, h, |xr, gr, dxr, [dw, db]| {
                let (mean, r) = moments(xr, self.eps);
                let xhat = |i: usize| (xr[i] as f64 - mean) * r;
                let g = |i: usize| gr[i] as f64 * wv[i] as f64;
                let (mut mg, mut mgx) = (0f64, 0f64);
                for i in 0..h {
                    let (gi, xi) = (g(i), xhat(i));
                    (mg, mgx) = (mg + gi, mgx + gi * xi);
                    dw[i] += gr[i] as f64 * xi;
                    db[i] += gr[i] as f64;
                }
                let (mg, mgx) = (mg / h as f64, mgx / h as f64);
                for (i, d) in dxr.iter_mut().enumerate() {
                    *d = (r * (g(i) - mg - xhat(i) * mgx)) as f32;
                }
            })
        });
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `y = gelu(x)` with the exact normal CDF (the ViT's MLP).
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "gelu")?;
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        crate::threads::install(|| gelu(x, &mut y, width));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (xv, gv) = (view(x)?, view(&dy)?);
        let (xv, gv) = (xv.slice(), gv.slice());
        let mut dx = vec![0f32; xv.len()];
        const CHUNK: usize = 1 << 14;
        crate::threads::install(|| {
            dx.par_chunks_mut(CHUNK)
                .zip(xv.par_chunks(CHUNK).zip(gv.par_chunks(CHUNK)))
                .for_each(|(d, (x, g))| gelu_backward(x, g, d))
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `y = silu(gate) ⊙ up`.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous(s1, l1, "swiglu")?, contiguous(s2, l2, "swiglu")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?}", l1.shape(), l2.shape());
        }
        let width = l1.shape().dims().last().copied().unwrap_or(1);
        let mut y = g.to_vec();
        swiglu_in_place(&mut y, u, width);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gv, uv, dyv) = (view(g)?, view(u)?, view(&dy)?);
        let (gv, uv, dyv) = (gv.slice(), uv.slice(), dyv.slice());
        let (mut dg, mut du) = (vec![0f32; gv.len()], vec![0f32; gv.len()]);
        const BLOCK: usize = 1 << 14;
        dg.par_chunks_mut(BLOCK)
            .zip(du.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each(|(i, (dg, du))| {
                let r = i * BLOCK..i * BLOCK + dg.len();
                swiglu_backward(&gv[r.clone()], &uv[r.clone()], &dyv[r], dg, du);
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// Half-split rotary embedding of `x [B, T, heads·d]` at positions `0..T`, with tables
/// `cos`, `sin` `[T, d/2]`. Its backward is the rotation by the opposite angle.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
}

impl Rope {
    /// Rotates rows of `width` (`T` positions a sequence) in place by `sign · angle`
    /// (`sign = −1`: the inverse rotation).
    fn rotate(&self, x: &mut [f32], t: usize, width: usize, sign: f32) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        x.par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
            let pos = row % t;
            let (c, s) = (
                &self.cos[pos * half..(pos + 1) * half],
                &self.sin[pos * half..(pos + 1) * half],
            );
            for head in xr.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2, si) = (a[i], b[i], sign * s[i]);
                    a[i] = x1 * c[i] - x2 * si;
                    b[i] = x2 * c[i] + x1 * si;
                }
            }
        });
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "rope")?;
        let (_, t, w) = l.shape().dims3()?;
        if !w.is_multiple_of(self.head_dim) || self.cos.len() < t * self.head_dim / 2 {
            candle_core::bail!("rope: rows of {w} for heads of {}", self.head_dim);
        }
        let mut y = x.to_vec();
        self.rotate(&mut y, t, w, 1.0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, w) = x.dims3()?;
        let mut g = values(dy)?;
        self.rotate(&mut g, t, w, -1.0);
        Ok(Some(Tensor::from_vec(g, x.shape(), x.device())?))
    }
}

/// Causal (or, with [`Mask::BIDIRECTIONAL`], encoder) attention with grouped KV heads over
/// `q [B, T, heads·d]`, `k [B, T, kv·d]`, `v [B, T, kv·dv]` (rotary embedding already applied),
/// giving `[B, T, heads·dv]`: the layout the projections read and write, so no transposes.
pub struct Attention {
    pub shape: AttnShape,
    pub mask: Mask,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous(s1, l1, "attention")?,
            contiguous(s2, l2, "attention")?,
            contiguous(s3, l3, "attention")?,
        );
        let sh = self.shape;
        let (b, t, qw) = l1.shape().dims3()?;
        if qw != sh.n_heads * sh.head_dim
            || l2.shape().dims3()? != (b, t, sh.n_kv_heads * sh.head_dim)
            || l3.shape().dims3()? != (b, t, sh.n_kv_heads * sh.v_head_dim)
        {
            candle_core::bail!("attention: shapes {l1:?} {l2:?} {l3:?} for {sh:?}");
        }
        let od = sh.out_dim();
        let mut out = vec![0f32; b * t * od];
        let (qs, ks, vs) = (
            t * qw,
            t * sh.n_kv_heads * sh.head_dim,
            t * sh.n_kv_heads * sh.v_head_dim,
        );
        for (i, o) in out.chunks_exact_mut(t * od).enumerate() {
            let (qb, kb, vb) = (&q[i * qs..][..qs], &k[i * ks..][..ks], &v[i * vs..][..vs]);
            causal_attention(qb, kb, vb, t, t, sh, self.mask, o);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, od))))
    }

    /// Per (sequence, KV head): for each query head of the group, the probabilities `P` are
    /// recomputed, then `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`,
    /// `dQ = dS K / √d`, `dK += dSᵀ Q / √d`. Tasks own disjoint columns of the gradients.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sh = self.shape;
        let (b, t, _) = q.dims3()?;
        let (nh, nkv, d, dv) = (sh.n_heads, sh.n_kv_heads, sh.head_dim, sh.v_head_dim);
        let group = nh / nkv;
        let (qw, kw, vw, ow) = (nh * d, nkv * d, nkv * dv, nh * dv);
        let dout = dout.contiguous()?;
        let views = [view(q)?, view(k)?, view(v)?, view(o)?, view(&dout)?];
        let [qv, kv, vv, ov, gv] = views.each_ref().map(View::slice);
        let scale = 1.0 / (d as f32).sqrt();
        let mask = self.mask;
        // Strided columns `[col, col + n)` of every row of sequence `seq` in a `[B, T, w]` tensor.
        let gather = |x: &[f32], seq: usize, w: usize, col: usize, n: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|r| x[(seq * t + r) * w + col..][..n].iter().copied())
                .collect()
        };
        let mm = |dst: &mut [f32], m: usize, n: usize, a: MatRef<f32>, bm: MatRef<f32>| {
            gemm(
                MatMut::from_row_major_slice_mut(dst, m, n),
                Accum::Replace,
                a,
                bm,
                Par::Seq,
            )
        };
        type Grads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
        let tasks: Vec<Grads> = (0..b * nkv)
            .into_par_iter()
            .map(|job| {
                let (seq, kvh) = (job / nkv, job % nkv);
                let kh = gather(kv, seq, kw, kvh * d, d);
                let vh = gather(vv, seq, vw, kvh * dv, dv);
                let (mut dk, mut dvv) = (vec![0f32; t * d], vec![0f32; t * dv]);
                let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
                let mut tmp_k = vec![0f32; t * d];
                let mut tmp_v = vec![0f32; t * dv];
                let mut dqs = Vec::with_capacity(group);
                for g in 0..group {
                    let h = kvh * group + g;
                    let qh = gather(qv, seq, qw, h * d, d);
                    let oh = gather(ov, seq, ow, h * dv, dv);
                    let doh = gather(gv, seq, ow, h * dv, dv);
                    mm(
                        &mut p,
                        t,
                        t,
                        row_major(&qh, t, d),
                        row_major(&kh, t, d).transpose(),
                    );
                    for (i, row) in p.chunks_exact_mut(t).enumerate() {
                        let (hidden, end) = (mask.hidden(i), mask.end(i, t));
                        row[hidden.clone()].fill(f32::NEG_INFINITY);
                        softmax_in_place(&mut row[..end], scale);
                        row[hidden].fill(0.0);
                        row[end..].fill(0.0);
                    }
                    // dV += Pᵀ dO
                    mm(
                        &mut tmp_v,
                        t,
                        dv,
                        row_major(&p, t, t).transpose(),
                        row_major(&doh, t, dv),
                    );
                    dvv.iter_mut().zip(&tmp_v).for_each(|(a, b)| *a += b);
                    mm(
                        &mut dp,
                        t,
                        t,
                        row_major(&doh, t, dv),
                        row_major(&vh, t, dv).transpose(),
                    );
                    for i in 0..t {
                        let di: f32 = (0..dv).map(|c| doh[i * dv + c] * oh[i * dv + c]).sum();
                        let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                        for (x, pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - di) * scale;
                        }
                    }
                    // dQ = dS K, dK += dSᵀ Q (dS already carries 1/√d).
                    let mut dq = vec![0f32; t * d];
                    mm(&mut dq, t, d, row_major(&dp, t, t), row_major(&kh, t, d));
                    mm(
                        &mut tmp_k,
                        t,
                        d,
                        row_major(&dp, t, t).transpose(),
                        row_major(&qh, t, d),
                    );
                    dk.iter_mut().zip(&tmp_k).for_each(|(a, b)| *a += b);
                    dqs.push(dq);
                }
                (dqs, dk, dvv)
            })
            .collect();
        let (mut dq, mut dk, mut dvt) = (
            vec![0f32; b * t * qw],
            vec![0f32; b * t * kw],
            vec![0f32; b * t * vw],
        );
        for (job, (dqs, dkh, dvh)) in tasks.into_iter().enumerate() {
            let (seq, kvh) = (job / nkv, job % nkv);
            let scatter = |dst: &mut [f32], w: usize, col: usize, n: usize, src: &[f32]| {
                for r in 0..t {
                    dst[(seq * t + r) * w + col..][..n].copy_from_slice(&src[r * n..(r + 1) * n]);
                }
            };
            for (g, dqh) in dqs.iter().enumerate() {
                scatter(&mut dq, qw, (kvh * group + g) * d, d, dqh);
            }
            scatter(&mut dk, kw, kvh * d, d, &dkh);
            scatter(&mut dvt, vw, kvh * dv, dv, &dvh);
        }
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dvt, v.shape(), v.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn var(n: usize, shape: &[usize], seed: usize) -> Var {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.8)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Values and gradients (of `Σ y ⊙ c` for a fixed `c`) of a fused op against primitives.
    fn same(fused: &Tensor, reference: &Tensor, vars: &[&Var], what: &str) {
        let c = var(fused.elem_count(), fused.dims(), 5);
        let (a, b) = (values(fused).unwrap(), values(reference).unwrap());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{what}: values differ by {d}");
        let ga = (fused * c.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (reference * c.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (k, v) in vars.iter().enumerate() {
            let (x, y) = (
                values(ga.get(v).unwrap()).unwrap(),
                values(gb.get(v).unwrap()).unwrap(),
            );
            let d = x
                .iter()
                .zip(&y)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 2e-4, "{what}: gradient of input {k} differs by {d}");
        }
    }

    #[test]
    fn linear_matches_candle_matmul_at_every_level() {
        let (x, w) = (var(70 * 24, &[70, 24], 1), var(33 * 24, &[33, 24], 2));
        crate::kernels::simd::for_each_level(|level| {
            let fused = x
                .as_tensor()
                .apply_op2(w.as_tensor(), Linear::default())
                .unwrap();
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            same(
                &fused,
                &reference,
                &[&x, &w],
                &format!("linear at {level:?}"),
            );
        });
        // Two threads: the row split of the backward GEMMs.
        let fused = x
            .as_tensor()
            .apply_op2(w.as_tensor(), Linear::default())
            .unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap();
        same(&fused, &reference, &[&x, &w], "linear, threaded");
    }

    /// With a sink, two backward passes leave the sum of their weight gradients in it (the
    /// second added inside the product) and none in candle's store; the input's gradient is
    /// unchanged. A vocabulary-wide output takes the tile path of the weight gradient where the
    /// CPU has AMX.
    #[test]
    fn linear_with_a_sink_sums_its_weight_gradients() {
        for (rows, inp, out) in [(70, 24, 33), (40, 24, 8200)] {
            let (x, w) = (
                var(rows * inp, &[rows, inp], 1),
                var(out * inp, &[out, inp], 2),
            );
            crate::kernels::simd::for_each_level(|level| {
                let sink = Arc::new(GradSink::default());
                let mut want = vec![0f32; out * inp];
                for seed in [5, 6] {
                    let c = var(rows * out, &[rows, out], seed);
                    let loss = |op: Linear| {
                        let y = x.as_tensor().apply_op2(w.as_tensor(), op).unwrap();
                        (y * c.as_tensor())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap()
                    };
                    let plain = loss(Linear::default());
                    let sunk = loss(Linear {
                        sink: Some(sink.clone()),
                        ..Linear::default()
                    });
                    assert!(
                        sunk.get(&w).is_none(),
                        "{level:?}: candle got a weight gradient"
                    );
                    let dx = |g: &candle_core::backprop::GradStore| values(g.get(&x).unwrap());
                    assert_eq!(dx(&plain).unwrap(), dx(&sunk).unwrap());
                    let dw = values(plain.get(&w).unwrap()).unwrap();
                    want.iter_mut().zip(&dw).for_each(|(a, b)| *a += b);
                }
                let got = sink.take().unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{level:?}, out {out}: summed gradient off by {worst}"
                );
            });
        }
    }

    #[test]
    fn norms_and_activations_match_primitives() {
        let (x, w) = (var(3 * 5 * 16, &[3, 5, 16], 1), var(16, &[16], 2));
        let fused = x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 })
            .unwrap();
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let reference = x
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap();
        same(&fused, &reference, &[&x, &w], "rms-norm");
        // LayerNorm on rows with an offset (two chunks of the backward's row split).
        let x = var(3 * 50 * 16, &[3, 50, 16], 6);
        let x = Var::from_tensor(&(x.as_tensor() + 5.0).unwrap()).unwrap();
        let b = var(16, &[16], 7);
        let fused = x
            .as_tensor()
            .apply_op3(w.as_tensor(), b.as_tensor(), LayerNorm { eps: 1e-6 })
            .unwrap();
        let centred = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let std = (centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
            .unwrap()
            .sqrt()
            .unwrap();
        let reference = centred
            .broadcast_div(&std)
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        same(&fused, &reference, &[&x, &w, &b], "layer-norm");
        let (g, u) = (var(4 * 40, &[4, 40], 3), var(4 * 40, &[4, 40], 4));
        let fused = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap();
        let reference = (g.silu().unwrap() * u.as_tensor()).unwrap();
        same(&fused, &reference, &[&g, &u], "swiglu");
        let x = var(3 * 7 * 40, &[3, 7, 40], 8);
        let x = Var::from_tensor(&(x.as_tensor() * 4.0).unwrap()).unwrap();
        let fused = x.as_tensor().apply_op1(Gelu).unwrap();
        same(&fused, &x.gelu_erf().unwrap(), &[&x], "gelu");
    }

    /// Rotary tables for `t` positions of `d`-wide heads.
    fn tables(t: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let half = d / 2;
        let angle = |p: usize, i: usize| p as f32 / 10000f32.powf((2 * i) as f32 / d as f32);
        let cos = (0..t * half)
            .map(|k| angle(k / half, k % half).cos())
            .collect();
        let sin = (0..t * half)
            .map(|k| angle(k / half, k % half).sin())
            .collect();
        (cos, sin)
    }

    #[test]
    fn rope_matches_primitives() {
        let (b, t, h, d) = (2, 6, 3, 8);
        let x = var(b * t * h * d, &[b, t, h * d], 6);
        let (cos, sin) = tables(t, d);
        let (ct, st) = (
            Tensor::from_vec(cos.clone(), (t, 1, d / 2), &Device::Cpu).unwrap(),
            Tensor::from_vec(sin.clone(), (t, 1, d / 2), &Device::Cpu).unwrap(),
        );
        let fused = x
            .as_tensor()
            .apply_op1(Rope {
                cos,
                sin,
                head_dim: d,
            })
            .unwrap();
        let xs = x.reshape((b, t, h, d)).unwrap();
        let (x1, x2) = (
            xs.narrow(3, 0, d / 2).unwrap(),
            xs.narrow(3, d / 2, d / 2).unwrap(),
        );
        let a = (x1.broadcast_mul(&ct).unwrap() - x2.broadcast_mul(&st).unwrap()).unwrap();
        let c = (x2.broadcast_mul(&ct).unwrap() + x1.broadcast_mul(&st).unwrap()).unwrap();
        let reference = Tensor::cat(&[a, c], 3)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap();
        same(&fused, &reference, &[&x], "rope");
    }

    /// Attention from primitives: repeated KV heads, a masked score matrix, softmax.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, sh: AttnShape, mask: Mask) -> Tensor {
        let (b, t, _) = q.dims3().unwrap();
        let heads = |x: &Tensor, n: usize, d: usize| {
            x.reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let group = sh.n_heads / sh.n_kv_heads;
        let rep = |x: Tensor, d: usize| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, sh.n_kv_heads, group, t, d))
                .unwrap()
                .reshape((b, sh.n_heads, t, d))
                .unwrap()
        };
        let qh = heads(q, sh.n_heads, sh.head_dim);
        let kh = rep(heads(k, sh.n_kv_heads, sh.head_dim), sh.head_dim);
        let vh = rep(heads(v, sh.n_kv_heads, sh.v_head_dim), sh.v_head_dim);
        let m: Vec<f32> = (0..t * t)
            .map(|x| {
                let (i, j) = (x / t, x % t);
                let vis = (j <= i || mask.bidirectional)
                    && mask.window.is_none_or(|w| i - j <= w || j < mask.sink);
                if vis {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let m = Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap();
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (sh.head_dim as f64).sqrt())
            .unwrap()
            .broadcast_add(&m)
            .unwrap();
        let mx = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&mx).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, sh.out_dim()))
            .unwrap()
    }

    #[test]
    fn attention_matches_primitives_with_gqa_and_windows() {
        let (b, t) = (2, 37);
        for (sh, mask) in [
            (AttnShape::new(4, 2, 8), Mask::CAUSAL),
            (AttnShape::new(3, 1, 16), Mask::CAUSAL),
            (
                AttnShape::new(4, 4, 8),
                Mask {
                    window: Some(5),
                    sink: 2,
                    ..Mask::CAUSAL
                },
            ),
            (AttnShape::new(4, 4, 8), Mask::BIDIRECTIONAL),
            (AttnShape::new(4, 2, 8), Mask::BIDIRECTIONAL),
        ] {
            let q = var(
                b * t * sh.n_heads * sh.head_dim,
                &[b, t, sh.n_heads * sh.head_dim],
                7,
            );
            let k = var(
                b * t * sh.n_kv_heads * sh.head_dim,
                &[b, t, sh.n_kv_heads * sh.head_dim],
                8,
            );
            let v = var(
                b * t * sh.n_kv_heads * sh.v_head_dim,
                &[b, t, sh.n_kv_heads * sh.v_head_dim],
                9,
            );
            let fused = q
                .as_tensor()
                .apply_op3(k.as_tensor(), v.as_tensor(), Attention { shape: sh, mask })
                .unwrap();
            let r = reference(&q, &k, &v, sh, mask);
            same(
                &fused,
                &r,
                &[&q, &k, &v],
                &format!("attention {sh:?} {mask:?}"),
            );
        }
    }
}
