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

/// (what, tokens, PyTorch fp32 tok/s, llama.cpp F32 tok/s) from the reference README, 2 threads.
const REFERENCE: [(&str, usize, Option<f64>, Option<f64>); 3] = [
    ("prefill", 512, Some(548.0), Some(535.0)),
    ("prefill", 2048, Some(529.0), None),
    ("decode", 128, Some(19.0), Some(54.0)),
];

pub fn run(model: Option<&str>, data: &Path, reps: usize, json_out: Option<PathBuf>) -> Result<()> {
    let text = whittle::data::text::read_text(data)?;
    let loaded = load(model)?;
    let ids = loaded.tokenizer.encode(&text)?;
    let threads = whittle::threads::threads();
    let reps = reps.max(1);
    let mut rows = Vec::new();
    for (what, t, torch, llama) in REFERENCE {
        eprintln!("measuring {what} {t} ({reps} runs + warm-up) ...");
        let r = if what == "prefill" {
            speed::prefill(&loaded.model, &ids, t, reps)?
        } else {
            speed::decode(&loaded.model, &ids, 128, t, reps)?.0
        };
        rows.push((r, torch, llama));
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
