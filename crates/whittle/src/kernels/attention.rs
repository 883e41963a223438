//! Causal multi-head attention with grouped KV heads (GQA), over a key/value history that may be
//! longer than the queries (a KV cache). Work is split into (head, block of query rows) tasks; a
//! block only multiplies against the keys it can see, which halves the prefill cost compared with
//! a full masked `T × T` product. The same kernel runs an encoder's bidirectional attention
//! (ViT), where every query sees every key.

use super::amx;
use super::dot::dot_portable;
use super::exp::{exp_approx, exp_shifted};
use super::f16;
use super::matmul::gemm;
use super::scratch;
use crate::model::AttnShape;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

thread_local! {
    /// Score rows of a task, reused by the next task on the same thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A decode task's f16 key and value rows, widened.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Query rows per task: small enough to balance 2+ threads and to keep a task's score rows
/// (`3·32` rows of up to 2048 keys for SmolLM2) mostly in L2; 32 was 8 % faster than 64 at
/// 2048 tokens with the tile product, no different at 512.
const Q_BLOCK: usize = 32;
/// Below this many multiply-adds (`t·s·heads·d`), attention runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 22;

/// Raw output pointer shared by tasks that write disjoint `(rows, head)` tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint tiles (distinct heads or distinct query rows), see `attention`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Accessor so closures capture the whole (Send) wrapper, not its raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Which keys a query may see besides causality: with `window = Some(w)`, key `j` is visible to
/// the query at position `i` only if `i − j ≤ w` or `j < sink` (meta tokens stay visible).
/// `bidirectional`: no causality either, every query sees every key (an encoder's attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    pub window: Option<usize>,
    pub sink: usize,
    pub bidirectional: bool,
}

impl Mask {
    pub const CAUSAL: Mask = Mask {
        window: None,
        sink: 0,
        bidirectional: false,
    };
    pub const BIDIRECTIONAL: Mask = Mask {
        window: None,
        sink: 0,
        bidirectional: true,
    };

    /// One past the last key that the query at position `pos` sees, of `keys`.
    pub(crate) fn end(self, pos: usize, keys: usize) -> usize {
        if self.bidirectional {
            keys
        } else {
            pos + 1
        }
    }

    /// Keys `sink..end` are hidden from the query at position `i`: the part of the history that
    /// slid out of the window (empty when there is no window).
    pub(crate) fn hidden(self, i: usize) -> std::ops::Range<usize> {
        match self.window {
            Some(w) if i > w => self.sink..(i - w).max(self.sink),
            _ => 0..0,
        }
    }
}

