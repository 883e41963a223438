//! `whittle train`: trains a Llama, Mamba or Hymba model from scratch on a text corpus, resuming
//! from `OUT/checkpoint` when one exists, and finishes with a summary (validation perplexity,
//! cache size, decode speed at long context) in `OUT/summary.json` and the model in `OUT/model`.

use crate::report::{table, write_json};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle::eval::speed;
use whittle::io::resolve::ModelSpec;
use whittle::model::{Arch, KvCache};
use whittle::train::optim::AdamWConfig;
use whittle::train::presets::{Preset, Size};
use whittle::train::trainer::{Start, Teacher, TokenData, TrainConfig, Trainer};

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum ArchArg {
    Llama,
    Mamba,
    Hymba,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum SizeArg {
    Tiny,
    Small,
}

/// `whittle train` arguments.
#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    arch: ArchArg,
    #[arg(long, value_enum, default_value = "small")]
    size: SizeArg,
    /// Corpus folder with train.list / valid.list (the Gutenberg corpus layout).
    #[arg(long, default_value = "../shared/data/gutenberg")]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    accum: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 3e-4)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Global gradient-norm clip (0: none).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 200)]
    eval_every: u64,
    #[arg(long, default_value_t = 32768)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 100)]
    ckpt_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hymba ablation: no meta tokens.
    #[arg(long)]
    no_meta_tokens: bool,
    /// Hymba ablation: every layer keeps its own K/V.
    #[arg(long)]
    no_kv_sharing: bool,
    /// Stop (with a checkpoint) after this many minutes; the same command resumes.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Matrix products in bf16 (weights, norms, softmax, scan and loss stay f32).
    #[arg(long)]
    bf16: bool,
    /// The linears' products on AMX tiles: f32 (f32 rounding) or bf16x3 (three bf16 products,
    /// ~2⁻¹⁵ relative error per term, about twice as fast); CPUs without AMX multiply in f32.
    #[arg(long, value_enum, default_value = "f32")]
    matmul_precision: whittle::train::trainer::Precision,
}

/// `whittle init` arguments.
#[derive(clap::Args)]
pub struct InitArgs {
    #[arg(long, value_enum)]
    arch: ArchArg,
    #[arg(long, value_enum, default_value = "small")]
    size: SizeArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Positions the model is built for.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    #[arg(long)]
    out: PathBuf,
}

/// The preset of an architecture and size (Hymba with its meta tokens and KV sharing unless
/// ablated).
fn preset(arch: ArchArg, size: SizeArg, meta_tokens: bool, kv_sharing: bool) -> Preset {
    Preset {
        arch: match arch {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Mamba => Arch::Mamba,
            ArchArg::Hymba => Arch::Hymba,
        },
        size: match size {
            SizeArg::Tiny => Size::Tiny,
            SizeArg::Small => Size::Small,
        },
        meta_tokens,
        kv_sharing,
    }
}

/// The default model's tokenizer: the one the presets are built for (`VOCAB` ids). The default
/// model is a GGUF file, whose header holds the tokenizer: its weights are not read.
fn default_tokenizer() -> Result<whittle::io::tokenizer::Tokenizer> {
    let path = ModelSpec::Default.resolve()?;
    let spec = whittle::io::gguf::GgufFile::open(&path)?.tokenizer_spec()?;
    Ok(whittle::io::tokenizer::Tokenizer::from_spec(&spec)?)
}

pub fn init(a: &InitArgs) -> Result<()> {
    let tok = default_tokenizer()?;
    let model = preset(a.arch, a.size, true, true).build(VOCAB, a.context, a.seed)?;
    whittle::io::safetensors::save(&model, Some(&tok), false, &a.out)?;
    println!(
        "wrote {} ({:.2} M parameters)",
        a.out.display(),
        model.n_params() as f64 / 1e6
    );
    Ok(())
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            preset: Some(preset(
                self.arch,
                self.size,
                !self.no_meta_tokens,
                !self.no_kv_sharing,
            )),
            steps: self.steps,
            batch: self.batch,
            seq_len: self.seq_len,
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
            bf16: self.bf16,
            precision: self.matmul_precision,
            objective: "ce".into(),
            groups: Default::default(),
            head_windows: 0,
            maskllm: None,
        }
    }
}

/// Files of a corpus folder's split: the names in `SPLIT.list` (the Gutenberg corpus's layout).
pub(crate) fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let list = dir.join(format!("{split}.list"));
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("{}: cannot read the {split} file list", list.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| dir.join(l))
        .collect())
}

/// Token ids of `files` read by the default model's tokenizer (the study's), cached in `cache`.
fn tokens(files: &[PathBuf], cache: &Path) -> Result<Vec<u32>> {
    tokens_with(&default_tokenizer()?, files, cache)
}

