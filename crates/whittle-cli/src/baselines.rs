//! Same-run baselines for `whittle bench --compare`: the reference PyTorch harness
//! (`shared/reference/harness/bench.py`) and llama.cpp's `llama-bench` (built by
//! `benches/compare_llamacpp.sh`), run as child processes on the same model file right after
//! whittle, restricted to the same SIMD level. A ratio is only meaningful between figures taken
//! on one machine in one run: the host's speed drifts, and CPUs differ by 2x.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use whittle::kernels::simd::Level;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Baseline {
    #[value(name = "pytorch")]
    PyTorch,
    #[value(name = "llama.cpp")]
    LlamaCpp,
}

/// A row of the bench table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Prefill(usize),
    /// Prefill reading 2:4-packed weights as stored (whittle only: the baselines run dense).
    PrefillStored(usize),
    /// Decode reading the weights as the file stores them (the packed blocks of a quantized
    /// file; f32 for an unquantized one).
    DecodeStored,
    DecodeF32,
}

/// Where the baselines live.
pub struct Tools {
    /// Python with the harness's requirements (torch, gguf, numpy).
    pub python: PathBuf,
    pub harness: PathBuf,
    /// `llama-bench`; default: the build of `benches/compare_llamacpp.sh` for the level.
    pub llama_bench: Option<PathBuf>,
}

/// One baseline's figures (tok/s) for the rows of the table.
pub struct Figures {
    pub name: String,
    /// How it ran (version, SIMD restriction), printed under the table.
    pub note: String,
    pub raw: Value,
    values: Vec<(Measure, f64)>,
}

impl Figures {
    pub fn get(&self, m: Measure) -> Option<f64> {
        self.values.iter().find(|(k, _)| *k == m).map(|(_, v)| *v)
    }
}

/// What whittle just measured, for the baselines to measure the same way.
pub struct Run<'a> {
    pub model: &'a Path,
    /// Whether the model keeps packed weights (its decode row is "weights as stored").
    pub packed: bool,
    pub level: Level,
    pub threads: usize,
    /// Timed runs per figure.
    pub reps: usize,
}

/// Runs `baseline` on the same model file, level, threads and repetitions as `run`.
pub fn measure(baseline: Baseline, tools: &Tools, run: &Run) -> Result<Figures> {
    let model = run.model;
    if model.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!(
            "--compare needs the model as a GGUF file (both baselines read GGUF), got {}",
            model.display()
        );
    }
    eprintln!("measuring {baseline:?} on the same file ...");
    match baseline {
        Baseline::PyTorch => pytorch(tools, run),
        Baseline::LlamaCpp => llama_cpp(tools, run),
    }
}

/// PyTorch's environment for a SIMD level: ATen's kernels, oneDNN and MKL each have their own
/// switch. `amx` (and AArch64's levels) leave PyTorch unrestricted.
fn torch_env(level: Level) -> Vec<(&'static str, &'static str)> {
    let (aten, onednn, mkl) = match level {
        Level::Scalar => ("default", "SSE41", "SSE4_2"),
        Level::Avx2 => ("avx2", "AVX2", "AVX2"),
        Level::Avx512 => ("avx512", "AVX512_CORE", "AVX512"),
        Level::Amx | Level::Neon => return Vec::new(),
    };
    vec![
        ("ATEN_CPU_CAPABILITY", aten),
        ("ONEDNN_MAX_CPU_ISA", onednn),
        ("MKL_ENABLE_INSTRUCTIONS", mkl),
    ]
}

fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what} ({cmd:?})"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pytorch(tools: &Tools, run: &Run) -> Result<Figures> {
    let env = torch_env(run.level);
    let capability = output(
        Command::new(&tools.python)
            .args([
                "-c",
                "import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())",
            ])
            .envs(env.iter().copied()),
        "python with torch (--python)",
    )?;
    let out = tempfile::NamedTempFile::new()?;
    let model = std::fs::canonicalize(run.model)?;
    // The harness runs in its own folder: a relative `--python` path (a venv's `bin/python`)
    // is made absolute first, not canonicalized (that would leave the venv for its base python).
    let python = match tools.python.components().count() {
        1 => tools.python.clone(),
        _ => std::path::absolute(&tools.python)?,
    };
    output(
        Command::new(&python)
            .current_dir(&tools.harness)
            .args(["bench.py", "--no-hf", "--threads", &run.threads.to_string()])
            .args(["--reps", &run.reps.to_string(), "--out"])
            .arg(out.path())
            .env("SMOLLM_GGUF", &model)
            .envs(env.iter().copied()),
        "the PyTorch harness (bench.py)",
    )?;
    let raw: Value = serde_json::from_slice(&std::fs::read(out.path())?)?;
    let mut values = Vec::new();
    for r in raw["rows"].as_array().into_iter().flatten() {
        let (what, t, v) = (
            r["what"].as_str().unwrap_or(""),
            r["tokens"].as_u64().unwrap_or(0) as usize,
            r["tok_per_s"].as_f64().unwrap_or(f64::NAN),
        );
        if what.starts_with("prefill") {
            values.push((Measure::Prefill(t), v));
        } else if what.starts_with("decode (") {
            // PyTorch decodes with f32 weights: the bar for both decode rows.
            values.push((Measure::DecodeStored, v));
            values.push((Measure::DecodeF32, v));
        }
    }
    let restricted: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(Figures {
        name: "PyTorch".into(),
        note: format!(
            "torch {} (get_cpu_capability: {}), fp32{}",
            capability.split_whitespace().next().unwrap_or("?"),
            capability.split_whitespace().nth(1).unwrap_or("?"),
            if restricted.is_empty() {
                String::new()
            } else {
                format!(", {}", restricted.join(" "))
            }
        ),
        raw,
        values,
    })
}

fn llama_cpp(tools: &Tools, run: &Run) -> Result<Figures> {
    // llama.cpp picks its instruction sets at compile time: the AVX2-only build for `avx2`
    // (and, the closest there is, `scalar`), the AVX-512 build for `avx512` and `amx` (a
    // `-DGGML_NATIVE=ON` build crashed on the AMX machine), the native build on ARM.
    let build = match run.level {
        Level::Scalar | Level::Avx2 => "avx2",
        Level::Avx512 | Level::Amx => "avx512",
        Level::Neon => "native",
    };
    let bin = tools.llama_bench.clone().unwrap_or_else(|| {
        PathBuf::from(format!("target/llama.cpp/build-{build}/bin/llama-bench"))
    });
    if !bin.exists() {
        bail!(
            "{} not found: build it with benches/compare_llamacpp.sh, or pass --llama-bench",
            bin.display()
        );
    }
    // Prefill from an empty cache; decode after 128 cached tokens, as whittle's decode figure
    // ("decode 128 after 128") is measured: llama-bench's plain tg128 starts from an empty
    // cache, ~2.5 % less attention work.
    let mut raw = Vec::new();
    for args in [
        ["-p", "512,2048", "-n", "0", "-d", "0"],
        ["-p", "0", "-n", "128", "-d", "128"],
    ] {
        let text = output(
            Command::new(&bin)
                .arg("-m")
                .arg(run.model)
                .args(["-t", &run.threads.to_string()])
                .args(args)
                .args(["-r", &run.reps.to_string(), "-o", "json"]),
            "llama-bench",
        )?;
        let part: Value = serde_json::from_str(&text).context("llama-bench printed no JSON")?;
        raw.extend(part.as_array().cloned().unwrap_or_default());
    }
    let raw = Value::Array(raw);
    let mut values = Vec::new();
    let mut version = String::new();
    for r in raw.as_array().into_iter().flatten() {
        let (p, n, ts) = (
            r["n_prompt"].as_u64().unwrap_or(0) as usize,
            r["n_gen"].as_u64().unwrap_or(0),
            r["avg_ts"].as_f64().unwrap_or(f64::NAN),
        );
        version = format!(
            "{} ({})",
            r["build_commit"].as_str().unwrap_or("?"),
            r["cpu_info"].as_str().unwrap_or("?")
        );
        match (p, n) {
            (p, 0) if p > 0 => values.push((Measure::Prefill(p), ts)),
            (0, _) if run.packed => values.push((Measure::DecodeStored, ts)),
            (0, _) => values.push((Measure::DecodeF32, ts)),
            _ => {}
        }
    }
    Ok(Figures {
        name: "llama.cpp".into(),
        note: format!(
            "llama-bench {version}, {build} build {}, same file (pp = prefill, tg128 @ d128 = decode after 128 tokens; K/V cache f16, its default)",
            bin.display()
        ),
        raw,
        values,
    })
}

/// The CPU's model name (`/proc/cpuinfo`), for every table of figures.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
