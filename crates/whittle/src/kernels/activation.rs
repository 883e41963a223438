//! SwiGLU: `silu(gate) ⊙ up`, in place in `gate`.

use super::exp::exp_approx;

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

/// `x += delta` (a residual add), `width` values a row.
pub fn add_in_place(x: &mut [f32], delta: &[f32], width: usize) {
    assert_eq!(x.len(), delta.len());
    super::for_row_blocks(delta, width, x, width, |_, d, x| {
        x.iter_mut().zip(d).for_each(|(x, d)| *x += d)
    });
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
}
