//! SwiGLU (`silu(gate) ⊙ up`, in place in `gate`), GELU (the ViT's), residual adds, and the
//! SSM's softplus.

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

/// `y = gelu(x) = x Φ(x)` with the exact normal CDF (DINOv2's and PyTorch's default GELU),
/// `width` values a row. Vectorised: candle's `gelu_erf` calls libm's `erff` and `expf` per
/// value, a fifth of DINOv2's forward.
pub fn gelu(x: &[f32], y: &mut [f32], width: usize) {
    assert_eq!(x.len(), y.len());
    super::for_row_blocks(x, width, y, width, |_, x, y| gelu_rows(x, y));
}

simd_dispatch! {
    fn gelu_rows(x: &[f32], y: &mut [f32]) {
        for (y, &v) in y.iter_mut().zip(x) {
            *y = v * normal_cdf::<FMA>(v);
        }
    }
}

simd_dispatch! {
    /// `dx = dy ⊙ gelu'(x)`, `gelu'(x) = Φ(x) + x φ(x)` with `φ(x) = e^{−x²/2} / √(2π)`.
    pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for i in 0..x.len() {
            let v = x[i];
            let pdf = INV_SQRT_2PI * exp_approx::<FMA>(-0.5 * v * v);
            dx[i] = dy[i] * madd::<FMA>(v, pdf, normal_cdf::<FMA>(v));
        }
    }
}

/// `Φ(x) = erfc(−x/√2) / 2` from Numerical Recipes' Chebyshev fit of `erfc(z)`, `z ≥ 0`, whose
/// relative error is below 1.2e-7 everywhere: the tails, where GELU is `x` times a tiny
/// probability, keep their relative accuracy, as `1 − erf` would not.
#[inline(always)]
fn normal_cdf<const FMA: bool>(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / madd::<FMA>(0.5, z, 1.0);
    let mut p = 0.170_872_77f32;
    for c in [
        -0.822_152_23f32,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = madd::<FMA>(p, t, c);
    }
    let half_erfc = 0.5 * t * exp_approx::<FMA>(madd::<FMA>(-z, z, p));
    if x >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
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

    /// `erf` in f64 from its Taylor series (|z| ≤ 3: terms below 1e-17 after ~60, cancellation
    /// costs ~4 of f64's 16 digits) and from the continued fraction of `erfc` beyond.
    fn erf64(z: f64) -> f64 {
        if z.abs() <= 3.0 {
            let (mut term, mut sum) = (z, z);
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = z.abs();
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / f;
            z.signum() * (1.0 - erfc)
        }
    }

    #[test]
    fn gelu_and_its_derivative_match_f64_at_every_level() {
        let x: Vec<f32> = (0..500).map(|i| (i as f32 - 250.0) * 0.047).collect();
        let cdf = |v: f64| 0.5 * (1.0 + erf64(v / std::f64::consts::SQRT_2));
        let (mut worst, mut worst_d) = (0f64, 0f64);
        crate::kernels::simd::for_each_level(|level| {
            let mut y = vec![f32::NAN; x.len()];
            gelu(&x, &mut y, 100);
            let dy = vec![1f32; x.len()];
            let mut dx = vec![f32::NAN; x.len()];
            gelu_backward(&x, &dy, &mut dx);
            for ((&v, &got), &d) in x.iter().zip(&y).zip(&dx) {
                let v = v as f64;
                let want = v * cdf(v);
                let err = (got as f64 - want).abs();
                worst = worst.max(err / (want.abs() + 1e-30));
                assert!(
                    err <= 5e-7 * want.abs() + 1e-7,
                    "{level} at {v}: {got} vs {want}"
                );
                let want_d =
                    cdf(v) + v * (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                worst_d = worst_d.max((d as f64 - want_d).abs());
                assert!(
                    (d as f64 - want_d).abs() <= 1e-6,
                    "{level}: gelu'({v}) {d} vs {want_d}"
                );
            }
        });
        assert!(worst > 0.0 && worst_d > 0.0, "the comparison ran");
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
