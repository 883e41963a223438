//! MaskLLM (arXiv 2409.17481): N:M masks learned end to end instead of chosen one-shot. Each
//! group of `m` consecutive inputs of a row holds one logit per candidate mask (the C(m, n)
//! patterns that keep `n`); training samples a soft mask by a Gumbel-softmax over
//! `κ · logits / τ` ([`op::MaskedWeight`]), with the weights frozen (or not), so the LM or
//! distillation loss itself decides which weights a group keeps. A one-shot mask (SparseGPT,
//! Wanda, magnitude) seeds the logits as the paper's prior; the argmax candidate is the mask
//! written out ([`file::LearnedMask`]), a file that also applies to the same model later.
//!
//! The embedding and the output head stay dense, as in the paper: only the layers' linears
//! are masked.

pub mod file;
pub mod op;

pub use file::LearnedMask;

use crate::calib::sequential::targeted;
use crate::model::Model;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Group sizes whose candidate lists stay small enough to hold one logit each (4:8 has 70).
pub const MAX_GROUP: usize = 8;

/// The candidate masks of an N:M pattern: bit `j` of a candidate set = input `j` of the group
/// kept. In increasing numeric order, so candidate indices are stable across runs and files.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub n: usize,
    pub m: usize,
    pub sets: Vec<u32>,
}

impl Candidates {
    pub fn new(n: usize, m: usize) -> Result<Self> {
        if m == 0 || n == 0 || n >= m || m > MAX_GROUP {
            return Err(Error::Invalid(format!(
                "learned masks need an N:M pattern with 0 < N < M ≤ {MAX_GROUP} (one logit per \
                 candidate mask; got {n}:{m})"
            )));
        }
        let sets = (0u32..1 << m)
            .filter(|s| s.count_ones() as usize == n)
            .collect();
        Ok(Candidates { n, m, sets })
    }

    /// Number of candidates (logits per group).
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Whether candidate `k` keeps input `j` of its group.
    #[inline]
    pub fn keeps(&self, k: usize, j: usize) -> bool {
        self.sets[k] >> j & 1 == 1
    }

    /// The candidate that keeps the most of `kept` (bit set of a group's kept inputs; ties: the
    /// lower index), the way a one-shot mask that is not exactly N:M is read as a prior.
    pub fn nearest(&self, kept: u32) -> usize {
        let mut best = 0;
        for (k, s) in self.sets.iter().enumerate() {
            if (s & kept).count_ones() > (self.sets[best] & kept).count_ones() {
                best = k;
            }
        }
        best
    }

    /// The index of the largest logit of each group (ties: the lower index).
    pub fn argmax(&self, logits: &[f32]) -> Vec<u8> {
        logits
            .chunks_exact(self.len())
            .map(|l| {
                let mut best = 0;
                for (k, v) in l.iter().enumerate() {
                    if *v > l[best] {
                        best = k;
                    }
                }
                best as u8
            })
            .collect()
    }
}

/// The settings of a MaskLLM run besides the training loop's own (steps, learning rate, ...):
/// the pattern, the schedules and the regulariser. Part of the trainer's configuration, so a
/// resumed run continues the same schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskLlmConfig {
    /// `"2:4"`.
    pub pattern: String,
    /// Gumbel-softmax temperature, from the first value to the second, linear in progress.
    pub tau: (f64, f64),
    /// Logit scale κ, linear in progress.
    pub kappa: (f64, f64),
    /// λ of the sparse-weight regulariser `− λ_t Σ ‖W ⊙ M‖²`, `λ_t = λ (1 − t/T)`: it rewards
    /// masks that keep large weights.
    pub sparse_reg: f64,
    /// Linears to mask (name suffixes); empty: every linear of every layer.
    #[serde(default)]
    pub targets: Vec<String>,
}

impl Default for MaskLlmConfig {
    /// The paper's defaults (`../shared/design/methods.md`).
    fn default() -> Self {
        MaskLlmConfig {
            pattern: "2:4".into(),
            tau: (4.0, 0.05),
            kappa: (100.0, 500.0),
            sparse_reg: 1e-5,
            targets: Vec::new(),
        }
    }
}

/// `(τ, κ, λ)` at one point of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub tau: f32,
    pub kappa: f32,
    pub reg: f32,
}

impl MaskLlmConfig {
    pub fn candidates(&self) -> Result<Candidates> {
        match super::Pattern::parse(&self.pattern)? {
            super::Pattern::NM { n, m } => Candidates::new(n, m),
            p => Err(Error::Invalid(format!(
                "learned masks need an N:M pattern, not {p}"
            ))),
        }
    }

