//! 2:4 sparse weight storage: per row, the two kept values of every group of four inputs and
//! their positions as nibbles ([`crate::kernels::sparse24`] documents the layout). A 2:4 model
//! (SparseGPT, Wanda, MaskLLM) holds its zeros explicitly in dense form; packed, it reads 2.25
//! bytes a weight per decoded token instead of 4.

use crate::kernels::sparse24::{pack_row, unpack_row_at};
use crate::model::Model;

#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24 {
    /// `out × in/2` kept values, row-major.
    pub values: Vec<f32>,
    /// `out × ceil(in/8)` bytes of positions.
    pub index: Vec<u8>,
}

impl Sparse24 {
    /// Packs `w` (`out × inp`), or `None` unless `inp` is a multiple of 4 and every group of
    /// four inputs holds at most two nonzeros.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Option<Self> {
        if inp == 0 || !inp.is_multiple_of(4) || w.len() != out * inp {
            return None;
        }
        let ib = inp.div_ceil(8);
        let mut values = vec![0f32; out * inp / 2];
        let mut index = vec![0u8; out * ib];
        let fits = w
            .chunks_exact(inp)
            .zip(values.chunks_exact_mut(inp / 2))
            .zip(index.chunks_exact_mut(ib))
            .all(|((row, v), i)| pack_row(row, v, i));
        fits.then_some(Sparse24 { values, index })
    }

    /// Row `r`'s values and positions for a matrix `inp` wide.
    pub fn row(&self, r: usize, inp: usize) -> (&[f32], &[u8]) {
        let ib = inp.div_ceil(8);
        (
            &self.values[r * inp / 2..(r + 1) * inp / 2],
            &self.index[r * ib..(r + 1) * ib],
        )
    }

    /// Writes the dense matrix (`out × inp`) into `w`, rows in parallel: prefill expands every
    /// packed matrix before its product, and on one thread that cost 12 % of a 512-token prefill.
    pub fn unpack_into(&self, inp: usize, w: &mut [f32]) {
        use rayon::prelude::*;
        let level = crate::kernels::simd::level();
        crate::threads::install(|| {
            w.par_chunks_exact_mut(inp)
                .enumerate()
                .with_min_len(64)
                .for_each(|(r, dst)| {
                    let (v, i) = self.row(r, inp);
                    unpack_row_at(level, v, i, dst);
                })
        });
    }

    pub fn bytes(&self) -> usize {
        4 * self.values.len() + self.index.len()
    }
}

impl Model {
    /// Stores every layer linear whose dense weight is 2:4 (each group of four inputs holds at
    /// most two nonzeros) in the packed form; returns how many. A dense matrix is left as it
    /// is at the cost of one scan, which stops at its first group of three nonzeros.
    pub fn pack_sparse24(&mut self) -> usize {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .filter(|(_, _, lin)| sparse_enough(lin))
            .map(|(_, _, lin)| lin.pack_sparse24())
            .filter(|packed| *packed)
            .count()
    }

    /// Whether some linear is stored 2:4-packed.
    pub fn has_sparse24(&self) -> bool {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .any(|(_, _, lin)| matches!(lin.weight(), crate::model::Weight::Sparse24(_)))
    }
}

/// Whether at least half a dense weight is zeros (a 2:4 matrix is; the check is cheaper than
/// packing a dense matrix only to give up).
fn sparse_enough(lin: &crate::model::Linear) -> bool {
    match lin.weight() {
        crate::model::Weight::Dense(w) => 2 * w.iter().filter(|v| **v == 0.0).count() >= w.len(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{random::random_model, AttnShape, LayerShape, Logits, ModelConfig};
    use crate::sparsity::{sparsify_model, Pattern, SparsityMethod};

    /// A magnitude-2:4 model packs every linear, computes the same logits packed as dense (one
    /// row: the packed dot product; many rows: the expanded GEMM), holds fewer bytes, and
    /// rewriting a packed weight expands it again.
    #[test]
    fn packed_two_four_model_matches_dense() {
        let config = ModelConfig {
            arch: crate::model::Arch::Llama,
            vocab_size: 64,
            hidden: 32,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            context_length: 64,
            tie_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            memory_tokens: 0,
            window_rule: Default::default(),
            kv_cache: Default::default(),
        };
        let shape = LayerShape {
            attn: Some(AttnShape::new(4, 2, 8)),
            ssm: None,
            mlp: Some(48),
        };
        let mut dense = random_model(config.clone(), &[shape, shape], 3).unwrap();
        let nm = Pattern::NM { n: 2, m: 4 };
        sparsify_model(
            &mut dense,
            &[],
            SparsityMethod::Magnitude,
            nm,
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        let mut packed = dense.clone();
        assert_eq!(packed.pack_sparse24(), 14);
        assert!(packed.has_sparse24() && !dense.has_sparse24());
        let bytes = |m: &crate::Model| -> usize {
            m.layers
                .iter()
                .flat_map(|l| l.linears())
                .map(|(_, _, l)| l.storage_bytes())
                .sum()
        };
        assert!(
            bytes(&packed) * 16 <= bytes(&dense) * 9,
            "2.25 bytes a weight"
        );
        let ids: Vec<u32> = (0..20).map(|i| (i * 7 % 64) as u32).collect();
        for n in [1, ids.len()] {
            let a = dense.forward(&ids[..n], None, Logits::All, None).unwrap();
            let b = packed.forward(&ids[..n], None, Logits::All, None).unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff < 1e-4, "{n} rows: {diff}");
        }
        let lin = &mut packed.layers[0].linears_mut()[0].2;
        lin.dense_weight_mut()[0] += 1.0;
        assert!(matches!(lin.weight(), crate::model::Weight::Dense(_)));
        // A dense model has nothing to pack.
        let mut other = random_model(config, &[shape], 1).unwrap();
        assert_eq!(other.pack_sparse24(), 0);
    }
}
