//! Recipes: several one-shot stages applied in order to one model, e.g.
//! SparseGPT 2:4 → GPTQ int4 → EoRA r64, written as TOML:
//!
//! ```toml
//! [calib]                      # optional; these are the defaults
//! file = "../shared/reference/wikitext2-valid.txt"
//! samples = 128
//! len = 2048
//! seed = 0
//!
//! [[stage]]
//! kind = "sparsify"            # method: magnitude | wanda | sparsegpt; pattern: "2:4", "50%"
//! method = "sparsegpt"
//! pattern = "2:4"
//!
//! [[stage]]
//! kind = "quantize"            # method: rtn | gptq; bits, group_size, sym, act_order
//! method = "gptq"
//! bits = 4
//! group_size = 128
//!
//! [[stage]]
//! kind = "compensate"          # method: svd | eora; rank (or rank_budget), fold
//! method = "eora"
//! rank = 64                    # or rank_budget = 5000000 (adapter parameters in total)
//! ```
//!
//! A `prune` stage (structured pruning, see [`crate::prune`]) reads importance scores that
//! `whittle importance` computed on the model as it is at that stage:
//!
//! ```toml
//! [[stage]]
//! kind = "prune"
//! scores = "scores.json"
//! drop_layers = 3              # also: layers = [12, 13], drop_attn, drop_mlp,
//! metric = "cosine"            #   hidden, ffn, heads_per_group
//! emulate = "lowrank:64"       # none | bias | linear | lowrank:R
//! ```
//!
//! Every stage may name `targets` (linear names or suffixes). Compensation measures against the
//! model as it was before the first stage, or after the last prune stage before it. A quantized base keeps its mask when it was sparse.