    /// Fails on settings no run can use.
    pub fn check(&self) -> Result<()> {
        self.candidates()?;
        let positive = |(a, b): (f64, f64)| a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite();
        if !positive(self.tau) || !positive(self.kappa) {
            return Err(Error::Invalid(format!(
                "τ ({} → {}) and κ ({} → {}) must be positive",
                self.tau.0, self.tau.1, self.kappa.0, self.kappa.1
            )));
        }
        if !(self.sparse_reg >= 0.0 && self.sparse_reg.is_finite()) {
            return Err(Error::Invalid(format!(
                "the sparse-weight regulariser must be ≥ 0, not {}",
                self.sparse_reg
            )));
        }
        Ok(())
    }

    /// The schedules after `step` of `steps` optimiser steps.
    pub fn at(&self, step: u64, steps: u64) -> Schedule {
        let t = step as f64 / steps.max(1) as f64;
        let lerp = |(a, b): (f64, f64)| (a + (b - a) * t) as f32;
        Schedule {
            tau: lerp(self.tau),
            kappa: lerp(self.kappa),
            reg: (self.sparse_reg * (1.0 - t)) as f32,
        }
    }
}

/// Parses `"A:B"` (a schedule from A to B) or `"A"` (constant).
pub fn parse_range(s: &str, what: &str) -> Result<(f64, f64)> {
    let bad = || Error::Invalid(format!("--{what} '{s}': expected START:END or a number"));
    let num = |v: &str| v.trim().parse::<f64>().map_err(|_| bad());
    match s.split_once(':') {
        Some((a, b)) => Ok((num(a)?, num(b)?)),
        None => num(s).map(|v| (v, v)),
    }
}

/// The name of the trained logits of linear `name` (`[rows, cols / m, candidates]`).
pub fn logits_name(linear: &str) -> String {
    format!("{linear}.mask_logits")
}

/// The linear whose logits `name` holds, if it names mask logits.
pub fn linear_of(name: &str) -> Option<&str> {
    name.strip_suffix(".mask_logits")
}

/// `(parameter name, rows, cols)` of every linear MaskLLM masks: the layers' linears among
/// `targets`; a width that the group size does not divide is an error.
pub fn masked_linears(
    model: &Model,
    config: &MaskLlmConfig,
) -> Result<Vec<(String, usize, usize)>> {
    let c = config.candidates()?;
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, _, lin) in layer.linears() {
            let full = format!("layers.{i}.{name}");
            if !targeted(&full, &config.targets) {
                continue;
            }
            if !lin.in_features.is_multiple_of(c.m) {
                return Err(Error::Invalid(format!(
                    "{full}: {} inputs are not a multiple of the group size {}",
                    lin.in_features, c.m
                )));
            }
            out.push((full, lin.out_features, lin.in_features));
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid("no linear to mask (check --targets)".into()));
    }
    Ok(out)
}

