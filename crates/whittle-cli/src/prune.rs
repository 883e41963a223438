//! `whittle importance` (scores from one calibration pass, optional Shapley estimates) and
//! `whittle prune` (width and depth pruning from stored scores).

use crate::compress::{CalibArgs, JobArgs};
use crate::report::{advance, progress, table, write_json};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;
use whittle::prune::emulate::EmulateKind;
use whittle::prune::importance::{activation_scores, DepthMetrics, Scores};
use whittle::prune::shapley::shapley;
use whittle::prune::width::WidthTarget;
use whittle::prune::{DepthMetric, PruneSpec, Unit};
use whittle::recipe::{Recipe, Stage};

#[derive(clap::Args, Clone)]
pub struct ImportanceArgs {
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Also estimate each block's and sublayer's contribution to the loss: leave-one-out, plus
    /// K Monte-Carlo subnetworks per family when K > 0.
    #[arg(long)]
    pub shapley_samples: Option<usize>,
    /// Fraction of units missing from each Monte-Carlo subnetwork.
    #[arg(long, default_value_t = 0.5)]
    pub shapley_drop: f64,
    /// Tokens of the held-out slice the Shapley losses are measured on: the end of the
    /// calibration text, in windows of --shapley-len.
    #[arg(long, default_value_t = 4096)]
    pub shapley_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub shapley_len: usize,
    #[arg(long, default_value_t = 0)]
    pub shapley_seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn importance(model: Option<&str>, args: &ImportanceArgs) -> Result<()> {
    let whittle::io::resolve::Loaded {
        mut model,
        tokenizer,
        path,
    } = crate::commands::load(model)?;
    whittle::io::atomic::parent_of(&args.out)?;
    let ids = crate::compress::calibration_ids(&tokenizer, &args.calib, true)?;
    let windows = crate::compress::calibration_windows(&ids, &args.calib)?;
    let pb = progress(windows.len(), "importance");
    let activation = activation_scores(&model, &windows, &mut advance(&pb))?;
    pb.finish_and_clear();
    let shapley = match args.shapley_samples {
        None => None,
        Some(k) => {
            let (len, n) = (
                args.shapley_len,
                args.shapley_tokens / args.shapley_len.max(1),
            );
            anyhow::ensure!(
                n > 0 && ids.len() >= n * len,
                "--shapley-tokens {} gives no window of {len} tokens from {} calibration tokens",
                args.shapley_tokens,
                ids.len()
            );
            let tail = &ids[ids.len() - n * len..];
            let slice: Vec<&[u32]> = tail.chunks_exact(len).collect();
            let pb = progress(0, "shapley");
            let s = shapley(
                &mut model,
                &slice,
                k,
                args.shapley_drop,
                args.shapley_seed,
                &mut advance(&pb),
            )?;
            pb.finish_and_clear();
            Some(s)
        }
    };
    let c = args.calib.spec();
    let scores = Scores {
        fingerprint: model.fingerprint(),
        calibration: format!(
            "{}: {} windows of {} tokens, seed {}",
            c.file.display(),
            c.samples,
            c.len,
            c.seed
        ),
        activation,
        shapley,
    };
    print_depth(&scores);
    write_json(&args.out, &scores)
        .with_context(|| format!("writing the scores of {}", path.display()))
}

/// Per-layer depth metrics, then each metric's six least important blocks and sublayers.
fn print_depth(s: &Scores) {
    let d = &s.activation.depth;
    let sh = s.shapley.as_ref();
    let f = |v: f64| format!("{v:.4}");
    let rows: Vec<Vec<String>> = (0..d.block.len())
        .map(|i| {
            let m = |x: &DepthMetrics| [f(x.cosine), f(x.angular), f(x.rel_l2)];
            let mut r = vec![i.to_string()];
            r.extend(m(&d.block[i]));
            r.push(f(d.attn[i].cosine));
            r.push(f(d.mlp[i].cosine));
            if let Some(sh) = sh {
                r.push(f(sh.leave_one_out.block[i]));
                r.push(
                    sh.monte_carlo
                        .as_ref()
                        .map_or("—".into(), |m| f(m.block[i])),
                );
            }
            r
        })
        .collect();
    let mut header = vec![
        "layer",
        "block cos",
        "block ang",
        "block rel L2",
        "attn cos",
        "mlp cos",
    ];
    if sh.is_some() {
        header.extend(["block LOO", "block Shapley"]);
    }
    table(&header, &rows);
    let families = [
        ("blocks", whittle::prune::depth::Family::Block),
        ("attention", whittle::prune::depth::Family::Attn),
        ("MLP", whittle::prune::depth::Family::Mlp),
    ];
    for (name, family) in families {
        for metric in DepthMetric::ALL {
            if let Ok(r) = whittle::prune::depth::ranking(s, family, metric) {
                let layers: Vec<String> = r
                    .iter()
                    .take(6)
                    .map(|(u, _)| u.layer().to_string())
                    .collect();
                println!(
                    "least important {name} by {}: {}",
                    metric.name(),
                    layers.join(", ")
                );
            }
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct PruneArgs {
    /// Scores written by `whittle importance` for this model.
    #[arg(long)]
    pub scores: PathBuf,
    /// Hidden size to keep (embedding channels).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP width to keep in every layer.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Query heads to keep in each KV group.
    #[arg(long)]
    pub heads_per_group: Option<usize>,
    /// Remove this many blocks, the least important by --metric.
    #[arg(long, default_value_t = 0)]
    pub drop_layers: usize,
    /// Remove these blocks (0-based).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Remove this many attention sublayers.
    #[arg(long, default_value_t = 0)]
    pub drop_attn: usize,
    /// Remove this many MLP sublayers.
    #[arg(long, default_value_t = 0)]
    pub drop_mlp: usize,
    /// cosine, angular, rel_l1, rel_l2, loo or shapley (the last two need Shapley scores).
    #[arg(long, default_value = "cosine")]
    pub metric: String,
    /// What replaces removed units: none, bias, linear or lowrank:R (fitted on the
    /// calibration windows).
    #[arg(long, default_value = "none")]
    pub emulate: String,
    /// Instead of widths and depth: a parameter budget (e.g. 90M); uniform candidates under it
    /// are scored by KL divergence to the model on calibration windows drawn with seed + 1
    /// (--calib-samples of --calib-len tokens; use a few hundred tokens each) and the best
    /// is kept.
    #[arg(long, conflicts_with_all = ["hidden", "ffn", "heads_per_group", "drop_layers",
        "layers", "drop_attn", "drop_mlp"])]
    pub target_params: Option<String>,
    /// Candidates scored in --target-params mode (the largest under the budget).
    #[arg(long, default_value_t = 8)]
    pub candidates: usize,
    #[command(flatten)]
    pub job: JobArgs,
}

/// `90M`, `1.2B`, `500k` or a plain count.
fn parse_count(s: &str) -> Result<usize> {
    let (num, mult) = match s.trim().chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('b' | 'B') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not a parameter count (e.g. 90M, 1.2B)"))?;
    anyhow::ensure!(v > 0.0, "the parameter budget must be positive");
    Ok((v * mult) as usize)
}

pub fn prune(model: Option<&str>, a: &PruneArgs) -> Result<()> {
    if let Some(t) = &a.target_params {
        return prune_to_budget(model, a, parse_count(t)?);
    }
    let scores = Scores::load(&a.scores)?;
    let spec = PruneSpec {
        width: WidthTarget {
            hidden: a.hidden,
            ffn: a.ffn,
            heads_per_group: a.heads_per_group,
        },
        units: a.layers.iter().map(|&i| Unit::Block(i)).collect(),
        drop_blocks: a.drop_layers,
        drop_attn: a.drop_attn,
        drop_mlp: a.drop_mlp,
        metric: DepthMetric::parse(&a.metric)?,
        emulate: EmulateKind::parse(&a.emulate)?,
    };
    anyhow::ensure!(
        !spec.width.is_empty() || !whittle::prune::units_to_remove(&scores, &spec)?.is_empty(),
        "nothing to prune: give --hidden, --ffn, --heads-per-group, --drop-layers, --layers, \
         --drop-attn or --drop-mlp"
    );
    let removed = whittle::prune::units_to_remove(&scores, &spec)?;
    let stage = Stage::Prune {
        scores: a.scores.clone(),
        hidden: a.hidden,
        ffn: a.ffn,
        heads_per_group: a.heads_per_group,
        layers: a.layers.clone(),
        drop_layers: a.drop_layers,
        drop_attn: a.drop_attn,
        drop_mlp: a.drop_mlp,
        metric: a.metric.clone(),
        emulate: a.emulate.clone(),
    };
    let what = format!("prune {}", spec.describe());
    let settings = json!({"spec": spec.describe(), "scores": a.scores, "removed": removed});
    let mut report = None;
    crate::compress::run(
        model,
        &a.job,
        &Recipe::single(a.job.calib.spec(), stage),
        &what,
        false,
        spec.emulate != EmulateKind::None,
        settings,
        &mut |m, windows, p| {
            report = Some(whittle::prune::prune_model(m, &scores, &spec, windows, p)?);
            Ok(Vec::new())
        },
    )?;
    if let Some(r) = report {
        print_removed(&r);
    }
    Ok(())
}

fn print_removed(r: &whittle::prune::PruneReport) {
    let rows: Vec<Vec<String>> = r
        .removed
        .iter()
        .map(|(u, v)| {
            vec![
                u.to_string(),
                v.map_or("named".into(), |v| format!("{v:.5}")),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(&["removed", "importance"], &rows);
    }
    println!(
        "parameters {:.2} M -> {:.2} M ({:.1} %), {} layers, hidden {}",
        r.params_before as f64 / 1e6,
        r.params_after as f64 / 1e6,
        100.0 * r.params_after as f64 / r.params_before as f64,
        r.layers_after,
        r.hidden_after
    );
}

/// `--target-params`: the search picks widths and depth on calibration windows drawn with
/// seed + 1 (held out from the windows the scores were computed on), then the chosen widths
/// are applied and recorded like explicit ones.
fn prune_to_budget(model: Option<&str>, a: &PruneArgs, budget: usize) -> Result<()> {
    let scores = Scores::load(&a.scores)?;
    let metric = DepthMetric::parse(&a.metric)?;
    let whittle::io::resolve::Loaded {
        model: m,
        tokenizer,
        ..
    } = crate::commands::load(model)?;
    let held_out = a.job.calib.with_seed_after();
    let ids = crate::compress::calibration_ids(&tokenizer, &held_out, true)?;
    let windows = crate::compress::calibration_windows(&ids, &held_out)?;
    let pb = progress(0, "candidates");
    let cands = whittle::prune::search::search(
        &m,
        &scores,
        budget,
        a.candidates,
        metric,
        &windows,
        &mut advance(&pb),
    )?;
    pb.finish_and_clear();
    drop(m);
    print_candidates(&cands);
    let best = cands[0];
    println!(
        "kept: hidden {}, ffn {}, {} heads per group, {} blocks dropped ({:.2} M parameters)",
        best.hidden,
        best.ffn,
        best.heads_per_group,
        best.drop_blocks,
        best.params as f64 / 1e6
    );
    let chosen = PruneArgs {
        hidden: Some(best.hidden),
        ffn: Some(best.ffn),
        heads_per_group: Some(best.heads_per_group),
        drop_layers: best.drop_blocks,
        target_params: None,
        ..a.clone()
    };
    prune(model, &chosen)
}

fn print_candidates(c: &[whittle::prune::search::Candidate]) {
    let rows: Vec<Vec<String>> = c
        .iter()
        .map(|c| {
            vec![
                c.hidden.to_string(),
                c.ffn.to_string(),
                c.heads_per_group.to_string(),
                c.drop_blocks.to_string(),
                format!("{:.2}", c.params as f64 / 1e6),
                c.kl.map_or("—".into(), |k| format!("{k:.4}")),
            ]
        })
        .collect();
    table(
        &[
            "hidden",
            "ffn",
            "heads/group",
            "blocks dropped",
            "params (M)",
            "KL to dense",
        ],
        &rows,
    );
}
