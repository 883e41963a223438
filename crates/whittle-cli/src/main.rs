//! The `whittle` command line: parses arguments, shows progress, prints tables, writes JSON.
//! All the work happens in the `whittle` library.

mod baselines;
mod bench;
mod commands;
mod compress;
mod distill;
mod maskllm;
mod plot;
mod prune;
mod ranks;
mod report;
mod tasks;
mod train;
mod vision;
mod vision_distill;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// mimalloc instead of glibc's malloc. The products allocate and free multi-MB buffers (packed
/// activations, scores, layer outputs) at every layer; glibc hands large blocks back to the
/// kernel and page-faults them in again. Same code otherwise, run one after the other on a Xeon model 207
/// (BENCHMARKS.md, "Allocator"): prefill 512 at `amx` 1645–1657 → 1931–2207 tok/s, HellaSwag
/// scoring 1.32x, GPTQ 1.28x, a KD step (2 × 4 micro-batches) 1.17x, peak RSS within 10 %.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "whittle",
    version,
    about = "Make small language models smaller and faster"
)]
struct Cli {
    /// Worker threads (default: available cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Sliding-window layers during cached decode: `upstream` sees W positions as Hymba's
    /// reference code does (parity with its generations), `consistent` sees W+1 like a full
    /// forward pass.
    #[arg(long, global = true, value_enum)]
    window_rule: Option<WindowRuleArg>,
    /// Element type of the decode cache's keys and values (default f32): f16 halves the cache
    /// (llama.cpp's default), moving the logits by ~1e-3 of their range.
    #[arg(long, global = true, value_enum)]
    kv_cache: Option<whittle::model::KvDtype>,
    /// Run as one rank of an MPI job (`mpirun -n N --bind-to none whittle ... --distributed`):
    /// train, distill and MaskLLM split every step's micro-batches (--accum counts all ranks'
    /// together); sparsify, quantize, compensate, compress, prune and importance split the
    /// calibration windows and sum their statistics. Rank 0 writes the files.
    #[arg(long, global = true)]
    distributed: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--model`: a GGUF file, an HF folder, or hf:org/name[@rev]; default SmolLM2-135M-Instruct.
#[derive(clap::Args, Clone)]
pub struct ModelArg {
    #[arg(long)]
    pub model: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch the default model (SmolLM2-135M-Instruct) into the cache.
    Fetch,
    /// Architecture, parameter counts per module, dtypes and file size.
    Inspect {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Generate text from a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the model as an HF folder (safetensors, f32) or, for an --out ending in .gguf,
    /// as a GGUF file for llama.cpp.
    Convert {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        out: PathBuf,
        /// Storage of the matrices in a GGUF file (norms stay f32).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: GgufDtype,
    },
    /// Prune weights to an N:M or unstructured pattern (magnitude, Wanda, SparseGPT), apply a
    /// mask file, or learn N:M masks by training (MaskLLM, resumable).
    Sparsify {
        #[command(flatten)]
        args: compress::OneShotArgs<whittle::recipe::Sparsify>,
        #[command(flatten)]
        learn: maskllm::MaskLlmArgs,
    },
    /// Quantize weights to 2-8 bits per group (RTN, GPTQ); stored packed.
    Quantize(compress::OneShotArgs<whittle::recipe::Quantize>),
    /// Add low-rank adapters that compensate a compressed model's error against a reference
    /// (plain SVD of the weight error, or EoRA in the input eigenspace).
    Compensate {
        #[command(flatten)]
        args: compress::OneShotArgs<whittle::recipe::Compensate>,
        /// The dense model it was made from (default: the default model).
        #[arg(long)]
        reference: Option<String>,
        /// Also write the adapters as a PEFT LoRA adapter folder.
        #[arg(long)]
        peft: Option<PathBuf>,
    },
    /// Importance scores for structured pruning from one calibration pass (Minitron width
    /// scores; cosine, angular and update-norm depth metrics), optionally leave-one-out and
    /// Monte-Carlo Shapley values of every block and sublayer; written as JSON for `prune`.
    Importance {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        args: prune::ImportanceArgs,
    },
    /// Structured pruning from stored scores: hidden channels, MLP neurons, query heads per KV
    /// group, whole blocks or attention / MLP sublayers (optionally replaced by emulated
    /// updates fitted on calibration data).
    Prune {
        #[command(flatten)]
        args: compress::OneShotArgs<whittle::recipe::Prune>,
        #[command(flatten)]
        search: prune::SearchArgs,
    },
    /// Apply a recipe of stages in order (e.g. SparseGPT 2:4 -> GPTQ int4 -> EoRA r64); the
    /// recipe format is documented in the library's `recipe` module.
    Compress {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        recipe: PathBuf,
        #[command(flatten)]
        eval: compress::EvalArgs,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Prefill and decode throughput (at the SIMD level in use; WHITTLE_SIMD forces one),
    /// optionally next to PyTorch and llama.cpp measured in the same run.
    Bench {
        #[command(flatten)]
        model: ModelArg,
        /// Text whose tokens feed the benchmark.
        #[arg(long, default_value = "../shared/reference/wikitext2-test.txt")]
        data: PathBuf,
        /// Timed runs per figure (median reported), after one warm-up.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Prefill lengths to time.
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        prefill: Vec<usize>,
        /// Also measure these on the same GGUF file, right after whittle, restricted to the
        /// same SIMD level: pytorch (the reference harness), llama.cpp (llama-bench).
        #[arg(long, value_enum, value_delimiter = ',')]
        compare: Vec<baselines::Baseline>,
        /// Python with the harness's requirements (for --compare pytorch).
        #[arg(long, env = "WHITTLE_BENCH_PYTHON", default_value = "python3")]
        python: PathBuf,
        /// The reference harness folder (for --compare pytorch).
        #[arg(long, default_value = "../shared/reference/harness")]
        harness: PathBuf,
        /// llama-bench binary (for --compare llama.cpp; default: benches/compare_llamacpp.sh's
        /// build for the SIMD level).
        #[arg(long)]
        llama_bench: Option<PathBuf>,
        /// Print the SIMD levels this CPU runs and exit.
        #[arg(long)]
        levels: bool,
        /// Instead of a model: every kernel timed at every SIMD level this CPU runs.
        #[arg(long)]
        kernels: bool,
        /// Instead of the reference protocol: decode speed and cache size after prefilling each
        /// of these context lengths (e.g. 1024,4096,8192).
        #[arg(long, value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Decode steps timed at each context.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Instead of a model: the selective-scan kernel against a naive sequential loop.
        #[arg(long)]
        scan: bool,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Train a Llama, Mamba or Hymba model from scratch on a corpus folder (resumes from
    /// OUT/checkpoint when present).
    Train(train::TrainArgs),
    /// Write a freshly initialised model of a training preset (with the default model's
    /// tokenizer) as an HF folder: a starting point, and a small model for sweeps and tests.
    Init(train::InitArgs),
    /// Train a student toward a teacher (logit KD, feature KD with PHI-S and other normalisers,
    /// cross-entropy fine-tuning; any loaded model, frozen groups, adapters only, fixed
    /// sparsity); resumes from OUT/checkpoint, writes OUT/model.
    Distill(distill::DistillArgs),
    /// Run a teacher once over training windows and store its top-k logits for `distill`.
    TeacherCache(distill::TeacherCacheArgs),
    /// Vision encoders: teachers' features and their evaluation.
    #[command(subcommand)]
    Vision(vision::VisionCommand),
    /// Plot training curves (loss and validation perplexity) of runs to an SVG file.
    Plot {
        /// Run folders written by `whittle train`, `distill` or `sparsify --method maskllm`, or
        /// by `whittle vision distill` (then one panel per teacher target).
        #[arg(long = "run", required_unless_present = "pareto")]
        runs: Vec<PathBuf>,
        /// Instead: the Pareto plot (perplexity against size) of a sweep's results.json
        /// (`tools/sweep.py`).
        #[arg(long, conflicts_with = "runs")]
        pareto: Option<PathBuf>,
        /// A reference perplexity drawn as a flat line, `LABEL=PPL` (repeatable), e.g. the
        /// one-shot SparseGPT 2:4 model measured on the same validation text.
        #[arg(long = "reference")]
        references: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum WindowRuleArg {
    Upstream,
    Consistent,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum GgufDtype {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}

impl From<GgufDtype> for whittle::io::gguf::GgufType {
    fn from(d: GgufDtype) -> Self {
        use whittle::io::gguf::GgufType as G;
        match d {
            GgufDtype::F32 => G::F32,
            GgufDtype::F16 => G::F16,
            GgufDtype::Bf16 => G::BF16,
            GgufDtype::Q8_0 => G::Q8_0,
            GgufDtype::Q4_0 => G::Q4_0,
            GgufDtype::Q4_1 => G::Q4_1,
        }
    }
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity over non-overlapping windows of a text file.
    Ppl {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Keep only the first ⌊N / seq-len⌋ windows.
        #[arg(long)]
        max_tokens: Option<usize>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Logits of every position of a text's first tokens, as JSON (ids and rows), for parity
    /// checks against other runtimes (e.g. transformers on an exported folder).
    Logits {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        #[arg(long)]
        json: PathBuf,
    },
    /// Zero- and few-shot accuracy on downstream tasks (lm-evaluation-harness conventions;
    /// all nine tasks when --tasks is not given).
    Tasks {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        tasks: tasks::TaskArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    // A panic is a bug in whittle, not bad input: say so, where, and exit 70 (EX_SOFTWARE), not
    // Rust's 101, so scripts can tell the two apart (bad input: 1, bad usage: 2).
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in whittle (please report it): {info}");
        std::process::exit(70);
    }));
    let cli = Cli::parse();
    // A bad WHITTLE_SIMD (unknown, or above what this CPU runs) is an error before any work.
    if let Err(e) = whittle::kernels::simd::init() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    whittle::threads::set_process_threads(
        cli.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    );
    commands::set_load_options(commands::LoadOptions {
        window_rule: cli.window_rule.map(|rule| match rule {
            WindowRuleArg::Upstream => whittle::model::WindowRule::Upstream,
            WindowRuleArg::Consistent => whittle::model::WindowRule::Consistent,
        }),
        kv_cache: cli.kv_cache,
    });
    if cli.distributed {
        let name = match &cli.command {
            Command::Train(_) => "train",
            Command::Distill(_) => "distill",
            Command::Sparsify { args, .. } if args.stage.method == "maskllm" => "maskllm",
            Command::Sparsify { .. } => "sparsify",
            Command::Quantize(_) => "quantize",
            Command::Compensate { .. } => "compensate",
            Command::Compress { .. } => "compress",
            Command::Prune { .. } => "prune",
            Command::Importance { .. } => "importance",
            _ => "this command",
        };
        if let Err(e) = ranks::check_supported(name).and_then(|_| ranks::init()) {
            ranks::fail(&e);
        }
    }
    let result = match cli.command {
        Command::Fetch => commands::fetch(),
        Command::Inspect { model, json } => commands::inspect(model.model.as_deref(), json),
        Command::Eval(EvalCommand::Ppl {
            model,
            data,
            seq_len,
            max_tokens,
            json,
        }) => commands::eval_ppl(model.model.as_deref(), &data, seq_len, max_tokens, json),
        Command::Eval(EvalCommand::Logits {
            model,
            data,
            tokens,
            json,
        }) => commands::eval_logits(model.model.as_deref(), &data, tokens, &json),
        Command::Eval(EvalCommand::Tasks { model, tasks, json }) => {
            commands::eval_tasks(model.model.as_deref(), &tasks, json)
        }
        Command::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => commands::generate(
            model.model.as_deref(),
            &prompt,
            chat,
            max_new_tokens,
            whittle::model::sampling::SamplingConfig {
                temperature,
                top_p,
                seed,
            },
        ),
        Command::Convert { model, out, dtype } => {
            commands::convert(model.model.as_deref(), &out, dtype.into())
        }
        Command::Sparsify { args, learn } => match args.stage.method.as_str() {
            "maskllm" => maskllm::run(&args, &learn),
            _ => compress::one_shot(&args, None, None),
        },
        Command::Quantize(args) => compress::one_shot(&args, None, None),
        Command::Compensate {
            args,
            reference,
            peft,
        } => compress::one_shot(&args, reference.as_deref(), peft.as_deref()),
        Command::Importance { model, args } => prune::importance(model.model.as_deref(), &args),
        Command::Prune { args, search } => prune::prune(&args, &search),
        Command::Compress {
            model,
            recipe,
            eval,
            out,
            json,
        } => commands::compress_recipe(model.model.as_deref(), &recipe, &eval, &out, json),
        Command::Bench {
            model,
            data,
            reps,
            prefill,
            compare,
            python,
            harness,
            llama_bench,
            levels,
            kernels,
            contexts,
            steps,
            scan,
            json,
        } => {
            if levels {
                bench::levels()
            } else if kernels {
                bench::kernels(reps, json)
            } else if scan {
                bench::scan(reps)
            } else if !contexts.is_empty() {
                bench::contexts(model.model.as_deref(), &data, &contexts, steps, reps, json)
            } else {
                let opts = bench::BenchOptions {
                    reps,
                    prefill,
                    compare,
                    tools: baselines::Tools {
                        python,
                        harness,
                        llama_bench,
                    },
                };
                bench::run(model.model.as_deref(), &data, &opts, json)
            }
        }
        Command::Train(args) => train::run(&args),
        Command::Init(args) => train::init(&args),
        Command::Distill(args) => distill::distill(&args),
        Command::TeacherCache(args) => distill::teacher_cache(&args),
        Command::Vision(cmd) => vision::run(&cmd),
        Command::Plot {
            runs,
            pareto,
            references,
            out,
        } => match pareto {
            Some(results) => plot::pareto(&results, &out),
            None => plot::curves(&runs, &references, &out),
        },
    };
    if let Err(e) = result {
        ranks::fail(&e);
    }
    ranks::finish();
}