/// The one-shot mask of `method` (magnitude, Wanda, SparseGPT; `windows` for the latter two)
/// on a copy of `model`, for the linears `config` masks: the prior of a MaskLLM run. Only the
/// mask is kept; SparseGPT's weight update is not (MaskLLM's weights stay the dense ones).
pub fn one_shot_prior(
    model: &Model,
    config: &MaskLlmConfig,
    method: super::SparsityMethod,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LearnedMask> {
    let c = config.candidates()?;
    let linears = masked_linears(model, config)?;
    let mut copy = model.clone();
    let pattern = super::Pattern::NM { n: c.n, m: c.m };
    super::sparsify_model(
        &mut copy,
        windows,
        method,
        pattern,
        &config.targets,
        progress,
    )?;
    Ok(LearnedMask::from_zeros(&copy, &c, &linears))
}

/// Initial logits of one linear: N(0, 0.01) from `seed`, then the prior (when given: the
/// candidate index of each group) as the paper applies it, `logits += (overlap − (n − 1)) ·
/// std(logits) · strength` — the prior's own candidate gains `strength` standard deviations,
/// a candidate sharing one kept input fewer none, and so on down.
pub fn init_logits(
    c: &Candidates,
    groups: usize,
    seed: u64,
    prior: Option<&[u8]>,
    strength: f64,
) -> Result<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let k = c.len();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // Box–Muller: two uniforms give one normal (the second is dropped for simplicity).
    let mut logits: Vec<f32> = (0..groups * k)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
            (0.01 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let Some(prior) = prior else {
        return Ok(logits);
    };
    if prior.len() != groups {
        return Err(Error::Invalid(format!(
            "the prior has {} groups, the linear {groups}",
            prior.len()
        )));
    }
    let mean = logits.iter().map(|v| *v as f64).sum::<f64>() / logits.len() as f64;
    let var = logits
        .iter()
        .map(|v| (*v as f64 - mean).powi(2))
        .sum::<f64>()
        / logits.len() as f64;
    let step = (var.sqrt() * strength) as f32;
    for (l, &p) in logits.chunks_exact_mut(k).zip(prior) {
        let p = *c.sets.get(p as usize).ok_or_else(|| {
            Error::Invalid(format!(
                "prior candidate {p} of a pattern with {k} candidates"
            ))
        })?;
        for (kk, v) in l.iter_mut().enumerate() {
            let overlap = (c.sets[kk] & p).count_ones() as f32;
            *v += (overlap - (c.n as f32 - 1.0)) * step;
        }
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_of_two_four_and_bad_patterns() {
        let c = Candidates::new(2, 4).unwrap();
        assert_eq!(c.sets, vec![0b0011, 0b0101, 0b0110, 0b1001, 0b1010, 0b1100]);
        assert_eq!(Candidates::new(4, 8).unwrap().len(), 70);
        assert!(c.keeps(1, 0) && c.keeps(1, 2) && !c.keeps(1, 1));
        assert_eq!(c.nearest(0b0110), 2);
        // Three kept inputs (an original zero among the pruned): the first candidate in two.
        assert_eq!(c.nearest(0b1110), 2);
        assert_eq!(c.argmax(&[0.0, 1.0, 0.5, 0.0, 0.0, 1.0]), vec![1]);
        for (n, m) in [(0, 4), (4, 4), (5, 4), (2, 16)] {
            assert!(Candidates::new(n, m).is_err(), "{n}:{m}");
        }
        let bad = MaskLlmConfig {
            pattern: "50%".into(),
            ..Default::default()
        };
        assert!(bad.check().is_err());
        let bad = MaskLlmConfig {
            tau: (4.0, 0.0),
            ..Default::default()
        };
        assert!(bad.check().is_err());
        assert_eq!(parse_range("4:0.05", "tau").unwrap(), (4.0, 0.05));
        assert_eq!(parse_range("3", "tau").unwrap(), (3.0, 3.0));
        assert!(parse_range("a:1", "tau").is_err());
    }

    #[test]
    fn schedules_are_linear_in_progress() {
        let c = MaskLlmConfig::default();
        let s = c.at(0, 10);
        assert_eq!((s.tau, s.kappa, s.reg), (4.0, 100.0, 1e-5));
        let s = c.at(5, 10);
        assert!((s.tau - 2.025).abs() < 1e-6 && (s.kappa - 300.0).abs() < 1e-4);
        assert!((s.reg - 5e-6).abs() < 1e-12);
        let s = c.at(10, 10);
        assert!((s.tau - 0.05).abs() < 1e-6 && s.reg == 0.0);
    }

    /// The initial logits are N(0, 0.01); the prior raises its own candidate by `strength`
    /// standard deviations over the candidates sharing one kept input, and those over the
    /// disjoint one, so the argmax of the initial logits is the prior in most groups (each of
    /// the four one-overlap rivals wins with P(N(0, 1) > 3/√2) ≈ 1.7 %: about 94 % stay).
    #[test]
    fn prior_shifts_logits_by_overlap() {
        let c = Candidates::new(2, 4).unwrap();
        let groups = 20_000;
        let plain = init_logits(&c, groups, 7, None, 3.0).unwrap();
        let mean = plain.iter().sum::<f32>() / plain.len() as f32;
        let std =
            (plain.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / plain.len() as f32).sqrt();
        assert!(
            mean.abs() < 2e-4 && (std - 0.01).abs() < 2e-4,
            "{mean} {std}"
        );
        let prior: Vec<u8> = (0..groups).map(|g| (g % 6) as u8).collect();
        let seeded = init_logits(&c, groups, 7, Some(&prior), 3.0).unwrap();
        for (g, (a, b)) in plain.chunks(6).zip(seeded.chunks(6)).enumerate() {
            let p = c.sets[g % 6];
            for k in 0..6 {
                let overlap = (c.sets[k] & p).count_ones() as f32;
                let want = a[k] + (overlap - 1.0) * 3.0 * std;
                assert!((b[k] - want).abs() < 1e-6);
            }
        }
        let hits = c
            .argmax(&seeded)
            .iter()
            .zip(&prior)
            .filter(|(a, b)| a == b)
            .count();
        let share = hits as f64 / groups as f64;
        assert!((0.92..0.96).contains(&share), "{share}");
        assert!(init_logits(&c, groups, 7, Some(&prior[1..]), 3.0).is_err());
    }
}
