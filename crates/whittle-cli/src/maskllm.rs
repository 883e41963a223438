//! `whittle sparsify --method maskllm`: learn N:M masks by training (MaskLLM), resumable, from a
//! one-shot prior; writes the mask file, the masked model and a summary. `--tokens 0` writes
//! the prior's own mask: the starting point every learning curve is compared with.

use crate::compress::{calibration_ids, calibration_windows, perplexity, OneShotArgs};
use crate::distill::{corpus, files, load, trainer};
use crate::report::{advance, progress, table, write_json};
use crate::train::{drive, keep_freed_memory, retire};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use whittle::io::tokenizer::Tokenizer;
use whittle::recipe::Sparsify;
use whittle::sparsity::maskllm::{self, parse_range, LearnedMask, MaskLlmConfig};
use whittle::sparsity::SparsityMethod;
use whittle::train::groups::{Groups, KeepZeros};
use whittle::train::optim::AdamWConfig;
use whittle::train::trainer::{Teacher, TokenData, TrainConfig, Trainer};
use whittle::Model;

/// The flags of `--method maskllm` (ignored by the one-shot methods).
#[derive(clap::Args, Clone)]
pub struct MaskLlmArgs {
    /// The mask the logits start from: sparsegpt | wanda | magnitude | none | a mask file.
    #[arg(long, default_value = "sparsegpt")]
    prior: String,
    /// Standard deviations of the initial logits the prior's candidate is raised by.
    #[arg(long, default_value_t = 3.0)]
    prior_strength: f64,
    /// Gumbel-softmax temperature, START:END (linear in progress).
    #[arg(long, default_value = "4:0.05")]
    tau: String,
    /// Logit scale κ, START:END.
    #[arg(long, default_value = "100:500")]
    kappa: String,
    /// λ of the sparse-weight regulariser (decays linearly to 0).
    #[arg(long, default_value_t = 1e-5)]
    sparse_reg: f64,
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    #[arg(long, default_value_t = 5e-6)]
    min_lr: f64,
    /// The mask logits' learning rate as a multiple of --lr.
    #[arg(long, default_value_t = 10.0)]
    mask_lr_mult: f64,
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Train the weights with the masks (default: frozen, as the paper).
    #[arg(long)]
    update_weights: bool,
    /// Distil from this teacher (e.g. the dense model) instead of the plain LM loss.
    #[arg(long)]
    teacher: Option<String>,
    /// The objective with --teacher (`kd`, `kd:T=2+ce:0.5`, ...).
    #[arg(long, default_value = "kd")]
    loss: String,
    /// Training text (corpus folders or files); needed unless --tokens 0.
    #[arg(long)]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Training tokens; 0 writes the prior's mask.
    #[arg(long)]
    tokens: Option<u64>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 2)]
    accum: usize,
    /// Validation text for the argmax mask's perplexity during training.
    #[arg(long, default_value = "../shared/data/gutenberg")]
    valid: PathBuf,
    /// Perplexity of the current argmax mask every this many steps.
    #[arg(long, default_value_t = 25)]
    eval_every: u64,
    #[arg(long, default_value_t = 16384)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 25)]
    ckpt_every: u64,
    /// The linears' products on AMX tiles: f32 (f32 rounding) or bf16x3 (three bf16 products,
    /// ~2⁻¹⁵ relative error per term, about twice as fast); CPUs without AMX multiply in f32.
    #[arg(long, value_enum, default_value = "f32")]
    matmul_precision: whittle::train::trainer::Precision,
    /// Stop (with a checkpoint) after this many minutes; the same command resumes.
    #[arg(long)]
    max_minutes: Option<f64>,
}

impl MaskLlmArgs {
    fn mask_config(&self, stage: &Sparsify) -> Result<MaskLlmConfig> {
        let c = MaskLlmConfig {
            pattern: stage.pattern.clone(),
            tau: parse_range(&self.tau, "tau")?,
            kappa: parse_range(&self.kappa, "kappa")?,
            sparse_reg: self.sparse_reg,
            targets: stage.targets.clone(),
        };
        c.check()?;
        Ok(c)
    }

