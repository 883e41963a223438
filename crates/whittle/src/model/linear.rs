//! A linear layer `y = W x (+ B A x)`: the unit every compression method reads and rewrites.
//! The weight's storage is an enum so that sparse and quantized forms (later methods) are new
//! variants of the same layer, not new model types; an optional low-rank adapter carries error
//! compensation (EoRA) or LoRA on top of any storage. The weight is private so that every
//! rewrite goes through a method that also drops what was derived from it (the tile packing).

use super::packed::Packed;
use super::sparse::{Sparse24, Sparse24Int};
use crate::kernels::amx;
use crate::kernels::dot::dot_at;
use crate::kernels::matmul::{
    matmul_t, matmul_t_expanding, matvec_chunks, GEMV_CHUNK, GEMV_MAX_ROWS,
};
use crate::kernels::matmul_small;
use crate::kernels::qdot::{dequant_row_at, qdot_at};
use crate::kernels::qdot_i16::{self, QActs};
use crate::kernels::simd::{self, Level};
use crate::kernels::sparse24::{dot24_at, unpack_row_at};
use crate::kernels::sparse24_int;
use crate::{Error, Result};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// How a weight matrix `[out, in]` is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// Row-major f32, `out × in` (a sparsified weight is dense with zeros).
    Dense(Vec<f32>),
    /// Group-quantized codes, dequantized on the fly.
    Packed(Packed),
    /// 2:4 sparse f32: two kept values and their positions per group of four inputs.
    Sparse24(Sparse24),
    /// 2:4 sparse codes of a symmetric 4- or 8-bit packed weight (decode at AVX-512).
    Sparse24Int(Sparse24Int),
}

impl Weight {
    /// Rows `rows` of the matrix (`inp` wide) as f32 into `dst`, at `level`: what prefill's
    /// GEMM and exports read from the stored forms.
    pub fn expand_rows_at(&self, level: Level, inp: usize, rows: Range<usize>, dst: &mut [f32]) {
        assert_eq!(dst.len(), rows.len() * inp);
        let mut each = |f: &mut dyn FnMut(usize, &mut [f32])| {
            for (r, d) in rows.clone().zip(dst.chunks_exact_mut(inp)) {
                f(r, d)
            }
        };
        match self {
            Weight::Dense(w) => dst.copy_from_slice(&w[rows.start * inp..rows.end * inp]),
            Weight::Packed(p) => each(&mut |r, d| dequant_row_at(level, p.row(r, inp), d)),
            Weight::Sparse24(s) => each(&mut |r, d| {
                let (values, index) = s.row(r, inp);
                unpack_row_at(level, values, index, d)
            }),
            Weight::Sparse24Int(s) => {
                let m = s.rows(inp);
                each(&mut |r, d| m.range(r..r + 1).unpack_row_at(level, d))
            }
        }
    }

    /// The whole matrix (`inp` wide) as f32 into `w`, 64 rows per parallel task.
    pub fn expand_all_at(&self, level: Level, inp: usize, w: &mut [f32]) {
        use rayon::prelude::*;
        crate::threads::install(|| {
            w.par_chunks_mut(64 * inp).enumerate().for_each(|(c, w)| {
                let rows = 64 * c..64 * c + w.len() / inp;
                self.expand_rows_at(level, inp, rows, w)
            })
        });
    }
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
    weight: Weight,
    pub adapter: Option<LowRank>,
    tiles: TileCache,
}

/// The weight packed for the AMX tile path, built by the first product that takes it. Packing
/// splits and transposes the whole weight, which cost 9 % of a 512-token prefill when done per
/// product; kept, it costs as much memory as an f32 copy of the weight (2 bf16 pieces for
/// weights dequantized from 4-bit blocks). Derived state: clones share it, equality ignores it,
/// and it is dropped whenever the weight is rewritten.
#[derive(Clone, Default)]
struct TileCache(OnceLock<Arc<amx::WeightTiles>>);

