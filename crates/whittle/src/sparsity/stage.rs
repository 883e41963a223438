//! `sparsify` as a one-shot method: its settings, recipe stage and command-line arguments.

use super::{sparsify_model, Pattern, SparsityMethod};
use crate::recipe::method::{Context, OneShot, StageReport};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};

/// Prune weights to an N:M or unstructured pattern (magnitude, Wanda, SparseGPT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Sparsify {
    /// magnitude | wanda | sparsegpt
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: String,
    /// N:M (N kept of every M consecutive inputs) or P% (unstructured, per output row).
    #[cfg_attr(feature = "cli", arg(long))]
    pub pattern: String,
    /// Linears to compress (names or suffixes: q_proj,k_proj,...); default all seven.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl Sparsify {
    fn parsed(&self) -> Result<(SparsityMethod, Pattern)> {
        Ok((
            SparsityMethod::parse(&self.method)?,
            Pattern::parse(&self.pattern)?,
        ))
    }
}

impl OneShot for Sparsify {
    fn describe(&self) -> String {
        format!("sparsify {} {}", self.method, self.pattern)
    }
    fn check(&self) -> Result<()> {
        self.parsed().map(|_| ())
    }
    fn needs_calibration(&self) -> bool {
        self.parsed().is_ok_and(|(m, _)| m.needs_calibration())
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport> {
        let (method, pattern) = self.parsed()?;
        if method.needs_calibration() && cx.windows.is_empty() {
            return Err(Error::Invalid(format!(
                "{method:?} needs calibration windows"
            )));
        }
        Ok(sparsify_model(
            model,
            cx.windows,
            method,
            pattern,
            &self.targets,
            cx.progress,
        )?
        .into())
    }
}
