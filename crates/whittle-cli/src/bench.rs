//! `whittle bench`: prefill and decode throughput with the reference protocol, printed next to
//! the reference implementations' figures (`shared/reference/README.md`, 2 threads, same machine
//! kind). Those were measured on a busy machine, so the ratios are indicative; BENCHMARKS.md
//! records runs where whittle and the baselines ran back to back.

use crate::commands::load;
use crate::report::{table, write_json};
use anyhow::Result;
use serde_json::json;
use std::path::{Path, PathBuf};
use whittle::eval::speed;
use whittle::io::resolve;

/// A measurement and its reference figures (PyTorch fp32, llama.cpp F32; tok/s, 2 threads).
struct Measure {
    what: &'static str,
    tokens: usize,
    /// Decode with every weight expanded to f32 (the model as PyTorch and llama.cpp F32 hold it).
    f32_weights: bool,
    torch: Option<f64>,
    llama: Option<f64>,
}

const MEASURES: [Measure; 4] = [
    Measure {
        what: "prefill",
        tokens: 512,
        f32_weights: true,
        torch: Some(548.0),
        llama: Some(535.0),
    },
    Measure {
        what: "prefill",
        tokens: 2048,
        f32_weights: true,
        torch: Some(529.0),
        llama: None,
    },
    Measure {
        what: "decode",
        tokens: 128,
        f32_weights: false,
        torch: Some(19.0),
        llama: Some(54.0),
    },
    Measure {
        what: "decode",
        tokens: 128,
        f32_weights: true,
        torch: Some(19.0),
        llama: Some(54.0),
    },
];

