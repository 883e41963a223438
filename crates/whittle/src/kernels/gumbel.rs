//! Gumbel-softmax over small groups, for MaskLLM's soft masks: 159 M logits of the 135M model
//! are perturbed, scaled and soft-maxed in groups of six at every forward pass and again in the
//! backward pass. Written per group with a 64-bit hash and scalar logs it cost ~150 ns a group
//! (8 s a micro-batch); here the noise comes from a 32-bit counter hash (vector multiplies on
//! every SIMD level) and the logs and exponentials run over whole rows, vectorised.

use super::exp::{exp_approx, ln_approx};

/// A 32-bit integer hash (Wellons' "lowbias32"): full avalanche from two multiplies, so that
/// consecutive counters give independent-looking uniforms.
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The uniform in (0, 1) of counter `i` under `key` (24 bits, never 0 or 1).
#[inline(always)]
fn uniform(key: u32, i: u32) -> f32 {
    let h = lowbias32(i.wrapping_mul(0x9e37_79b9) ^ key);
    ((h >> 8) as f32 + 0.5) * (1.0 / (1u32 << 24) as f32)
}

simd_dispatch! {
    /// `out_i = (κ·logits_i + g_i) / τ` with Gumbel noise `g_i = −ln(−ln u_i)`, `u_i` the
    /// uniform of counter `first + i` under `key`: a pure function of its arguments, so a
    /// backward pass regenerates the forward pass's noise.
    pub fn gumbel_logits, gumbel_logits_at(
        logits: &[f32],
        key: u32,
        first: u32,
        kappa: f32,
        inv_tau: f32,
        out: &mut [f32],
    ) {
        for (i, (o, l)) in out.iter_mut().zip(logits).enumerate() {
            let u = uniform(key, first.wrapping_add(i as u32));
            let g = -ln_approx::<FMA>(-ln_approx::<FMA>(u));
            *o = (kappa * l + g) * inv_tau;
        }
    }
}

simd_dispatch! {
    /// Softmax within each group of `k` consecutive values, in place. Probabilities below
    /// [`FLUSH`] become 0: late in MaskLLM's schedule (τ → 0.05, κ → 500) all but one
    /// candidate underflow, and the subnormal masks and gradients they made slowed the products
    /// down step after step (a step of SmolLM2 went from 70 s to 800 s over its last 10 steps).
    pub fn group_softmax, group_softmax_at(x: &mut [f32], k: usize) {
        for g in x.chunks_exact_mut(k) {
            let max = g.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            g.iter_mut().for_each(|v| *v -= max);
        }
        for v in x.iter_mut() {
            *v = exp_approx::<FMA>(*v);
        }
        for g in x.chunks_exact_mut(k) {
            let inv = 1.0 / g.iter().sum::<f32>();
            g.iter_mut().for_each(|v| {
                let p = *v * inv;
                *v = if p < FLUSH { 0.0 } else { p };
            });
        }
    }
}

/// Probabilities treated as 0 (far below anything a mask or its gradient can resolve against
/// the kept candidate's ≈ 1, and far above the subnormal range of f32).
pub const FLUSH: f32 = 1e-20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::for_each_level;

    /// Against f64 formulas, at every level this CPU runs; and the noise has the Gumbel
    /// distribution's mean (Euler's γ) and variance (π²/6).
    #[test]
    fn gumbel_softmax_matches_f64_at_every_level() {
        let n = 60_000;
        let logits: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
        for_each_level(|l| {
            let mut out = vec![0f32; n];
            gumbel_logits(&logits, 17, 5, 100.0, 0.5, &mut out);
            let mut noise = Vec::with_capacity(n);
            for (i, (o, x)) in out.iter().zip(&logits).enumerate() {
                let u = uniform(17, 5 + i as u32) as f64;
                let g = -(-u.ln()).ln();
                noise.push(g);
                let want = (100.0 * *x as f64 + g) * 0.5;
                assert!(
                    (*o as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{l}: {i}: {o} against {want} (u = {u})"
                );
            }
            let mean = noise.iter().sum::<f64>() / n as f64;
            let var = noise.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((mean - 0.577_215_66).abs() < 0.02, "{l}: mean {mean}");
            assert!(
                (var - std::f64::consts::PI.powi(2) / 6.0).abs() < 0.05,
                "{l}: var {var}"
            );
            let mut p = out.clone();
            group_softmax(&mut p, 6);
            for (g, y) in p.chunks(6).zip(out.chunks(6)) {
                let m = y.iter().fold(f64::MIN, |a, b| a.max(*b as f64));
                let z: f64 = y.iter().map(|v| (*v as f64 - m).exp()).sum();
                for (a, b) in g.iter().zip(y) {
                    let want = (*b as f64 - m).exp() / z;
                    assert!((*a as f64 - want).abs() < 1e-6, "{l}");
                }
            }
        });
    }
}