/// `out[t, n_heads·dv] = softmax(q kᵀ / √d + mask) v`.
///
/// `q` holds `t` query rows at positions `past..past+t` (`past = s − t`); `k` holds `s` rows
/// (`n_kv_heads·d` wide) and `v` holds `s` rows (`n_kv_heads·dv` wide) for positions `0..s`.
/// Query head `h` reads KV head `h / (n_heads/n_kv)`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    s: usize,
    shape: AttnShape,
    mask: Mask,
    out: &mut [f32],
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        v_head_dim: dv,
    } = shape;
    let (qd, kvd, vd, od) = (n_heads * d, n_kv_heads * d, n_kv_heads * dv, n_heads * dv);
    assert!(t <= s);
    assert_eq!(q.len(), t * qd);
    assert!(k.len() >= s * kvd && v.len() >= s * vd);
    assert_eq!(out.len(), t * od);
    if t == 1 && s >= SINGLE_QUERY_MIN_KEYS {
        return single_query(q, Stored::F32(k), Stored::F32(v), s, shape, mask, out);
    }
    let past = s - t;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = t.div_ceil(Q_BLOCK);
    let dst = OutPtr(out.as_mut_ptr());
    // On AMX, the scores are a tile product (f32 accuracy, see `amx`) against each KV head's
    // keys, packed once for all its query blocks.
    let key_tiles = amx::takes(t).then(|| {
        let pack = |h: usize| {
            let mut kh = vec![0f32; s * d];
            for (j, row) in kh.chunks_exact_mut(d).enumerate() {
                row.copy_from_slice(&k[j * kvd + h * d..][..d]);
            }
            amx::WeightTiles::pack(&kh, s, d)
        };
        (0..n_kv_heads).map(pack).collect::<Vec<_>>()
    });

    // One task per (KV head, block of query rows): the group's query heads are stacked into one
    // `group·bt`-row product against the keys, so each key/value block is read once per group
    // instead of once per query head.
    let task = |job: usize| {
        let (kvh, b) = (job / blocks, job % blocks);
        let (i0, i1) = (b * Q_BLOCK, ((b + 1) * Q_BLOCK).min(t));
        // The block's last query row sees the most keys.
        let (bt, keys) = (i1 - i0, mask.end(past + i1 - 1, s));
        let m = group * bt;
        // Row `g·bt + r`: query head `kvh·group + g` at query row `i0 + r`.
        let head_row = |row: usize| (kvh * group + row / bt, row % bt);
        let q_row = |row: usize| {
            let (h, r) = head_row(row);
            &q[(i0 + r) * qd + h * d..][..d]
        };
        // Overwritten by the product: reused between tasks instead of a zeroed allocation (the
        // memset of 1.5 MB per task was 3 % of prefill 2048).
        let mut scores_buf = SCORES.with_borrow_mut(std::mem::take);
        let scores = super::scratch(&mut scores_buf, m * keys);
        match &key_tiles {
            Some(tiles) => {
                let mut qa = amx::Acts::with_shape(m, d);
                (0..m).for_each(|row| qa.set_row(row, q_row(row)));
                amx::product(&qa, &tiles[kvh], keys, scores);
            }
            None => {
                let qs: Vec<f32> = (0..m).flat_map(q_row).copied().collect();
                let kb = MatRef::from_row_major_slice_with_stride(&k[kvh * d..], keys, d, kvd);
                gemm(
                    MatMut::from_row_major_slice_mut(scores, m, keys),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&qs, m, d),
                    kb.transpose(),
                    Par::Seq,
                );
            }
        }
        // Unnormalised probabilities; each output row is divided by its sum instead (dv values
        // rather than a row of `keys`).
        let mut inv = vec![0f32; m];
        for (row, sc) in scores.chunks_exact_mut(keys).enumerate() {
            let pos = past + i0 + row % bt;
            let (hidden, end) = (mask.hidden(pos), mask.end(pos, keys));
            sc[hidden.clone()].fill(f32::NEG_INFINITY);
            inv[row] = 1.0 / exp_shifted(&mut sc[..end], scale).0;
            sc[hidden].fill(0.0);
            sc[end..].fill(0.0);
        }
        let mut o = vec![0f32; m * dv];
        gemm(
            MatMut::from_row_major_slice_mut(&mut o, m, dv),
            Accum::Replace,
            MatRef::from_row_major_slice(scores, m, keys),
            MatRef::from_row_major_slice_with_stride(&v[kvh * dv..], keys, dv, vd),
            Par::Seq,
        );
        SCORES.with_borrow_mut(|b| *b = scores_buf);
        for (row, (src, inv)) in o.chunks_exact(dv).zip(&inv).enumerate() {
            let (h, r) = head_row(row);
            let at = dst.at((i0 + r) * od + h * dv);
            for (c, x) in src.iter().enumerate() {
                // SAFETY: this task alone writes rows i0..i1, columns of its KV head's query
                // heads (h·dv..(h+1)·dv), inside the buffer of t rows of od floats.
                unsafe { *at.add(c) = x * inv };
            }
        }
    };
    let jobs = n_kv_heads * blocks;
    // A decode step's attention is a few hundred kFLOP: waking a second thread costs more.
    let small = t * s * n_heads * (d + dv) < 2 * PARALLEL_MIN_WORK;
    if crate::threads::threads() == 1 || jobs == 1 || small {
        (0..jobs).for_each(task);
    } else {
        (0..jobs).into_par_iter().for_each(task);
    }
}