use crate::calib::sequential::LinearReport;
use crate::lowrank::{compensate_choice, LowRankMethod, RankChoice};
use crate::prune::emulate::EmulateKind;
use crate::prune::importance::Scores;
use crate::prune::width::WidthTarget;
use crate::prune::{prune_model, DepthMetric, PruneSpec, Unit};
use crate::quant::{quantize_model, QuantConfig, QuantMethod};
use crate::sparsity::{sparsify_model, Pattern, SparsityMethod};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CalibSpec {
    #[serde(default = "default_calib_file")]
    pub file: PathBuf,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_len")]
    pub len: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_calib_file() -> PathBuf {
    PathBuf::from("../shared/reference/wikitext2-valid.txt")
}
fn default_samples() -> usize {
    128
}
fn default_len() -> usize {
    2048
}
fn default_bits() -> u8 {
    4
}
fn default_group() -> usize {
    128
}
/// Adapter rank of a `compensate` stage that names neither `rank` nor `rank_budget`.
pub const DEFAULT_RANK: usize = 64;
fn default_rank() -> usize {
    DEFAULT_RANK
}

fn default_metric() -> String {
    "cosine".into()
}
fn default_emulate() -> String {
    "none".into()
}

impl Default for CalibSpec {
    fn default() -> Self {
        CalibSpec {
            file: default_calib_file(),
            samples: default_samples(),
            len: default_len(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Stage {
    Sparsify {
        method: String,
        pattern: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
    },
    Quantize {
        method: String,
        #[serde(default = "default_bits")]
        bits: u8,
        #[serde(default = "default_group")]
        group_size: usize,
        #[serde(default)]
        sym: bool,
        #[serde(default)]
        act_order: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
    },
    Prune {
        scores: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hidden: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ffn: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heads_per_group: Option<usize>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        layers: Vec<usize>,
        #[serde(default)]
        drop_layers: usize,
        #[serde(default)]
        drop_attn: usize,
        #[serde(default)]
        drop_mlp: usize,
        #[serde(default = "default_metric")]
        metric: String,
        #[serde(default = "default_emulate")]
        emulate: String,
    },
    Compensate {
        method: String,
        #[serde(default = "default_rank")]
        rank: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rank_budget: Option<usize>,
        #[serde(default)]
        fold: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub calib: CalibSpec,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

impl Recipe {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let r: Recipe = toml::from_str(&text).map_err(|e| Error::format(path, e))?;
        if r.stages.is_empty() {
            return Err(Error::format(path, "the recipe has no [[stage]]"));
        }
        r.check().map_err(|e| Error::format(path, e))?;
        Ok(r)
    }

    /// A one-stage recipe: what a single `sparsify`/`quantize`/`compensate` run records as its
    /// provenance, so every run can be replayed with `whittle compress --recipe`.
    pub fn single(calib: CalibSpec, stage: Stage) -> Self {
        Recipe {
            calib,
            stages: vec![stage],
        }
    }

    /// The recipe as TOML text, in the format [`Recipe::from_file`] reads.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid(format!("recipe to TOML: {e}")))
    }

    /// One line per stage of a recipe's TOML text (`sparsify sparsegpt 2:4`); the text itself
    /// when it does not parse (provenance written by another version).
    pub fn describe_toml(text: &str) -> Vec<String> {
        match toml::from_str::<Recipe>(text) {
            Ok(r) => r.stages.iter().map(Stage::describe).collect(),
            Err(_) => vec![text.lines().next().unwrap_or("").to_string()],
        }
    }

    /// Parses every stage's settings up front, so a typo fails before hours of work.
    fn check(&self) -> Result<()> {
        self.stages.iter().try_for_each(|s| s.step().map(|_| ()))
    }

    /// Applies the stages in order; `reference` is the model before the first stage.
    /// `progress(stage, done, total)` reports each stage's layers.
    pub fn run(
        &self,
        model: &mut Model,
        reference: &Model,
        windows: &[&[u32]],
        progress: &mut dyn FnMut(usize, usize, usize),
    ) -> Result<Vec<(String, Vec<LinearReport>)>> {
        let mut out = Vec::new();
        // After a prune stage, compensation measures against the pruned model (the dense one
        // has other shapes).
        let mut pruned: Option<Model> = None;
        for (i, s) in self.stages.iter().enumerate() {
            let p = &mut |d, t| progress(i, d, t);
            let reference = pruned.as_ref().unwrap_or(reference);
            let reports = match s.step()? {
                Step::Sparsify(m, pat, targets) => {
                    sparsify_model(model, windows, m, pat, targets, p)?
                }
                Step::Quantize(m, cfg, targets) => {
                    let w = if m.needs_calibration() { windows } else { &[] };
                    quantize_model(model, w, m, cfg, targets, p)?
                }
                Step::Compensate(m, ranks, fold, targets) => {
                    compensate_choice(model, reference, windows, m, ranks, fold, targets, p)?.0
                }
                Step::Prune(scores, spec) => {
                    let scores = Scores::load(scores)?;
                    let w = if spec.emulate == EmulateKind::None {
                        &[]
                    } else {
                        windows
                    };
                    prune_model(model, &scores, &spec, w, p)?;
                    pruned = Some(model.clone());
                    Vec::new()
                }
            };
            out.push((s.describe(), reports));
        }
        Ok(out)
    }

    /// Whether any stage needs calibration data.
    pub fn needs_calibration(&self) -> bool {
        self.stages.iter().any(|s| match s.step() {
            Ok(Step::Sparsify(m, ..)) => m.needs_calibration(),
            Ok(Step::Quantize(m, ..)) => m.needs_calibration(),
            Ok(Step::Prune(_, spec)) => spec.emulate != EmulateKind::None,
            Ok(Step::Compensate(..)) | Err(_) => true,
        })
    }
}

/// A stage with its settings parsed.
enum Step<'a> {
    Sparsify(SparsityMethod, Pattern, &'a [String]),
    Quantize(QuantMethod, QuantConfig, &'a [String]),
    Compensate(LowRankMethod, RankChoice, bool, &'a [String]),
    Prune(&'a Path, PruneSpec),
}

impl Stage {
    fn step(&self) -> Result<Step<'_>> {
        Ok(match self {
            Stage::Sparsify {
                method,
                pattern,
                targets,
            } => Step::Sparsify(
                SparsityMethod::parse(method)?,
                Pattern::parse(pattern)?,
                targets,
            ),
            Stage::Quantize {
                method,
                bits,
                group_size,
                sym,
                act_order,
                targets,
            } => {
                let cfg = QuantConfig {
                    bits: *bits,
                    group: *group_size,
                    sym: *sym,
                };
                cfg.check("recipe", 32)?;
                Step::Quantize(QuantMethod::parse(method, *act_order)?, cfg, targets)
            }
            Stage::Prune {
                scores,
                hidden,
                ffn,
                heads_per_group,
                layers,
                drop_layers,
                drop_attn,
                drop_mlp,
                metric,
                emulate,
            } => Step::Prune(
                scores,
                PruneSpec {
                    width: WidthTarget {
                        hidden: *hidden,
                        ffn: *ffn,
                        heads_per_group: *heads_per_group,
                    },
                    units: layers.iter().map(|&i| Unit::Block(i)).collect(),
                    drop_blocks: *drop_layers,
                    drop_attn: *drop_attn,
                    drop_mlp: *drop_mlp,
                    metric: DepthMetric::parse(metric)?,
                    emulate: EmulateKind::parse(emulate)?,
                },
            ),
            Stage::Compensate {
                method,
                rank,
                rank_budget,
                fold,
                targets,
            } => {
                if *rank == 0 || *rank_budget == Some(0) {
                    return Err(Error::Invalid(
                        "rank and rank_budget must be positive".into(),
                    ));
                }
                let ranks = rank_budget.map_or(RankChoice::Fixed(*rank), RankChoice::Budget);
                Step::Compensate(LowRankMethod::parse(method)?, ranks, *fold, targets)
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Stage::Sparsify {
                method, pattern, ..
            } => format!("sparsify {method} {pattern}"),
            Stage::Quantize {
                method,
                bits,
                group_size,
                ..
            } => {
                format!("quantize {method} int{bits} g{group_size}")
            }
            Stage::Prune { .. } => match self.step() {
                Ok(Step::Prune(_, spec)) => format!("prune {}", spec.describe()),
                _ => "prune".into(),
            },
            Stage::Compensate {
                method,
                rank_budget: Some(b),
                ..
            } => format!("compensate {method} budget {b}"),
            Stage::Compensate { method, rank, .. } => format!("compensate {method} r{rank}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let r: Recipe = toml::from_str(
            "[[stage]]\nkind = \"sparsify\"\nmethod = \"sparsegpt\"\npattern = \"2:4\"\n\
             [[stage]]\nkind = \"quantize\"\nmethod = \"gptq\"\n\
             [[stage]]\nkind = \"compensate\"\nmethod = \"eora\"\nrank = 16\n",
        )
        .unwrap();
        assert_eq!(r.stages.len(), 3);
        assert_eq!(r.calib.samples, 128);
        r.check().unwrap();
        assert!(r.needs_calibration());
        let bad: Recipe = toml::from_str(
            "[[stage]]\nkind = \"sparsify\"\nmethod = \"wanda\"\npattern = \"5:4\"\n",
        )
        .unwrap();
        assert!(bad.check().is_err());
        assert!(toml::from_str::<Recipe>("[[stage]]\nkind = \"prune\"\n").is_err());
        let p: Recipe = toml::from_str(
            "[[stage]]\nkind = \"prune\"\nscores = \"s.json\"\ndrop_layers = 3\n\
             emulate = \"lowrank:8\"\n",
        )
        .unwrap();
        p.check().unwrap();
        assert_eq!(
            p.stages[0].describe(),
            "prune -3 blocks (cosine), emulate lowrank:8"
        );
        let bad: Recipe =
            toml::from_str("[[stage]]\nkind = \"prune\"\nscores = \"s.json\"\nmetric = \"cos\"\n")
                .unwrap();
        assert!(bad.check().is_err());
    }
}
