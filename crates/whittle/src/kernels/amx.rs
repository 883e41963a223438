//! `y = x · Wᵀ` in f32 on Intel AMX tiles, to f32 accuracy.
//!
//! Why: on CPUs with AMX (Sapphire Rapids and later) one `tdpbf16ps` multiplies a 16 × 32 by a
//! 32 × 16 bf16 tile into f32 sums, ~12x the f32 FMA rate of the same core (measured here:
//! 4.7 ns per instruction, 3.4 TFLOP/s bf16 per core against a 233 GFLOP/s f32 peak). bf16 alone
//! would change the model's numbers, so every f32 is split into three bf16 pieces by truncation,
//! `v = v₀ + v₁ + v₂` exactly (each piece takes the next 8 significant bits), and the product
//! sums the six piece products `wᵢ·xⱼ` with `i + j ≤ 2`. The three dropped ones are below
//! 2⁻²⁴ of `w·x`, the rounding level of f32 itself, and the pieces' products are exact in the
//! f32 accumulators; so the result carries f32 rounding, not bf16 error (the "bf16x3" scheme
//! of oneDNN and of NVIDIA's 3xTF32). Six tile products per f32 product still leave AMX ahead of
//! f32 FMAs (see BENCHMARKS.md for the measured prefill). Weights with fewer significant bits
//! have zero pieces, whose products are skipped: 5 products for ≤ 16 bits (every weight
//! dequantized from GGUF's 4-bit blocks with f16 scales), 3 for bf16 weights.
//!
//! Layout. `x` (`rows × in`) becomes the A operand, each tile 1 KiB contiguous:
//! `[16-token block][k block][piece][token][32]` bf16 (split rows as they are). `W` (`out × in`)
//! becomes the B operand in AMX's pair layout, `[16-feature block][k block][piece][k pair]
//! [feature]` u32 (a 16 × 16 transpose of the split rows), holding only the pieces the weight
//! needs. The accumulator tiles are then blocks of `y` itself (`[token][feature]`) and are stored
//! straight into it. Weights are packed once into [`WeightTiles`], which a `Linear` keeps with
//! its weight (dropping them when the weight is rewritten), so a forward pass pays neither the
//! split nor the transpose of its weights; activations are packed once per input (shared by
//! q/k/v, by gate/up). The micro-kernel computes a 32 × 32 block of `y` (four accumulator tiles)
//! over the whole depth, in one of three schedules by the weight's piece count.
//!
//! Training may ask for less ([`Precision::Bf16x3`]): two pieces of each operand and the three
//! products `x₁w₀, x₀w₀, x₀w₁` (oneDNN's "bf16x3"), half the tile products of an f32 weight's
//! six, with a relative error of a few 2⁻¹⁶ per term instead of f32 rounding.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::OnceLock;

/// How exactly the tile products multiply f32 values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Precision {
    /// Every piece product the f32 result needs (see the module doc): f32 rounding, not bf16
    /// error. Inference and evaluation always use it.
    #[default]
    F32,
    /// Two bf16 pieces of each operand and three products (`x₁w₀, x₀w₀, x₀w₁`): each term
    /// within ~3·2⁻¹⁶ of `|x|·|w|`, for 3 tile products where f32 weights take 6. For training,
    /// whose gradients carry far more noise than that.
    Bf16x3,
}

impl Precision {
    /// The activation pieces its products read.
    fn activation_pieces(self) -> usize {
        match self {
            Precision::F32 => PIECES,
            Precision::Bf16x3 => 2,
        }
    }
}

thread_local! {
    /// Packing buffers of activations, reused between products (a fresh multi-MiB buffer per
    /// product costs its page faults: measured 0.3–1 ms per product). A pool, because attention
    /// holds two at once (queries, probabilities).
    static ACT_TILES: RefCell<Vec<Vec<u16>>> = const { RefCell::new(Vec::new()) };
    /// Packing buffer of transient weights ([`matmul_t`]), reused for the same reason.
    static WEIGHT_TILES: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Fewest rows for which the tile path pays (it pads rows to 32).
const MIN_ROWS: usize = 32;
/// Values per tile row (bf16) and rows per tile.
const KB: usize = 32;
const TILE: usize = 16;
/// bf16 pieces per f32.
const PIECES: usize = 3;
/// bf16 values in one A tile, u32 pairs in one B tile.
const A_TILE: usize = TILE * KB;
const B_TILE: usize = TILE * TILE;
/// Padding after the last tiles of a buffer: the micro-kernel loads the next k block's first
/// tiles while it finishes the current one, also after the last k block (activations: up to
/// piece 2 of the next block; weights: piece 0 of the next block).
const A_AHEAD: usize = PIECES * A_TILE;
const B_AHEAD: usize = B_TILE;

/// Whether the CPU has AMX-BF16 (and AVX512-BW, used to pack tiles) and Linux granted this
/// process the tile state; asked once.
pub fn os_grants_tiles() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(imp::enable)
}

/// Whether the tile path runs on this thread: the SIMD level is `amx` (the CPU's widest where it
/// has AMX; `WHITTLE_SIMD=avx512` or lower forces the other GEMMs, e.g. to compare them).
pub fn available() -> bool {
    super::simd::level() == super::simd::Level::Amx
}

/// Whether a product over `rows` rows takes the tile path (the one rule that the plain and the
/// shared-input products both follow).
pub fn takes(rows: usize) -> bool {
    rows >= MIN_ROWS && available()
}