/// [`causal_attention`] over K/V rows kept as f16 bits (a decode cache in f16): a decode step
/// reads them as stored, each task widening its own rows into a scratch (half the bytes from
/// memory, the f32 body on L2-resident rows); several queries at once widen the whole history
/// first and take the f32 path.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_f16(
    q: &[f32],
    k: &[u16],
    v: &[u16],
    t: usize,
    s: usize,
    shape: AttnShape,
    mask: Mask,
    out: &mut [f32],
) {
    let (kvd, vd) = (shape.kv_dim(), shape.v_dim());
    assert!(k.len() >= s * kvd && v.len() >= s * vd);
    if t == 1 && s >= SINGLE_QUERY_MIN_KEYS {
        return single_query(q, Stored::F16(k), Stored::F16(v), s, shape, mask, out);
    }
    let level = super::simd::level();
    let (mut kw, mut vw) = (vec![0f32; s * kvd], vec![0f32; s * vd]);
    f16::widen_at(level, &k[..s * kvd], &mut kw);
    f16::widen_at(level, &v[..s * vd], &mut vw);
    causal_attention(q, &kw, &vw, t, s, shape, mask, out)
}

/// Key or value rows as attention reads them.
#[derive(Clone, Copy)]
enum Stored<'a> {
    F32(&'a [f32]),
    /// f16 bits.
    F16(&'a [u16]),
}

/// From this many keys on, a decode step takes the matrix-vector path below instead of GEMMs
/// (a GEMM with one query row spends its time packing the keys).
const SINGLE_QUERY_MIN_KEYS: usize = 64;

/// Attention of one query row (a decode step) over `s` keys: per KV head, the scores of its group
/// of query heads (dot products), a softmax, and the value rows accumulated with those weights,
/// so each head's keys and values are read once for the whole group. On more than one thread the
/// keys are also split into equal ranges (flash-decoding): each (KV head, key range) task leaves
/// its unnormalised output with its softmax shift and sum, and the ranges are merged. SmolLM2's
/// 3 KV heads alone would split 2 : 1 between two threads; left serial, attention was 9 % of
/// 2-thread decode at 128–384 tokens on a Zen 2 EPYC, with the other thread spinning idle.
fn single_query(
    q: &[f32],
    k: Stored,
    v: Stored,
    s: usize,
    shape: AttnShape,
    mask: Mask,
    out: &mut [f32],
) {
    let (d, dv) = (shape.head_dim, shape.v_head_dim);
    let (kvd, vd) = (shape.kv_dim(), shape.v_dim());
    let (n_kv, group) = (shape.n_kv_heads, shape.n_heads / shape.n_kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    let hidden = mask.hidden(s - 1);
    let threads = crate::threads::threads();
    let parts = if threads == 1 || s * shape.n_heads * (d + dv) < TEAM_MIN_WORK {
        1
    } else {
        (2 * threads)
            .div_ceil(n_kv)
            .min(s.div_ceil(MIN_PART_KEYS))
            .max(1)
    };
    let part_keys = s.div_ceil(parts);
    // Task (KV head, key range): its group's unnormalised outputs and (shift, sum) per head.
    let level = super::simd::level();
    let task = |i: usize, o: &mut [f32], stats: &mut [Partial]| {
        let (kvh, part) = (i / parts, i % parts);
        let q = &q[kvh * group * d..(kvh + 1) * group * d];
        // The last ranges may be short or empty (`s` not a multiple of `parts`).
        let keys = (part * part_keys).min(s)..((part + 1) * part_keys).min(s);
        match (k, v) {
            (Stored::F32(k), Stored::F32(v)) => {
                let heads = KvHead {
                    q,
                    k: &k[kvh * d..],
                    v: &v[kvh * dv..],
                    stride: (kvd, vd),
                    dims: (d, dv),
                };
                one_kv_head_at(level, &heads, scale, hidden.clone(), keys, o, stats);
            }
            (Stored::F16(k), Stored::F16(v)) => WIDE.with_borrow_mut(|wide| {
                // This range's rows of this KV head, widened: then the f32 body on them.
                let n = keys.len();
                let (kw, vw) = scratch(wide, n * (d + dv)).split_at_mut(n * d);
                if n > 0 {
                    let rows = |src: &[u16], stride: usize, width: usize, dst: &mut [f32]| {
                        let first = keys.start * stride + kvh * width;
                        let end = first + (n - 1) * stride + width;
                        f16::widen_rows_at(level, &src[first..end], stride, width, dst)
                    };
                    rows(k, kvd, d, kw);
                    rows(v, vd, dv, vw);
                }
                let heads = KvHead {
                    q,
                    k: kw,
                    v: vw,
                    stride: (d, dv),
                    dims: (d, dv),
                };
                let hidden =
                    hidden.start.saturating_sub(keys.start)..hidden.end.saturating_sub(keys.start);
                one_kv_head_at(level, &heads, scale, hidden, 0..n, o, stats);
            }),
            _ => unreachable!("keys and values are stored alike"),
        }
    };
    if parts == 1 {
        let mut stats = vec![Partial::EMPTY; group];
        for (kvh, o) in out.chunks_mut(group * dv).enumerate() {
            task(kvh, o, &mut stats);
            for (oh, st) in o.chunks_exact_mut(dv).zip(&stats) {
                let inv = 1.0 / st.sum;
                oh.iter_mut().for_each(|x| *x *= inv);
            }
        }
        return;
    }
    let jobs = n_kv * parts;
    let mut partial = vec![0f32; jobs * group * dv];
    let mut stats = vec![Partial::EMPTY; jobs * group];
    let mut items: Vec<(usize, &mut [f32], &mut [Partial])> = partial
        .chunks_mut(group * dv)
        .zip(stats.chunks_mut(group))
        .enumerate()
        .map(|(i, (o, st))| (i, o, st))
        .collect();
    crate::threads::for_each_mut(&mut items, |(i, o, st)| task(*i, o, st));
    // out_h = Σ_p e^{shift_p − M} o_p / Σ_p e^{shift_p − M} sum_p, M = the largest shift.
    for h in 0..shape.n_heads {
        let (kvh, g) = (h / group, h % group);
        let at = |p: usize| (kvh * parts + p) * group + g;
        let top = (0..parts)
            .map(|p| stats[at(p)].shift)
            .fold(f32::NEG_INFINITY, f32::max);
        let oh = &mut out[h * dv..(h + 1) * dv];
        oh.fill(0.0);
        let mut total = 0f32;
        for p in 0..parts {
            let st = stats[at(p)];
            if st.sum == 0.0 {
                continue; // every key of this range is hidden (sliding window)
            }
            let w = exp_approx::<false>(st.shift - top);
            total += w * st.sum;
            let src = &partial[at(p) * dv..(at(p) + 1) * dv];
            oh.iter_mut().zip(src).for_each(|(x, y)| *x += w * y);
        }
        let inv = 1.0 / total;
        oh.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Fewest multiply-adds (`s·heads·(d + dv)`) for which a decode step's attention is split
/// between threads (SmolLM2: from 57 keys on).
const TEAM_MIN_WORK: usize = 1 << 16;
/// Fewest keys of one range when a decode step's keys are split.
const MIN_PART_KEYS: usize = 32;

/// A query head's softmax over one range of keys: its weights were `e^{x − shift}` (`x` the
/// scaled scores) and sum to `sum` (0 when every key of the range is hidden).
#[derive(Clone, Copy)]
struct Partial {
    shift: f32,
    sum: f32,
}

impl Partial {
    const EMPTY: Partial = Partial {
        shift: f32::NEG_INFINITY,
        sum: 0.0,
    };
}

/// One KV head's share of a decode step: its group of query heads (`q`, `group × d`), its key and
/// value rows (`k`, `v` start at the head's columns; rows are `stride` apart), `dims = (d, dv)`.
struct KvHead<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    stride: (usize, usize),
    dims: (usize, usize),
}

/// Rows ahead that [`one_kv_head_at`] asks the memory system for: cache rows are strided (all KV
/// heads of a position are adjacent), which the hardware prefetcher follows poorly.
const PREFETCH_ROWS: usize = 8;

#[inline(always)]
fn prefetch(buf: &[f32], at: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (buf, at);
    #[cfg(target_arch = "x86_64")]
    if at < buf.len() {
        // SAFETY: a prefetch is only a hint; `at` is inside the buffer.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(buf.as_ptr().add(at) as *const i8);
        }
    }
}

simd_dispatch! {
    /// Scores, softmax weights and weighted values of one KV head's query group over the keys
    /// `keys` (`hidden` ones excluded), with the inner loops inlined into one vectorised body (a
    /// call per key was most of the time at long context). Leaves the outputs unnormalised, with
    /// each head's shift and sum in `stats`.
    fn _, one_kv_head_at(
        h: &KvHead,
        scale: f32,
        hidden: std::ops::Range<usize>,
        keys: std::ops::Range<usize>,
        out: &mut [f32],
        stats: &mut [Partial],
    ) {
        let (d, dv) = h.dims;
        let (ks, vs) = h.stride;
        let group = h.q.len() / d;
        let n = keys.len();
        // The hidden keys, counted from the range's start.
        let hid = hidden.start.clamp(keys.start, keys.end) - keys.start
            ..hidden.end.clamp(keys.start, keys.end) - keys.start;
        out.fill(0.0);
        if hid.len() == n {
            stats.fill(Partial::EMPTY);
            return;
        }
        let mut p = vec![0f32; group * n];
        for ((g, row), st) in p.chunks_exact_mut(n).enumerate().zip(stats.iter_mut()) {
            let qh = &h.q[g * d..(g + 1) * d];
            for (i, x) in row.iter_mut().enumerate() {
                let j = keys.start + i;
                prefetch(h.k, (j + PREFETCH_ROWS) * ks);
                *x = dot_portable(qh, &h.k[j * ks..j * ks + d]);
            }
            row[hid.clone()].fill(f32::NEG_INFINITY);
            let (sum, max) = exp_shifted(row, scale);
            row[hid.clone()].fill(0.0);
            *st = Partial {
                shift: scale * max,
                sum,
            };
        }
        // One query head at a time: its dv sums stay in registers (a group's three rows of 64
        // did not, and spilled: 7 % slower decode at 2048 keys); the value rows are read again
        // per head, from L1/L2.
        for (og, pg) in out.chunks_exact_mut(dv).zip(p.chunks_exact(n)) {
            for (i, w) in pg.iter().enumerate() {
                let j = keys.start + i;
                prefetch(h.v, (j + PREFETCH_ROWS) * vs);
                let vj = &h.v[j * vs..j * vs + dv];
                for (o, x) in og.iter_mut().zip(vj) {
                    *o += w * x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct transcription of the definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        s: usize,
        sh: AttnShape,
        mask: Mask,
    ) -> Vec<f64> {
        let (d, dv) = (sh.head_dim, sh.v_head_dim);
        let (qd, kvd, vd, od) = (sh.q_dim(), sh.kv_dim(), sh.v_dim(), sh.out_dim());
        let past = s - t;
        let mut out = vec![0f64; t * od];
        for h in 0..sh.n_heads {
            let kvh = h / (sh.n_heads / sh.n_kv_heads);
            for i in 0..t {
                let p = past + i;
                let last = if mask.bidirectional { s - 1 } else { p };
                let visible: Vec<usize> = (0..=last)
                    .filter(|&j| mask.window.is_none_or(|w| p - j <= w || j < mask.sink))
                    .collect();
                let mut w: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| q[i * qd + h * d + c] as f64 * k[j * kvd + kvh * d + c] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = w.iter().cloned().fold(f64::MIN, f64::max);
                w.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = w.iter().sum();
                for c in 0..dv {
                    out[i * od + h * dv + c] = visible
                        .iter()
                        .zip(&w)
                        .map(|(&j, wj)| wj / z * v[j * vd + kvh * dv + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn gqa_causal_and_bidirectional_match_naive_with_history_window_and_wide_values_at_every_level()
    {
        crate::kernels::simd::for_each_level(|level| {
            let masks = [
                Mask::CAUSAL,
                Mask {
                    window: Some(8),
                    sink: 3,
                    ..Mask::CAUSAL
                },
                Mask {
                    window: Some(20),
                    sink: 0,
                    ..Mask::CAUSAL
                },
                Mask::BIDIRECTIONAL,
            ];
            for (sh, mask) in [
                (AttnShape::new(6, 2, 8), masks[0]),
                (
                    AttnShape {
                        v_head_dim: 16,
                        ..AttnShape::new(4, 2, 8)
                    },
                    masks[1],
                ),
                (AttnShape::new(2, 1, 4), masks[2]),
                (AttnShape::new(6, 6, 8), masks[3]),
                (AttnShape::new(4, 2, 8), masks[3]),
            ] {
                for (t, s) in [(1, 1), (5, 5), (130, 130), (1, 77), (70, 100)] {
                    let f = |n: usize, m: usize| -> Vec<f32> {
                        (0..n)
                            .map(|i| ((i * m % 97) as f32 / 97.0 - 0.5) * 2.0)
                            .collect()
                    };
                    let (q, k, v) = (
                        f(t * sh.q_dim(), 31),
                        f(s * sh.kv_dim(), 17),
                        f(s * sh.v_dim(), 29),
                    );
                    let mut out = vec![f32::NAN; t * sh.out_dim()];
                    causal_attention(&q, &k, &v, t, s, sh, mask, &mut out);
                    for (a, b) in out.iter().zip(naive(&q, &k, &v, t, s, sh, mask)) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5,
                            "{level} t={t} s={s}: {a} vs {b}"
                        );
                    }
                }
            }
        });
    }

    /// A decode step long enough to be split by KV head and key range between two threads
    /// equals the definition, as does the same step on one thread: SmolLM2's 9 query / 3 KV
    /// heads, and one KV head whose 4 key ranges meet a sliding window (one range fully hidden,
    /// two partly, the sink keys visible).
    #[test]
    fn decode_step_split_between_threads_matches_naive() {
        crate::threads::set_threads(2);
        let window = Mask {
            window: Some(100),
            sink: 4,
            ..Mask::CAUSAL
        };
        for (sh, mask) in [
            (AttnShape::new(9, 3, 64), Mask::CAUSAL),
            (AttnShape::new(4, 1, 64), window),
        ] {
            let s = 300;
            assert!(s * sh.n_heads * (sh.head_dim + sh.v_head_dim) >= TEAM_MIN_WORK);
            let f = |n: usize, m: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * m % 89) as f32 / 89.0 - 0.5) * 2.0)
                    .collect()
            };
            let (q, k, v) = (
                f(sh.q_dim(), 31),
                f(s * sh.kv_dim(), 17),
                f(s * sh.v_dim(), 29),
            );
            let want = naive(&q, &k, &v, 1, s, sh, mask);
            for one in [false, true] {
                let mut out = vec![f32::NAN; sh.out_dim()];
                let run = || causal_attention(&q, &k, &v, 1, s, sh, mask, &mut out);
                if one {
                    crate::threads::one_thread(run);
                } else {
                    crate::threads::install(run);
                }
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "one thread: {one}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Attention over f16 rows equals attention over their f32 values exactly: decode steps
    /// split between two threads (windowed, with hidden ranges) and on one thread at every
    /// level, and several queries at once (widened first).
    #[test]
    fn f16_rows_attend_as_their_f32_values() {
        crate::threads::set_threads(2);
        let window = Mask {
            window: Some(100),
            sink: 4,
            ..Mask::CAUSAL
        };
        let f = |n: usize, m: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m % 89) as f32 / 89.0 - 0.5) * 3.0)
                .collect()
        };
        let half = |x: &[f32]| -> Vec<u16> {
            x.iter()
                .map(|v| ::half::f16::from_f32(*v).to_bits())
                .collect()
        };
        let wide = |h: &[u16]| -> Vec<f32> {
            h.iter()
                .map(|b| ::half::f16::from_bits(*b).to_f32())
                .collect()
        };
        for (sh, mask) in [
            (AttnShape::new(9, 3, 64), Mask::CAUSAL),
            (AttnShape::new(4, 1, 64), window),
        ] {
            for (t, s) in [(1, 300), (1, 70), (1, 9), (5, 300)] {
                let q = f(t * sh.q_dim(), 31);
                let (k16, v16) = (half(&f(s * sh.kv_dim(), 17)), half(&f(s * sh.v_dim(), 29)));
                let (k, v) = (wide(&k16), wide(&v16));
                let check = |what: &str| {
                    let mut want = vec![f32::NAN; t * sh.out_dim()];
                    causal_attention(&q, &k, &v, t, s, sh, mask, &mut want);
                    let mut got = vec![f32::NAN; t * sh.out_dim()];
                    causal_attention_f16(&q, &k16, &v16, t, s, sh, mask, &mut got);
                    assert_eq!(got, want, "{what}, t={t} s={s}, {mask:?}");
                };
                crate::threads::install(|| check("two threads"));
                crate::kernels::simd::for_each_level(|l| check(l.name()));
            }
        }
    }
}