impl PartialEq for TileCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for TileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.0.get().map_or(0, |t| t.bytes());
        write!(f, "TileCache({bytes} bytes)")
    }
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
        Ok(Linear::new(Weight::Dense(w), out, inp))
    }

    /// A layer over `weight` (`out × inp`; its size is the caller's to check).
    pub fn new(weight: Weight, out: usize, inp: usize) -> Self {
        Linear {
            out_features: out,
            in_features: inp,
            weight,
            adapter: None,
            tiles: TileCache::default(),
        }
    }

    /// How the weight is stored.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The weight for rewriting in place (drops the tile packing derived from it).
    pub fn weight_mut(&mut self) -> &mut Weight {
        self.tiles = TileCache::default();
        &mut self.weight
    }

    /// Replaces the weight (drops the tile packing derived from the old one).
    pub fn set_weight(&mut self, weight: Weight) {
        *self.weight_mut() = weight;
    }

    /// The weight as dense f32 (what export and analysis read; expanded for packed weights).
    pub fn dense_weight(&self) -> Cow<'_, [f32]> {
        if let Weight::Dense(w) = &self.weight {
            return Cow::Borrowed(w);
        }
        let mut w = vec![0f32; self.out_features * self.in_features];
        self.weight
            .expand_all_at(simd::level(), self.in_features, &mut w);
        Cow::Owned(w)
    }

    /// The weight as group-quantized blocks, when it is stored quantized (2:4 codes are
    /// expanded back to their dense blocks): what exports of packed models write.
    pub fn packed_weight(&self) -> Option<Cow<'_, Packed>> {
        match &self.weight {
            Weight::Packed(p) => Some(Cow::Borrowed(p)),
            Weight::Sparse24Int(s) => {
                let p = s.to_packed(self.out_features, self.in_features);
                Some(Cow::Owned(p.expect("2:4 codes describe their own matrix")))
            }
            _ => None,
        }
    }

    /// Stores a 2:4 weight packed (kept values or codes and their positions); returns whether
    /// it did: dense weights, and symmetric 4/8-bit blocks where `level` has their 2:4 kernel
    /// ([`sparse24_int::takes`]); not when some group keeps more than two inputs.
    pub fn pack_sparse24_at(&mut self, level: Level) -> bool {
        let (out, inp) = (self.out_features, self.in_features);
        let packed = match &self.weight {
            Weight::Dense(w) => Sparse24::pack(w, out, inp).map(Weight::Sparse24),
            Weight::Packed(p) if sparse24_int::takes(level, p.bits) => {
                Sparse24Int::pack(p, out, inp).map(Weight::Sparse24Int)
            }
            _ => None,
        };
        // The same values: a tile packing derived from them stays valid.
        packed.map(|w| self.weight = w).is_some()
    }

    /// The dense weight for in-place rewriting (packed storage is expanded first).
    pub fn dense_weight_mut(&mut self) -> &mut Vec<f32> {
        self.densify();
        match self.weight_mut() {
            Weight::Dense(w) => w,
            _ => unreachable!("densify leaves a dense weight"),
        }
    }

    /// Replaces packed or sparse storage by its f32 expansion (the same values: the tiles stay
    /// valid).
    pub fn densify(&mut self) {
        if !matches!(self.weight, Weight::Dense(_)) {
            self.weight = Weight::Dense(self.dense_weight().into_owned());
        }
    }

    /// Bytes the weight occupies in memory (adapter included, f32 caches excluded).
    pub fn storage_bytes(&self) -> usize {
        let w = match &self.weight {
            Weight::Dense(w) => 4 * w.len(),
            Weight::Packed(p) => p.bytes(),
            Weight::Sparse24(s) => s.bytes(),
            Weight::Sparse24Int(s) => s.bytes(),
        };
        w + self
            .adapter
            .as_ref()
            .map_or(0, |a| 4 * (a.a.len() + a.b.len()))
    }

    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_) | Weight::Sparse24Int(_))
    }

    /// Copies row `r` of the weight (as f32) into `out`: an embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        self.weight
            .expand_rows_at(simd::level(), self.in_features, r..r + 1, out)
    }

    /// Fails if the weight (or adapter) holds NaN or Inf.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match &self.weight {
            Weight::Dense(w) => crate::error::check_finite(name, w)?,
            Weight::Packed(p) => {
                crate::error::check_finite(&format!("{name} (scales)"), &p.scales)?;
                crate::error::check_finite(&format!("{name} (mins)"), &p.mins)?;
            }
            Weight::Sparse24(s) => s.values.check_finite(name)?,
            Weight::Sparse24Int(s) => {
                crate::error::check_finite(&format!("{name} (scales)"), &s.scales)?
            }
        }
        if let Some(a) = &self.adapter {
            crate::error::check_finite(&format!("{name} (adapter A)"), &a.a)?;
            crate::error::check_finite(&format!("{name} (adapter B)"), &a.b)?;
        }
        Ok(())
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
        if self.row_by_row(rows) {
            let level = simd::level();
            for (xr, yr) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
                let xq = self.decode_input(level, xr);
                matvec_chunks(yr, |start, ys| {
                    self.rows_dot(level, start, xr, xq.as_ref(), ys)
                });
            }
        } else {
            match &self.weight {
                _ if amx::takes(rows) => Self::on_tiles(&[self], x, rows, &mut [y]),
                Weight::Dense(w) => matmul_t(x, w, rows, inp, out, y),
                Weight::Packed(p) if matmul_small::takes(simd::level(), rows) => {
                    let w = matmul_small::WeightRows::Packed(p.rows(inp));
                    matmul_small::matmul_t(simd::level(), x, w, (rows, inp, out), y);
                }
                // Expanded chunk by chunk inside the product: keeping an f32 copy would cost
                // the memory of an f32 model.
                packed => {
                    let level = simd::level();
                    let expand = |rows: Range<usize>, w: &mut [f32]| {
                        packed.expand_rows_at(level, inp, rows, w)
                    };
                    matmul_t_expanding(x, (rows, inp, out), y, &expand);
                }
            }
        }
        self.add_adapter(x, rows, y);
    }

    /// `outs[i] = x · linears[i]ᵀ` (adapters not included) on the AMX tiles: one packing of the
    /// shared input and one parallel section for all the products, over the kept weight tiles.
    fn on_tiles(linears: &[&Linear], x: &[f32], rows: usize, outs: &mut [&mut [f32]]) {
        let acts = amx::Acts::pack(x, rows, linears[0].in_features);
        let tiles: Vec<_> = linears.iter().map(|l| l.weight_tiles()).collect();
        let mut products: Vec<_> = tiles
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, y)| amx::Product { w, y })
            .collect();
        amx::matmul_many(&acts, &mut products);
    }

    /// The weight packed for the tile path, packed on first use and kept.
    fn weight_tiles(&self) -> Arc<amx::WeightTiles> {
        let pack = || {
            let w = self.dense_weight();
            Arc::new(amx::WeightTiles::pack(
                &w,
                self.out_features,
                self.in_features,
            ))
        };
        self.tiles.0.get_or_init(pack).clone()
    }

    /// Bytes of the kept tile packing (0 until a tile product has run).
    pub fn tile_bytes(&self) -> usize {
        self.tiles.0.get().map_or(0, |t| t.bytes())
    }

    /// Whether `rows` rows go through the matrix-vector loop (one pass over the weight per row):
    /// one row (decode); a few rows read the weight once in the small-row product instead
    /// where a level has it.
    fn row_by_row(&self, rows: usize) -> bool {
        rows <= GEMV_MAX_ROWS && (rows == 1 || !matmul_small::takes(simd::level(), rows))
    }

    /// `x` quantized to int16 blocks when this weight's decode takes the integer dot product
    /// ([`qdot_i16`]: 4- and 8-bit codes at the vector levels), once for all its rows.
    fn decode_input(&self, level: Level, x: &[f32]) -> Option<QActs> {
        self.takes_int16(level).then(|| QActs::quantize(x))
    }

    fn takes_int16(&self, level: Level) -> bool {
        let takes = match &self.weight {
            Weight::Packed(p) => qdot_i16::takes(level, p.bits),
            Weight::Sparse24Int(s) => sparse24_int::takes(level, s.bits),
            _ => false,
        };
        takes && !qdot_i16::f32_activations()
    }

    /// `y[i] = W[start + i] · x`, dequantizing packed rows on the fly (or, given `xq`,
    /// against the int16 activations); at the level the calling thread resolved, so that
    /// workers run what it was forced to.
    fn rows_dot(&self, level: Level, start: usize, x: &[f32], xq: Option<&QActs>, y: &mut [f32]) {
        let inp = self.in_features;
        let rows = start..start + y.len();
        match (&self.weight, xq) {
            (Weight::Dense(w), _) => {
                for (j, yj) in rows.zip(y) {
                    *yj = dot_at(level, &w[j * inp..(j + 1) * inp], x);
                }
            }
            (Weight::Packed(p), Some(xq)) => {
                qdot_i16::qdot_i16_rows_at(level, p.rows(inp).range(rows), xq, y);
            }
            (Weight::Packed(p), None) => {
                let m = p.rows(inp);
                for (j, yj) in rows.zip(y) {
                    *yj = qdot_at(level, m.row(j), x);
                }
            }
            (Weight::Sparse24(s), _) => {
                for (j, yj) in rows.zip(y) {
                    let (v, i) = s.row(j, inp);
                    *yj = dot24_at(level, v, i, x);
                }
            }
            (Weight::Sparse24Int(s), Some(xq)) => {
                sparse24_int::dot_rows_at(level, s.rows(inp).range(rows), xq, y);
            }
            // f32 activations (scoring): each row expanded, then the exact dot product.
            (Weight::Sparse24Int(s), None) => {
                let (m, mut w) = (s.rows(inp), vec![0f32; inp]);
                for (j, yj) in rows.zip(y) {
                    m.range(j..j + 1).unpack_row_at(level, &mut w);
                    *yj = dot_at(level, &w, x);
                }
            }
        }
    }

    /// Runs linears that read the same input (q/k/v, gate/up): `outs[i] = x · linears[i]ᵀ`.
    /// For a few rows (decode), all their output rows form one parallel section, which halves
    /// the thread wake-ups per token compared with one section per linear.
    pub fn forward_shared_input(
        linears: &[&Linear],
        x: &[f32],
        rows: usize,
        outs: &mut [&mut [f32]],
    ) {
        if amx::takes(rows) {
            Self::on_tiles(linears, x, rows, outs);
            for (l, y) in linears.iter().zip(outs.iter_mut()) {
                l.add_adapter(x, rows, y);
            }
            return;
        }
        if !linears.iter().all(|l| l.row_by_row(rows)) {
            for (l, y) in linears.iter().zip(outs.iter_mut()) {
                l.forward(x, rows, y);
            }
            return;
        }
        let inp = linears[0].in_features;
        let level = simd::level();
        // The int16 input of each row, quantized once for every linear that reads it.
        let int16 = linears.iter().any(|l| l.takes_int16(level));
        let xq: Vec<Option<QActs>> = x
            .chunks_exact(inp)
            .map(|xr| int16.then(|| QActs::quantize(xr)))
            .collect();
        type Task<'a> = (
            &'a Linear,
            &'a [f32],
            Option<&'a QActs>,
            usize,
            &'a mut [f32],
        );
        let mut tasks: Vec<Task> = Vec::new();
        for (l, y) in linears.iter().zip(outs.iter_mut()) {
            let out = l.out_features;
            let rows = x.chunks_exact(inp).zip(&xq).zip(y.chunks_exact_mut(out));
            for ((xr, xq), yr) in rows {
                let xq = xq.as_ref().filter(|_| l.takes_int16(level));
                for (c, chunk) in yr.chunks_mut(GEMV_CHUNK).enumerate() {
                    tasks.push((l, xr, xq, c * GEMV_CHUNK, chunk));
                }
            }
        }
        crate::threads::for_each_mut(&mut tasks, |(l, xr, xq, start, chunk)| {
            l.rows_dot(level, *start, xr, *xq, chunk)
        });
        for (l, y) in linears.iter().zip(outs.iter_mut()) {
            l.add_adapter(x, rows, y);
        }
    }

    /// `y += B(Ax)` when the layer carries a low-rank adapter.
    fn add_adapter(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (inp, out) = (self.in_features, self.out_features);
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

    /// A rewrite of the weight drops its kept tile packing, so the next product sees the new
    /// values (doubled weights: exactly doubled outputs, also on the tiles).
    #[test]
    fn rewriting_the_weight_drops_its_tiles() {
        let (out, inp, rows) = (48, 64, 40);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (i % 13) as f32 * 0.01 - 0.06)
            .collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| (i % 7) as f32 * 0.1 - 0.3)
            .collect();
        let mut lin = Linear::dense("w", w, out, inp).unwrap();
        let mut y = vec![0f32; rows * out];
        lin.forward(&x, rows, &mut y);
        assert_eq!(lin.tile_bytes() > 0, amx::takes(rows));
        lin.dense_weight_mut().iter_mut().for_each(|v| *v *= 2.0);
        assert_eq!(lin.tile_bytes(), 0);
        let mut doubled = vec![0f32; rows * out];
        lin.forward(&x, rows, &mut doubled);
        let want: Vec<f32> = y.iter().map(|v| 2.0 * v).collect();
        assert_eq!(doubled, want);
    }

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