/// Splitting into pieces and laying out tiles, 32 values at a time in AVX-512 registers (every
/// CPU with AMX has AVX512-BW).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{A_TILE, B_TILE, KB, PIECES, TILE};
    use std::arch::x86_64::*;

    /// The pieces of 32 values (zero beyond `src.len()`): register `p` holds piece `p` of each
    /// value as 32 bf16 in order, i.e. 16 pairs `(v[2i], v[2i+1])` as u32.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn split32(src: &[f32]) -> [__m512i; PIECES] {
        let mut buf = [0f32; KB];
        let src = if src.len() == KB {
            src
        } else {
            buf[..src.len()].copy_from_slice(src);
            &buf[..]
        };
        const ODD: [u16; 32] = {
            let mut a = [0u16; 32];
            let mut i = 0;
            while i < 32 {
                a[i] = 2 * i as u16 + 1;
                i += 1;
            }
            a
        };
        let idx = _mm512_loadu_si512(ODD.as_ptr().cast());
        let lo = pieces16(_mm512_loadu_ps(src.as_ptr()));
        let hi = pieces16(_mm512_loadu_ps(src.as_ptr().add(16)));
        [0, 1, 2].map(|p| _mm512_permutex2var_epi16(lo[p], idx, hi[p]))
    }

    /// The three pieces of 16 values, each piece in the high half of its value's u32 lane
    /// (the low half zero).
    #[inline(always)]
    unsafe fn pieces16(v: __m512) -> [__m512i; PIECES] {
        let mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let p0 = _mm512_and_si512(_mm512_castps_si512(v), mask);
        let r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(p0));
        let p1 = _mm512_and_si512(_mm512_castps_si512(r1), mask);
        let r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(p1));
        [p0, p1, _mm512_and_si512(_mm512_castps_si512(r2), mask)]
    }

    /// Depth rows `2i` and `2i + 1` of k block `kb` of a k-major source (`src`: `depth` rows of
    /// `ld` floats), columns `c0..c0 + n` (`n ≤ 16`; zeros past them and past `depth`), as u32
    /// lanes over the columns: lane `c` of piece `p` holds piece `p` of row `2i`'s value in its
    /// low half and of row `2i + 1`'s in its high half — one pair of AMX's pair layout.
    #[inline(always)]
    unsafe fn pair_rows(
        src: &[f32],
        (ld, depth): (usize, usize),
        (kb, i): (usize, usize),
        (c0, n): (usize, usize),
    ) -> [__m512i; PIECES] {
        let row = |d: usize| {
            if d >= depth || n == 0 {
                return _mm512_setzero_ps();
            }
            let mask: __mmask16 = if n >= TILE { !0 } else { (1 << n) - 1 };
            _mm512_maskz_loadu_ps(mask, src[d * ld + c0..].as_ptr())
        };
        let d = kb * KB + 2 * i;
        let (lo, hi) = (pieces16(row(d)), pieces16(row(d + 1)));
        [0, 1, 2].map(|p| _mm512_or_si512(_mm512_srli_epi32::<16>(lo[p]), hi[p]))
    }

    /// Columns `c0..c0 + n` (`n ≤ 16`) of a k-major source — `Wᵀ`, `depth` rows of `ld` —
    /// into B tiles of `pieces` pieces, as [`pack_pairs`] lays out the rows of `W`: the k pairs
    /// are two source rows, so no transpose is needed.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_pairs_k_major(
        src: &[f32],
        (ld, depth): (usize, usize),
        (c0, n): (usize, usize),
        pieces: usize,
        out: &mut [u32],
    ) {
        for (kb, tiles) in out.chunks_exact_mut(pieces * B_TILE).enumerate() {
            for i in 0..TILE {
                let v = pair_rows(src, (ld, depth), (kb, i), (c0, n));
                for (p, v) in v.into_iter().take(pieces).enumerate() {
                    let at = p * B_TILE + i * TILE;
                    _mm512_storeu_si512(tiles[at..at + TILE].as_mut_ptr().cast(), v);
                }
            }
        }
    }

    /// Columns `c0..c0 + n` (`n ≤ 16`) of a k-major source — `xᵀ`, `depth` rows of `ld` —
    /// as one block of A tiles (the first `pieces`), as [`pack_row`] lays out 16 rows of `x`:
    /// the pairs of two source rows, transposed 16 × 16 into token rows.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_tokens_k_major(
        src: &[f32],
        (ld, depth): (usize, usize),
        (c0, n): (usize, usize),
        pieces: usize,
        out: &mut [u16],
    ) {
        for (kb, tiles) in out.chunks_exact_mut(PIECES * A_TILE).enumerate() {
            let mut m = [[_mm512_setzero_si512(); TILE]; PIECES];
            for i in 0..TILE {
                let v = pair_rows(src, (ld, depth), (kb, i), (c0, n));
                for (piece, v) in m.iter_mut().zip(v) {
                    piece[i] = v;
                }
            }
            for (p, rows) in m.iter_mut().enumerate().take(pieces) {
                transpose16(rows);
                for (t, row) in rows.iter().enumerate() {
                    let at = p * A_TILE + t * KB;
                    _mm512_storeu_si512(tiles[at..at + KB].as_mut_ptr().cast(), *row);
                }
            }
        }
    }

    /// How many pieces `v` needs: 1 when every later piece is zero (bf16 values), 2 when only
    /// the last is (≤ 16 significant bits, e.g. weights dequantized from 4-bit blocks with f16
    /// scales), else 3.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pieces_needed(v: &[f32]) -> usize {
        let mut seen = [_mm512_setzero_si512(); PIECES];
        for c in v.chunks(KB) {
            for (s, p) in seen.iter_mut().zip(split32(c)) {
                *s = _mm512_or_si512(*s, p);
            }
        }
        let nonzero = |v: __m512i| _mm512_test_epi32_mask(v, v) != 0;
        match (nonzero(seen[1]), nonzero(seen[2])) {
            (_, true) => 3,
            (true, false) => 2,
            (false, false) => 1,
        }
    }

    /// Row `n` (of 16) of a block of A tiles: value `j` of k block `kb`, piece `p` (the first
    /// `pieces`) goes to `out[(kb·3 + p)·512 + n·32 + j]`; values past `x.len()` (up to the
    /// block's depth) are 0.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_row(x: &[f32], n: usize, pieces: usize, out: &mut [u16]) {
        for (kb, tiles) in out.chunks_exact_mut(PIECES * A_TILE).enumerate() {
            let v = match kb * KB < x.len() {
                true => split32(&x[kb * KB..x.len().min((kb + 1) * KB)]),
                false => [_mm512_setzero_si512(); PIECES],
            };
            for (p, v) in v.into_iter().take(pieces).enumerate() {
                let at = p * A_TILE + n * KB;
                _mm512_storeu_si512(tiles[at..at + KB].as_mut_ptr().cast(), v);
            }
        }
    }

    /// Up to 16 weight rows (`w.len() / inp`) into B tiles of `pieces` pieces per k block:
    /// row `n`'s pair `i` of k block `kb`, piece `p` goes to `out[(kb·pieces + p)·256 + i·16
    /// + n]` (a 16 × 16 transpose of the split rows); missing rows are zero.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_pairs(w: &[f32], inp: usize, pieces: usize, out: &mut [u32]) {
        let present = w.len() / inp;
        for (kb, tiles) in out.chunks_exact_mut(pieces * B_TILE).enumerate() {
            let mut m = [[_mm512_setzero_si512(); TILE]; PIECES];
            for n in 0..present {
                let v = split32(&w[n * inp + kb * KB..n * inp + inp.min((kb + 1) * KB)]);
                for (piece, v) in m.iter_mut().zip(v) {
                    piece[n] = v;
                }
            }
            for (p, tile) in tiles.chunks_exact_mut(B_TILE).enumerate() {
                transpose16(&mut m[p]);
                for (i, row) in m[p].iter().enumerate() {
                    _mm512_storeu_si512(tile[i * TILE..(i + 1) * TILE].as_mut_ptr().cast(), *row);
                }
            }
        }
    }

    /// Transposes 16 rows of 16 u32 in registers (unpack 32, unpack 64, two 128-bit shuffles).
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in (0..16).step_by(2) {
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for i in (0..16).step_by(4) {
            r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for h in [0, 8] {
            for i in 0..4 {
                t[h + i] = _mm512_shuffle_i32x4::<0x88>(r[h + i], r[h + i + 4]);
                t[h + i + 4] = _mm512_shuffle_i32x4::<0xdd>(r[h + i], r[h + i + 4]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_i32x4::<0x88>(t[i], t[i + 8]);
            r[i + 8] = _mm512_shuffle_i32x4::<0xdd>(t[i], t[i + 8]);
        }
    }
}

/// Runs `f` over `chunks`, in parallel when whittle uses more than one thread.
fn each_chunk<T: Send>(chunks: Vec<T>, f: impl Fn(T) + Sync + Send) {
    if crate::threads::threads() == 1 {
        chunks.into_iter().for_each(f);
    } else {
        chunks.into_par_iter().for_each(f);
    }
}

/// Activations packed as A tiles (see the module doc), shared by every weight that reads them.
pub struct Acts {
    /// The tiles, then at least [`A_AHEAD`] more (a reused buffer may be longer).
    data: Vec<u16>,
    rows: usize,
    inp: usize,
    kblocks: usize,
    token_pairs: usize,
}

impl Acts {
    /// Packs `x` (`rows × inp`, row-major); rows are padded to a multiple of 32 with zeros.
    pub fn pack(x: &[f32], rows: usize, inp: usize) -> Acts {
        Acts::pack_at(x, rows, inp, Precision::F32)
    }

    /// [`Acts::pack`] for products at `precision`: bf16x3 never reads the third pieces, so
    /// they are not written.
    fn pack_at(x: &[f32], rows: usize, inp: usize, precision: Precision) -> Acts {
        assert_eq!(x.len(), rows * inp);
        let pieces = precision.activation_pieces();
        Acts::pack_blocks(rows, inp, &|tb, out| {
            for n in 0..TILE {
                let r = (tb * TILE + n).min(rows);
                let row = &x[r * inp..(r * inp + inp).min(x.len())];
                // SAFETY: `pack_blocks` runs this only where `os_grants_tiles()`, which implies
                // AVX512-BW.
                unsafe { simd::pack_row(row, n, pieces, out) }
            }
        })
    }

    /// The tiles of `rows × inp` activations, each block of 16 rows written by
    /// `block(token_block, tiles)`, in parallel.
    fn pack_blocks(rows: usize, inp: usize, block: &(dyn Fn(usize, &mut [u16]) + Sync)) -> Acts {
        let mut acts = Acts::with_shape(rows, inp);
        let per_block = acts.per_block();
        let chunks: Vec<_> = acts.data[..2 * acts.token_pairs * per_block]
            .chunks_mut(per_block.max(1))
            .enumerate()
            .collect();
        each_chunk(chunks, |(tb, out)| block(tb, out));
        acts
    }

    /// Packs the activations `x = srcᵀ[cols]`: `src` is k-major (`depth` rows of `ld` floats)
    /// and each column in `cols` is one row of `x`, `depth` deep. The left operand of a weight
    /// gradient `dyᵀ · x` is the transpose of a row-major `dy`; this reads it without a copy.
    fn pack_k_major(
        src: &[f32],
        (depth, ld): (usize, usize),
        cols: std::ops::Range<usize>,
        precision: Precision,
    ) -> Acts {
        assert!(cols.end <= ld && src.len() >= depth * ld);
        let rows = cols.len();
        let pieces = precision.activation_pieces();
        Acts::pack_blocks(rows, depth, &|tb, out| {
            let t0 = (tb * TILE).min(rows);
            let n = TILE.min(rows - t0);
            // SAFETY: as in `pack`; the columns `cols.start + t0 ..+ n` lie inside `ld`
            // (asserted above).
            unsafe {
                simd::pack_tokens_k_major(src, (ld, depth), (cols.start + t0, n), pieces, out)
            }
        })
    }

    /// Tiles for `rows × inp` values whose rows are packed one by one with [`Acts::set_row`]
    /// (rows never set hold whatever the reused buffer held).
    pub fn with_shape(rows: usize, inp: usize) -> Acts {
        assert!(
            os_grants_tiles(),
            "AMX tile path used on a machine without it"
        );
        let kblocks = inp.div_ceil(KB);
        let token_pairs = rows.div_ceil(2 * TILE);
        let mut data = ACT_TILES
            .with_borrow_mut(|pool| pool.pop())
            .unwrap_or_default();
        // The padding after the last block is only ever loaded ahead, never used.
        super::scratch(
            &mut data,
            2 * token_pairs * kblocks * PIECES * A_TILE + A_AHEAD,
        );
        Acts {
            data,
            rows,
            inp,
            kblocks,
            token_pairs,
        }
    }

    fn per_block(&self) -> usize {
        self.kblocks * PIECES * A_TILE
    }

    /// Packs row `r` (< rows rounded up to 32): `x`, then zeros up to the depth.
    pub fn set_row(&mut self, r: usize, x: &[f32]) {
        assert!(r < 2 * TILE * self.token_pairs && x.len() <= self.inp);
        let per_block = self.per_block();
        let block = &mut self.data[r / TILE * per_block..][..per_block];
        // SAFETY: `os_grants_tiles()` (asserted by `with_shape`) implies AVX512-BW.
        unsafe { simd::pack_row(x, r % TILE, PIECES, block) }
    }
}

impl Drop for Acts {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        ACT_TILES.with_borrow_mut(|pool| pool.push(data));
    }
}

/// A weight (`out × inp`) packed as B tiles with only the pieces it needs (see the module
/// doc): what a `Linear` keeps so that its products do not split and transpose it every time.
pub struct WeightTiles {
    /// The tiles, then at least [`B_AHEAD`] more (a reused buffer may be longer).
    data: Vec<u32>,
    out: usize,
    inp: usize,
    pieces: usize,
    precision: Precision,
}

impl WeightTiles {
    /// Packs `w` (`out × inp`, row-major); features are padded to a multiple of 32 with zeros.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> WeightTiles {
        Self::pack_into(w, out, inp, Vec::new(), Precision::F32)
    }

    fn pack_into(
        w: &[f32],
        out: usize,
        inp: usize,
        data: Vec<u32>,
        precision: Precision,
    ) -> WeightTiles {
        assert_eq!(w.len(), out * inp);
        Self::pack_blocks(w, (out, inp), (data, precision), &|fb, pieces, dst| {
            let (r0, r1) = ((fb * TILE).min(out), ((fb + 1) * TILE).min(out));
            // SAFETY: `pack_blocks` runs this only where `os_grants_tiles()`, which implies
            // AVX512-BW.
            unsafe { simd::pack_pairs(&w[r0 * inp..r1 * inp], inp, pieces, dst) }
        })
    }

    /// Packs `W` (`out × inp`) given as `src = Wᵀ` (`inp × out`, row-major): the right operand
    /// of a weight gradient `dyᵀ · x`, whose weight is `xᵀ`, read without a transpose.
    fn pack_k_major(
        src: &[f32],
        out: usize,
        inp: usize,
        data: Vec<u32>,
        precision: Precision,
    ) -> WeightTiles {
        assert_eq!(src.len(), out * inp);
        Self::pack_blocks(src, (out, inp), (data, precision), &|fb, pieces, dst| {
            let c0 = (fb * TILE).min(out);
            let n = TILE.min(out - c0);
            // SAFETY: as in `pack_into`; the columns `c0 ..+ n` lie inside the `out` columns.
            unsafe { simd::pack_pairs_k_major(src, (out, inp), (c0, n), pieces, dst) }
        })
    }

    /// The tiles of `out × inp` values, all of which are in `values`, each block of 16
    /// features written by `block(feature_block, pieces, tiles)`.
    fn pack_blocks(
        values: &[f32],
        (out, inp): (usize, usize),
        (mut data, precision): (Vec<u32>, Precision),
        block: &(dyn Fn(usize, usize, &mut [u32]) + Sync),
    ) -> WeightTiles {
        assert!(
            os_grants_tiles(),
            "AMX tile path used on a machine without it"
        );
        let pieces = match precision {
            // SAFETY: `os_grants_tiles()` (asserted above) implies AVX512-BW.
            Precision::F32 => unsafe { simd::pieces_needed(values) },
            // Two, without the scan (trained weights use all their bits).
            Precision::Bf16x3 => 2,
        };
        let per_block = inp.div_ceil(KB) * pieces * B_TILE;
        let blocks = 2 * out.div_ceil(2 * TILE);
        let chunks: Vec<_> = super::scratch(&mut data, blocks * per_block + B_AHEAD)
            [..blocks * per_block]
            .chunks_mut(per_block.max(1))
            .enumerate()
            .collect();
        each_chunk(chunks, |(fb, dst)| block(fb, pieces, dst));
        WeightTiles {
            data,
            out,
            inp,
            pieces,
            precision,
        }
    }

    /// Bytes the tiles occupy.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }
}

