//! `prune` as a one-shot method: its settings, recipe stage and command-line arguments.

use super::emulate::EmulateKind;
use super::importance::Scores;
use super::width::WidthTarget;
use super::{prune_model, DepthMetric, PruneSpec, Unit};
use crate::recipe::method::{Context, OneShot, StageReport};
use crate::{Model, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn default_metric() -> String {
    "cosine".into()
}
fn default_emulate() -> String {
    "none".into()
}

/// Structured pruning from stored scores: hidden channels, MLP neurons, query heads per KV
/// group, whole blocks or attention / MLP sublayers (optionally replaced by emulated updates
/// fitted on calibration data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Prune {
    /// Scores written by `whittle importance` for this model.
    #[cfg_attr(feature = "cli", arg(long))]
    pub scores: PathBuf,
    /// Hidden size to keep (embedding channels).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// MLP width to keep in every layer.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn: Option<usize>,
    /// Query heads to keep in each KV group.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads_per_group: Option<usize>,
    /// Remove these blocks (0-based).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// Remove this many blocks, the least important by --metric.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    #[serde(default)]
    pub drop_layers: usize,
    /// Remove this many attention sublayers.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    #[serde(default)]
    pub drop_attn: usize,
    /// Remove this many MLP sublayers.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    #[serde(default)]
    pub drop_mlp: usize,
    /// cosine, angular, rel_l1, rel_l2, loo or shapley (the last two need Shapley scores).
    #[cfg_attr(feature = "cli", arg(long, default_value = "cosine"))]
    #[serde(default = "default_metric")]
    pub metric: String,
    /// What replaces removed units: none, bias, linear or lowrank:R (fitted on the
    /// calibration windows).
    #[cfg_attr(feature = "cli", arg(long, default_value = "none"))]
    #[serde(default = "default_emulate")]
    pub emulate: String,
}

impl Prune {
    pub fn spec(&self) -> Result<PruneSpec> {
        Ok(PruneSpec {
            width: WidthTarget {
                hidden: self.hidden,
                ffn: self.ffn,
                heads_per_group: self.heads_per_group,
            },
            units: self.layers.iter().map(|&i| Unit::Block(i)).collect(),
            drop_blocks: self.drop_layers,
            drop_attn: self.drop_attn,
            drop_mlp: self.drop_mlp,
            metric: DepthMetric::parse(&self.metric)?,
            emulate: EmulateKind::parse(&self.emulate)?,
        })
    }
}

impl OneShot for Prune {
    fn describe(&self) -> String {
        match self.spec() {
            Ok(s) => format!("prune {}", s.describe()),
            Err(_) => "prune".into(),
        }
    }
    fn check(&self) -> Result<()> {
        self.spec().map(|_| ())
    }
    fn needs_calibration(&self) -> bool {
        self.spec().is_ok_and(|s| s.emulate != EmulateKind::None)
    }
    fn changes_shapes(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport> {
        let spec = self.spec()?;
        let scores = Scores::load(&self.scores)?;
        let r = prune_model(model, &scores, &spec, cx.windows, cx.progress)?;
        let mut notes: Vec<String> = r
            .removed
            .iter()
            .map(|(u, v)| match v {
                Some(v) => format!("removed {u} (importance {v:.5})"),
                None => format!("removed {u}"),
            })
            .collect();
        notes.push(format!(
            "parameters {:.2} M -> {:.2} M ({:.1} %), {} layers, hidden {}",
            r.params_before as f64 / 1e6,
            r.params_after as f64 / 1e6,
            100.0 * r.params_after as f64 / r.params_before as f64,
            r.layers_after,
            r.hidden_after
        ));
        Ok(StageReport {
            linears: Vec::new(),
            notes,
            details: serde_json::to_value(&r).unwrap_or_default(),
        })
    }
}
