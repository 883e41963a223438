//! The one-shot compression commands (`sparsify`, ...): shared calibration and evaluation
//! arguments, the per-layer table, and the before/after perplexity.

use crate::commands::load;
use crate::report::{advance, progress, table, write_json};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle::calib::sequential::LinearReport;
use whittle::io::tokenizer::Tokenizer;
use whittle::model::provenance::Figure;
use whittle::recipe::method::{self, StageReport};
use whittle::recipe::{Recipe, Stage};
use whittle::Model;

/// Calibration data: windows of the text at GPTQ-style seeded random starts.
#[derive(clap::Args, Clone)]
pub struct CalibArgs {
    #[arg(long, default_value = "../shared/reference/wikitext2-valid.txt")]
    calib: PathBuf,
    /// Windows to sample; 0 runs data-free where the method allows (SVD compensation).
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    #[arg(long, default_value_t = 2048)]
    calib_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl CalibArgs {
    /// `--calib-samples 0` asks for no calibration (e.g. data-free SVD compensation).
    pub fn wanted(&self) -> bool {
        self.calib_samples > 0
    }

    /// The same windows' settings with the next seed: other windows of the same text, held out
    /// from the ones drawn with this seed.
    pub fn with_seed_after(&self) -> Self {
        CalibArgs {
            seed: self.seed + 1,
            ..self.clone()
        }
    }

    /// These settings as a recipe's `[calib]` table.
    pub fn spec(&self) -> whittle::recipe::CalibSpec {
        whittle::recipe::CalibSpec {
            file: self.calib.clone(),
            samples: self.calib_samples,
            len: self.calib_len,
            seed: self.seed,
        }
    }

    /// The calibration settings of a recipe file.
    pub fn from_spec(s: &whittle::recipe::CalibSpec) -> Self {
        CalibArgs {
            calib: s.file.clone(),
            calib_samples: s.samples,
            calib_len: s.len,
            seed: s.seed,
        }
    }
}

/// Perplexity before and after, when `--eval` is given; downstream tasks with `--tasks`.
#[derive(clap::Args, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub tasks: crate::tasks::TaskArgs,
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    eval_seq_len: usize,
    /// Keep only the first ⌊N / eval-seq-len⌋ windows.
    #[arg(long)]
    eval_max_tokens: Option<usize>,
}

/// What every one-shot command takes besides its method: calibration data, evaluation, where to
/// write.
#[derive(clap::Args, Clone)]
pub struct JobArgs {
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub eval: EvalArgs,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Tokens of the calibration text (read once); none when the method needs no data.
pub(crate) fn calibration_ids(tok: &Tokenizer, args: &CalibArgs, needed: bool) -> Result<Vec<u32>> {
    if !needed {
        return Ok(Vec::new());
    }
    let text = whittle::data::text::read_text(&args.calib)?;
    let ids = tok.encode(&text)?;
    let need = args.calib_len + 2;
    anyhow::ensure!(
        ids.len() >= need,
        "{}: {} tokens, fewer than one calibration window of {} needs",
        args.calib.display(),
        ids.len(),
        args.calib_len
    );
    Ok(ids)
}

/// The calibration windows (none without calibration tokens).
pub(crate) fn calibration_windows<'a>(ids: &'a [u32], args: &CalibArgs) -> Result<Vec<&'a [u32]>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(whittle::data::calib::calibration_windows(
        ids,
        args.calib_samples,
        args.calib_len,
        args.seed,
    )?)
}

pub(crate) fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    args: &EvalArgs,
    what: &str,
) -> Result<Option<f64>> {
    let Some(path) = &args.eval else {
        return Ok(None);
    };
    let ids = tok.encode(&whittle::data::text::read_text(path)?)?;
    let pb = progress(0, what);
    let r = whittle::eval::perplexity::perplexity(
        model,
        &ids,
        args.eval_seq_len,
        args.eval_max_tokens,
        &mut advance(&pb),
    )
    .with_context(|| format!("perplexity of {}", path.display()))?;
    pb.finish_and_clear();
    Ok(Some(r.ppl))
}

