//! Prefill products of stored weights (2:4 f32, 4-bit blocks) against the same product on the
//! dense f32 weight, SmolLM2's shapes, 512 rows (GFLOP/s, medians of 21 after a warm-up, 2 threads
//! or the count given, at the level `WHITTLE_SIMD` forces): `Linear::forward`, which expands the
//! stored weight 64 rows at a time inside the product, and the whole matrix expanded first and
//! then multiplied (what it did before). The weights here stay in cache between repetitions, so
//! the dense product is at its best; in a model each weight comes from memory once per pass.
//!
//!   WHITTLE_SIMD=avx2 cargo run --release --example expanding_gemm [THREADS]
use rayon::prelude::*;
use whittle::kernels::matmul::matmul_t;
use whittle::model::linear::{Linear, Weight};
use whittle::quant::{rtn, QuantConfig};

fn median_seconds(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..21)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[10]
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .map_or(2, |t| t.parse().expect("thread count"));
    whittle::threads::set_threads(threads);
    println!(
        "level {}, {threads} threads",
        whittle::kernels::simd::level().name()
    );
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
                whittle::threads::install(|| {
                    buf.par_chunks_mut(64 * k).enumerate().for_each(|(c, w)| {
                        let rows = 64 * c..64 * c + w.len() / k;
                        l.weight().expand_rows_at(level, k, rows, w)
                    })
                });
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
