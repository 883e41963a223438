//! `whittle importance` (scores from one calibration pass, optional Shapley estimates) and
//! `whittle prune` (width and depth pruning from stored scores).

use crate::compress::{CalibArgs, OneShotArgs};
use crate::report::{advance, progress, table, write_json};
use anyhow::{Context, Result};
use std::path::PathBuf;
use whittle::prune::importance::{activation_scores, DepthMetrics, Scores};
use whittle::prune::shapley::shapley;
use whittle::prune::DepthMetric;
use whittle::recipe::Prune;

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
    let pb = match crate::ranks::is_root() {
        true => progress(windows.len(), "importance"),
        false => indicatif::ProgressBar::hidden(),
    };
    // With --distributed the ranks split the windows (Shapley, below, runs whole on each).
    let activation = whittle::dist::scoped(crate::ranks::comm(), || {
        activation_scores(&model, &windows, &mut advance(&pb))
    })?;
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
    if !crate::ranks::is_root() {
        return Ok(());
    }
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

/// `prune --target-params`: choose widths and depth under a budget instead of naming them.
#[derive(clap::Args, Clone)]
pub struct SearchArgs {
    /// A parameter budget (e.g. 90M): uniform candidates under it are scored by KL divergence
    /// to the model on calibration windows drawn with seed + 1 (--calib-samples of
    /// --calib-len tokens; a few hundred tokens each suffice) and the best is kept.
    #[arg(long, conflicts_with_all = ["hidden", "ffn", "heads_per_group", "drop_layers",
        "layers", "drop_attn", "drop_mlp"])]
    pub target_params: Option<String>,
    /// Candidates scored in --target-params mode (the largest under the budget).
    #[arg(long, default_value_t = 8)]
    pub candidates: usize,
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

pub fn prune(a: &OneShotArgs<Prune>, search: &SearchArgs) -> Result<()> {
    match &search.target_params {
        Some(t) => prune_to_budget(a, search, parse_count(t)?),
        None => crate::compress::one_shot(a, None, None),
    }
}

/// `--target-params`: the search picks widths and depth on calibration windows drawn with
/// seed + 1 (held out from the windows the scores were computed on), then the chosen widths
/// are applied and recorded like explicit ones.
fn prune_to_budget(a: &OneShotArgs<Prune>, search: &SearchArgs, budget: usize) -> Result<()> {
    let scores = Scores::load(&a.stage.scores)?;
    let metric = DepthMetric::parse(&a.stage.metric)?;
    let model = a.model.model.as_deref();
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
        search.candidates,
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
    let mut chosen = a.clone();
    chosen.stage = Prune {
        hidden: Some(best.hidden),
        ffn: Some(best.ffn),
        heads_per_group: Some(best.heads_per_group),
        drop_layers: best.drop_blocks,
        ..a.stage.clone()
    };
    crate::compress::one_shot(&chosen, None, None)
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
