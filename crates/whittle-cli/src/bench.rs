//! `whittle bench`: prefill and decode throughput with the reference protocol. Figures of other
//! implementations are only printed when measured in the same run (`--compare`): the same
//! ratios against figures from another machine were wrong by 10 % and more on a different CPU.
//! Every table says which CPU and which SIMD level its figures come from.

use crate::baselines::{self, Baseline, Figures};
use crate::commands::{load, load_model};
use crate::report::{table, write_json};
use anyhow::Result;
use serde_json::json;
use std::path::{Path, PathBuf};
use whittle::eval::speed;
use whittle::io::resolve;
use whittle::kernels::simd;

/// What `whittle bench` measures and against what.
pub struct BenchOptions {
    pub reps: usize,
    /// Prefill lengths (tokens).
    pub prefill: Vec<usize>,
    pub compare: Vec<Baseline>,
    pub tools: baselines::Tools,
}

/// One line of the table: whittle's figure and the baselines' for the same measure.
struct Line {
    row: speed::SpeedRow,
    key: baselines::Measure,
}

pub fn run(
    model: Option<&str>,
    data: &Path,
    opts: &BenchOptions,
    json_out: Option<PathBuf>,
) -> Result<()> {
    let text = whittle::data::text::read_text(data)?;
    let loaded = load(model)?;
    let ids = loaded.tokenizer.encode(&text)?;
    let threads = whittle::threads::threads();
    let reps = opts.reps.max(1);
    let level = simd::level();
    // Prefill runs on f32 weights (as PyTorch and llama.cpp F32 do; a packed model would expand
    // them per GEMM); decode reads weights as stored, so a packed model is measured both ways.
    // The expanded copy is loaded with the same options (window rule) as the model itself.
    let mut expanded = load_model(&loaded.path)?;
    expanded.densify();
    let packed = loaded.model.has_packed();
    let mut lines = Vec::new();
    let sparse = loaded.model.has_sparse24();
    // A packed or 2:4 model's own prefill (weights expanded per product or tiled once) is timed
    // in turn with the f32 copy's.
    let mut models = vec![&expanded];
    if sparse || packed {
        models.push(&loaded.model);
    }
    for &t in &opts.prefill {
        eprintln!("measuring prefill {t} ({reps} runs + warm-up) ...");
        let rows = speed::prefill(&models, &ids, t, reps)?;
        for (i, mut row) in rows.into_iter().enumerate() {
            let key = if i == 0 {
                baselines::Measure::Prefill(t)
            } else {
                row.what += if sparse {
                    ", 2:4 packed"
                } else {
                    ", weights as stored"
                };
                baselines::Measure::PrefillStored(t)
            };
            lines.push(Line { row, key });
        }
    }
    let mut decode = |model: &whittle::Model, label: &str, key| -> Result<()> {
        eprintln!("measuring decode, {label} ({reps} runs + warm-up) ...");
        let mut row = speed::decode(model, &ids, 128, 128, reps)?.0;
        row.what += &format!(", {label}");
        if model.config.kv_cache == whittle::model::KvDtype::F16 {
            row.what += ", f16 cache";
        }
        lines.push(Line { row, key });
        Ok(())
    };
    // Quantized or 2:4-packed weights decode from their stored form.
    if packed || sparse {
        decode(
            &loaded.model,
            "weights as stored",
            baselines::Measure::DecodeStored,
        )?;
    }
    decode(&expanded, "f32 weights", baselines::Measure::DecodeF32)?;
    let same = baselines::Run {
        model: &loaded.path,
        packed,
        level,
        threads,
        reps,
    };
    let figures: Vec<Figures> = opts
        .compare
        .iter()
        .map(|b| baselines::measure(*b, &opts.tools, &same))
        .collect::<Result<_>>()?;

    let mut header = vec!["measure".to_string(), "whittle tok/s".to_string()];
    for f in &figures {
        header.push(format!("{} tok/s", f.name));
    }
    for f in &figures {
        header.push(format!("vs {}", f.name));
    }
    let cells: Vec<Vec<String>> =
        lines
            .iter()
            .map(|l| {
                let mut row = vec![l.row.what.clone(), format!("{:.1}", l.row.tokens_per_s)];
                let theirs: Vec<Option<f64>> = figures.iter().map(|f| f.get(l.key)).collect();
                row.extend(
                    theirs
                        .iter()
                        .map(|v| v.map_or("—".into(), |v| format!("{v:.1}"))),
                );
                row.extend(theirs.iter().map(|v| {
                    v.map_or("—".into(), |v| format!("{:.2}x", l.row.tokens_per_s / v))
                }));
                row
            })
            .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &cells);
    let cpu = baselines::cpu_name();
    println!("CPU {cpu}; SIMD level {level}; threads {threads}");
    for f in &figures {
        println!("{}: {}", f.name, f.note);
    }
    if let Some(out) = json_out {
        let rows: Vec<_> = lines
            .iter()
            .map(|l| {
                let mut r = json!({"whittle": l.row});
                for f in &figures {
                    r[f.name.as_str()] = json!(f.get(l.key));
                }
                r
            })
            .collect();
        let baselines: Vec<_> = figures
            .iter()
            .map(|f| json!({"name": f.name, "note": f.note, "raw": f.raw}))
            .collect();
        write_json(
            &out,
            &json!({
                "model": loaded.path,
                "cpu": cpu,
                "simd_level": level.name(),
                "threads": threads,
                "rows": rows,
                "baselines": baselines,
            }),
        )?;
    }
    Ok(())
}

/// Every kernel at every SIMD level this CPU runs, one thread: microseconds per call and how
/// much slower the scalar level is than AVX2 (NEON on ARM).
pub fn kernels(reps: usize, json_out: Option<PathBuf>) -> Result<()> {
    eprintln!("timing every kernel at every level ({reps} runs + warm-up each) ...");
    let times = whittle::eval::kernel_speed::run(reps);
    let levels: Vec<&str> = simd::Level::supported().iter().map(|l| l.name()).collect();
    let mut names: Vec<&str> = Vec::new();
    for t in &times {
        if !names.contains(&t.kernel) {
            names.push(t.kernel);
        }
    }
    let at = |k: &str, l: &str| {
        times
            .iter()
            .find(|t| t.kernel == k && t.level == l)
            .map(|t| t.seconds)
    };
    let vector = levels
        .iter()
        .copied()
        .find(|l| *l == "avx2" || *l == "neon");
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|k| {
            let mut row = vec![k.to_string()];
            row.extend(
                levels
                    .iter()
                    .map(|l| at(k, l).map_or("—".into(), |s| format!("{:.1}", s * 1e6))),
            );
            if let (Some(v), Some(s)) = (vector.and_then(|v| at(k, v)), at(k, "scalar")) {
                row.push(format!("{:.1}x", s / v));
            }
            row
        })
        .collect();
    let mut header = vec!["kernel (µs per call, 1 thread)".to_string()];
    header.extend(levels.iter().map(|l| l.to_string()));
    if let Some(v) = vector {
        header.push(format!("scalar / {v}"));
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &rows);
    println!("CPU {}", baselines::cpu_name());
    if let Some(out) = json_out {
        write_json(&out, &json!({"cpu": baselines::cpu_name(), "times": times}))?;
    }
    Ok(())
}

/// The SIMD levels this CPU runs, lowest first, one line: what scripts loop over.
pub fn levels() -> Result<()> {
    let names: Vec<_> = simd::Level::supported().iter().map(|l| l.name()).collect();
    println!("{}", names.join(" "));
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
