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
