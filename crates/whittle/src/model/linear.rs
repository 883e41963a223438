//! A linear layer `y = W x (+ B A x)`: the unit every compression method reads and rewrites.
//! The weight's storage is an enum so that sparse and quantized forms (later methods) are new
//! variants of the same layer, not new model types; an optional low-rank adapter carries error
//! compensation (EoRA) or LoRA on top of any storage.

use crate::kernels::matmul::matmul_t;
use crate::{Error, Result};

/// How a weight matrix `[out, in]` is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// Row-major f32, `out × in` (a sparsified weight is dense with zeros).
    Dense(Vec<f32>),
}

/// `ΔW ≈ B·A` with `A: rank × in`, `B: out × rank`, both row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: Weight,
    pub adapter: Option<LowRank>,
}

impl Linear {
    /// A dense layer; fails if `w` does not hold `out·in` values.
    pub fn dense(name: &str, w: Vec<f32>, out: usize, inp: usize) -> Result<Self> {
        if w.len() != out * inp {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: vec![out, inp],
                found: vec![w.len()],
            });
        }
        Ok(Linear {
            out_features: out,
            in_features: inp,
            weight: Weight::Dense(w),
            adapter: None,
        })
    }

    /// The weight as dense f32 (what export and analysis read).
    pub fn dense_weight(&self) -> &[f32] {
        match &self.weight {
            Weight::Dense(w) => w,
        }
    }

    /// Number of stored parameters (weight plus adapter).
    pub fn n_params(&self) -> usize {
        self.out_features * self.in_features
            + self
                .adapter
                .as_ref()
                .map_or(0, |a| a.rank * (self.in_features + self.out_features))
    }

    /// `y[rows, out] = x[rows, in] · Wᵀ (+ adapter)`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (inp, out) = (self.in_features, self.out_features);
        match &self.weight {
            Weight::Dense(w) => matmul_t(x, w, rows, inp, out, y),
        }
        if let Some(ad) = &self.adapter {
            let mut ax = vec![0f32; rows * ad.rank];
            matmul_t(x, &ad.a, rows, inp, ad.rank, &mut ax);
            let mut bax = vec![0f32; rows * out];
            matmul_t(&ax, &ad.b, rows, ad.rank, out, &mut bax);
            y.iter_mut().zip(&bax).for_each(|(y, d)| *y += d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_adds_b_a_x() {
        let (out, inp, r) = (3, 4, 2);
        let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.1).collect();
        let mut lin = Linear::dense("w", w.clone(), out, inp).unwrap();
        let a = vec![1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, -1.0];
        let b = vec![1.0, 1.0, 0.5, 0.0, 0.0, 2.0];
        lin.adapter = Some(LowRank {
            rank: r,
            a: a.clone(),
            b: b.clone(),
        });
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = [0f32; 3];
        lin.forward(&x, 1, &mut y);
        for o in 0..out {
            let mut want: f32 = (0..inp).map(|k| w[o * inp + k] * x[k]).sum();
            for j in 0..r {
                let ax: f32 = (0..inp).map(|k| a[j * inp + k] * x[k]).sum();
                want += b[o * r + j] * ax;
            }
            assert!((y[o] - want).abs() < 1e-5);
        }
        assert_eq!(lin.n_params(), 12 + 2 * 7);
        assert!(Linear::dense("bad", vec![0.0; 5], 2, 3).is_err());
    }
}
