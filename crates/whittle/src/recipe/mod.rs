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
//! method = "sparsegpt"         #   or method = "mask", mask = "m.safetensors" (a learned mask,
//! pattern = "2:4"              #   `whittle sparsify --method maskllm`)
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

pub mod method;

pub use crate::lowrank::stage::{Compensate, DEFAULT_RANK};
pub use crate::prune::stage::Prune;
pub use crate::quant::stage::Quantize;
pub use crate::sparsity::stage::Sparsify;
use crate::{Error, Model, Result};
use method::{Context, OneShot, StageReport};
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

/// Declares [`Stage`] with one variant per method (named like its settings struct, `kind` in
/// TOML its lowercase name), its [`OneShot`] view, and `From` each settings struct.
macro_rules! stages {
    ($($method:ident),* $(,)?) => {
        /// One stage of a recipe: a one-shot method with its settings (see [`OneShot`]).
        #[derive(Debug, Clone, Deserialize, Serialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        pub enum Stage {
            $($method($method),)*
        }

        impl Stage {
            pub fn method(&self) -> &dyn OneShot {
                match self {
                    $(Stage::$method(s) => s,)*
                }
            }
        }

        $(impl From<$method> for Stage {
            fn from(s: $method) -> Self {
                Stage::$method(s)
            }
        })*
    };
}

stages!(Sparsify, Quantize, Compensate, Prune);

impl Stage {
    pub fn describe(&self) -> String {
        self.method().describe()
    }
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

    /// One line per stage of a recipe's TOML text (`sparsify sparsegpt 2:4`), or the line of a
    /// training run's settings (`train kd, 244 steps of 4 × 512 (accum 2)`); the text's first
    /// line when it parses as neither (provenance written by another version).
    pub fn describe_toml(text: &str) -> Vec<String> {
        if let Ok(r) = toml::from_str::<Recipe>(text) {
            return r.stages.iter().map(Stage::describe).collect();
        }
        if let Ok(t) = crate::train::trainer::TrainConfig::from_toml(text) {
            return vec![t.describe()];
        }
        vec![text.lines().next().unwrap_or("").to_string()]
    }

    /// Parses every stage's settings up front, so a typo fails before hours of work.
    fn check(&self) -> Result<()> {
        self.stages.iter().try_for_each(|s| s.method().check())
    }

    /// Applies the stages in order; `reference` is the model before the first stage (after a
    /// stage that changes shapes, e.g. pruning, later stages measure against its output).
    /// `progress(stage, done, total)` reports each stage's work.
    pub fn run(
        &self,
        model: &mut Model,
        reference: &Model,
        windows: &[&[u32]],
        progress: &mut dyn FnMut(usize, usize, usize),
    ) -> Result<Vec<(String, StageReport)>> {
        let mut out = Vec::new();
        let mut reshaped: Option<Model> = None;
        for (i, s) in self.stages.iter().enumerate() {
            let m = s.method();
            let cx = Context {
                reference: Some(reshaped.as_ref().unwrap_or(reference)),
                windows: if m.uses_calibration() { windows } else { &[] },
                progress: &mut |d, t| progress(i, d, t),
            };
            let report = m.run(model, cx)?;
            if m.changes_shapes() {
                reshaped = Some(model.clone());
            }
            out.push((m.describe(), report));
        }
        Ok(out)
    }

    /// Whether any stage uses calibration data.
    pub fn needs_calibration(&self) -> bool {
        self.stages.iter().any(|s| s.method().uses_calibration())
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

    /// The learned-mask example is refused up front while its mask file is missing (named in
    /// the error), and a mask stage without a file asks for one.
    #[test]
    fn mask_stage_needs_a_readable_mask_file() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/maskllm-gptq-eora.toml");
        let err = Recipe::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("maskllm/run/mask.safetensors"), "{err}");
        let none: Recipe =
            toml::from_str("[[stage]]\nkind = \"sparsify\"\nmethod = \"mask\"\n").unwrap();
        assert!(none
            .check()
            .unwrap_err()
            .to_string()
            .contains("--mask FILE"));
        assert!(!none.needs_calibration());
    }
}
