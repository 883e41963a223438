//! `compensate` as a one-shot method: its settings, recipe stage and command-line arguments.

use super::{compensate_choice, LowRankMethod, RankChoice, Ranks};
use crate::recipe::method::{Context, OneShot, StageReport};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};

/// Adapter rank of a `compensate` stage that names neither `rank` nor `rank_budget`.
pub const DEFAULT_RANK: usize = 64;
fn default_rank() -> usize {
    DEFAULT_RANK
}

/// Add low-rank adapters that compensate a compressed model's error against a reference
/// (plain SVD of the weight error, or EoRA in the input eigenspace).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Compensate {
    /// svd | eora
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: String,
    /// Rank of every adapter.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_RANK, conflicts_with = "rank_budget"))]
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Instead of one rank: a total number of adapter parameters, spent where the singular
    /// values are largest per parameter (one extra calibration pass).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_budget: Option<usize>,
    /// Merge B·A into dense weights instead of keeping adapters.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub fold: bool,
    /// Linears to compress (names or suffixes: q_proj,k_proj,...); default all seven.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl Compensate {
    fn parsed(&self) -> Result<(LowRankMethod, RankChoice)> {
        if self.rank == 0 || self.rank_budget == Some(0) {
            return Err(Error::Invalid(
                "rank and rank_budget must be positive".into(),
            ));
        }
        let ranks = self
            .rank_budget
            .map_or(RankChoice::Fixed(self.rank), RankChoice::Budget);
        Ok((LowRankMethod::parse(&self.method)?, ranks))
    }
}

impl OneShot for Compensate {
    fn describe(&self) -> String {
        match self.rank_budget {
            Some(b) => format!("compensate {} budget {b}", self.method),
            None => format!("compensate {} r{}", self.method, self.rank),
        }
    }
    fn check(&self) -> Result<()> {
        self.parsed().map(|_| ())
    }
    fn needs_calibration(&self) -> bool {
        self.parsed().is_ok_and(|(m, _)| m == LowRankMethod::Eora)
    }
    fn uses_calibration(&self) -> bool {
        true
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn writes_packed(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport> {
        let (method, ranks) = self.parsed()?;
        let reference = cx.reference.ok_or_else(|| {
            Error::Invalid("compensation needs the model before compression".into())
        })?;
        let (linears, ranks) = compensate_choice(
            model,
            reference,
            cx.windows,
            method,
            ranks,
            self.fold,
            &self.targets,
            cx.progress,
        )?;
        let mut notes = Vec::new();
        if let Ranks::PerLinear(r) = &ranks {
            let used: Vec<usize> = r.values().copied().filter(|x| *x > 0).collect();
            notes.push(format!(
                "rank budget: {} of {} linears get an adapter, ranks {}..{}",
                used.len(),
                r.len(),
                used.iter().min().unwrap_or(&0),
                used.iter().max().unwrap_or(&0)
            ));
        }
        Ok(StageReport {
            linears,
            notes,
            details: serde_json::Value::Null,
        })
    }
}