/// One product of [`matmul_many`]: `y[rows, out] = x · wᵀ`.
pub struct Product<'a> {
    pub w: &'a WeightTiles,
    pub y: &'a mut [f32],
}

/// Feature pairs (of 32 features) per work item: the item's weight tiles stay in L2 while every
/// token passes over them. Small enough that the 192-wide K/V projections still give several
/// items to share between threads.
const PAIRS_PER_ITEM: usize = 2;

/// Runs several products over the same packed activations (q/k/v, gate/up) as one parallel
/// section, overwriting each `y`. Panics unless [`available`] (which also obtains the tile
/// state from the OS).
pub fn matmul_many(acts: &Acts, products: &mut [Product]) {
    let mut items = Vec::new();
    for (i, p) in products.iter_mut().enumerate() {
        assert_eq!(p.w.inp, acts.inp);
        assert_eq!(p.y.len(), acts.rows * p.w.out);
        for f0 in (0..p.w.out.div_ceil(2 * TILE)).step_by(PAIRS_PER_ITEM) {
            items.push((i, f0, SendPtr(p.y.as_mut_ptr())));
        }
    }
    let products: &[Product] = products;
    each_chunk(items, |(i, f0, y)| {
        let w = products[i].w;
        let pairs = f0..(f0 + PAIRS_PER_ITEM).min(w.out.div_ceil(2 * TILE));
        // SAFETY: `y` holds `rows × w.out` floats (asserted above) and work items cover
        // disjoint feature pairs of it.
        unsafe { feature_pairs(acts, w, pairs, w.out, y.0, w.out) };
    });
}

