//! Each forward-pass kernel timed at each SIMD level, on one thread, on SmolLM2-135M's shapes:
//! the figures behind "the scalar level is at most 8x slower than avx2 on any kernel" and the
//! check that no level falls back to something slow (`whittle bench --kernels`).

use crate::kernels::simd::{for_each_level, Level};
use crate::kernels::{activation, attention, exp, matmul, norm, qdot, rope, sparse24, ssm};
use crate::kernels::{qdot_i16, sparse24_int};
use crate::model::AttnShape;
use serde::Serialize;
use std::time::Instant;

/// One kernel's time at one level.
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub level: &'static str,
    /// Median seconds of one call.
    pub seconds: f64,
}

/// Deterministic values in [-1, 1).
fn wave(n: usize, m: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * m % 1009) as f32 / 1009.0 - 0.5) * 2.0)
        .collect()
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut runs: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Times every kernel at every level this CPU runs (lowest first), `reps` runs each.
pub fn run(reps: usize) -> Vec<KernelTime> {
    let (hidden, ffn, tokens) = (576usize, 1536usize, 512usize);
    let shape = AttnShape::new(9, 3, 64);
    let x = wave(tokens * hidden, 7);
    let w = wave(ffn * hidden, 13);
    let (q, k, v) = (
        wave(tokens * shape.q_dim(), 17),
        wave(tokens * shape.kv_dim(), 19),
        wave(tokens * shape.v_dim(), 23),
    );
    // A Q4_1-like matrix: 4-bit codes, one (scale, min) per 32 inputs.
    let codes: Vec<u8> = (0..ffn * hidden / 2)
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    let groups = ffn * hidden / 32;
    let (scales, mins) = (wave(groups, 3), wave(groups, 5));
    let matrix = qdot::QRows::new(4, 32, None, (&codes, &scales, &mins), hidden);
    let row = |r: usize| matrix.row(r);
    // The same matrix 2:4-sparse (the first two of every four kept), packed.
    let half: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 4 < 2 { *v } else { 0.0 })
        .collect();
    let packed24 =
        crate::model::sparse::Sparse24::pack(&half, ffn, hidden).expect("a 2:4 matrix packs");
    // The same with its values cut to bf16: kept as bf16 bits.
    let half16: Vec<f32> = half
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    let packed24_bf16 =
        crate::model::sparse::Sparse24::pack(&half16, ffn, hidden).expect("a 2:4 matrix packs");
    // A symmetric 4-bit matrix 2:4-sparse (the same codes, the last two of every four at the
    // zero point 8), as 2:4 codes.
    let steps = hidden / sparse24_int::STEP;
    let mut codes24 = vec![0u8; ffn * steps * sparse24_int::step_bytes(4)];
    let mut index24 = vec![0u64; ffn * steps];
    let mut row_q = vec![0u8; hidden];
    for (r, (c, i)) in codes24
        .chunks_exact_mut(steps * sparse24_int::step_bytes(4))
        .zip(index24.chunks_exact_mut(steps))
        .enumerate()
    {
        sparse24_int::row_codes(4, row(r).data, &mut row_q);
        for g in row_q.chunks_exact_mut(4) {
            g[2..].fill(8);
        }
        assert!(sparse24_int::pack_codes(4, 8, &row_q, c, i));
    }
    let matrix24 = sparse24_int::Rows24 {
        bits: 4,
        group: 32,
        inp: hidden,
        codes: &codes24,
        index: &index24,
        scales: &scales,
    };
    let table = rope::RopeTable::new(64, 10000.0, tokens);
    let norm_w = wave(hidden, 29);
    let scan = ssm::ScanData::synthetic(64, 512, 16);
    let conv_w = wave(512 * 4, 31);
    let mut out = Vec::new();
    for_each_level(|level: Level| {
        let mut push = |kernel, seconds| {
            out.push(KernelTime {
                kernel,
                level: level.name(),
                seconds,
            })
        };
        let mut y = vec![0f32; tokens * ffn];
        push(
            "gemm 512×576→1536",
            time(reps, || {
                matmul::matmul_t(&x, &w, tokens, hidden, ffn, &mut y);
            }),
        );
        push(
            "gemv f32 576→1536",
            time(reps, || {
                matmul::matmul_t(&x[..hidden], &w, 1, hidden, ffn, &mut y[..ffn]);
            }),
        );
        push(
            "gemv 2:4 f32 576→1536",
            time(reps, || {
                for (r, yr) in y[..ffn].iter_mut().enumerate() {
                    let (v, i) = packed24.row(r, hidden);
                    *yr = sparse24::dot24_at(level, v, i, &x[..hidden]);
                }
            }),
        );
        push(
            "gemv 2:4 bf16 576→1536",
            time(reps, || {
                for (r, yr) in y[..ffn].iter_mut().enumerate() {
                    let (v, i) = packed24_bf16.row(r, hidden);
                    *yr = sparse24::dot24_at(level, v, i, &x[..hidden]);
                }
            }),
        );
        push(
            "gemv Q4 576→1536",
            time(reps, || {
                for (r, yr) in y[..ffn].iter_mut().enumerate() {
                    *yr = qdot::qdot(row(r), &x[..hidden]);
                }
            }),
        );
        if qdot_i16::takes(level, 4) {
            push(
                "gemv Q4×int16 576→1536",
                time(reps, || {
                    let xq = qdot_i16::QActs::quantize(&x[..hidden]);
                    qdot_i16::qdot_i16_rows_at(level, matrix, &xq, &mut y[..ffn]);
                }),
            );
        }
        if sparse24_int::takes(level, 4) {
            push(
                "gemv 2:4 Q4×int16 576→1536",
                time(reps, || {
                    let xq = qdot_i16::QActs::quantize(&x[..hidden]);
                    sparse24_int::dot_rows_at(level, matrix24, &xq, &mut y[..ffn]);
                }),
            );
        }
        let mut expanded = vec![0f32; ffn * hidden];
        push(
            "dequantize Q4 1536×576",
            time(reps, || {
                for (r, yr) in expanded.chunks_exact_mut(hidden).enumerate() {
                    qdot::dequant_row(row(r), yr);
                }
            }),
        );
        // Only the levels that store 2:4 codes expand them.
        if sparse24_int::takes(level, 4) {
            push(
                "expand 2:4 Q4 1536×576",
                time(reps, || {
                    for (r, yr) in expanded.chunks_exact_mut(hidden).enumerate() {
                        matrix24.range(r..r + 1).unpack_row_at(level, yr);
                    }
                }),
            );
        }
        let mut o = vec![0f32; tokens * shape.out_dim()];
        push(
            "attention prefill 512",
            time(reps, || {
                attention::causal_attention(
                    &q,
                    &k,
                    &v,
                    tokens,
                    tokens,
                    shape,
                    attention::Mask::CAUSAL,
                    &mut o,
                );
            }),
        );
        let last = &q[(tokens - 1) * shape.q_dim()..];
        push(
            "attention decode at 512",
            time(reps, || {
                let o = &mut o[..shape.out_dim()];
                attention::causal_attention(
                    last,
                    &k,
                    &v,
                    1,
                    tokens,
                    shape,
                    attention::Mask::CAUSAL,
                    o,
                );
            }),
        );
        push(
            "softmax 512×2048",
            time(reps, || {
                for r in y.chunks_exact_mut(2048).take(512) {
                    exp::softmax_in_place(r, 0.125);
                }
            }),
        );
        let up = wave(tokens * ffn, 37);
        push(
            "swiglu 512×1536",
            time(reps, || activation::swiglu_in_place(&mut y, &up, ffn)),
        );
        let mut h = vec![0f32; tokens * hidden];
        push(
            "rmsnorm 512×576",
            time(reps, || norm::rms_norm(&x, &norm_w, 1e-5, &mut h)),
        );
        let mut qr = q.clone();
        push(
            "rope 512×9 heads",
            time(reps, || table.apply(&mut qr, tokens, shape.q_dim(), 9, 0)),
        );
        let (mut st, mut ys) = (vec![0f32; 512 * 16], vec![0f32; 64 * 512]);
        push(
            "selective scan 64×512×16",
            time(reps, || {
                ssm::selective_scan(&scan.inputs(), &mut st, &mut ys)
            }),
        );
        let mut hist = vec![0f32; 3 * 512];
        push(
            "causal conv 64×512",
            time(reps, || {
                ssm::causal_conv_silu(&x[..64 * 512], &conv_w, &w[..512], &mut hist, 512, &mut ys)
            }),
        );
    });
    out
}
