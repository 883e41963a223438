//! Structured pruning: remove whole heads, neurons, hidden channels, blocks or sublayers, so that
//! every product of the forward pass gets smaller (sparsity and quantization only shrink the
//! file). Minitron's width and depth pruning (arXiv 2407.14679, 2408.11796) and the block /
//! sublayer importance, Shapley estimates and emulated updates of "A deeper look at depth
//! pruning of LLMs" (arXiv 2407.16286).
//!
//! - [`importance`]: one calibration pass → width scores and static depth metrics;
//! - [`shapley`]: leave-one-out and Monte-Carlo values of blocks and sublayers;
//! - [`width`]: keep the top-scored heads (within each KV group), neurons and channels;
//! - [`depth`]: remove blocks or sublayers, optionally replaced by [`emulate`]d updates.
//!
//! The result is the same [`Model`] with other widths; [`Model::irregularity`] says whether it
//! is still a plain Llama that other runtimes load.

pub mod depth;
pub mod emulate;
pub mod importance;
pub mod search;
pub mod shapley;
pub mod stage;
pub mod width;

use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};

/// A unit of depth pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "unit", content = "layer")]
pub enum Unit {
    Block(usize),
    Attn(usize),
    Mlp(usize),
}

impl Unit {
    pub fn layer(self) -> usize {
        match self {
            Unit::Block(i) | Unit::Attn(i) | Unit::Mlp(i) => i,
        }
    }
    pub(crate) fn has_attn(self) -> bool {
        matches!(self, Unit::Block(_) | Unit::Attn(_))
    }
    pub(crate) fn has_mlp(self) -> bool {
        matches!(self, Unit::Block(_) | Unit::Mlp(_))
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Block(i) => write!(f, "block {i}"),
            Unit::Attn(i) => write!(f, "attention of layer {i}"),
            Unit::Mlp(i) => write!(f, "MLP of layer {i}"),
        }
    }
}

/// Which depth metric ranks units for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthMetric {
    Cosine,
    Angular,
    RelL1,
    RelL2,
    /// Leave-one-out loss increase.
    Loo,
    /// Monte-Carlo Shapley estimate.
    Shapley,
}

impl DepthMetric {
    pub const ALL: [DepthMetric; 6] = [
        DepthMetric::Cosine,
        DepthMetric::Angular,
        DepthMetric::RelL1,
        DepthMetric::RelL2,
        DepthMetric::Loo,
        DepthMetric::Shapley,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DepthMetric::Cosine => "cosine",
            DepthMetric::Angular => "angular",
            DepthMetric::RelL1 => "rel_l1",
            DepthMetric::RelL2 => "rel_l2",
            DepthMetric::Loo => "loo",
            DepthMetric::Shapley => "shapley",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown depth metric '{s}' (known: {})",
                    Self::ALL.map(Self::name).join(", ")
                ))
            })
    }
}

/// One pruning run: target widths, then units to remove (named, or the least important by a
/// metric), and what stands in for them.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneSpec {
    pub width: width::WidthTarget,
    /// Units named explicitly (`--layers`), removed in addition to the ranked ones.
    pub units: Vec<Unit>,
    pub drop_blocks: usize,
    pub drop_attn: usize,
    pub drop_mlp: usize,
    pub metric: DepthMetric,
    pub emulate: emulate::EmulateKind,
}

/// What a pruning run did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Removed units with their importance under the metric (explicitly named ones: `None`).
    pub removed: Vec<(Unit, Option<f64>)>,
    pub params_before: usize,
    pub params_after: usize,
    pub layers_after: usize,
    pub hidden_after: usize,
}

/// Prunes `model` as `spec` says, with `scores` computed on this very model (checked by
/// fingerprint). Widths first, then the ranked units are removed, their emulated updates
/// fitted on `windows` through the width-pruned model. `progress(done, total)` reports the
/// fitting pass.
pub fn prune_model(
    model: &mut Model,
    scores: &importance::Scores,
    spec: &PruneSpec,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PruneReport> {
    scores.fingerprint.check(model, "the importance scores")?;
    let removed = units_to_remove(scores, spec)?;
    let units: Vec<Unit> = removed.iter().map(|(u, _)| *u).collect();
    depth::check_units(model, &units)?;
    let params_before = model.n_params();
    if !spec.width.is_empty() {
        width::prune_width(model, &scores.activation.width, &spec.width)?;
    }
    let emulations = emulate::fit_emulations(model, &units, windows, spec.emulate, progress)?;
    depth::remove_units(model, &units, emulations)?;
    Ok(PruneReport {
        removed,
        params_before,
        params_after: model.n_params(),
        layers_after: model.layers.len(),
        hidden_after: model.config.hidden,
    })
}

/// The units `spec` removes: the named ones (value `None`), then per family the least
/// important ones under `spec.metric` that do not overlap those already chosen.
pub fn units_to_remove(
    scores: &importance::Scores,
    spec: &PruneSpec,
) -> Result<Vec<(Unit, Option<f64>)>> {
    let mut removed: Vec<(Unit, Option<f64>)> = spec.units.iter().map(|u| (*u, None)).collect();
    for (family, k) in [
        (depth::Family::Block, spec.drop_blocks),
        (depth::Family::Attn, spec.drop_attn),
        (depth::Family::Mlp, spec.drop_mlp),
    ] {
        if k == 0 {
            continue;
        }
        let ranked: Vec<_> = depth::ranking(scores, family, spec.metric)?
            .into_iter()
            .filter(|(u, _)| {
                !removed
                    .iter()
                    .any(|(r, _)| r.layer() == u.layer() && overlaps(*r, *u))
            })
            .collect();
        if k > ranked.len() {
            return Err(Error::Invalid(format!(
                "cannot remove {k} {family:?} units: {} are left to remove",
                ranked.len()
            )));
        }
        removed.extend(ranked[..k].iter().map(|(u, v)| (*u, Some(*v))));
    }
    Ok(removed)
}

/// Whether two units of the same layer share a sublayer.
fn overlaps(a: Unit, b: Unit) -> bool {
    a.has_attn() && b.has_attn() || a.has_mlp() && b.has_mlp()
}

impl PruneSpec {
    /// One line: `hidden 448, ffn 1152, -3 blocks (cosine), emulate linear`.
    pub fn describe(&self) -> String {
        let w = &self.width;
        let mut parts: Vec<String> = [
            w.hidden.map(|v| format!("hidden {v}")),
            w.ffn.map(|v| format!("ffn {v}")),
            w.heads_per_group.map(|v| format!("{v} heads per group")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !self.units.is_empty() {
            let names: Vec<String> = self.units.iter().map(|u| u.to_string()).collect();
            parts.push(format!("remove {}", names.join(", ")));
        }
        for (k, what) in [
            (self.drop_blocks, "blocks"),
            (self.drop_attn, "attention sublayers"),
            (self.drop_mlp, "MLP sublayers"),
        ] {
            if k > 0 {
                parts.push(format!("-{k} {what} ({})", self.metric.name()));
            }
        }
        if self.emulate != emulate::EmulateKind::None {
            parts.push(format!("emulate {}", self.emulate.name()));
        }
        parts.join(", ")
    }
}