/// `y[rows, features] = x · w[..features]ᵀ` on the calling thread (for callers that are
/// parallel tasks themselves), over the k blocks of `acts`: a weight packed deeper than `acts`
/// contributes only its first rows of depth (attention's values, of which a query block sees a
/// prefix).
pub fn product(acts: &Acts, w: &WeightTiles, features: usize, y: &mut [f32]) {
    assert!(features <= w.out && acts.kblocks <= w.inp.div_ceil(KB));
    assert_eq!(y.len(), acts.rows * features);
    // SAFETY: `y` holds `rows × features` floats (asserted above).
    unsafe {
        feature_pairs(
            acts,
            w,
            0..features.div_ceil(2 * TILE),
            features,
            y.as_mut_ptr(),
            features,
        )
    };
}

/// Writes `y[r, n] = Σₖ acts[r, k] · w[n, k]` for the features `n < features` of the pairs (of
/// 32 features) `pairs`, rows `ld` floats apart.
///
/// # Safety
/// `y` is valid for `acts.rows` rows of `ld ≥ features` floats, and nothing else writes the
/// columns of `pairs` while this runs; `features ≤ w.out`, `acts.kblocks ≤ w`'s k blocks.
unsafe fn feature_pairs(
    acts: &Acts,
    w: &WeightTiles,
    pairs: std::ops::Range<usize>,
    features: usize,
    y: *mut f32,
    ld: usize,
) {
    let (rows, kblocks) = (acts.rows, acts.kblocks);
    if kblocks == 0 {
        // Zero depth (a rank-0 adapter): the micro-kernel's loop needs one k block.
        for r in 0..rows {
            for n in pairs.start * 2 * TILE..features.min(pairs.end * 2 * TILE) {
                *y.add(r * ld + n) = 0.0;
            }
        }
        return;
    }
    let pair_tiles = 2 * kblocks * PIECES * A_TILE;
    let feature_tiles = w.inp.div_ceil(KB) * w.pieces * B_TILE;
    let token_pairs = acts.token_pairs;
    // Token pairs per pass over the feature pairs: their A tiles (≤ 1 MiB) stay in L2.
    let tp_chunk = ((1 << 20) / (pair_tiles * 2)).max(1);
    let mut c = Tiles([0f32; 4 * TILE * TILE]);
    imp::configure();
    for t0 in (0..token_pairs).step_by(tp_chunk) {
        for fp in pairs.clone() {
            let n0 = 2 * fp * TILE;
            let b = w.data[n0 / TILE * feature_tiles..].as_ptr();
            for tp in t0..(t0 + tp_chunk).min(token_pairs) {
                let a = acts.data[tp * pair_tiles..].as_ptr();
                let r0 = tp * 2 * TILE;
                // SAFETY (both calls): `a` points at two blocks of `kblocks` k blocks of
                // activation tiles and `b` at two of weight tiles with `w.pieces` pieces (the
                // buffers hold whole pairs plus the ahead padding); the tile state was
                // configured on this thread; the destination holds 32 rows of 32 floats at
                // the given byte stride: the 32 × 32 block at (r0, n0) of `y` when it lies
                // inside (the caller's contract), else the local `c`.
                if r0 + 2 * TILE <= rows && n0 + 2 * TILE <= features {
                    imp::block(
                        a,
                        b,
                        kblocks,
                        (w.pieces, w.precision),
                        y.add(r0 * ld + n0),
                        4 * ld,
                    );
                    continue;
                }
                let lc = 2 * TILE;
                imp::block(
                    a,
                    b,
                    kblocks,
                    (w.pieces, w.precision),
                    c.0.as_mut_ptr(),
                    4 * lc,
                );
                let n = lc.min(features - n0);
                for (t, row) in c.0.chunks_exact(lc).take(rows - r0).enumerate() {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), y.add((r0 + t) * ld + n0), n);
                }
            }
        }
    }
    imp::release();
}

