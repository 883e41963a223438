//! 2:4 sparse weight storage: per row, the two kept values of every group of four inputs and
//! their positions as nibbles ([`crate::kernels::sparse24`] documents the layout). A 2:4 model
//! (SparseGPT, Wanda, MaskLLM) holds its zeros explicitly in dense form; packed, it reads 2.25
//! bytes a weight per decoded token instead of 4.

use crate::kernels::qdot::{block_bytes, pack_block, BLOCK};
use crate::kernels::sparse24::{pack_row, KeptRow};
use crate::kernels::sparse24_int::{pack_codes, row_codes, step_bytes, Rows24, STEP};
use crate::model::{Model, Packed};
use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24 {
    /// `out × in/2` kept values, row-major.
    pub values: KeptValues,
    /// `out × ceil(in/8)` bytes of positions.
    pub index: Vec<u8>,
}

/// Kept values: f32, or bf16 bits when every value is exactly a bf16 (half the bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum KeptValues {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl KeptValues {
    /// The same values as bf16 bits where each is exactly a bf16 (its low 16 bits zero).
    fn narrowed(values: Vec<f32>) -> Self {
        let bf16 = |v: &f32| half::bf16::from_f32(*v);
        if values.iter().all(|v| bf16(v).to_f32() == *v) {
            KeptValues::Bf16(values.iter().map(|v| bf16(v).to_bits()).collect())
        } else {
            KeptValues::F32(values)
        }
    }

    /// Values `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> KeptRow<'_> {
        match self {
            KeptValues::F32(v) => KeptRow::F32(&v[range]),
            KeptValues::Bf16(v) => KeptRow::Bf16(&v[range]),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KeptValues::F32(v) => 4 * v.len(),
            KeptValues::Bf16(v) => 2 * v.len(),
        }
    }

    /// Fails on NaN or Inf.
    pub fn check_finite(&self, name: &str) -> crate::Result<()> {
        match self {
            KeptValues::F32(v) => crate::error::check_finite(name, v),
            KeptValues::Bf16(v) => {
                let wide: Vec<f32> = v
                    .iter()
                    .map(|b| half::bf16::from_bits(*b).to_f32())
                    .collect();
                crate::error::check_finite(name, &wide)
            }
        }
    }
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
        fits.then(|| Sparse24 {
            values: KeptValues::narrowed(values),
            index,
        })
    }

    /// Row `r`'s values and positions for a matrix `inp` wide.
    pub fn row(&self, r: usize, inp: usize) -> (KeptRow<'_>, &[u8]) {
        let ib = inp.div_ceil(8);
        (
            self.values.slice(r * inp / 2..(r + 1) * inp / 2),
            &self.index[r * ib..(r + 1) * ib],
        )
    }

    pub fn bytes(&self) -> usize {
        self.values.bytes() + self.index.len()
    }
}

/// 2:4 sparse codes of a symmetric 4- or 8-bit packed weight: the kept codes (signed, about
/// the zero point) and their positions, in the layout of [`crate::kernels::sparse24_int`].
/// Half the codes of the dense blocks plus 4 bits of positions per group of four inputs:
/// decode reads 0.67x (8-bit) / 0.8x (4-bit) of the bytes of dense blocks with 32-input scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24Int {
    pub bits: u8,
    /// Inputs per scale (32 or a multiple of 64; a row's last group may be shorter).
    pub group: usize,
    /// `out` rows of `inp / 64` steps of codes.
    pub codes: Vec<u8>,
    /// `out` rows of `inp / 64` position words.
    pub index: Vec<u64>,
    /// `out × ceil(inp / group)`, row-major.
    pub scales: Vec<f32>,
}

impl Sparse24Int {
    /// `p` (`out × inp`) in this layout, or `None` unless its grid is symmetric with 4- or
    /// 8-bit codes, `inp` is a multiple of 64, its groups are 32 inputs or a multiple of 64, and
    /// every group of four inputs holds at most two codes other than the zero point's. A dense
    /// matrix is refused at its first group of three nonzero codes.
    pub fn pack(p: &Packed, out: usize, inp: usize) -> Option<Self> {
        let zero = p.zero()? as u8;
        let group_fits = p.group == BLOCK || p.group.is_multiple_of(STEP);
        if !(p.bits == 4 || p.bits == 8) || inp == 0 || !inp.is_multiple_of(STEP) || !group_fits {
            return None;
        }
        let (steps, sb) = (inp / STEP, step_bytes(p.bits));
        let mut codes = vec![0u8; out * steps * sb];
        let mut index = vec![0u64; out * steps];
        let mut q = vec![0u8; inp];
        let rows = p.rows(inp);
        let fits = codes
            .chunks_exact_mut(steps * sb)
            .zip(index.chunks_exact_mut(steps))
            .enumerate()
            .all(|(r, (c, i))| {
                row_codes(p.bits, rows.row(r).data, &mut q);
                pack_codes(p.bits, zero, &q, c, i)
            });
        fits.then(|| Sparse24Int {
            bits: p.bits,
            group: p.group,
            codes,
            index,
            scales: p.scales.clone(),
        })
    }

