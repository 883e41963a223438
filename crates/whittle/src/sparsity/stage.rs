//! `sparsify` as a one-shot method: its settings, recipe stage and command-line arguments.
//! Besides the one-shot scores, a stage can apply a mask file (`method = "mask"`), such as the
//! one a MaskLLM run learned, so that learned masks chain with quantization in one recipe.

use super::{sparsify_model, Pattern, SparsityMethod};
use crate::recipe::method::{Context, OneShot, StageReport};
use crate::sparsity::maskllm::LearnedMask;
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Prune weights to an N:M or unstructured pattern (magnitude, Wanda, SparseGPT), or apply a
/// mask file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Sparsify {
    /// magnitude | wanda | sparsegpt | mask (apply --mask) | maskllm (learn masks: see its
    /// flags below)
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: String,
    /// N:M (N kept of every M consecutive inputs) or P% (unstructured, per output row); a mask
    /// file brings its own.
    #[cfg_attr(feature = "cli", arg(long, default_value = "2:4"))]
    #[serde(default = "two_four")]
    pub pattern: String,
    /// The mask file `--method mask` applies (written by `sparsify --method maskllm`).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<PathBuf>,
    /// Linears to compress (names or suffixes: q_proj,k_proj,...); default all seven.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

fn two_four() -> String {
    "2:4".into()
}

impl Sparsify {
    /// The mask file of `method = "mask"`, read and checked against nothing yet.
    fn mask_file(&self) -> Result<Option<LearnedMask>> {
        if self.method != "mask" {
            return Ok(None);
        }
        let path = self.mask.as_ref().ok_or_else(|| {
            Error::Invalid("--method mask needs --mask FILE (a learned mask)".into())
        })?;
        LearnedMask::load(path).map(Some)
    }

    fn parsed(&self) -> Result<(SparsityMethod, Pattern)> {
        if self.method == "maskllm" {
            return Err(Error::Invalid(
                "maskllm learns masks by training: run `whittle sparsify --method maskllm` \
                 (a recipe applies its mask file with method = \"mask\")"
                    .into(),
            ));
        }
        Ok((
            SparsityMethod::parse(&self.method)?,
            Pattern::parse(&self.pattern)?,
        ))
    }
}

impl OneShot for Sparsify {
    fn describe(&self) -> String {
        match (&self.method[..], &self.mask) {
            ("mask", Some(f)) => format!("sparsify mask {}", f.display()),
            _ => format!("sparsify {} {}", self.method, self.pattern),
        }
    }
    fn check(&self) -> Result<()> {
        match self.method.as_str() {
            "mask" => self.mask_file().map(|_| ()),
            _ => self.parsed().map(|_| ()),
        }
    }
    fn needs_calibration(&self) -> bool {
        self.parsed().is_ok_and(|(m, _)| m.needs_calibration())
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport> {
        if let Some(mask) = self.mask_file()? {
            mask.apply(model)?;
            return Ok(StageReport {
                notes: vec![format!(
                    "applied the {}:{} mask of {} linears",
                    mask.n,
                    mask.m,
                    mask.linears.len()
                )],
                ..Default::default()
            });
        }
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