/// `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ` on tiles at `precision`, packing both operands
/// for this one product (a weight used again belongs in a kept [`WeightTiles`]).
pub fn matmul_t(
    x: &[f32],
    w: &[f32],
    (rows, inp, out): (usize, usize, usize),
    y: &mut [f32],
    precision: Precision,
) {
    let acts = Acts::pack_at(x, rows, inp, precision);
    let buf = WEIGHT_TILES.with_borrow_mut(std::mem::take);
    let w = WeightTiles::pack_into(w, out, inp, buf, precision);
    matmul_many(&acts, &mut [Product { w: &w, y }]);
    WEIGHT_TILES.with_borrow_mut(|b| *b = w.data);
}

/// `dx[rows, inp] = dy[rows, out] · w[out, inp]`, the input gradient of `y = x · wᵀ`, on tiles
/// at `precision`: `w` is the right operand as it lies (its rows are the k pairs), no
/// transpose in memory.
pub fn matmul_nn(
    dy: &[f32],
    w: &[f32],
    (rows, out, inp): (usize, usize, usize),
    dx: &mut [f32],
    precision: Precision,
) {
    assert_eq!(
        (dy.len(), w.len(), dx.len()),
        (rows * out, out * inp, rows * inp)
    );
    let buf = WEIGHT_TILES.with_borrow_mut(std::mem::take);
    let wt = WeightTiles::pack_k_major(w, inp, out, buf, precision);
    let pack = |r: std::ops::Range<usize>| {
        Acts::pack_at(&dy[r.start * out..r.end * out], r.len(), out, precision)
    };
    in_chunks(wt, (rows, out), &pack, dx);
}

/// `y = a · wᵀ` into `y` (`n × wt.out`) for a left operand of `n` rows of `depth` that
/// `pack(rows)` packs a chunk of rows at a time ([`LEFT_CHUNK_BYTES`]); gives `wt`'s buffer back.
fn in_chunks(
    wt: WeightTiles,
    (n, depth): (usize, usize),
    pack: &dyn Fn(std::ops::Range<usize>) -> Acts,
    y: &mut [f32],
) {
    let chunk = (LEFT_CHUNK_BYTES / (2 * PIECES * depth.max(1)))
        .next_multiple_of(2 * TILE)
        .max(2 * TILE);
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let y = &mut y[r0 * wt.out..r1 * wt.out];
        matmul_many(&pack(r0..r1), &mut [Product { w: &wt, y }]);
    }
    WEIGHT_TILES.with_borrow_mut(|b| *b = wt.data);
}

/// Bytes of packed left operand per chunk of [`matmul_tn`] and [`matmul_nn`] (the head's
/// gradient packed whole would take 6 bytes a value, 1.2 GB at 4096 rows). Small in tests, so
/// that their small products run several chunks.
const LEFT_CHUNK_BYTES: usize = if cfg!(test) { 64 << 10 } else { 32 << 20 };