pub fn run(model: Option<&str>, data: &Path, reps: usize, json_out: Option<PathBuf>) -> Result<()> {
    let text = whittle::data::text::read_text(data)?;
    let loaded = load(model)?;
    let ids = loaded.tokenizer.encode(&text)?;
    let threads = whittle::threads::threads();
    let reps = reps.max(1);
    // Prefill runs on f32 weights (as PyTorch and llama.cpp F32 do; a packed model would expand
    // them per GEMM); decode reads weights as stored, so it is measured both ways.
    let mut expanded = resolve::load(&loaded.path)?.model;
    expanded.densify();
    let mut rows = Vec::new();
    for m in MEASURES {
        let model = if m.f32_weights {
            &expanded
        } else {
            &loaded.model
        };
        eprintln!(
            "measuring {} {} ({reps} runs + warm-up) ...",
            m.what, m.tokens
        );
        let mut r = if m.what == "prefill" {
            speed::prefill(model, &ids, m.tokens, reps)?
        } else {
            speed::decode(model, &ids, 128, m.tokens, reps)?.0
        };
        if m.what == "decode" {
            r.what += if m.f32_weights {
                ", f32 weights"
            } else {
                ", weights as stored"
            };
        }
        rows.push((r, m.torch, m.llama));
    }
    let fmt = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.0}"));
    let ratio = |a: f64, b: Option<f64>| b.map_or("—".to_string(), |b| format!("{:.2}x", a / b));
    table(
        &[
            "measure",
            "whittle tok/s",
            "PyTorch fp32",
            "llama.cpp F32",
            "vs PyTorch",
            "vs llama.cpp",
        ],
        &rows
            .iter()
            .map(|(r, torch, llama)| {
                vec![
                    r.what.clone(),
                    format!("{:.1}", r.tokens_per_s),
                    fmt(*torch),
                    fmt(*llama),
                    ratio(r.tokens_per_s, *torch),
                    ratio(r.tokens_per_s, *llama),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!("threads {threads}; reference figures: shared/reference/README.md (2 threads, busy machine)");
    if let Some(out) = json_out {
        let rows: Vec<_> = rows
            .iter()
            .map(|(r, torch, llama)| json!({"whittle": r, "pytorch_fp32": torch, "llamacpp_f32": llama}))
            .collect();
        write_json(
            &out,
            &json!({"model": loaded.path, "threads": threads, "rows": rows}),
        )?;
    }
    Ok(())
}

/// Token ids to run a benchmark on: the text's tokens when the model has a tokenizer, else a
/// fixed pseudo-random sequence over the vocabulary (checkpoints such as test fixtures ship none).
fn bench_ids(
    loaded_path: &Path,
    model: &whittle::Model,
    data: &Path,
    n: usize,
) -> Result<Vec<u32>> {
    match resolve::load_tokenizer(loaded_path, model) {
        Ok(tok) => Ok(tok.encode(&whittle::data::text::read_text(data)?)?),
        Err(_) => {
            eprintln!("no tokenizer: benchmarking on pseudo-random token ids");
            let v = model.config.vocab_size as u64;
            Ok((0..n as u64)
                .map(|i| ((i * 7919 + 13) % v) as u32)
                .collect())
        }
    }
}

/// Decode throughput and cache size at growing context lengths.
pub fn contexts(
    model: Option<&str>,
    data: &Path,
    contexts: &[usize],
    steps: usize,
    reps: usize,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let path = whittle::io::resolve::ModelSpec::parse(model)?.resolve()?;
    let model = crate::commands::load_model(&path)?;
    let longest = contexts.iter().max().copied().unwrap_or(0);
    let ids = bench_ids(&path, &model, data, longest)?;
    let mut rows = Vec::new();
    for &c in contexts {
        eprintln!("decode at context {c} ({reps} runs + warm-up) ...");
        let (r, bytes) = speed::decode_at_context(&model, &ids, c, steps, reps.max(1))?;
        rows.push((c, r, bytes));
    }
    table(
        &["context", "decode tok/s", "cache MiB", "cache bytes/token"],
        &rows
            .iter()
            .map(|(c, r, b)| {
                vec![
                    c.to_string(),
                    format!("{:.1}", r.tokens_per_s),
                    format!("{:.2}", *b as f64 / (1 << 20) as f64),
                    format!("{:.0}", *b as f64 / (c + steps) as f64),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!(
        "threads {}; {steps} greedy steps timed after an untimed prefill",
        whittle::threads::threads()
    );
    if let Some(out) = json_out {
        let rows: Vec<_> = rows
            .iter()
            .map(|(c, r, b)| json!({"context": c, "decode": r, "cache_bytes": b}))
            .collect();
        write_json(&out, &json!({"model": path, "rows": rows}))?;
    }
    Ok(())
}

/// The selective scan, blocked and parallel, against the textbook sequential loop.
pub fn scan(reps: usize) -> Result<()> {
    use whittle::kernels::ssm::{selective_scan, selective_scan_naive, ScanData};
    let mut rows = Vec::new();
    // Hymba-1.5B's SSM (E = 3200, N = 16) at 2048 steps; a few-million-parameter model's.
    for (t, e, n) in [
        (2048usize, 3200usize, 16usize),
        (256, 256, 16),
        (1, 3200, 16),
    ] {
        let data = ScanData::synthetic(t, e, n);
        let inp = data.inputs();
        let time = |f: &dyn Fn(&mut [f32], &mut [f32])| {
            let (mut st, mut y) = (vec![0f32; e * n], vec![0f32; t * e]);
            let mut runs = Vec::new();
            for i in 0..=reps.max(1) {
                let s = std::time::Instant::now();
                f(&mut st, &mut y);
                if i > 0 {
                    runs.push(s.elapsed().as_secs_f64());
                }
            }
            runs.sort_by(f64::total_cmp);
            runs[runs.len() / 2]
        };
        let naive = time(&|st, y| selective_scan_naive(&inp, st, y));
        let fast = whittle::threads::install(|| time(&|st, y| selective_scan(&inp, st, y)));
        rows.push(vec![
            format!("{t} × {e} × {n}"),
            format!("{:.3}", naive * 1e3),
            format!("{:.3}", fast * 1e3),
            format!("{:.1}x", naive / fast),
            format!("{:.2}", (t * e * n) as f64 / fast / 1e9),
        ]);
    }
    table(
        &[
            "steps × channels × states",
            "naive ms",
            "whittle ms",
            "speed-up",
            "G updates/s",
        ],
        &rows,
    );
    println!("threads {}", whittle::threads::threads());
    Ok(())
}
