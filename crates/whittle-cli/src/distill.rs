//! `whittle distill` (train a student toward a teacher: logit and feature distillation, or plain
//! fine-tuning, on any loaded model, resumable) and `whittle teacher-cache` (a teacher's top-k
//! logits over the training windows, computed once for every student run).

use crate::report::{advance, progress, table, write_json};
use crate::train::{
    drive, finished, keep_freed_memory, resumable, retire, split_files, tokens_with,
};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use whittle::distill::cache::{self, TeacherCache};
use whittle::distill::{check_same_tokenizer, tokenizer_hash};
use whittle::io::tokenizer::Tokenizer;
use whittle::train::groups::{Groups, KeepZeros};
use whittle::train::optim::AdamWConfig;
use whittle::train::trainer::{Precision, Start, Teacher, TokenData, TrainConfig, Trainer};
use whittle::Model;

/// Training text: corpus folders (their `train.list`) or plain files, in the order given.
#[derive(clap::Args, Clone)]
pub struct DataArgs {
    /// A corpus folder with train.list / valid.list (the Gutenberg layout) or a text file;
    /// repeat to mix corpora (their tokens are concatenated).
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
}

#[derive(clap::Args)]
pub struct DistillArgs {
    /// The teacher (default: the default model); not needed with --teacher-cache alone.
    #[arg(long)]
    teacher: Option<String>,
    /// The model to train: any model whittle loads (GGUF, HF folder, `hf:org/name`).
    #[arg(long)]
    student: String,
    #[command(flatten)]
    data: DataArgs,
    /// Training tokens (the run's length; steps = tokens / (batch · seq-len · accum)).
    #[arg(long)]
    tokens: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// The objective: `kd:T=2+ce:0.5`, `ce`, `rkl`, `jsd:beta=0.5`, `feat:layers=4/8/12`, ...
    #[arg(long, default_value = "kd")]
    loss: String,
    /// Feature distillation of student blocks `L,L,...` with a teacher normaliser
    /// (`4,8,12:phis`; none, global, per-channel, pca, zca, hadamard-whitening, phis).
    #[arg(long)]
    features: Option<String>,
    /// Weight of the feature term.
    #[arg(long, default_value_t = 1.0)]
    feature_weight: f32,
    #[arg(long, default_value = "mse")]
    feature_loss: String,
    /// Calibration windows the feature heads are fitted on.
    #[arg(long, default_value_t = 16)]
    head_windows: usize,
    /// Train from the windows and top-k logits of `whittle teacher-cache`.
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// Minitron's teacher correction: fine-tune the teacher with cross-entropy on the data for
    /// this many tokens first (resumable in OUT/teacher-correction).
    #[arg(long)]
    teacher_correction: Option<u64>,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Train only the low-rank adapters (of a quantized or compensated model).
    #[arg(long)]
    adapters_only: bool,
    /// Frozen parameters (patterns with `*`, e.g. `embed`, `layers.*.mlp_norm`).
    #[arg(long, value_delimiter = ',')]
    freeze: Vec<String>,
    /// Per-group learning rates, `PATTERN=FACTOR` (0 freezes).
    #[arg(long, value_delimiter = ',')]
    lr_scale: Vec<String>,
    /// Whether zeros of sparse weights stay zero (auto: matrices ≥ 25 % zeros keep them).
    #[arg(long, value_enum, default_value = "auto")]
    keep_zeros: KeepZeros,
    /// The linears' products on AMX tiles: f32 (f32 rounding) or bf16x3 (three bf16 products,
    /// ~2⁻¹⁵ relative error per term, about twice as fast); CPUs without AMX multiply in f32.
    #[arg(long, value_enum, default_value = "f32")]
    matmul_precision: Precision,
    /// Validation text (folder: its valid.list; or a file).
    #[arg(long, default_value = "../shared/data/gutenberg")]
    valid: PathBuf,
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    #[arg(long, default_value_t = 16384)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 25)]
    ckpt_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop (with a checkpoint) after this many minutes; the same command resumes.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Downstream tasks scored on the trained student (and recorded in its provenance).
    #[command(flatten)]
    tasks: crate::tasks::TaskArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct TeacherCacheArgs {
    #[arg(long)]
    teacher: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Tokens to cache (whole windows of --seq-len, drawn in shuffled order).
    #[arg(long)]
    tokens: u64,
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

/// The files of `paths` for `split`: a folder's `SPLIT.list`, or a file itself.
pub(crate) fn files(paths: &[PathBuf], split: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(split_files(p, split)?);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}

/// Token ids of `files`, cached in whittle's home (`tokens/`) by a hash of the paths, sizes and
/// tokenizer: every run on the same corpus reads it once.
pub(crate) fn corpus(tok: &Tokenizer, files: &[PathBuf], what: &str) -> Result<Vec<u32>> {
    let dir = whittle::io::fetch::whittle_home().join("tokens");
    let mut key = tokenizer_hash(tok);
    for f in files {
        let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        key.push_str(&format!("|{}:{len}", f.display()));
    }
    let id = cache::hash_ids(&key.bytes().map(u32::from).collect::<Vec<_>>());
    std::fs::create_dir_all(&dir)?;
    let ids = tokens_with(tok, files, &dir.join(format!("tokens-{what}-{id}.bin")))?;
    eprintln!("{what}: {} tokens from {} files", ids.len(), files.len());
    Ok(ids)
}

/// Loads a model for training or teaching as stored: a packed (GGUF) teacher computes with its
/// dequantized values, the dense model, without holding an f32 copy; a packed student is read
/// into f32 training tensors and written back dense.
pub(crate) fn load(spec: Option<&str>) -> Result<(Model, Tokenizer)> {
    let l = crate::commands::load(spec)?;
    Ok((l.model, l.tokenizer))
}

pub fn teacher_cache(a: &TeacherCacheArgs) -> Result<()> {
    anyhow::ensure!(
        !a.out.exists(),
        "{} already exists; choose a new output folder",
        a.out.display()
    );
    let (teacher, tok) = load(a.teacher.as_deref())?;
    whittle::io::atomic::parent_of(&a.out)?;
    let ids = corpus(&tok, &files(&a.data.data, "train")?, "train")?;
    let n = (a.tokens as usize).div_ceil(a.data.seq_len);
    let windows = cache::shuffled_windows(&ids, a.data.seq_len, n, a.seed)?;
    let pb = progress(windows.len(), "teacher cache");
    let meta = cache::write(
        &a.out,
        &teacher,
        tokenizer_hash(&tok),
        &windows,
        a.top_k,
        &mut advance(&pb),
    )?;
    pb.finish_and_clear();
    let bytes = meta.windows * meta.seq_len * (6 * meta.k + 4);
    println!(
        "cached {} windows of {} tokens, top-{} logits: {:.1} MB ({} bytes per token)",
        meta.windows,
        meta.seq_len,
        meta.k,
        bytes as f64 / 1e6,
        6 * meta.k + 4
    );
    Ok(())
}

impl DistillArgs {
    fn objective(&self) -> Result<String> {
        let mut spec = self.loss.clone();
        if let Some(f) = &self.features {
            let (layers, norm) = f.split_once(':').unwrap_or((f, "phis"));
            spec += &format!(
                "+feat:layers={},norm={norm},loss={},w={}",
                layers.replace(',', "/"),
                self.feature_loss,
                self.feature_weight
            );
        }
        whittle::train::objective::Objective::parse(&spec)?;
        Ok(spec)
    }

    fn config(&self, objective: String, tokens: u64) -> Result<TrainConfig> {
        Ok(TrainConfig {
            preset: None,
            steps: TrainConfig::steps_for(tokens, self.batch, self.data.seq_len, self.accum),
            batch: self.batch,
            seq_len: self.data.seq_len,
            accum: self.accum,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            clip: self.clip,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            eval_every: self.eval_every,
            eval_tokens: self.eval_tokens,
            ckpt_every: self.ckpt_every,
            seed: self.seed,
            bf16: false,
            precision: self.matmul_precision,
            objective,
            groups: Groups {
                adapters_only: self.adapters_only,
                freeze: self.freeze.clone(),
                lr_scale: Groups::parse_lr_scale(&self.lr_scale)?,
                keep_zeros: self.keep_zeros,
            },
            head_windows: self.head_windows,
            maskllm: None,
        })
    }
}

/// Starts or resumes a run in `dir`.
pub(crate) fn trainer(
    dir: &Path,
    config: TrainConfig,
    student: Model,
    teacher: Teacher,
    data: &TokenData,
) -> Result<Trainer> {
    let start = Start::Model(Box::new(student));
    Ok(match resumable(dir, &config)? {
        true => Trainer::resume(dir, start, teacher, data)?,
        false => Trainer::new(config, start, teacher, data)?,
    })
}

pub fn distill(a: &DistillArgs) -> Result<()> {
    keep_freed_memory();
    let objective = a.objective()?;
    let needs_teacher = whittle::train::objective::Objective::parse(&objective)?.needs_teacher();
    // Task names are checked now, not after hours of training.
    a.tasks.parsed()?;
    std::fs::create_dir_all(&a.out)?;
    let (student, tok) = load(Some(&a.student))?;
    let cache = match &a.teacher_cache {
        Some(d) => Some(TeacherCache::open(d).with_context(|| "opening the teacher cache")?),
        None => None,
    };
    if a.teacher_correction.is_some() && cache.is_some() {
        bail!("--teacher-correction changes the teacher, whose cached logits would be stale: use a live teacher");
    }
    let config = a.config(objective, a.tokens)?;
    if finished(&a.out, &config)? {
        return Ok(());
    }
    // A cache replaces the teacher (its windows are the data); a teacher named beside it is
    // loaded only to check that the cache is its own.
    let load_teacher = a.teacher_correction.is_some()
        || (needs_teacher && cache.is_none())
        || (cache.is_some() && a.teacher.is_some());
    let mut teacher = match load_teacher {
        true => {
            let (t, ttok) = load(a.teacher.as_deref())?;
            check_same_tokenizer(&ttok, &tok)?;
            Some(t)
        }
        false => None,
    };
    if let Some(c) = &cache {
        c.check(teacher.as_ref(), &student, &tokenizer_hash(&tok))?;
    }
    let data = TokenData {
        train: match &cache {
            Some(_) => Vec::new(),
            None => corpus(&tok, &files(&a.data.data, "train")?, "train")?,
        },
        valid: corpus(
            &tok,
            &files(std::slice::from_ref(&a.valid), "valid")?,
            "valid",
        )?,
    };
    if let Some(tokens) = a.teacher_correction {
        if let Some(t) = teacher.take() {
            teacher = Some(correct_teacher(a, t, tokens, &data)?);
        }
    }
    let source = match (cache, teacher) {
        (Some(c), _) => Teacher::Cached(Box::new(c)),
        (None, Some(t)) if needs_teacher => Teacher::Live(Box::new(t)),
        _ => Teacher::None,
    };
    let mut t = trainer(&a.out, config, student, source, &data)?;
    crate::ranks::join(&mut t, &data)?;
    eprintln!(
        "distill: {} steps of {} × {} tokens (accum {}), {:.2} M trained parameters, objective {}",
        t.config.steps,
        t.config.batch,
        t.config.seq_len,
        t.config.accum,
        t.n_params() as f64 / 1e6,
        t.config.objective
    );
    if !drive(&mut t, &data, &a.out, a.max_minutes)? {
        return Ok(());
    }
    finish(&mut t, &tok, &data, &a.tasks, &a.out)?;
    retire(&a.out)?;
    match a.teacher_correction.is_some() {
        true => retire(&a.out.join("teacher-correction")),
        false => Ok(()),
    }
}

/// Minitron's teacher correction: a cross-entropy fine-tune of the teacher on the training data,
/// itself a resumable run in `OUT/teacher-correction`.
fn correct_teacher(
    a: &DistillArgs,
    teacher: Model,
    tokens: u64,
    data: &TokenData,
) -> Result<Model> {
    anyhow::ensure!(
        !data.train.is_empty(),
        "--teacher-correction needs the training text (--data), not only a cache"
    );
    let dir = a.out.join("teacher-correction");
    let mut config = a.config("ce".into(), tokens)?;
    config.groups = Groups::default();
    let mut t = trainer(&dir, config, teacher, Teacher::None, data)?;
    crate::ranks::join(&mut t, data)?;
    eprintln!("teacher correction: {} steps", t.config.steps);
    if !drive(&mut t, data, &dir, a.max_minutes)? {
        bail!("the time budget ended during teacher correction; run the same command again");
    }
    Ok(t.model)
}

/// Final validation and downstream tasks, the student written as a whittle HF folder
/// (`OUT/model`), the feature heads and a summary.
fn finish(
    t: &mut Trainer,
    tok: &Tokenizer,
    data: &TokenData,
    tasks: &crate::tasks::TaskArgs,
    out: &Path,
) -> Result<()> {
    let ppl = t.validate(data)?;
    if !crate::ranks::is_root() {
        return Ok(());
    }
    let features = t.feature_report(data)?;
    let task_reports = crate::tasks::evaluate(&t.model, tok, tasks, "student")?;
    let last = t.log.last().cloned();
    let model_dir = out.join("model");
    let mut model = t.model.clone();
    let figures = task_reports.iter().flat_map(|r| r.figures()).collect();
    model.provenance.record_run(t.config.to_toml()?, figures);
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir)?;
    }
    whittle::io::safetensors::save(&model, Some(tok), model.has_packed(), &model_dir)?;
    let heads = out.join("feature_heads.safetensors");
    let wrote_heads = t.save_heads(&heads)?;
    let rows = vec![
        vec!["steps".into(), t.step.to_string()],
        vec![
            "tokens".into(),
            last.as_ref().map_or(0, |r| r.tokens).to_string(),
        ],
        vec![
            "final loss".into(),
            last.as_ref()
                .map_or(String::new(), |r| format!("{:.4}", r.loss)),
        ],
        vec!["validation perplexity".into(), format!("{ppl:.3}")],
    ];
    table(&["measure", "value"], &rows);
    print_features(&features);
    if !task_reports.is_empty() {
        crate::tasks::print(&task_reports);
    }
    eprintln!("wrote {}", model_dir.display());
    write_json(
        &out.join("summary.json"),
        &json!({
            "config": t.config, "steps": t.step, "val_ppl": ppl, "last": last,
            "model": model_dir, "feature_heads": wrote_heads.then_some(heads), "features": features,
            "tasks": task_reports,
        }),
    )
}

/// The feature heads on the validation text: each layer's loss and its share of the feature
/// term (how the normaliser weighed the layers), and the fidelity in the teacher's space.
fn print_features(features: &[whittle::train::trainer::HeadReport]) {
    if features.is_empty() {
        return;
    }
    let total: f64 = features.iter().map(|f| f.loss).sum();
    let rows: Vec<Vec<String>> = features
        .iter()
        .map(|f| {
            vec![
                format!("{} -> {}", f.student, f.teacher),
                format!("{:.4}", f.loss),
                format!("{:.1}", 100.0 * f.loss / total.max(1e-30)),
                format!("{:.4}", f.cosine),
                format!("{:.4}", f.nmse),
            ]
        })
        .collect();
    table(
        &[
            "student -> teacher block",
            "feature loss",
            "share %",
            "cosine",
            "nMSE",
        ],
        &rows,
    );
}