    fn train_config(&self, masks: MaskLlmConfig, tokens: u64, seed: u64) -> TrainConfig {
        let objective = match self.teacher {
            Some(_) => self.loss.clone(),
            None => "ce".into(),
        };
        TrainConfig {
            preset: None,
            steps: TrainConfig::steps_for(tokens, self.batch, self.seq_len, self.accum),
            batch: self.batch,
            seq_len: self.seq_len,
            accum: self.accum,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            clip: 1.0,
            adamw: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            eval_every: self.eval_every,
            eval_tokens: self.eval_tokens,
            ckpt_every: self.ckpt_every,
            seed,
            bf16: false,
            precision: self.matmul_precision,
            objective,
            groups: Groups {
                freeze: match self.update_weights {
                    true => vec!["embed".into(), "lm_head".into()],
                    false => vec!["*".into()],
                },
                lr_scale: vec![("*.mask_logits".into(), self.mask_lr_mult)],
                keep_zeros: KeepZeros::Off,
                ..Default::default()
            },
            head_windows: 0,
            maskllm: Some(masks),
        }
    }
}

/// The prior mask: a one-shot method's mask on the model (calibrated as the one-shot command
/// would be), a mask file, or none.
fn prior(
    model: &Model,
    tok: &Tokenizer,
    a: &OneShotArgs<Sparsify>,
    learn: &MaskLlmArgs,
    masks: &MaskLlmConfig,
) -> Result<Option<LearnedMask>> {
    let method = match learn.prior.as_str() {
        "none" => return Ok(None),
        "sparsegpt" | "wanda" | "magnitude" => SparsityMethod::parse(&learn.prior)?,
        file => {
            let m = LearnedMask::load(Path::new(file))
                .with_context(|| format!("--prior {file}: not a one-shot method or mask file"))?;
            m.check(model)
                .with_context(|| format!("--prior {file} does not fit this model"))?;
            return Ok(Some(m));
        }
    };
    let ids = calibration_ids(tok, &a.job.calib, method.needs_calibration())?;
    let windows = calibration_windows(&ids, &a.job.calib)?;
    let pb = progress(model.layers.len(), &format!("{} prior", learn.prior));
    let m = maskllm::one_shot_prior(model, masks, method, &windows, &mut advance(&pb))?;
    pb.finish_and_clear();
    Ok(Some(m))
}

