//! `whittle plot`: training curves of `whittle train`, `distill` and `sparsify --method maskllm`
//! runs (loss and validation perplexity against tokens seen), one line per run, as SVG, with
//! reference perplexities as horizontal lines (e.g. the one-shot method a run should beat); and
//! of `vision distill` runs (each target's loss against the step, one line per run).

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use whittle::train::trainer::LogRow;

/// Whether `dir` holds a `whittle vision distill` run (its settings name a student ViT).
fn is_vision_run(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("checkpoint/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|s| s["config"]["student"].is_object())
}

/// A run's name (its folder), log, and validation perplexity before its first step when the run
/// recorded one (`start.json`: a MaskLLM run's seeded mask).
fn read_log(dir: &Path) -> Result<(String, Vec<LogRow>, Option<f64>)> {
    let path = dir.join("checkpoint/state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let state: serde_json::Value = serde_json::from_str(&text)?;
    let log: Vec<LogRow> = serde_json::from_value(state["log"].clone())?;
    let name = dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let start = std::fs::read_to_string(dir.join("start.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["val_ppl"].as_f64());
    Ok((name, log, start))
}

/// Parses `--reference LABEL=PPL`.
pub fn parse_reference(s: &str) -> Result<(String, f64)> {
    let (label, v) = s
        .rsplit_once('=')
        .with_context(|| format!("--reference '{s}': expected LABEL=PPL"))?;
    let v: f64 =
        v.parse().ok().filter(|v: &f64| *v > 0.0).with_context(|| {
            format!("--reference '{s}': the perplexity must be a positive number")
        })?;
    Ok((label.to_string(), v))
}

/// Exponential moving average (the per-step loss is noisy).
fn smooth(v: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut acc = None;
    v.iter()
        .map(|&(x, y)| {
            let s = acc.map_or(y, |a: f64| a + alpha * (y - a));
            acc = Some(s);
            (x, s)
        })
        .collect()
}

pub fn curves(runs: &[PathBuf], references: &[String], out: &Path) -> Result<()> {
    if runs.iter().any(|r| is_vision_run(r)) {
        return vision_curves(runs, out);
    }
    let logs: Vec<(String, Vec<LogRow>, Option<f64>)> =
        runs.iter().map(|r| read_log(r)).collect::<Result<_>>()?;
    let references: Vec<(String, f64)> = references
        .iter()
        .map(|r| parse_reference(r))
        .collect::<Result<_>>()?;
    let series = |f: &dyn Fn(&LogRow) -> Option<f64>, start: bool| {
        logs.iter()
            .map(|(n, log, first)| {
                let first = first.filter(|_| start).map(|p| (0.0, p.ln()));
                let pts = first
                    .into_iter()
                    .chain(
                        log.iter()
                            .filter_map(|r| f(r).map(|y| (r.tokens as f64 / 1e6, y))),
                    )
                    .collect();
                (n.clone(), pts)
            })
            .collect::<Vec<(String, Vec<(f64, f64)>)>>()
    };
    let loss: Vec<_> = series(&|r| Some(r.loss), false)
        .into_iter()
        .map(|(n, p)| (n, smooth(&p, 0.05)))
        .collect();
    let mut ppl = series(&|r| r.val_ppl.map(f64::ln), true);
    // A reference is a flat line across the runs' token range.
    let x1 = ppl
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1e-3, f64::max);
    for (label, v) in &references {
        ppl.push((label.clone(), vec![(0.0, v.ln()), (x1, v.ln())]));
    }
    let root = SVGBackend::new(out, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    for (area, (title, data)) in panels.iter().zip([
        ("training loss (EMA 0.05)", &loss),
        ("validation log-perplexity", &ppl),
    ]) {
        panel(area, title, "million tokens", data)?;
    }
    root.present()?;
    println!("wrote {}", out.display());
    Ok(())
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// One chart: a line per series, a legend; nothing when there are no points.
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    data: &Series,
) -> Result<()> {
    let pts = data.iter().flat_map(|(_, p)| p.iter());
    let (x1, lo, hi) = pts.fold((0f64, f64::MAX, f64::MIN), |(x, lo, hi), &(a, b)| {
        (x.max(a), lo.min(b), hi.max(b))
    });
    if lo > hi {
        return Ok(());
    }
    let pad = 0.02 * (hi - lo).abs().max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..x1.max(1e-3), lo - pad..hi + pad)?;
    chart.configure_mesh().x_desc(x_desc).draw()?;
    for (i, (name, p)) in data.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Vision distillation runs (`whittle vision distill`): one panel per target (a teacher's
/// summary or per-patch features), a line per run (e.g. one per normaliser), log10 of the
/// target's loss (EMA 0.05) against the step.
pub fn vision_curves(runs: &[PathBuf], out: &Path) -> Result<()> {
    let mut per_target: Vec<(String, Series)> = Vec::new();
    for dir in runs {
        let path = dir.join("checkpoint/state.json");
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        let targets: Vec<String> = serde_json::from_value(state["config"]["teachers"].clone())?;
        let log: Vec<whittle::vision::distill::StepLog> =
            serde_json::from_value(state["log"].clone())?;
        let run = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        for (t, target) in targets.iter().enumerate() {
            let pts: Vec<(f64, f64)> = log
                .iter()
                .filter_map(|r| {
                    r.teacher_loss
                        .get(t)
                        .map(|l| (r.step as f64, l.max(1e-12).log10()))
                })
                .collect();
            let curve = (run.clone(), smooth(&pts, 0.05));
            match per_target.iter_mut().find(|(n, _)| n == target) {
                Some((_, series)) => series.push(curve),
                None => per_target.push((target.clone(), vec![curve])),
            }
        }
    }
    if per_target.is_empty() {
        anyhow::bail!("no vision distillation run among the given folders");
    }
    let root = SVGBackend::new(out, (520 * per_target.len() as u32, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, per_target.len()));
    for (area, (target, series)) in panels.iter().zip(&per_target) {
        panel(
            area,
            &format!("{target}: log10 loss (EMA 0.05)"),
            "step",
            series,
        )?;
    }
    root.present()?;
    println!("wrote {}", out.display());
    Ok(())
}

/// One sweep entry as `tools/sweep.py` writes it to `results.json`.
#[derive(serde::Deserialize)]
struct SweepRow {
    label: String,
    status: String,
    ppl: Option<f64>,
    size_bytes: Option<f64>,
    decode_tok_s: Option<f64>,
    #[serde(default)]
    pareto: Option<bool>,
}

/// The Pareto plot of a recipe sweep: perplexity against weight size, one labelled point per
/// finished entry (decode speed in the label when measured), the front joined by a line.
pub fn pareto(results: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(results).with_context(|| format!("{}", results.display()))?;
    let rows: Vec<SweepRow> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a sweep's results.json", results.display()))?;
    let pts: Vec<(f64, f64, &SweepRow)> = rows
        .iter()
        .filter(|r| r.status == "done")
        .filter_map(|r| Some((r.size_bytes? / 1e6, r.ppl?, r)))
        .collect();
    anyhow::ensure!(
        !pts.is_empty(),
        "{}: no finished entry to plot",
        results.display()
    );
    let (x1, lo, hi) = pts
        .iter()
        .fold((0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
            (x.max(p.0), lo.min(p.1), hi.max(p.1))
        });
    let root = SVGBackend::new(out, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("sweep: perplexity against weight size", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x1 * 1.15, (lo * 0.9)..(hi * 1.1))?;
    chart
        .configure_mesh()
        .x_desc("weights on disk (MB)")
        .y_desc("perplexity")
        .draw()?;
    let mut front: Vec<(f64, f64)> = pts
        .iter()
        .filter(|p| p.2.pareto == Some(true))
        .map(|p| (p.0, p.1))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart.draw_series(LineSeries::new(front, RED.stroke_width(2)))?;
    chart.draw_series(pts.iter().map(|&(x, y, r)| {
        let color = if r.pareto == Some(true) { RED } else { BLUE };
        let speed = r
            .decode_tok_s
            .map_or(String::new(), |s| format!(", {s:.0} tok/s"));
        EmptyElement::at((x, y))
            + Circle::new((0, 0), 4, color.filled())
            + Text::new(format!("{}{speed}", r.label), (6, -12), ("sans-serif", 12))
    }))?;
    root.present()?;
    println!("wrote {}", out.display());
    Ok(())
}
