//! The selective scan as a candle op with a hand-written backward pass. Written with candle's
//! primitives the scan is a loop of `T` tiny tensor ops per layer (and as many in backward); as
//! one op it is two tight loops, like Mamba's fused kernel.
//!
//! Inputs: `du = [Δ | u]` `[B, T, 2E]` (with `u = Δ ⊙ x`), `a` `[E, N]` (= −exp(A_log)),
//! `bc = [B | C]` `[B, T, 2N]`. Output `y` `[B, T, E]` with
//! `h_t = exp(Δ_t a) ⊙ h_{t−1} + u_t ⊗ B_t` (from `h_{−1} = 0`) and `y_t = h_t · C_t`.
//! The `D` skip and the gate are ordinary tensor ops around it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub struct SelectiveScan;

/// Dimensions of one call, read off the input shapes.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    e: usize,
    n: usize,
}

fn dims(du: &Layout, a: &Layout) -> Result<Dims> {
    let (b, t, e2) = du.shape().dims3()?;
    let (e, n) = a.shape().dims2()?;
    if e2 != 2 * e {
        candle_core::bail!("selective scan: du has width {e2}, expected 2·{e}");
    }
    Ok(Dims { b, t, e, n })
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    super::ops::contiguous(s, l, "selective scan")
}

/// Runs the recurrence of one sequence; `states`, when given, receives `h_t` for every step.
fn scan_one(
    d: Dims,
    du: &[f32],
    a: &[f32],
    bc: &[f32],
    y: &mut [f32],
    mut states: Option<&mut [f32]>,
) {
    let Dims { t, e, n, .. } = d;
    let mut h = vec![0f32; e * n];
    for s in 0..t {
        let (row, bcs) = (
            &du[s * 2 * e..(s + 1) * 2 * e],
            &bc[s * 2 * n..(s + 1) * 2 * n],
        );
        let (bs, cs) = bcs.split_at(n);
        for c in 0..e {
            let (delta, u) = (row[c], row[e + c]);
            let hc = &mut h[c * n..(c + 1) * n];
            let ac = &a[c * n..(c + 1) * n];
            let mut acc = 0f32;
            for k in 0..n {
                hc[k] = (delta * ac[k]).exp() * hc[k] + u * bs[k];
                acc += hc[k] * cs[k];
            }
            y[s * e + c] = acc;
        }
        if let Some(st) = states.as_deref_mut() {
            st[s * e * n..(s + 1) * e * n].copy_from_slice(&h);
        }
    }
}

impl CustomOp3 for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective-scan"
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
        let d = dims(l1, l2)?;
        let (du, a, bc) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut y = vec![0f32; d.b * d.t * d.e];
        y.par_chunks_mut(d.t * d.e).enumerate().for_each(|(i, yb)| {
            let du = &du[i * d.t * 2 * d.e..(i + 1) * d.t * 2 * d.e];
            let bc = &bc[i * d.t * 2 * d.n..(i + 1) * d.t * 2 * d.n];
            scan_one(d, du, a, bc, yb, None);
        });
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.e))))
    }

    fn bwd(
        &self,
        du: &Tensor,
        a: &Tensor,
        bc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, e2) = du.dims3()?;
        let (e, n) = a.dims2()?;
        let d = Dims { b, t, e: e2 / 2, n };
        let (du_v, a_v) = (
            du.flatten_all()?.to_vec1::<f32>()?,
            a.flatten_all()?.to_vec1::<f32>()?,
        );
        let (bc_v, gy) = (
            bc.flatten_all()?.to_vec1::<f32>()?,
            grad.flatten_all()?.to_vec1::<f32>()?,
        );
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b)
            .into_par_iter()
            .map(|i| {
                let du = &du_v[i * t * 2 * e..(i + 1) * t * 2 * e];
                let bc = &bc_v[i * t * 2 * n..(i + 1) * t * 2 * n];
                let gy = &gy[i * t * e..(i + 1) * t * e];
                backward_one(d, du, &a_v, bc, gy)
            })
            .collect();
        let mut g_du = Vec::with_capacity(b * t * 2 * e);
        let mut g_bc = Vec::with_capacity(b * t * 2 * n);
        let mut g_a = vec![0f32; e * n];
        for (gdu, ga, gbc) in per {
            g_du.extend(gdu);
            g_bc.extend(gbc);
            g_a.iter_mut().zip(ga).for_each(|(x, y)| *x += y);
        }
        let dev = du.device();
        Ok((
            Some(Tensor::from_vec(g_du, (b, t, 2 * e), dev)?),
            Some(Tensor::from_vec(g_a, (e, n), dev)?),
            Some(Tensor::from_vec(g_bc, (b, t, 2 * n), dev)?),
        ))
    }
}

