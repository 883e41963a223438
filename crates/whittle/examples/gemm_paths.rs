//! The two paths of `y = x · Wᵀ` on SmolLM2's prefill shapes, side by side (GFLOP/s, medians of
//! 15 after a warm-up, 2 threads or the count given): faer with the rows split between threads (what
//! `kernels::matmul` runs without AMX), the AMX tile path packing both operands per product (a
//! weight used once) and with the weight's tiles kept (a model's linears).
//!
//!   cargo run --release --example gemm_paths [THREADS]
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use whittle::kernels::amx;

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
                median_seconds(&mut || amx::matmul_t(&x, &w, r, k, n, &mut y))
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
}