/// Token ids of `files`, books joined by the end-of-text token; cached in `cache` (u32 LE).
pub(crate) fn tokens_with(
    tok: &whittle::io::tokenizer::Tokenizer,
    files: &[PathBuf],
    cache: &Path,
) -> Result<Vec<u32>> {
    if let Ok(bytes) = std::fs::read(cache) {
        return Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    let mut ids = Vec::new();
    for f in files {
        ids.extend(tok.encode(&whittle::data::text::read_text(f)?)?);
        ids.extend(tok.eos);
    }
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    whittle::io::atomic::write_bytes(cache, &bytes)?;
    Ok(ids)
}

/// SmolLM2's vocabulary: every study model uses its tokenizer.
const VOCAB: usize = 49152;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc 3's
/// `include/mimalloc.h`; libmimalloc-sys names only some options). Checked by a test.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process. A training step allocates and frees tensors of hundreds of
/// MB; an allocator that hands them back to the kernel makes the next step page-fault its way
/// back: with glibc that cost 40 % of a small model's step (550 vs 950 tokens/s). mimalloc (the
/// binary's allocator) returns freed pages after a delay (1 s); training turns that off. Measured
/// on SmolLM2's cross-entropy step (batch 2 × 512, 2 threads, Xeon model 207): glibc tuned to
/// keep its heap 209.2 tok/s, mimalloc with the default delay 207.9–216.6, without purging 228.9
/// (at batch 8, where the step's own work dominates, 209.9 against 211.9).
pub(crate) fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's tuning options, which any thread may do at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let (config, data_dir, out, max_minutes) = (
        args.config(),
        args.data.as_path(),
        args.out.as_path(),
        args.max_minutes,
    );
    keep_freed_memory();
    std::fs::create_dir_all(out)?;
    if finished(out, &config)? {
        return Ok(());
    }
    let t0 = Instant::now();
    let data = TokenData {
        train: tokens(
            &split_files(data_dir, "train")?,
            &out.join("tokens-train.bin"),
        )?,
        valid: tokens(
            &split_files(data_dir, "valid")?,
            &out.join("tokens-valid.bin"),
        )?,
    };
    eprintln!(
        "corpus: {} training and {} validation tokens ({:.0} s)",
        data.train.len(),
        data.valid.len(),
        t0.elapsed().as_secs_f64()
    );
    let start = || Start::Preset { vocab: VOCAB };
    let mut trainer = match resumable(out, &config)? {
        true => Trainer::resume(out, start(), Teacher::None, &data)?,
        false => Trainer::new(config, start(), Teacher::None, &data)?,
    };
    crate::ranks::join(&mut trainer, &data)?;
    let c = trainer.config.clone();
    if let Some(p) = c.preset {
        eprintln!(
            "{:?} {:?}: {:.2} M parameters ({:.2} M outside the embedding)",
            p.arch,
            p.size,
            trainer.n_params() as f64 / 1e6,
            (trainer.n_params() - trainer.model.embed.n_params()) as f64 / 1e6
        );
    }
    if drive(&mut trainer, &data, out, max_minutes)? {
        summary(&mut trainer, &data, out)?;
        retire(out)?;
    }
    Ok(())
}

/// Whether `out` holds a checkpoint of a run with `config` to resume; fails when it holds a run
/// with other settings.
pub(crate) fn resumable(out: &Path, config: &TrainConfig) -> Result<bool> {
    if !out.join("checkpoint/state.json").is_file() {
        return Ok(false);
    }
    let saved = Trainer::saved_config(out)?;
    if &saved != config {
        bail!(
            "{} holds a run with other settings; use a new --out or the same settings:\n{:#?}",
            out.display(),
            saved
        );
    }
    Ok(true)
}

/// Whether `out` holds this run finished (results written, checkpoint retired by [`retire`]): then
/// there is nothing to resume, and it says so. Rank 0's disk decides for every rank of a
/// distributed run (the others may not see it, and must not start a run rank 0 skips).
pub(crate) fn finished(out: &Path, config: &TrainConfig) -> Result<bool> {
    let root = crate::ranks::is_root();
    let mine = root && resumable(out, config)? && Trainer::finished(out)?;
    let mut done = [mine as u8 as f64];
    crate::ranks::comm().sum_f64(&mut done)?;
    if done[0] == 0.0 {
        return Ok(false);
    }
    if root {
        eprintln!(
            "{} holds this run, finished (summary.json, model/); use a new --out to train again",
            out.display()
        );
    }
    Ok(true)
}

