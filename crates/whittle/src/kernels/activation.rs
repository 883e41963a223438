//! SwiGLU (`silu(gate) ⊙ up`, in place in `gate`), residual adds, and the SSM's softplus.

use super::exp::exp_approx;
use super::simd::madd;

/// `gate[i] = silu(gate[i]) · up[i]` with `silu(v) = v / (1 + e^{-v})`, `width` values a row.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32], width: usize) {
    assert_eq!(gate.len(), up.len());
    super::for_row_blocks(up, width, gate, width, |_, u, g| swiglu(g, u));
}

simd_dispatch! {
    fn swiglu(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp_approx::<FMA>(-*g)) * u;
        }
    }
}

simd_dispatch! {
    /// The gradients of `y = silu(g) ⊙ u` given `dy`: `du = dy ⊙ silu(g)`,
    /// `dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))`.
    pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + exp_approx::<FMA>(-g[i]));
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

/// `x += delta` (a residual add), `width` values a row.
pub fn add_in_place(x: &mut [f32], delta: &[f32], width: usize) {
    assert_eq!(x.len(), delta.len());
    super::for_row_blocks(delta, width, x, width, |_, d, x| {
        x.iter_mut().zip(d).for_each(|(x, d)| *x += d)
    });
}

simd_dispatch! {
    /// `row[i] = softplus(row[i] + bias[i])` as torch computes it (the identity above 20), with
    /// `softplus(v) = max(v, 0) + ln(1 + e^{−|v|})`. Vectorised instead of libm's `expf` and
    /// `log1pf` per channel (Hymba-1.5B's SSM: 3200 channels a layer, every token).
    pub fn softplus_bias_in_place(row: &mut [f32], bias: &[f32]) {
        for (v, b) in row.iter_mut().zip(bias) {
            let x = *v + b;
            let t = exp_approx::<FMA>(-x.abs());
            let sp = x.max(0.0) + ln_1p_unit::<FMA>(t);
            *v = if x > 20.0 { x } else { sp };
        }
    }
}

/// `ln(1 + t)` for `t` in [0, 1]: `2·atanh(s)` with `s = t / (2 + t) ≤ 1/3`, an odd series whose
/// terms shrink ninefold (to 2⁻²⁴ relative in 8 terms), with no cancellation for small `t`.
#[inline(always)]
fn ln_1p_unit<const FMA: bool>(t: f32) -> f32 {
    let s = t / (2.0 + t);
    let s2 = s * s;
    let mut p = 1.0 / 17.0;
    for k in [15.0f32, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0] {
        p = madd::<FMA>(p, s2, 1.0 / k);
    }
    let p = madd::<FMA>(p, s2, 1.0);
    2.0 * s * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definition_at_every_level() {
        crate::kernels::simd::for_each_level(|level| {
            let mut g = [-90.0f32, -3.0, -0.5, 0.0, 0.7, 5.0, 100.0];
            let u = [1.0f32, 1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&a, &b)| a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64)
                .collect();
            swiglu_in_place(&mut g, &u, 7);
            for (a, b) in g.iter().zip(want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "{level}: {a} vs {b}"
                );
            }
        });
    }

    #[test]
    fn softplus_matches_f64_at_every_level() {
        let x: Vec<f32> = (0..400).map(|i| (i as f32 - 200.0) * 0.137).collect();
        let bias: Vec<f32> = (0..400).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        crate::kernels::simd::for_each_level(|level| {
            let mut y = x.clone();
            softplus_bias_in_place(&mut y, &bias);
            for ((got, v), b) in y.iter().zip(&x).zip(&bias) {
                let v = (*v + *b) as f64;
                let want = if v > 20.0 { v } else { v.exp().ln_1p() };
                let err = (*got as f64 - want).abs();
                assert!(
                    err <= 2e-7 * want.abs() + 1e-30,
                    "{level} at {v}: {got} vs {want}"
                );
            }
        });
    }
}
