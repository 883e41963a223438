//! The two paths of `y = x · Wᵀ` on SmolLM2's prefill shapes, side by side (GFLOP/s, medians of
//! 15 after a warm-up, 2 threads or the count given): faer with the rows split between threads (what
//! `kernels::matmul` runs without AMX), the AMX tile path packing both operands per product (a
//! weight used once) and with the weight's tiles kept (a model's linears).
//!
//!
//! Then products of stored weights (2:4 f32, 4-bit blocks) against the same product on the dense
//! f32 weight, 512 rows, at the level `WHITTLE_SIMD` forces: `Linear::forward`, which expands the
//! stored weight 64 rows at a time inside the product, and the whole matrix expanded first and
//! then multiplied (what it did before). The weights stay in cache between repetitions, so the
//! dense product is at its best; in a model each weight comes from memory once per pass.
//!
//!   [WHITTLE_SIMD=avx2] cargo run --release --example gemm_paths [THREADS]
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use whittle::kernels::amx;
use whittle::kernels::matmul::matmul_t;
use whittle::model::linear::{Linear, Weight};
use whittle::quant::{rtn, QuantConfig};

fn median_seconds(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..15)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[7]
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .map_or(2, |t| t.parse().expect("thread count"));
    whittle::threads::set_threads(threads);
    println!("rows × in → out        faer GFLOP/s   AMX GFLOP/s   AMX, kept weight");
    for (r, k, n) in [
        (512, 576, 576),
        (512, 576, 1536),
        (512, 1536, 576),
        (2048, 576, 1536),
        (2048, 1536, 576),
    ] {
        let x: Vec<f32> = (0..r * k).map(|i| (i * 7 % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i * 5 % 11) as f32 * 0.1).collect();
        let mut y = vec![0f32; r * n];
        let gflop = 2.0 * (r * k * n) as f64 / 1e9;
        let faer = whittle::threads::install(|| {
            median_seconds(&mut || {
                x.par_chunks(r / 2 * k)
                    .zip(y.par_chunks_mut(r / 2 * n))
                    .for_each(|(x, y)| {
                        let rows = x.len() / k;
                        faer::linalg::matmul::matmul(
                            MatMut::from_row_major_slice_mut(y, rows, n),
                            Accum::Replace,
                            MatRef::from_row_major_slice(x, rows, k),
                            MatRef::from_row_major_slice(&w, n, k).transpose(),
                            1.0f32,
                            Par::Seq,
                        )
                    })
            })
        });
        let (tiles, kept) = if amx::available() {
            let once = whittle::threads::install(|| {
                median_seconds(&mut || {
                    amx::matmul_t(&x, &w, (r, k, n), &mut y, amx::Precision::F32)
                })
            });
            let packed = amx::WeightTiles::pack(&w, n, k);
            let kept = whittle::threads::install(|| {
                median_seconds(&mut || {
                    let acts = amx::Acts::pack(&x, r, k);
                    amx::matmul_many(
                        &acts,
                        &mut [amx::Product {
                            w: &packed,
                            y: &mut y,
                        }],
                    )
                })
            });
            (
                format!("{:.0}", gflop / once),
                format!("{:.0}", gflop / kept),
            )
        } else {
            ("no AMX".into(), "no AMX".into())
        };
        println!(
            "{r:>5} × {k:>4} → {n:>4}   {:>12.0}   {tiles:>11}   {kept:>16}",
            gflop / faer
        );
    }
    stored_weights();
}

/// The second table: stored weights through `Linear::forward` against dense and expand-first.
fn stored_weights() {
    println!("level {}", whittle::kernels::simd::level().name());
    println!("rows × in → out     weight      dense f32   chunked   whole first   (GFLOP/s)");
    const PAIRS: [[usize; 2]; 6] = [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]];
    for (r, k, n) in [(512, 576, 1536), (512, 1536, 576), (512, 576, 576)] {
        let x: Vec<f32> = (0..r * k)
            .map(|i| (i * 7 % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut w: Vec<f32> = (0..n * k)
            .map(|i| (i * 5 % 11) as f32 * 0.1 - 0.5)
            .collect();
        for (i, v) in w.iter_mut().enumerate() {
            if !PAIRS[(i / 4) % 6].contains(&(i % 4)) {
                *v = 0.0;
            }
        }
        let dense = Linear::dense("w", w.clone(), n, k).expect("shape");
        let mut sparse = dense.clone();
        assert!(sparse.pack_sparse24_at(whittle::kernels::simd::level()));
        let cfg = QuantConfig {
            bits: 4,
            group: 32,
            sym: false,
        };
        let q4 = Linear::new(Weight::Packed(rtn("w", &w, n, k, cfg).expect("q4")), n, k);
        let mut y = vec![0f32; r * n];
        let gflop = 2.0 * (r * k * n) as f64 / 1e9;
        let base = median_seconds(&mut || dense.forward(&x, r, &mut y));
        for (name, l) in [("2:4 f32", &sparse), ("Q4 g32", &q4)] {
            let chunked = median_seconds(&mut || l.forward(&x, r, &mut y));
            let mut buf = vec![0f32; n * k];
            let level = whittle::kernels::simd::level();
            let whole = median_seconds(&mut || {
                l.weight().expand_all_at(level, k, &mut buf);
                matmul_t(&x, &buf, r, k, n, &mut y)
            });
            println!(
                "{r} × {k} → {n:<5}  {name:<10} {:>8.1}  {:>8.1}  {:>8.1}",
                gflop / base,
                gflop / chunked,
                gflop / whole
            );
        }
    }
}
