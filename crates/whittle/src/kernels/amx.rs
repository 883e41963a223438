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
//! Layout. `W` (`out × in`, row-major) becomes the A operand, each tile 1 KiB contiguous:
//! `[16-row block][k block][piece][row][32]` bf16. `x` (`rows × in`) becomes the B operand in
//! AMX's pair layout, also tile by tile: `[16-token block][k block][piece][k pair][token]` u32
//! (a 16 × 16 transpose of the split rows). The activations are packed once per input (shared by
//! q/k/v, by gate/up); the weight is packed per product, 64 rows per work item into a buffer that
//! stays in L2 (a packed copy kept with the model could go stale when a method rewrites the
//! weight in place); quantized weights are expanded to f32 by the same work item, 64 rows at a
//! time ([`ExpandRows`]). The micro-kernel computes a 32 × 32 block of `yᵀ` (four accumulator
//! tiles) over the whole depth, in one of three schedules by the weight's piece count.

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

thread_local! {
    /// Packing buffers reused between products (a fresh multi-MiB buffer per product costs its
    /// page faults: measured 0.3–1 ms per weight, a third of the product).
    static WEIGHT_TILES: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static ACT_TILES: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A work item's weight rows expanded to f32 (for [`WeightRows::Expand`]).
    static EXPANDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Fewest rows for which the tile path pays (it pads rows to 32).
const MIN_ROWS: usize = 32;
/// Values per tile row (bf16) and rows per tile.
const KB: usize = 32;
const TILE: usize = 16;
/// bf16 pieces per f32.
const PIECES: usize = 3;
/// u32 pairs in one B tile.
const B_TILE: usize = TILE * TILE;
/// u32 after the last tiles of a buffer: the micro-kernel loads the next k block's first tiles
/// while it finishes the current one, also after the last k block.
const AHEAD_PAD: usize = PIECES * B_TILE;

/// Whether the tile path runs: the CPU has AMX-BF16, Linux granted the tile state, and
/// `WHITTLE_AMX=0` is not set (which forces the plain f32 GEMM, e.g. to compare the two).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("WHITTLE_AMX").map_or(true, |v| v != "0") && imp::enable())
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
    use super::{B_TILE, KB, PIECES, TILE};
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
        let mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let halves = |v: __m512| {
            let p0 = _mm512_and_si512(_mm512_castps_si512(v), mask);
            let r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(p0));
            let p1 = _mm512_and_si512(_mm512_castps_si512(r1), mask);
            let r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(p1));
            [p0, p1, _mm512_and_si512(_mm512_castps_si512(r2), mask)]
        };
        let lo = halves(_mm512_loadu_ps(src.as_ptr()));
        let hi = halves(_mm512_loadu_ps(src.as_ptr().add(16)));
        [0, 1, 2].map(|p| _mm512_permutex2var_epi16(lo[p], idx, hi[p]))
    }

    /// Up to 16 weight rows into A tiles: row `n`'s value `j` of k block `kb`, piece `p` goes
    /// to `out[(kb·3 + p)·512 + n·32 + j]`. Returns how many pieces the rows need: 1 when every
    /// later piece is zero (bf16 weights), 2 when only the last is (e.g. weights dequantized
    /// from 4-bit blocks with f16 scales, ≤ 16 significant bits).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_weight_block(w: &[f32], inp: usize, out: &mut [u16]) -> usize {
        let mut seen = [_mm512_setzero_si512(); PIECES];
        for (n, row) in w.chunks_exact(inp).enumerate() {
            for (kb, tiles) in out.chunks_exact_mut(PIECES * TILE * KB).enumerate() {
                let v = split32(&row[kb * KB..inp.min((kb + 1) * KB)]);
                for (p, v) in v.into_iter().enumerate() {
                    let at = p * TILE * KB + n * KB;
                    _mm512_storeu_si512(tiles[at..at + KB].as_mut_ptr().cast(), v);
                    seen[p] = _mm512_or_si512(seen[p], v);
                }
            }
        }
        let nonzero = |v: __m512i| _mm512_test_epi32_mask(v, v) != 0;
        match (nonzero(seen[1]), nonzero(seen[2])) {
            (_, true) => 3,
            (true, false) => 2,
            (false, false) => 1,
        }
    }

    /// One block of 16 tokens into B tiles: token `t`'s pair `i` of k block `kb`, piece `p`
    /// goes to `out[(kb·3 + p)·256 + i·16 + t]` (a 16 × 16 transpose of the split rows).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_token_block(x: &[f32], inp: usize, rows: usize, tb: usize, out: &mut [u32]) {
        let present = rows.saturating_sub(tb * TILE).min(TILE);
        for (kb, tiles) in out.chunks_exact_mut(PIECES * B_TILE).enumerate() {
            let mut m = [[_mm512_setzero_si512(); TILE]; PIECES];
            for t in 0..present {
                let r = tb * TILE + t;
                let v = split32(&x[r * inp + kb * KB..r * inp + inp.min((kb + 1) * KB)]);
                for (piece, v) in m.iter_mut().zip(v) {
                    piece[t] = v;
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

    /// `y[t·ld + n] = tile[n·16 + t]` for a full 16 × 16 accumulator tile.
    ///
    /// # Safety
    /// AVX-512F; `y` is valid for 16 rows of 16 values at row stride `ld`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store_transposed(tile: &[f32], y: *mut f32, ld: usize) {
        let mut m = [_mm512_setzero_si512(); TILE];
        for (n, row) in m.iter_mut().enumerate() {
            *row = _mm512_loadu_si512(tile[n * TILE..(n + 1) * TILE].as_ptr().cast());
        }
        transpose16(&mut m);
        for (t, row) in m.iter().enumerate() {
            _mm512_storeu_si512(y.add(t * ld).cast(), *row);
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

/// Activations packed as B tiles (see the module doc), shared by every weight that reads them.
pub struct Acts {
    /// The tiles, then at least [`AHEAD_PAD`] more (a reused buffer may be longer).
    data: Vec<u32>,
    rows: usize,
    inp: usize,
    kblocks: usize,
    token_pairs: usize,
}

impl Acts {
    /// Packs `x` (`rows × inp`, row-major); rows are padded to a multiple of 32 with zeros.
    pub fn pack(x: &[f32], rows: usize, inp: usize) -> Acts {
        assert!(available(), "AMX tile path used on a machine without it");
        assert_eq!(x.len(), rows * inp);
        let kblocks = inp.div_ceil(KB);
        let per_block = kblocks * PIECES * B_TILE;
        let blocks = 2 * rows.div_ceil(2 * TILE);
        let mut data = ACT_TILES.with_borrow_mut(std::mem::take);
        // The padding after the last block is only ever loaded ahead, never used: left as is.
        let chunks: Vec<_> = super::scratch(&mut data, blocks * per_block + AHEAD_PAD)
            [..blocks * per_block]
            .chunks_mut(per_block.max(1))
            .enumerate()
            .collect();
        // SAFETY: `available()` (asserted above) implies AVX512-BW.
        each_chunk(chunks, |(tb, out)| unsafe {
            simd::pack_token_block(x, inp, rows, tb, out)
        });
        Acts {
            data,
            rows,
            inp,
            kblocks,
            token_pairs: blocks / 2,
        }
    }
}

/// Weight rows that are stored in another form (packed quantized codes) and expanded to f32 by
/// the work item that packs them into tiles, a few rows at a time: prefill then reads the
/// stored bytes (0.6 per weight for 4-bit codes), not an f32 copy of the whole matrix.
pub trait ExpandRows: Sync {
    /// Writes rows `rows` of the `out × inp` matrix, as f32, into `dst` (`rows.len() · inp`).
    fn expand_rows(&self, rows: std::ops::Range<usize>, dst: &mut [f32]);
}

/// The weight of a [`Product`]: f32 rows (`out × inp`, row-major) or rows expanded on the fly.
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    Expand(&'a dyn ExpandRows),
}

/// One product of [`matmul_many`]: `y[rows, out] = x · wᵀ` for a weight `w` (`out × inp`).
pub struct Product<'a> {
    pub w: WeightRows<'a>,
    pub out: usize,
    pub y: &'a mut [f32],
}

/// Feature pairs (of 32 rows) per work item: each item packs its rows once, into a buffer that
/// stays in L2 while every token passes over it. Small enough that the 192-wide K/V
/// projections still give several items to share between threads.
const PAIRS_PER_ITEM: usize = 2;

/// Runs several products over the same packed activations (q/k/v, gate/up) as one parallel
/// section, overwriting each `y`. Panics unless [`available`] (which also obtains the tile
/// state from the OS).
pub fn matmul_many(acts: &Acts, products: &mut [Product]) {
    assert!(available(), "AMX tile path used on a machine without it");
    let (rows, inp, kblocks) = (acts.rows, acts.inp, acts.kblocks);
    if kblocks == 0 {
        // Zero-depth products (a rank-0 adapter): the micro-kernel's loop needs one k block.
        products.iter_mut().for_each(|p| p.y.fill(0.0));
        return;
    }
    let stride = kblocks * PIECES * KB;
    let pair_tiles = 2 * kblocks * PIECES * B_TILE;
    let token_pairs = acts.token_pairs;
    // Token pairs per pass over an item's feature pairs: their B tiles (≤ 1 MiB) stay in L2.
    let tp_chunk = ((1 << 20) / (pair_tiles * 4)).max(1);
    let mut items = Vec::new();
    for (i, p) in products.iter_mut().enumerate() {
        if let WeightRows::F32(w) = p.w {
            assert_eq!(w.len(), p.out * inp);
        }
        assert_eq!(p.y.len(), rows * p.out);
        for f0 in (0..p.out.div_ceil(2 * TILE)).step_by(PAIRS_PER_ITEM) {
            items.push((i, f0, SendPtr(p.y.as_mut_ptr())));
        }
    }
    let products: &[Product] = products;
    each_chunk(items, |(i, f0, y)| {
        let out = products[i].out;
        let pairs = PAIRS_PER_ITEM.min(out.div_ceil(2 * TILE) - f0);
        let (r0, r1) = (f0 * 2 * TILE, out.min((f0 + pairs) * 2 * TILE));
        let mut expanded = EXPANDED.with_borrow_mut(std::mem::take);
        let rows_here = match products[i].w {
            WeightRows::F32(w) => &w[r0 * inp..r1 * inp],
            WeightRows::Expand(e) => {
                let rows = super::scratch(&mut expanded, (r1 - r0) * inp);
                e.expand_rows(r0..r1, rows);
                &rows[..]
            }
        };
        // Padding rows keep whatever the buffer held: they only reach outputs not stored.
        let mut packed = WEIGHT_TILES.with_borrow_mut(std::mem::take);
        super::scratch(&mut packed, pairs * 2 * TILE * stride + 2 * AHEAD_PAD);
        let pieces = rows_here
            .chunks(TILE * inp)
            .zip(packed.chunks_mut(TILE * stride))
            // SAFETY: `available()` (asserted above) implies AVX512-BW.
            .map(|(w, dst)| unsafe { simd::pack_weight_block(w, inp, dst) })
            .max()
            .unwrap_or(PIECES);
        EXPANDED.with_borrow_mut(|b| *b = expanded);
        let mut c = Tiles([0f32; 4 * TILE * TILE]);
        imp::configure();
        for t0 in (0..token_pairs).step_by(tp_chunk) {
            for fp in 0..pairs {
                for tp in t0..(t0 + tp_chunk).min(token_pairs) {
                    let a = packed[fp * 2 * TILE * stride..].as_ptr();
                    let b = acts.data[tp * pair_tiles..].as_ptr();
                    // SAFETY: `a` and `b` point at two blocks of `kblocks` k blocks each (the
                    // buffers hold whole pairs plus AHEAD_PAD); the tile state was configured on
                    // this thread; the weight's pieces beyond `pieces` are zero.
                    unsafe { imp::block(a, b, kblocks, pieces, &mut c.0) };
                    // c: tiles (f, t) in order (0,0), (0,1), (1,0), (1,1); each [feature][token].
                    for (q, tile) in c.0.chunks_exact(TILE * TILE).enumerate() {
                        let n0 = (2 * (f0 + fp) + q / 2) * TILE;
                        let r0 = (2 * tp + q % 2) * TILE;
                        if r0 + TILE <= rows && n0 + TILE <= out {
                            // SAFETY: the 16 × 16 block at (r0, n0) lies inside `y`; AVX-512F
                            // comes with AMX; work items cover disjoint blocks.
                            unsafe { simd::store_transposed(tile, y.0.add(r0 * out + n0), out) };
                            continue;
                        }
                        for t in 0..TILE.min(rows.saturating_sub(r0)) {
                            for n in 0..TILE.min(out.saturating_sub(n0)) {
                                // SAFETY: (r0 + t, n0 + n) lies inside this product's `y`
                                // (bounds above) and work items cover disjoint blocks of it.
                                unsafe { *y.0.add((r0 + t) * out + n0 + n) = tile[n * TILE + t] };
                            }
                        }
                    }
                }
            }
        }
        imp::release();
        WEIGHT_TILES.with_borrow_mut(|b| *b = packed);
    });
}

/// `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ` on tiles (packs `x` for this one product).
pub fn matmul_t(x: &[f32], w: WeightRows, rows: usize, inp: usize, out: usize, y: &mut [f32]) {
    let acts = Acts::pack(x, rows, inp);
    matmul_many(&acts, &mut [Product { w, out, y }]);
}

impl Drop for Acts {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        ACT_TILES.with_borrow_mut(|b| *b = data);
    }
}

#[repr(C, align(64))]
struct Tiles([f32; 4 * TILE * TILE]);

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint positions by the work items.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Other architectures never take the tile path (`available()` is false there).
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub unsafe fn pack_weight_block(_: &[f32], _: usize, _: &mut [u16]) -> usize {
        unreachable!("the tile path runs only where `available()`")
    }
    pub unsafe fn pack_token_block(_: &[f32], _: usize, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("the tile path runs only where `available()`")
    }
    pub unsafe fn store_transposed(_: &[f32], _: *mut f32, _: usize) {
        unreachable!("the tile path runs only where `available()`")
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
        // SAFETY: `available()` checked the CPU and OS support; the config is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
    }

    /// Returns the tile state to its initial (empty) state.
    pub fn release() {
        // SAFETY: as in `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Four products that read tmm6 and tmm7 last, each register reloaded (from byte offset
    /// `$off` of the k block) right after its last reader, so the load overlaps two products.
    macro_rules! then_new_b {
        ($off:literal) => {
            concat!(
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tileloadd tmm6, [{b0} + {sb}*1 + ",
                $off,
                "]\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
                "tileloadd tmm7, [{b1} + {sb}*1 + ",
                $off,
                "]\n",
            )
        };
    }

    /// As [`then_new_b`], reloading the weight tiles tmm4 and tmm5.
    macro_rules! then_new_a {
        ($off:literal) => {
            concat!(
                "tdpbf16ps tmm0, tmm4, tmm6\n",
                "tdpbf16ps tmm1, tmm4, tmm7\n",
                "tileloadd tmm4, [{a0} + {sb}*1 + ",
                $off,
                "]\n",
                "tdpbf16ps tmm2, tmm5, tmm6\n",
                "tdpbf16ps tmm3, tmm5, tmm7\n",
                "tileloadd tmm5, [{a1} + {sb}*1 + ",
                $off,
                "]\n",
            )
        };
    }

    /// The loop over k blocks around one schedule of piece products (a k block is 3 KiB of
    /// each operand; 5120 = the next block's activation piece 2, 3072 its weight piece 0).
    macro_rules! kernel {
        ($a:expr, $b:expr, $kblocks:expr, $c:expr, $($steps:expr),+) => {
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{a0} + {sb}*1]",
                "tileloadd tmm5, [{a1} + {sb}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1 + 2048]",
                "tileloadd tmm7, [{b1} + {sb}*1 + 2048]",
                "2:",
                $($steps,)+
                then_new_b!("5120"),
                "tileloadd tmm4, [{a0} + {sb}*1 + 3072]",
                "tileloadd tmm5, [{a1} + {sb}*1 + 3072]",
                "add {a0}, 3072", "add {a1}, 3072", "add {b0}, 3072", "add {b1}, 3072",
                "dec {n}", "jnz 2b",
                "tilestored [{c} + {sb}*1], tmm0",
                "tilestored [{c} + {sb}*1 + 1024], tmm1",
                "tilestored [{c} + {sb}*1 + 2048], tmm2",
                "tilestored [{c} + {sb}*1 + 3072], tmm3",
                a0 = inout(reg) $a => _,
                a1 = inout(reg) $a.byte_add($kblocks * 3 * 1024) => _,
                b0 = inout(reg) $b => _,
                b1 = inout(reg) $b.byte_add($kblocks * 3 * 1024) => _,
                n = inout(reg) $kblocks => _,
                sb = in(reg) 64usize,
                c = in(reg) $c.as_mut_ptr(),
                options(nostack),
            )
        };
    }

    /// Four accumulator tiles `c = [C₀₀, C₀₁, C₁₀, C₁₁]` of two feature blocks (A tiles at `a`,
    /// `a + kblocks·3` tiles) × two token blocks (B tiles at `b`, `b + kblocks·3` tiles) over
    /// `kblocks` k blocks, from the weight's first `pieces` pieces. Three pieces: the products
    /// w₀x₂, w₀x₁, w₁x₁, w₁x₀, w₀x₀, w₂x₀, each step changing one operand, 14 tile loads per 24
    /// products. Weights with ≤ 16 significant bits (w₂ = 0) skip w₂x₀: 12 loads per 20; bf16
    /// weights (w₁ = w₂ = 0) take w₀x₂, w₀x₁, w₀x₀: 8 per 12 (the skipped products are exact
    /// zeros). Tiles have no renaming, so each load is issued right after the last product
    /// that reads the register's old value; the next k block's first tiles are
    /// loaded at the end of this one (buffers carry [`AHEAD_PAD`] for the last).
    ///
    /// # Safety
    /// The tile state is configured on this thread; `a` holds 32 rows of `a_stride` bytes and
    /// `b` 2·kblocks·3 tiles of 1 KiB; the weight's pieces from `pieces` on are zero.
    pub unsafe fn block(
        a: *const u16,
        b: *const u32,
        kblocks: usize,
        pieces: usize,
        c: &mut [f32; 1024],
    ) {
        match pieces {
            1 => kernel!(a, b, kblocks, c, then_new_b!("1024"), then_new_b!("0")),
            2 => kernel!(
                a,
                b,
                kblocks,
                c,
                then_new_b!("1024"),
                then_new_a!("1024"),
                then_new_b!("0"),
                then_new_a!("0")
            ),
            _ => kernel!(
                a,
                b,
                kblocks,
                c,
                then_new_b!("1024"),
                then_new_a!("1024"),
                then_new_b!("0"),
                then_new_a!("0"),
                then_new_a!("2048")
            ),
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
    pub unsafe fn block(_: *const u16, _: *const u32, _: usize, _: usize, _: &mut [f32; 1024]) {
        unreachable!("the tile path runs only where `available()`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this CPU runs the tile path; says so when it does not (the test then passes
    /// without checking anything, as on CPUs without AMX).
    fn tiles_here() -> bool {
        let here = available();
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
            // SAFETY: `available()` implies AVX512-BW.
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

    /// The packer reports the pieces a block of weights needs: 3 for f32, 2 for ≤ 16 significant
    /// bits, 1 for bf16 values — which selects the micro-kernel that skips the zero pieces.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packer_counts_the_pieces_the_weights_need() {
        if !tiles_here() {
            return;
        }
        let w: Vec<f32> = (0..16 * 40)
            .map(|i| (i as f32 * 0.37).sin() * 0.1)
            .collect();
        let mut out = vec![0u16; 2 * PIECES * TILE * KB];
        for (mask, want) in [(!0u32, 3), (0xFFFF_FF00, 2), (0xFFFF_0000, 1)] {
            let w: Vec<f32> = w
                .iter()
                .map(|v| f32::from_bits(v.to_bits() & mask))
                .collect();
            // SAFETY: `available()` implies AVX512-BW.
            assert_eq!(unsafe { simd::pack_weight_block(&w, 40, &mut out) }, want);
        }
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
        matmul_t(&[], WeightRows::F32(&[]), 40, 0, 7, &mut y);
        assert!(y.iter().all(|v| *v == 0.0), "zero depth gives zeros");
        let shapes = [(32, 32, 32), (33, 37, 50), (77, 576, 65), (40, 1000, 33)];
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
            matmul_t(&x, WeightRows::F32(&w), rows, inp, out, &mut y);
            let mut f32_gemm = vec![0f32; rows * out];
            crate::kernels::matmul::gemm(
                faer::MatMut::from_row_major_slice_mut(&mut f32_gemm, rows, out),
                faer::Accum::Replace,
                faer::MatRef::from_row_major_slice(&x, rows, inp),
                faer::MatRef::from_row_major_slice(&w, out, inp).transpose(),
                faer::Par::Seq,
            );
            let (mut worst, mut worst_f32) = (0f64, 0f64);
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|k| x[r * inp + k] as f64 * w[o * inp + k] as f64)
                        .sum();
                    worst = worst.max((y[r * out + o] as f64 - want).abs());
                    worst_f32 = worst_f32.max((f32_gemm[r * out + o] as f64 - want).abs());
                }
            }
            assert!(
                worst <= 2.0 * worst_f32 + 1e-7,
                "{rows}x{inp}x{out}, mask {mask:x}: worst error {worst:e}, f32 GEMM's {worst_f32:e}"
            );
        }
    }
}
