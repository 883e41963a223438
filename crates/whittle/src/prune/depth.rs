//! Depth pruning: rank blocks or sublayers by a stored metric and remove the least important
//! ones, each either gone (the residual stream passes through) or replaced by an emulated
//! update ([`super::emulate`]). A block removed without emulation leaves the layer list, so the
//! result is still a plain Llama with fewer layers; a removed sublayer (or an emulated block)
//! leaves a layer of another shape, which whittle's own format keeps.

use super::importance::{DepthMetrics, Scores};
use super::{DepthMetric, Unit};
use crate::model::Emulation;
use crate::{Error, Model, Result};

/// Which kind of unit a ranking covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Block,
    Attn,
    Mlp,
}

impl Family {
    fn unit(self, i: usize) -> Unit {
        match self {
            Family::Block => Unit::Block(i),
            Family::Attn => Unit::Attn(i),
            Family::Mlp => Unit::Mlp(i),
        }
    }
}

fn static_metric(m: &DepthMetrics, metric: DepthMetric) -> f64 {
    match metric {
        DepthMetric::Cosine => m.cosine,
        DepthMetric::Angular => m.angular,
        DepthMetric::RelL1 => m.rel_l1,
        _ => m.rel_l2,
    }
}

/// The units of `family` with their importance under `metric`, least important first (ties:
/// lower layer first). Units already removed from the model the scores describe are skipped.
pub fn ranking(scores: &Scores, family: Family, metric: DepthMetric) -> Result<Vec<(Unit, f64)>> {
    let d = &scores.activation.depth;
    let n = d.block.len();
    let shapley = || {
        scores.shapley.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "the scores hold no Shapley estimates; run `whittle importance` with \
                 --shapley-samples to rank by '{}'",
                metric.name()
            ))
        })
    };
    let value = |i: usize| -> Result<f64> {
        let u = family.unit(i);
        Ok(match metric {
            DepthMetric::Loo => shapley()?.leave_one_out.get(u),
            DepthMetric::Shapley => shapley()?
                .monte_carlo
                .as_ref()
                .ok_or_else(|| {
                    Error::Invalid(
                        "the scores hold leave-one-out values only (--shapley-samples 0)".into(),
                    )
                })?
                .get(u),
            _ => static_metric(
                match family {
                    Family::Block => &d.block[i],
                    Family::Attn => &d.attn[i],
                    Family::Mlp => &d.mlp[i],
                },
                metric,
            ),
        })
    };
    let layers = &scores.fingerprint.layers;
    let present = |i: usize| match family {
        Family::Block => true,
        Family::Attn => layers[i].attn.is_some(),
        Family::Mlp => layers[i].mlp.is_some(),
    };
    let mut v: Vec<(Unit, f64)> = (0..n)
        .filter(|&i| present(i))
        .map(|i| Ok((family.unit(i), value(i)?)))
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(v)
}

/// Checks that `units` name existing, distinct parts of `model` that can be removed.
pub fn check_units(model: &Model, units: &[Unit]) -> Result<()> {
    let n = model.layers.len();
    for (k, u) in units.iter().enumerate() {
        let i = u.layer();
        let Some(l) = model.layers.get(i) else {
            return Err(Error::Invalid(format!(
                "{u}: the model has {n} layers (0..{})",
                n - 1
            )));
        };
        if l.ssm.is_some() {
            return Err(Error::Invalid(format!(
                "{u}: removing units of SSM or hybrid layers is not supported"
            )));
        }
        let missing = match u {
            Unit::Attn(_) => l.attn.is_none(),
            Unit::Mlp(_) => l.mlp.is_none(),
            Unit::Block(_) => false,
        };
        if missing {
            return Err(Error::Invalid(format!("{u} was already removed")));
        }
        if u.has_attn() && l.attn.is_some() && model.kv_is_shared(i) {
            return Err(Error::Invalid(format!(
                "{u}: later layers read this layer's K/V"
            )));
        }
        if units[..k]
            .iter()
            .any(|o| o.layer() == i && (o.has_attn() && u.has_attn() || o.has_mlp() && u.has_mlp()))
        {
            return Err(Error::Invalid(format!("{u} is named twice")));
        }
    }
    if units.iter().filter(|u| matches!(u, Unit::Block(_))).count() >= n {
        return Err(Error::Invalid(format!(
            "removing {} blocks leaves none of {n}",
            units.len()
        )));
    }
    Ok(())
}

/// Removes `units` from `model`; `emulations` (empty, or one per unit in the same order) stand
/// in for them. Layers left with nothing in them are dropped.
/// Inputs are checked before anything changes.
pub fn remove_units(model: &mut Model, units: &[Unit], emulations: Vec<Emulation>) -> Result<()> {
    check_units(model, units)?;
    if !emulations.is_empty() && emulations.len() != units.len() {
        return Err(Error::Invalid(format!(
            "{} emulated updates for {} units",
            emulations.len(),
            units.len()
        )));
    }
    let mut emulations = emulations.into_iter().map(Some).collect::<Vec<_>>();
    emulations.resize_with(units.len(), || None);
    for (u, e) in units.iter().zip(emulations) {
        let l = &mut model.layers[u.layer()];
        if u.has_attn() {
            l.attn = None;
        }
        if u.has_mlp() {
            l.mlp = None;
        }
        match u {
            Unit::Block(_) | Unit::Attn(_) => l.emulated.mixer = e,
            Unit::Mlp(_) => l.emulated.mlp = e,
        }
    }
    model.layers.retain(|l| {
        l.attn.is_some() || l.ssm.is_some() || l.mlp.is_some() || !l.emulated.is_empty()
    });
    model.revalidate()
}