/// `dw[out, inp] = dy[rows, out]ᵀ · x[rows, inp]`, the weight gradient of `y = x · wᵀ`, on
/// tiles at `precision`: `x` packed once as the right operand, `dyᵀ` packed a chunk of
/// outputs at a time as the left one (neither transposed in memory).
pub fn matmul_tn(
    dy: &[f32],
    x: &[f32],
    (rows, out, inp): (usize, usize, usize),
    dw: &mut [f32],
    precision: Precision,
) {
    assert_eq!(
        (dy.len(), x.len(), dw.len()),
        (rows * out, rows * inp, out * inp)
    );
    let buf = WEIGHT_TILES.with_borrow_mut(std::mem::take);
    let xt = WeightTiles::pack_k_major(x, inp, rows, buf, precision);
    let pack = |o| Acts::pack_k_major(dy, (rows, out), o, precision);
    in_chunks(xt, (out, rows), &pack, dw);
}

#[repr(C, align(64))]
struct Tiles([f32; 4 * TILE * TILE]);

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint positions by the work items.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Other architectures never take the tile path (`os_grants_tiles()` is false there).
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub unsafe fn pieces_needed(_: &[f32]) -> usize {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
    pub unsafe fn pack_row(_: &[f32], _: usize, _: usize, _: &mut [u16]) {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
    pub unsafe fn pack_pairs(_: &[f32], _: usize, _: usize, _: &mut [u32]) {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
    pub unsafe fn pack_pairs_k_major(
        _: &[f32],
        _: (usize, usize),
        _: (usize, usize),
        _: usize,
        _: &mut [u32],
    ) {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
    pub unsafe fn pack_tokens_k_major(
        _: &[f32],
        _: (usize, usize),
        _: (usize, usize),
        _: usize,
        _: &mut [u16],
    ) {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    extern "C" {
        fn syscall(num: i64, ...) -> i64;
    }

    /// Asks Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`),
    /// after checking CPUID for AMX-TILE and AMX-BF16.
    pub fn enable() -> bool {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: a plain system call; it only changes this process's permitted xsave state.
        bf16 && tile
            && std::arch::is_x86_feature_detected!("avx512bw")
            && unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    }

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads the tile configuration on this thread: palette 1, eight tiles of 16 rows × 64 bytes.
    pub fn configure() {
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        // SAFETY: `os_grants_tiles()` checked the CPU and OS support; the config is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
    }

    /// Returns the tile state to its initial (empty) state.
    pub fn release() {
        // SAFETY: as in `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Four products that read tmm6 and tmm7 last, each register reloaded (from byte offset
    /// `$off` of the weight's k block) right after its last reader, so the load overlaps two
    /// products.
    macro_rules! then_new_b {
        ($off:literal) => {
            concat!(
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tileloadd tmm6, [{b0} + {s}*1 + ",
                $off,
                "]\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
                "tileloadd tmm7, [{b1} + {s}*1 + ",
                $off,
                "]\n",
            )
        };
    }

    /// As [`then_new_b`], reloading the activation tiles tmm4 and tmm5.
    macro_rules! then_new_a {
        ($off:literal) => {
            concat!(
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "tileloadd tmm4, [{a0} + {s}*1 + ",
                $off,
                "]\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
                "tileloadd tmm5, [{a1} + {s}*1 + ",
                $off,
                "]\n",
            )
        };
    }

    /// The loop over k blocks around one schedule of piece products, which starts on the
    /// activation piece at byte offset `$first` of a k block and ends loading the next block's
    /// (`$next` = 3072 + `$first`: an activation k block is 3 KiB); a weight k block is
    /// `pieces` KiB, so the next block's piece 0 is loaded after the pointers move on.
    macro_rules! kernel {
        ($a:expr, $b:expr, $bs:expr, $kblocks:expr, $c:expr, $ldc:expr,
         ($first:literal, $next:literal), $($steps:expr),+) => {
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                concat!("tileloadd tmm4, [{a0} + {s}*1 + ", $first, "]"),
                concat!("tileloadd tmm5, [{a1} + {s}*1 + ", $first, "]"),
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "2:",
                $($steps,)+
                then_new_a!($next),
                "add {b0}, {bs}", "add {b1}, {bs}",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "add {a0}, 3072", "add {a1}, 3072",
                "dec {n}", "jnz 2b",
                "tilestored [{c0} + {ldc}*1], tmm0",
                "tilestored [{c0} + {ldc}*1 + 64], tmm1",
                "tilestored [{c1} + {ldc}*1], tmm2",
                "tilestored [{c1} + {ldc}*1 + 64], tmm3",
                a0 = inout(reg) $a => _,
                a1 = inout(reg) $a.byte_add($kblocks * 3 * 1024) => _,
                b0 = inout(reg) $b => _,
                b1 = inout(reg) $b.byte_add($kblocks * $bs) => _,
                bs = in(reg) $bs,
                n = inout(reg) $kblocks => _,
                s = in(reg) 64usize,
                c0 = in(reg) $c,
                c1 = in(reg) $c.byte_add(16 * $ldc),
                ldc = in(reg) $ldc,
                options(nostack),
            )
        };
    }

    /// Four accumulator tiles, a 32 × 32 block of `y` written at `c` (rows `ldc` bytes apart):
    /// two token blocks (A tiles at `a`, `a + kblocks·3` tiles) × two feature blocks (B tiles
    /// at `b`, `b + kblocks·pieces` tiles) over `kblocks` k blocks. Three weight pieces: the
    /// products x₂w₀, x₁w₀, x₁w₁, x₀w₁, x₀w₀, x₀w₂, each step changing one operand, 14 tile
    /// loads per 24 products. Weights with ≤ 16 significant bits (w₂ absent) skip x₀w₂: 12
    /// loads per 20; bf16 weights (only w₀) take x₂w₀, x₁w₀, x₀w₀: 8 per 12. At
    /// [`Precision::Bf16x3`] x₂ is never read: x₁w₀, x₀w₀, x₀w₁ (8 loads per 12). Tiles have no renaming, so each load is issued right after the last
    /// product that reads the register's old value; the next k block's first tiles are loaded
    /// at the end of this one (buffers carry [`A_AHEAD`] and [`B_AHEAD`] for the last).
    ///
    /// # Safety
    /// The tile state is configured on this thread; `a` holds 2·kblocks·3 tiles of 1 KiB, `b`
    /// 2·kblocks·pieces; `c` is valid for 32 rows of 32 floats `ldc` bytes apart.
    pub unsafe fn block(
        a: *const u16,
        b: *const u32,
        kblocks: usize,
        (pieces, precision): (usize, super::Precision),
        c: *mut f32,
        ldc: usize,
    ) {
        let bs = pieces * 1024;
        macro_rules! run {
            ($offsets:tt, $($steps:expr),+) => {
                kernel!(a, b, bs, kblocks, c, ldc, $offsets, $($steps),+)
            };
        }
        match (precision, pieces) {
            (super::Precision::F32, 1) => {
                run!(("2048", "5120"), then_new_a!("1024"), then_new_a!("0"))
            }
            (super::Precision::F32, 2) => run!(
                ("2048", "5120"),
                then_new_a!("1024"),
                then_new_b!("1024"),
                then_new_a!("0"),
                then_new_b!("0")
            ),
            (super::Precision::F32, _) => run!(
                ("2048", "5120"),
                then_new_a!("1024"),
                then_new_b!("1024"),
                then_new_a!("0"),
                then_new_b!("0"),
                then_new_b!("2048")
            ),
            // Packed with two weight pieces always.
            (super::Precision::Bf16x3, _) => {
                run!(("1024", "4096"), then_new_a!("0"), then_new_b!("1024"))
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn enable() -> bool {
        false
    }
    pub fn configure() {}
    pub fn release() {}
    pub unsafe fn block(
        _: *const u16,
        _: *const u32,
        _: usize,
        _: (usize, super::Precision),
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("the tile path runs only where `os_grants_tiles()`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this CPU runs the tile path; says so when it does not (the test then passes
    /// without checking anything, as on CPUs without AMX).
    fn tiles_here() -> bool {
        let here = os_grants_tiles();
        if !here {
            eprintln!("no AMX on this CPU: tile path not tested here");
        }
        here
    }

    /// Every value is exactly the sum of its three pieces (also for a partial block).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pieces_sum_to_the_value() {
        if !tiles_here() {
            return;
        }
        let v: Vec<f32> = (0..29)
            .map(|i| (i as f32 * 0.731 - 9.0).exp() * if i % 3 == 0 { -1.0 } else { 1.0 })
            .chain([0.1, 1.0 / 3.0, 0.0])
            .collect();
        for src in [&v[..], &v[..29]] {
            // SAFETY: `os_grants_tiles()` implies AVX512-BW.
            let p = unsafe { simd::split32(src) };
            let p: Vec<[u16; 32]> = p
                .iter()
                .map(|r| unsafe { std::mem::transmute(*r) })
                .collect();
            for (j, &want) in src
                .iter()
                .chain(std::iter::repeat(&0.0))
                .take(32)
                .enumerate()
            {
                let sum: f64 = p
                    .iter()
                    .map(|r| f32::from_bits((r[j] as u32) << 16) as f64)
                    .sum();
                assert_eq!(sum, want as f64, "value {j}");
            }
        }
    }

    /// The packer finds the pieces a weight needs: 3 for f32, 2 for ≤ 16 significant bits,
    /// 1 for bf16 values — which selects the micro-kernel that skips the zero pieces.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packer_counts_the_pieces_the_weights_need() {
        if !tiles_here() {
            return;
        }
        let w: Vec<f32> = (0..16 * 40)
            .map(|i| (i as f32 * 0.37).sin() * 0.1)
            .collect();
        for (mask, want) in [(!0u32, 3), (0xFFFF_FF00, 2), (0xFFFF_0000, 1)] {
            let w: Vec<f32> = w
                .iter()
                .map(|v| f32::from_bits(v.to_bits() & mask))
                .collect();
            assert_eq!(WeightTiles::pack(&w, 16, 40).pieces, want);
        }
    }

    /// The largest errors of `got` (`lhs · rhs`, row-major) and of faer's f32 GEMM of the same
    /// product, both against an f64 loop.
    fn worst_errors(got: &[f32], lhs: faer::MatRef<f32>, rhs: faer::MatRef<f32>) -> (f64, f64) {
        let (m, n) = (lhs.nrows(), rhs.ncols());
        let mut f32_gemm = vec![0f32; m * n];
        crate::kernels::matmul::gemm(
            faer::MatMut::from_row_major_slice_mut(&mut f32_gemm, m, n),
            faer::Accum::Replace,
            lhs,
            rhs,
            faer::Par::Seq,
        );
        let (mut worst, mut worst_f32) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..lhs.ncols())
                    .map(|k| *lhs.get(i, k) as f64 * *rhs.get(k, j) as f64)
                    .sum();
                worst = worst.max((got[i * n + j] as f64 - want).abs());
                worst_f32 = worst_f32.max((f32_gemm[i * n + j] as f64 - want).abs());
            }
        }
        (worst, worst_f32)
    }

    /// Against an f64 loop, with every odd size (rows, depth and outputs not multiples of the
    /// tiles) and weights that need 3, 2 and 1 bf16 pieces (each its own micro-kernel): the
    /// largest error must be that of an f32 GEMM (faer's, same data), not bf16's (~200x larger).
    #[test]
    fn tile_product_has_f32_gemm_accuracy() {
        if !tiles_here() {
            return;
        }
        let mut y = vec![f32::NAN; 40 * 7];
        matmul_t(&[], &[], (40, 0, 7), &mut y, Precision::F32);
        assert!(y.iter().all(|v| *v == 0.0), "zero depth gives zeros");
        let shapes = [
            (32, 32, 32),
            (64, 96, 96),
            (33, 37, 50),
            (77, 576, 65),
            (40, 1000, 33),
        ];
        for ((rows, inp, out), mask) in shapes
            .into_iter()
            .flat_map(|s| [!0u32, 0xFFFF_FF00, 0xFFFF_0000].map(|m| (s, m)))
        {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.37)
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * 0.051)
                .map(|v: f32| f32::from_bits(v.to_bits() & mask))
                .collect();
            let mut y = vec![f32::NAN; rows * out];
            matmul_t(&x, &w, (rows, inp, out), &mut y, Precision::F32);
            let (worst, worst_f32) = worst_errors(
                &y,
                faer::MatRef::from_row_major_slice(&x, rows, inp),
                faer::MatRef::from_row_major_slice(&w, out, inp).transpose(),
            );
            assert!(
                worst <= 2.0 * worst_f32 + 1e-7,
                "{rows}x{inp}x{out}, mask {mask:x}: worst error {worst:e}, f32 GEMM's {worst_f32:e}"
            );
        }
    }

    /// The three products of training at both precisions, against an f64 loop over the same
    /// operands: `y = x · wᵀ`, `dx = dy · w` (the weight read as it lies) and `dw = dyᵀ · x`,
    /// odd sizes, weights of 3, 2 and 1 pieces. F32 must have the f32 GEMM's accuracy; bf16x3
    /// must stay within its bound, 3·2⁻¹⁶ of `Σ |a|·|b|` per element (x₁w₁, x₂ and w₂ dropped),
    /// which plain bf16 (2⁻⁸) would miss by far, and must not be the F32 schedule. (200 rows:
    /// `dy · w` packs `dy` in several chunks of rows in the test build.)
    #[test]
    fn training_products_at_both_precisions() {
        if !tiles_here() {
            return;
        }
        let value = |i: usize, m: usize| ((i * 7919 % m) as f32 / (m as f32 / 2.0) - 1.0) * 0.73;
        let shapes = [
            (32, 32, 32),
            (33, 37, 50),
            (77, 65, 576),
            (40, 300, 33),
            (200, 300, 33),
        ];
        for ((rows, out, inp), mask) in shapes
            .into_iter()
            .flat_map(|s| [!0u32, 0xFFFF_FF00, 0xFFFF_0000].map(|m| (s, m)))
        {
            let x: Vec<f32> = (0..rows * inp).map(|i| value(i, 991)).collect();
            let dy: Vec<f32> = (0..rows * out).map(|i| value(i, 1000)).collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| f32::from_bits(value(i, 997).to_bits() & mask))
                .collect();
            type Run<'a> = Box<dyn Fn(&mut [f32], Precision) + 'a>;
            fn m(v: &[f32], r: usize, c: usize) -> faer::MatRef<'_, f32> {
                faer::MatRef::from_row_major_slice(v, r, c)
            }
            let cases: [(&str, Run, faer::MatRef<f32>, faer::MatRef<f32>); 3] = [
                (
                    "x·wᵀ",
                    Box::new(|y, p| matmul_t(&x, &w, (rows, inp, out), y, p)),
                    m(&x, rows, inp),
                    m(&w, out, inp).transpose(),
                ),
                (
                    "dy·w",
                    Box::new(|y, p| matmul_nn(&dy, &w, (rows, out, inp), y, p)),
                    m(&dy, rows, out),
                    m(&w, out, inp),
                ),
                (
                    "dyᵀ·x",
                    Box::new(|y, p| matmul_tn(&dy, &x, (rows, out, inp), y, p)),
                    m(&dy, rows, out).transpose(),
                    m(&x, rows, inp),
                ),
            ];
            for (what, run, lhs, rhs) in cases {
                let (n, k) = (rhs.ncols(), lhs.ncols());
                let mut exact = vec![f32::NAN; lhs.nrows() * n];
                run(&mut exact, Precision::F32);
                let (worst, worst_f32) = worst_errors(&exact, lhs, rhs);
                let at = format!("{what} {rows}x{out}x{inp}, mask {mask:x}");
                assert!(
                    worst <= 2.0 * worst_f32 + 1e-7,
                    "{at}: f32 {worst:e} / {worst_f32:e}"
                );
                let mut fast = vec![f32::NAN; lhs.nrows() * n];
                run(&mut fast, Precision::Bf16x3);
                for i in 0..lhs.nrows() {
                    for j in 0..n {
                        let (mut want, mut size) = (0f64, 0f64);
                        for q in 0..k {
                            let (a, b) = (*lhs.get(i, q) as f64, *rhs.get(q, j) as f64);
                            want += a * b;
                            size += (a * b).abs();
                        }
                        let err = (fast[i * n + j] as f64 - want).abs();
                        let bound = 3.0 * 2f64.powi(-16) * size + worst_f32 + 1e-7;
                        assert!(
                            err <= bound,
                            "{at}: bf16x3 ({i}, {j}) off by {err:e} > {bound:e}"
                        );
                    }
                }
                if mask == !0u32 {
                    assert_ne!(fast, exact, "{at}: bf16x3 ran the f32 schedule");
                }
            }
        }
    }

    /// The weight gradient, whose operands are both packed from k-major sources, against an
    /// f64 loop: `dw = dyᵀ · x` for odd sizes (partial tiles on every side; several chunks of
    /// outputs, as the test build's chunks are small), again to f32 GEMM accuracy.
    #[test]
    fn weight_gradient_has_f32_gemm_accuracy() {
        if !tiles_here() {
            return;
        }
        let value = |i: usize, m: usize| ((i * 7919 % m) as f32 / (m as f32 / 2.0) - 1.0) * 0.73;
        for (rows, out, inp) in [(32, 32, 32), (33, 37, 50), (77, 65, 576), (40, 1000, 33)] {
            let dy: Vec<f32> = (0..rows * out).map(|i| value(i, 1000)).collect();
            let x: Vec<f32> = (0..rows * inp).map(|i| value(i, 991)).collect();
            let mut dw = vec![f32::NAN; out * inp];
            matmul_tn(&dy, &x, (rows, out, inp), &mut dw, Precision::F32);
            let (worst, worst_f32) = worst_errors(
                &dw,
                faer::MatRef::from_row_major_slice(&dy, rows, out).transpose(),
                faer::MatRef::from_row_major_slice(&x, rows, inp),
            );
            assert!(
                worst <= 2.0 * worst_f32 + 1e-7,
                "{rows}x{out}x{inp}: worst error {worst:e}, f32 GEMM's {worst_f32:e}"
            );
        }
    }
}