    /// The rows of a matrix `inp` wide.
    pub fn rows(&self, inp: usize) -> Rows24<'_> {
        Rows24 {
            bits: self.bits,
            group: self.group,
            inp,
            codes: &self.codes,
            index: &self.index,
            scales: &self.scales,
        }
    }

    /// The dense packed weight these codes came from (the zero point's code restored in the
    /// dropped places): what exports write.
    pub fn to_packed(&self, out: usize, inp: usize) -> Result<Packed> {
        let zero = 1u8 << (self.bits - 1);
        let bb = block_bytes(self.bits);
        let mut data = vec![0u8; out * inp / BLOCK * bb];
        let mut q = vec![0u8; inp];
        let rows = self.rows(inp);
        for (r, dst) in data.chunks_exact_mut(inp / BLOCK * bb).enumerate() {
            rows.range(r..r + 1).unpack_codes(zero, &mut q);
            for (bytes, qb) in dst.chunks_exact_mut(bb).zip(q.chunks_exact(BLOCK)) {
                pack_block(self.bits, qb.try_into().expect("32 codes"), bytes);
            }
        }
        let mins = self.scales.iter().map(|s| -s * zero as f32).collect();
        Packed::new(
            "2:4 codes",
            (out, inp),
            self.bits,
            self.group,
            data,
            self.scales.clone(),
            mins,
        )
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 8 * self.index.len() + 4 * self.scales.len()
    }
}

impl Model {
    /// Stores every layer linear whose dense weight is 2:4 (each group of four inputs holds at
    /// most two nonzeros) in the packed form; returns how many. A dense matrix is left as it
    /// is at the cost of one scan, which stops at its first group of three nonzeros.
    /// Linears pack in parallel, at the calling thread's level (a 2:4 SmolLM2 in Q8_0 blocks
    /// loads in 0.6 s instead of 0.7 s with one matrix at a time, Xeon).
    pub fn pack_sparse24(&mut self) -> usize {
        use rayon::prelude::*;
        let level = crate::kernels::simd::level();
        let mut linears: Vec<_> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .map(|(_, _, lin)| lin)
            .filter(|lin| sparse_enough(lin))
            .collect();
        crate::threads::install(|| {
            linears
                .par_iter_mut()
                .map(|lin| lin.pack_sparse24_at(level))
                .filter(|packed| *packed)
                .count()
        })
    }

    /// Whether some linear is stored 2:4-packed.
    pub fn has_sparse24(&self) -> bool {
        use crate::model::Weight;
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .any(|(_, _, lin)| matches!(lin.weight(), Weight::Sparse24(_) | Weight::Sparse24Int(_)))
    }
}

