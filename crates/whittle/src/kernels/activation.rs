//! SwiGLU: `silu(gate) ⊙ up`, in place in `gate`.

use super::exp::exp_approx;

simd_dispatch! {
    /// `gate[i] = silu(gate[i]) · up[i]` with `silu(v) = v / (1 + e^{-v})`.
    pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len());
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp_approx(-*g)) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definition() {
        let mut g = [-90.0f32, -3.0, -0.5, 0.0, 0.7, 5.0, 100.0];
        let u = [1.0f32, 1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64)
            .collect();
        swiglu_in_place(&mut g, &u);
        for (a, b) in g.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
