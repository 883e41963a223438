//! Adaptive (Shapley-style) importance of blocks and sublayers ("A deeper look at depth pruning
//! of LLMs", arXiv 2407.16286): a unit's value is how much the language-model loss on a held-out
//! slice grows when the unit is missing, measured against subnetworks rather than against each
//! unit alone.
//!
//! - Leave-one-out: `loss(model − u) − loss(model)`.
//! - Monte Carlo: `K` random subnetworks, each missing a random `drop` fraction of the units;
//!   `value(u) = mean loss of the samples without u − mean loss of the samples with u`.
//!
//! A unit is removed by taking its sublayer out of the model for the measurement and putting it
//! back, so no copy of the model is made.

use super::Unit;
use crate::eval::perplexity::windows_nll;
use crate::{Error, Model, Result};
use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

/// Loss increases (nats per token) of every unit, by layer. `None` where not computed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitValues {
    pub block: Vec<f64>,
    pub attn: Vec<f64>,
    pub mlp: Vec<f64>,
}

impl UnitValues {
    fn zeros(n: usize) -> Self {
        UnitValues {
            block: vec![0.0; n],
            attn: vec![0.0; n],
            mlp: vec![0.0; n],
        }
    }

    fn slot(&mut self, u: Unit) -> &mut f64 {
        match u {
            Unit::Block(i) => &mut self.block[i],
            Unit::Attn(i) => &mut self.attn[i],
            Unit::Mlp(i) => &mut self.mlp[i],
        }
    }

    pub fn get(&self, u: Unit) -> f64 {
        match u {
            Unit::Block(i) => self.block[i],
            Unit::Attn(i) => self.attn[i],
            Unit::Mlp(i) => self.mlp[i],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShapleyScores {
    /// Mean loss of the full model on the slice.
    pub base_loss: f64,
    pub tokens: usize,
    pub leave_one_out: UnitValues,
    /// Monte-Carlo estimates (blocks sampled among blocks, sublayers among sublayers).
    pub monte_carlo: Option<UnitValues>,
    pub samples: usize,
    pub drop: f64,
    pub seed: u64,
}

/// Mean next-token loss of `model` with `units` taken out.
pub fn loss_without(model: &mut Model, units: &[Unit], windows: &[&[u32]]) -> Result<f64> {
    let taken = take_units(model, units)?;
    let result = mean_loss(model, windows);
    put_back(model, taken);
    result
}

fn mean_loss(model: &Model, windows: &[&[u32]]) -> Result<f64> {
    let nll = windows_nll(model, windows, &mut |_, _| {})?;
    let n: usize = windows.iter().map(|w| w.len() - 1).sum();
    Ok(nll / n.max(1) as f64)
}

type Taken = Vec<(
    usize,
    Option<crate::model::Attention>,
    Option<crate::model::Mlp>,
)>;

fn take_units(model: &mut Model, units: &[Unit]) -> Result<Taken> {
    super::depth::check_units(model, units)?;
    Ok(units
        .iter()
        .map(|u| {
            let l = &mut model.layers[u.layer()];
            let attn = if u.has_attn() { l.attn.take() } else { None };
            let mlp = if u.has_mlp() { l.mlp.take() } else { None };
            (u.layer(), attn, mlp)
        })
        .collect())
}

fn put_back(model: &mut Model, taken: Taken) {
    for (i, attn, mlp) in taken.into_iter().rev() {
        let l = &mut model.layers[i];
        if attn.is_some() {
            l.attn = attn;
        }
        if mlp.is_some() {
            l.mlp = mlp;
        }
    }
}

/// Leave-one-out and (with `samples > 0`) Monte-Carlo values of every block and sublayer on the
/// slice `windows`. `progress(done, total)` counts loss evaluations.
pub fn shapley(
    model: &mut Model,
    windows: &[&[u32]],
    samples: usize,
    drop: f64,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ShapleyScores> {
    if windows.is_empty() {
        return Err(Error::Invalid(
            "Shapley estimates need at least one window".into(),
        ));
    }
    if !(drop > 0.0 && drop < 1.0) {
        return Err(Error::Invalid(format!(
            "the drop fraction of a Monte-Carlo subnetwork must lie in (0, 1), not {drop}"
        )));
    }
    let n = model.layers.len();
    let layers = &model.layers;
    let families: [Vec<Unit>; 2] = [
        (0..n).map(Unit::Block).collect(),
        (0..n)
            .flat_map(|i| {
                let l = &layers[i];
                [
                    l.attn.is_some().then_some(Unit::Attn(i)),
                    l.mlp.is_some().then_some(Unit::Mlp(i)),
                ]
            })
            .flatten()
            .collect(),
    ];
    let total = 1 + families[0].len() + families[1].len() + 2 * samples;
    let mut done = 0;
    let mut tick = |p: &mut dyn FnMut(usize, usize)| {
        done += 1;
        p(done, total)
    };
    let base = mean_loss(model, windows)?;
    tick(progress);
    let mut loo = UnitValues::zeros(n);
    for u in families.iter().flatten() {
        *loo.slot(*u) = loss_without(model, &[*u], windows)? - base;
        tick(progress);
    }
    let monte_carlo = if samples == 0 {
        None
    } else {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut with = UnitValues::zeros(n);
        let mut without = UnitValues::zeros(n);
        let mut counts = [UnitValues::zeros(n), UnitValues::zeros(n)];
        for family in families.iter().filter(|f| f.len() > 1) {
            let k = ((family.len() as f64 * drop).round() as usize).clamp(1, family.len() - 1);
            for _ in 0..samples {
                let mut order = family.clone();
                order.shuffle(&mut rng);
                let (gone, kept) = order.split_at(k);
                let loss = loss_without(model, gone, windows)?;
                for u in gone {
                    *without.slot(*u) += loss;
                    *counts[0].slot(*u) += 1.0;
                }
                for u in kept {
                    *with.slot(*u) += loss;
                    *counts[1].slot(*u) += 1.0;
                }
                tick(progress);
            }
        }
        let mut v = UnitValues::zeros(n);
        for u in families.iter().flatten() {
            let (a, b) = (counts[0].get(*u), counts[1].get(*u));
            // A unit never (or always) dropped has no estimate: fall back to leave-one-out.
            *v.slot(*u) = if a > 0.0 && b > 0.0 {
                without.get(*u) / a - with.get(*u) / b
            } else {
                loo.get(*u)
            };
        }
        Some(v)
    };
    Ok(ShapleyScores {
        base_loss: base,
        tokens: windows.iter().map(|w| w.len() - 1).sum(),
        leave_one_out: loo,
        monte_carlo,
        samples,
        drop,
        seed,
    })
}