/// Drops the tensors of a finished run's checkpoint in `dir` once its results are written (they
/// only serve to resume; 1.6 GB for SmolLM2 with its AdamW moments), keeping its log.
pub(crate) fn retire(dir: &Path) -> Result<()> {
    if !crate::ranks::is_root() {
        return Ok(());
    }
    let bytes = Trainer::retire_checkpoint(dir)?;
    if bytes > 0 {
        eprintln!(
            "finished: dropped the checkpoint's tensors in {} ({:.2} GB); its log stays",
            dir.display(),
            bytes as f64 / 1e9
        );
    }
    Ok(())
}

/// Runs `trainer` to its last step or the time budget, checkpointing in `out`, with a progress
/// bar; returns whether the run is finished.
pub(crate) fn drive(
    trainer: &mut Trainer,
    data: &TokenData,
    out: &Path,
    max_minutes: Option<f64>,
) -> Result<bool> {
    let c = trainer.config.clone();
    if let Some(step) = trainer.last_checkpoint() {
        eprintln!("resuming at step {step} of {}", c.steps);
    }
    let pb = match crate::ranks::is_root() {
        true => crate::report::progress(c.steps as usize, "training"),
        false => indicatif::ProgressBar::hidden(),
    };
    pb.set_position(trainer.step);
    let deadline =
        max_minutes.map(|m| Instant::now() + std::time::Duration::from_secs_f64(m * 60.0));
    trainer.run(data, Some(out), None, deadline, &mut |r| {
        pb.set_position(r.step);
        let val = r
            .val_ppl
            .map_or(String::new(), |p| format!(" · val ppl {p:.2}"));
        let parts: String = r
            .parts
            .iter()
            .map(|(n, v)| format!(" {n} {v:.3}"))
            .collect();
        pb.set_message(format!(
            "loss {:.3}{parts} · {:.0} tok/s{val}",
            r.loss, r.tokens_per_s
        ));
    })?;
    let comm = trainer.collective();
    if comm.size() > 1 && comm.rank() == 0 {
        eprintln!(
            "data-parallel over {}: {:.1} MB of gradients summed per step",
            comm.describe(),
            4.0 * trainer.reduced_per_step() as f64 / 1e6
        );
    }
    if trainer.step < c.steps {
        pb.abandon();
        eprintln!(
            "time budget spent at step {}; run the same command again to resume",
            trainer.step
        );
        return Ok(false);
    }
    pb.finish();
    Ok(true)
}

/// Final figures of a finished run: validation perplexity, cache size and decode speed.
fn summary(trainer: &mut Trainer, data: &TokenData, out: &Path) -> Result<()> {
    let val_ppl = trainer.validate(data)?;
    if !crate::ranks::is_root() {
        return Ok(());
    }
    let model = &trainer.model;
    let per_token = KvCache::footprint(model, 8192) - KvCache::footprint(model, 8191);
    let mut decode = Vec::new();
    let ids: Vec<u32> = data.valid.iter().cycle().take(8192).copied().collect();
    for ctx in [1024, 4096, 8000] {
        let (r, bytes) = speed::decode_at_context(model, &ids, ctx, 32, 1)?;
        decode.push(json!({"context": ctx, "tokens_per_s": r.tokens_per_s, "cache_bytes": bytes}));
    }
    let c = &trainer.config;
    let s = json!({
        "preset": c.preset,
        "parameters": model.n_params(),
        "non_embedding_parameters": model.n_params() - model.embed.n_params(),
        "steps": trainer.step,
        "tokens": trainer.log.last().map_or(0, |r| r.tokens),
        "val_ppl": val_ppl,
        "cache_bytes_per_token": per_token,
        "cache_bytes_at_8k": KvCache::footprint(model, 8192),
        "decode": decode,
    });
    table(
        &["measure", "value"],
        &[
            vec!["validation perplexity".into(), format!("{val_ppl:.2}")],
            vec!["cache bytes/token".into(), per_token.to_string()],
            vec![
                "cache MiB at 8k".into(),
                format!(
                    "{:.2}",
                    KvCache::footprint(model, 8192) as f64 / (1 << 20) as f64
                ),
            ],
        ],
    );
    // The trained model as a folder every command (and transformers, for Llama and Mamba) loads;
    // the summary last, so that a summary means the run's results are all written.
    let dir = out.join("model");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    whittle::io::safetensors::save(model, Some(&default_tokenizer()?), false, &dir)?;
    eprintln!("wrote {}", dir.display());
    write_json(&out.join("summary.json"), &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index names the purge delay: its default in mimalloc 3 (1000 ms, `src/options.c`)
    /// reads back from it, and so does the value training sets.
    #[test]
    fn purge_delay_option_is_the_one_training_sets() {
        // SAFETY: reads and sets mimalloc options.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            keep_freed_memory();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), -1);
        }
    }
}