pub fn run(a: &OneShotArgs<Sparsify>, learn: &MaskLlmArgs) -> Result<()> {
    keep_freed_memory();
    let out = &a.job.out;
    let masks = learn.mask_config(&a.stage)?;
    let tokens = learn
        .tokens
        .context("--method maskllm needs --tokens N (0: write the prior's mask)")?;
    anyhow::ensure!(
        !out.join("mask.safetensors").exists(),
        "{} already holds a finished run; choose a new --out",
        out.display()
    );
    let (model, tok) = load(a.model.model.as_deref())?;
    std::fs::create_dir_all(out)?;
    if tokens == 0 {
        let mask = prior(&model, &tok, a, learn, &masks)?
            .context("--tokens 0 writes the prior's mask: name a prior other than none")?;
        return finish(a, model, &tok, &mask, None);
    }
    anyhow::ensure!(
        !learn.data.is_empty(),
        "--method maskllm trains on --data (corpus folders or text files)"
    );
    let data = TokenData {
        train: corpus(&tok, &files(&learn.data, "train")?, "train")?,
        valid: corpus(
            &tok,
            &files(std::slice::from_ref(&learn.valid), "valid")?,
            "valid",
        )?,
    };
    let config = learn.train_config(masks.clone(), tokens, a.job.calib.spec().seed);
    let teacher = match &learn.teacher {
        Some(t) => {
            let (t, ttok) = load(Some(t))?;
            whittle::distill::check_same_tokenizer(&ttok, &tok)?;
            Teacher::Live(Box::new(t))
        }
        None => Teacher::None,
    };
    let fresh = !out.join("checkpoint/state.json").is_file();
    let first = fresh
        .then(|| prior(&model, &tok, a, learn, &masks))
        .transpose()?;
    let mut t = trainer(out, config, model, teacher, &data)?;
    if let Some(Some(p)) = &first {
        t.set_prior(p, learn.prior_strength)?;
    }
    // Rank 0's state wins: a resumed run's logits, not another rank's fresh prior.
    crate::ranks::join(&mut t, &data)?;
    if t.step == 0 && learn.prior != "none" {
        // The curve's first point (the log starts with the first step), kept beside the run.
        let ppl = t.validate(&data)?;
        eprintln!("argmax mask of the seeded logits: validation perplexity {ppl:.3}");
        if crate::ranks::is_root() {
            write_json(
                &out.join("start.json"),
                &json!({"val_ppl": ppl, "prior": learn.prior}),
            )?;
        }
    }
    eprintln!(
        "maskllm: {} steps of {} × {} tokens (accum {}), {:.1} M mask logits{}, objective {}",
        t.config.steps,
        t.config.batch,
        t.config.seq_len,
        t.config.accum,
        t.n_params() as f64 / 1e6,
        if learn.update_weights {
            " + weights"
        } else {
            ""
        },
        t.config.objective
    );
    if !drive(&mut t, &data, out, learn.max_minutes)? {
        return Ok(());
    }
    if !crate::ranks::is_root() {
        return Ok(());
    }
    let mask = t.learned_mask()?.context("a MaskLLM run learns masks")?;
    let config = t.config.clone();
    let model = t.model.clone();
    finish(a, model, &tok, &mask, Some((&t, &config)))?;
    retire(out)
}

/// Writes `OUT/mask.safetensors`, the masked model (`OUT/model`), and the perplexity before
/// and after (`--eval`) as a table and in `OUT/summary.json` (and `--json`).
fn finish(
    a: &OneShotArgs<Sparsify>,
    mut model: Model,
    tok: &Tokenizer,
    mask: &LearnedMask,
    run: Option<(&Trainer, &TrainConfig)>,
) -> Result<()> {
    let out = &a.job.out;
    let before = perplexity(&model, tok, &a.job.eval, "perplexity before")?;
    mask.apply(&mut model)?;
    let after = perplexity(&model, tok, &a.job.eval, "perplexity after")?;
    let settings = match run {
        Some((_, c)) => c.to_toml()?,
        None => format!("sparsify maskllm {}:{}, prior only", mask.n, mask.m),
    };
    model.provenance.record_run(settings, Vec::new());
    let model_dir = out.join("model");
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir)?;
    }
    whittle::io::safetensors::save(&model, Some(tok), false, &model_dir)?;
    mask.save(&out.join("mask.safetensors"))?;
    let fmt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
    let last = run.and_then(|(t, _)| t.log.last().cloned());
    table(
        &["measure", "value"],
        &[
            vec!["pattern".into(), format!("{}:{}", mask.n, mask.m)],
            vec![
                "tokens trained".into(),
                last.as_ref().map_or(0, |r| r.tokens).to_string(),
            ],
            vec![
                "validation perplexity (argmax mask)".into(),
                fmt(last.as_ref().and_then(|r| r.val_ppl)),
            ],
            vec!["perplexity without the mask".into(), fmt(before)],
            vec!["perplexity with the mask".into(), fmt(after)],
        ],
    );
    eprintln!(
        "wrote {} and {}",
        model_dir.display(),
        out.join("mask.safetensors").display()
    );
    let summary = json!({
        "pattern": format!("{}:{}", mask.n, mask.m), "config": run.map(|(_, c)| c),
        "last": last, "ppl_before": before, "ppl_after": after, "eval": a.job.eval.eval,
        "mask": out.join("mask.safetensors"), "model": model_dir,
    });
    write_json(&out.join("summary.json"), &summary)?;
    if let Some(j) = &a.job.json {
        write_json(j, &summary)?;
    }
    Ok(())
}