/// A compression run over a loaded model: `(model, calibration windows, progress)`.
pub type CompressFn<'a> =
    dyn FnMut(&mut Model, &[&[u32]], &mut dyn FnMut(usize, usize)) -> Result<StageReport> + 'a;

/// A one-shot command: the model, the method's own settings (its recipe stage), and the job.
#[derive(clap::Args, Clone)]
pub struct OneShotArgs<S: clap::Args> {
    #[command(flatten)]
    pub model: crate::ModelArg,
    #[command(flatten)]
    pub stage: S,
    #[command(flatten)]
    pub job: JobArgs,
}

/// The one driver of every one-shot command: the stage runs through [`run`], recorded as a
/// one-stage recipe. `reference`: the model compensation measures against (default: the
/// default model); `peft`: also write the adapters as a PEFT folder.
pub fn one_shot<S>(a: &OneShotArgs<S>, reference: Option<&str>, peft: Option<&Path>) -> Result<()>
where
    S: clap::Args + Clone + Into<Stage>,
{
    let stage: Stage = a.stage.clone().into();
    let method = stage.method();
    method.check()?;
    let calibrate =
        method.needs_calibration() || (method.uses_calibration() && a.job.calib.wanted());
    let settings = serde_json::to_value(&stage)?;
    run(
        a.model.model.as_deref(),
        &a.job,
        &Recipe::single(a.job.calib.spec(), stage.clone()),
        &method.describe(),
        method.writes_packed(),
        calibrate,
        settings,
        &mut |m, windows, progress| {
            let reference = match method.needs_reference() {
                true => Some(crate::commands::load(reference)?.model),
                false => None,
            };
            let cx = method::Context {
                reference: reference.as_ref(),
                windows,
                progress,
            };
            let report = method.run(m, cx)?;
            if let Some(dir) = peft {
                whittle::io::peft::save(m, dir)?;
                eprintln!("wrote {}", dir.display());
            }
            Ok(report)
        },
    )
}

/// The perplexity measured after compression, as a provenance figure.
fn ppl_figure(args: &EvalArgs, ppl: f64) -> Figure {
    let file = args.eval.as_deref().unwrap_or(std::path::Path::new("text"));
    let task = file
        .file_stem()
        .map_or_else(|| "text".into(), |s| s.to_string_lossy().into_owned());
    let first = args
        .eval_max_tokens
        .map_or(String::new(), |n| format!(", first {n} tokens"));
    Figure {
        task,
        metric: "ppl".into(),
        value: ppl,
        stderr: None,
        setting: format!("{}-token windows{first}", args.eval_seq_len),
    }
}