/// Whether at least half a dense weight is zeros (a 2:4 matrix is; the check is cheaper than
/// packing a dense matrix only to give up).
fn sparse_enough(lin: &crate::model::Linear) -> bool {
    match lin.weight() {
        crate::model::Weight::Dense(w) => 2 * w.iter().filter(|v| **v == 0.0).count() >= w.len(),
        // Packing codes stops at the first group of three nonzero codes: no scan needed.
        crate::model::Weight::Packed(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{KeptValues, Sparse24};
    use crate::model::{random::random_model, AttnShape, LayerShape, Logits, ModelConfig, Weight};
    use crate::sparsity::{sparsify_model, Pattern, SparsityMethod};
    use crate::Model;

    /// A random two-layer Llama `hidden` wide (4 query heads, 2 KV heads), dense.
    fn random(hidden: usize, mlp: usize, layers: usize, seed: u64) -> Model {
        let config = ModelConfig {
            arch: crate::model::Arch::Llama,
            vocab_size: 64,
            hidden,
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
            attn: Some(AttnShape::new(4, 2, hidden / 4)),
            ssm: None,
            mlp: Some(mlp),
        };
        random_model(config, &vec![shape; layers], seed).unwrap()
    }

    /// [`random`] with two layers, pruned to magnitude 2:4.
    fn two_four(hidden: usize, mlp: usize, seed: u64) -> Model {
        let mut m = random(hidden, mlp, 2, seed);
        let nm = Pattern::NM { n: 2, m: 4 };
        sparsify_model(
            &mut m,
            &[],
            SparsityMethod::Magnitude,
            nm,
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        m
    }

    /// Bytes of the layers' linears.
    fn bytes(m: &Model) -> usize {
        m.layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|(_, _, l)| l.storage_bytes())
            .sum()
    }

    fn all_linears(m: &Model, f: impl Fn(&Weight) -> bool) -> bool {
        m.layers
            .iter()
            .flat_map(|l| l.linears())
            .all(|(_, _, l)| f(l.weight()))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    const IDS: [u32; 20] = [
        0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 6, 13, 20, 27, 34, 41, 48, 55, 62, 5,
    ];

    /// Logits of the first token alone (decode's product) and of all of [`IDS`] (prefill's).
    fn logits(m: &Model) -> [Vec<f32>; 2] {
        [1, IDS.len()].map(|n| m.forward(&IDS[..n], None, Logits::All, None).unwrap())
    }

    /// A magnitude-2:4 model packs every linear, computes the same logits packed as dense (one
    /// row: the packed dot product; many rows: the expanded GEMM), holds fewer bytes (fewer
    /// still with bf16-exact weights), and rewriting a packed weight expands it again.
    #[test]
    fn packed_two_four_model_matches_dense() {
        let dense = two_four(32, 48, 3);
        let mut packed = dense.clone();
        assert_eq!(packed.pack_sparse24(), 14);
        assert!(packed.has_sparse24() && !dense.has_sparse24());
        assert!(
            bytes(&packed) * 16 <= bytes(&dense) * 9,
            "2.25 bytes a weight"
        );
        for (a, b) in logits(&dense).iter().zip(logits(&packed)) {
            assert!(max_diff(a, &b) < 1e-4);
        }
        // Cut to bf16 (a model read from bf16 weights), the kept values pack as bf16 bits: 1.25
        // bytes a weight, the same logits as the dense bf16 model.
        let mut dense16 = dense.clone();
        for l in &mut dense16.layers {
            for (_, _, lin) in l.linears_mut() {
                let w = lin.dense_weight_mut();
                w.iter_mut()
                    .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            }
        }
        let mut packed16 = dense16.clone();
        assert_eq!(packed16.pack_sparse24(), 14);
        assert!(all_linears(&packed16, |w| matches!(
            w,
            Weight::Sparse24(Sparse24 {
                values: KeptValues::Bf16(_),
                ..
            })
        )));
        assert!(
            bytes(&packed16) * 16 <= bytes(&dense) * 5,
            "1.25 bytes a weight"
        );
        for (a, b) in logits(&dense16).iter().zip(logits(&packed16)) {
            assert!(max_diff(a, &b) < 1e-4, "bf16");
        }
        let lin = &mut packed.layers[0].linears_mut()[0].2;
        lin.dense_weight_mut()[0] += 1.0;
        assert!(matches!(lin.weight(), Weight::Dense(_)));
        // A dense model has nothing to pack.
        assert_eq!(random(32, 48, 1, 1).pack_sparse24(), 0);
    }

    /// A 2:4 model converted to Q8_0 / Q4_0 blocks packs every linear as 2:4 codes at the
    /// AVX-512 levels (and nowhere else), in ~0.6 of the bytes; prefill and the f32-activation
    /// path compute the same logits as the dense blocks, decode's integer dot stays within
    /// activation rounding of theirs, and exports get the very same blocks back.
    #[test]
    fn two_four_blocks_pack_as_codes() {
        use crate::io::gguf::{self, GgufType};
        use crate::kernels::qdot_i16::with_f32_activations as exact;
        use crate::kernels::simd::{with_level, Level};
        use crate::kernels::sparse24_int;
        let dense = two_four(64, 128, 5);
        let dir = tempfile::tempdir().unwrap();
        for ty in [GgufType::Q8_0, GgufType::Q4_0] {
            let path = dir.path().join(format!("{ty:?}.gguf"));
            gguf::save(&dense, None, ty, &path).unwrap();
            let blocks = gguf::load(&path).unwrap().0;
            for level in Level::supported() {
                with_level(level, || {
                    crate::threads::one_thread(|| {
                        let mut packed = blocks.clone();
                        let n = packed.pack_sparse24();
                        if !sparse24_int::takes(level, 8) {
                            assert_eq!(n, 0, "{level}");
                            return;
                        }
                        assert_eq!(n, 14, "{ty:?} at {level}");
                        assert!(all_linears(&packed, |w| matches!(
                            w,
                            Weight::Sparse24Int(_)
                        )));
                        assert!(bytes(&packed) * 10 <= bytes(&blocks) * 7, "{ty:?}");
                        let ([a1, a], [b1, b]) = (logits(&blocks), logits(&packed));
                        assert!(max_diff(&a, &b) < 1e-4, "{ty:?} prefill at {level}");
                        let range = a1.iter().fold(0f32, |m, v| m.max(v.abs()));
                        assert!(
                            max_diff(&a1, &b1) < 1e-3 * range,
                            "{ty:?} decode at {level}"
                        );
                        // Scoring's exact path: both against f32 activations.
                        let ([a1, _], [b1, _]) =
                            (exact(|| logits(&blocks)), exact(|| logits(&packed)));
                        assert!(max_diff(&a1, &b1) < 1e-5 * range, "{ty:?} f32 at {level}");
                        // Written as a packed folder, read back as the same blocks.
                        let out = dir.path().join(format!("{ty:?}-{level}"));
                        crate::io::safetensors::save(&packed, None, true, &out).unwrap();
                        let back = crate::io::safetensors::load(&out).unwrap();
                        for (x, y) in blocks.layers.iter().zip(&back.layers) {
                            for ((_, _, x), (_, _, y)) in x.linears().into_iter().zip(y.linears()) {
                                assert_eq!(x.weight(), y.weight(), "{ty:?}");
                            }
                        }
                    })
                });
            }
        }
    }
}