/// Reverse-time pass of one sequence: gradients of `du`, `a` and `bc` given `gy = ∂L/∂y`.
fn backward_one(
    d: Dims,
    du: &[f32],
    a: &[f32],
    bc: &[f32],
    gy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { t, e, n, .. } = d;
    let mut states = vec![0f32; t * e * n];
    let mut y = vec![0f32; t * e];
    scan_one(d, du, a, bc, &mut y, Some(&mut states));
    let (mut g_du, mut g_a, mut g_bc) = (
        vec![0f32; t * 2 * e],
        vec![0f32; e * n],
        vec![0f32; t * 2 * n],
    );
    // ∂L/∂h_t, carried backwards through h_t = α_t ⊙ h_{t−1} + …
    let mut gh = vec![0f32; e * n];
    for s in (0..t).rev() {
        let (row, bcs) = (
            &du[s * 2 * e..(s + 1) * 2 * e],
            &bc[s * 2 * n..(s + 1) * 2 * n],
        );
        let (bs, cs) = bcs.split_at(n);
        let (gb_row, gc_row) = g_bc[s * 2 * n..(s + 1) * 2 * n].split_at_mut(n);
        for c in 0..e {
            let (delta, u, g) = (row[c], row[e + c], gy[s * e + c]);
            let h = &states[(s * e + c) * n..(s * e + c + 1) * n];
            let (mut g_delta, mut g_u) = (0f32, 0f32);
            for k in 0..n {
                let i = c * n + k;
                let prev = if s > 0 {
                    states[((s - 1) * e + c) * n + k]
                } else {
                    0.0
                };
                gh[i] += g * cs[k];
                gc_row[k] += g * h[k];
                gb_row[k] += gh[i] * u;
                g_u += gh[i] * bs[k];
                let alpha = (delta * a[i]).exp();
                let g_alpha = gh[i] * prev * alpha;
                g_delta += g_alpha * a[i];
                g_a[i] += g_alpha * delta;
                gh[i] *= alpha;
            }
            g_du[s * 2 * e + c] = g_delta;
            g_du[s * 2 * e + e + c] = g_u;
        }
    }
    (g_du, g_a, g_bc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn wave(n: usize, m: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * ((i * m % 89) as f32 / 88.0))
            .collect()
    }

    /// Autograd gradients of `Σ w ⊙ scan(du, a, bc)` against central finite differences.
    #[test]
    fn gradients_match_finite_differences() {
        let (b, t, e, n) = (2usize, 6usize, 3usize, 4usize);
        let dev = Device::Cpu;
        let du0: Vec<f32> = (0..b * t)
            .flat_map(|r| {
                let d = wave(e, 7 + r, 0.05, 0.6);
                let u = wave(e, 11 + r, -1.0, 1.0);
                d.into_iter().chain(u)
            })
            .collect();
        let a0: Vec<f32> = wave(e * n, 5, 0.2, 2.0).iter().map(|v| -v).collect();
        let bc0 = wave(b * t * 2 * n, 13, -1.2, 1.2);
        let w = Tensor::from_vec(wave(b * t * e, 17, -1.0, 1.0), (b, t, e), &dev).unwrap();
        let loss = |du: &Tensor, a: &Tensor, bc: &Tensor| -> Tensor {
            du.apply_op3(a, bc, SelectiveScan)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let du = Var::from_vec(du0.clone(), (b, t, 2 * e), &dev).unwrap();
        let a = Var::from_vec(a0.clone(), (e, n), &dev).unwrap();
        let bc = Var::from_vec(bc0.clone(), (b, t, 2 * n), &dev).unwrap();
        let grads = loss(&du, &a, &bc).backward().unwrap();
        let inputs = [
            (&du, du0, vec![b, t, 2 * e]),
            (&a, a0, vec![e, n]),
            (&bc, bc0, vec![b, t, 2 * n]),
        ];
        for (k, (var, base, shape)) in inputs.iter().enumerate() {
            let g = grads.get(var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let eval = |vals: Vec<f32>| -> f64 {
                let mut ts: Vec<Tensor> = inputs
                    .iter()
                    .map(|(v, _, _)| v.as_tensor().clone())
                    .collect();
                ts[k] = Tensor::from_vec(vals, shape.clone(), &dev).unwrap();
                loss(&ts[0], &ts[1], &ts[2]).to_scalar::<f32>().unwrap() as f64
            };
            for i in 0..base.len() {
                let h = 1e-2f32;
                let (mut p, mut m) = (base.clone(), base.clone());
                p[i] += h;
                m[i] -= h;
                let fd = (eval(p) - eval(m)) / (2.0 * h as f64);
                let got = g[i] as f64;
                assert!(
                    (got - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                    "input {k} element {i}: autograd {got} vs finite difference {fd}"
                );
            }
        }
    }
}