/// Loads the model, measures it, draws the calibration windows (when `calibrate`), runs
/// `compress` with a per-layer progress bar, measures again, prints the tables, records
/// `recipe` and the figures in the model's provenance, writes the model to `job.out`
/// (quantized linears kept packed when `packed`) and the report to `job.json`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: Option<&str>,
    job: &JobArgs,
    recipe: &Recipe,
    what: &str,
    packed: bool,
    calibrate: bool,
    settings: serde_json::Value,
    compress: &mut CompressFn,
) -> Result<()> {
    let (eval, out) = (&job.eval, &job.out);
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; choose a new output folder",
        out.display()
    );
    whittle::io::atomic::parent_of(out)?;
    let whittle::io::resolve::Loaded {
        mut model,
        tokenizer,
        path,
    } = load(model)?;
    // With --distributed, the ranks split the calibration windows; rank 0 alone measures,
    // reports and writes.
    let root = crate::ranks::is_root();
    let before = match root {
        true => perplexity(&model, &tokenizer, eval, "perplexity before")?,
        false => None,
    };
    let tasks_before = match root {
        true => crate::tasks::evaluate(&model, &tokenizer, &eval.tasks, "before")?,
        false => Vec::new(),
    };
    let ids = calibration_ids(&tokenizer, &job.calib, calibrate)?;
    let windows = calibration_windows(&ids, &job.calib)?;
    let pb = match root {
        true => progress(model.layers.len(), what),
        false => indicatif::ProgressBar::hidden(),
    };
    let start = Instant::now();
    let report = whittle::dist::scoped(crate::ranks::comm(), || {
        compress(&mut model, &windows, &mut advance(&pb))
    })?;
    let reports = &report.linears;
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if !root {
        return Ok(());
    }
    let after = perplexity(&model, &tokenizer, eval, "perplexity after")?;
    if !reports.is_empty() {
        layer_table(reports);
    }
    report.notes.iter().for_each(|n| println!("{n}"));
    println!("{what}: {seconds:.1} s");
    if let (Some(b), Some(a)) = (before, after) {
        println!("perplexity {b:.4} -> {a:.4}");
    }
    let tasks_after = crate::tasks::evaluate(&model, &tokenizer, &eval.tasks, "after")?;
    if !tasks_before.is_empty() {
        crate::tasks::print_pair(&tasks_before, &tasks_after);
    }
    let mut figures: Vec<Figure> = after.map(|p| ppl_figure(eval, p)).into_iter().collect();
    figures.extend(tasks_after.iter().flat_map(|t| t.figures()));
    model.provenance.record_run(recipe.to_toml()?, figures);
    whittle::io::safetensors::save(&model, Some(&tokenizer), packed, out)?;
    eprintln!("wrote {}", out.display());
    if let Some(j) = &job.json {
        write_json(
            j,
            &json!({"model": path, "method": what, "settings": settings, "seconds": seconds,
                    "ppl_before": before, "ppl_after": after, "eval": eval.eval,
                    "eval_seq_len": eval.eval_seq_len, "eval_max_tokens": eval.eval_max_tokens,
                    "tasks_before": tasks_before, "tasks_after": tasks_after,
                    "linears": reports, "details": report.details, "out": out}),
        )?;
    }
    Ok(())
}

/// Columns of [`layer_table`].
const LAYER_HEADER: [&str; 6] = [
    "layer",
    "linears",
    "rel. error before",
    "rel. error",
    "worst",
    "seconds",
];

/// One row per layer: linears touched, mean relative output error before compensation (when the
/// method compensates) and after the method, worst error, time.
fn layer_table(reports: &[LinearReport]) {
    table(&LAYER_HEADER, &layer_rows(reports));
    match reports.iter().filter_map(|r| r.error_tokens).max() {
        Some(n) => println!("relative errors ‖ΔW·X‖²/‖W·X‖² on {n} calibration tokens"),
        None if reports.iter().any(|r| r.rel_error.is_some()) => {
            println!("relative errors ‖ΔW‖²/‖W‖² in weight space")
        }
        None => {}
    }
}

fn layer_rows(reports: &[LinearReport]) -> Vec<Vec<String>> {
    let layers = reports.iter().map(|r| r.layer).max().map_or(0, |m| m + 1);
    (0..layers)
        .map(|l| {
            let rs: Vec<&LinearReport> = reports.iter().filter(|r| r.layer == l).collect();
            let errs: Vec<f64> = rs.iter().filter_map(|r| r.rel_error).collect();
            let fmt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.4}"));
            let mean_of =
                |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            let mean = mean_of(&errs);
            let before: Vec<f64> = rs.iter().filter_map(|r| r.error_before).collect();
            let worst = errs
                .iter()
                .cloned()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            vec![
                l.to_string(),
                rs.len().to_string(),
                fmt(mean_of(&before)),
                fmt(mean),
                fmt(worst),
                format!("{:.2}", rs.iter().map(|r| r.seconds).sum::<f64>()),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_rows_fill_every_column() {
        let report = |layer, rel, before| LinearReport {
            layer,
            name: format!("layers.{layer}.q_proj"),
            rel_error: Some(rel),
            error_before: before,
            error_tokens: Some(64),
            damp: None,
            seconds: 0.5,
        };
        let rows = layer_rows(&[
            report(0, 0.1, Some(0.4)),
            report(0, 0.3, Some(0.6)),
            report(1, 0.2, None),
        ]);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.len() == LAYER_HEADER.len()));
        assert_eq!(rows[0], ["0", "2", "0.5000", "0.2000", "0.3000", "1.00"]);
        assert_eq!(rows[1][2], "—");
    }
}
