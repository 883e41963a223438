//! Parameter groups: which of a model's parameters train, at what share of the learning rate,
//! and which weights keep their zeros. Recovering a compressed model rarely trains everything:
//! a quantized model trains only its adapters (the packed base stays on its grid), a 2:4 model
//! must stay 2:4, and embeddings often train slower than the blocks.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Whether exact zeros of weight matrices stay zero while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum KeepZeros {
    /// Matrices with at least [`SPARSE_FRACTION`] exact zeros keep them (a sparsified model);
    /// dense matrices train freely.
    #[default]
    Auto,
    /// Every matrix keeps its zeros.
    On,
    Off,
}

/// The zero fraction from which `KeepZeros::Auto` treats a matrix as sparse: 2:4 and 50 %
/// unstructured sparsity are far above it, a dense or dequantized weight far below.
pub const SPARSE_FRACTION: f64 = 0.25;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Groups {
    /// Only low-rank adapters train (`NAME.adapter.a/b`); everything else is frozen.
    #[serde(default)]
    pub adapters_only: bool,
    /// Patterns of frozen parameters (`*` matches any run of characters).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// `(pattern, factor)`: parameters matching a pattern train at `factor × lr` (the first
    /// matching pattern counts).
    #[serde(default)]
    pub lr_scale: Vec<(String, f64)>,
    #[serde(default)]
    pub keep_zeros: KeepZeros,
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

impl Groups {
    /// Parses `--lr-scale` entries `PATTERN=FACTOR`.
    pub fn parse_lr_scale(specs: &[String]) -> Result<Vec<(String, f64)>> {
        specs
            .iter()
            .map(|s| {
                let bad = || Error::Invalid(format!("--lr-scale '{s}': expected PATTERN=FACTOR"));
                let (p, f) = s.rsplit_once('=').ok_or_else(bad)?;
                let f: f64 = f.parse().map_err(|_| bad())?;
                if !f.is_finite() || f < 0.0 {
                    return Err(bad());
                }
                Ok((p.to_string(), f))
            })
            .collect()
    }

    /// Whether `name` trains.
    pub fn trains(&self, name: &str) -> bool {
        if self.adapters_only && !name.contains(".adapter.") {
            return false;
        }
        !self.freeze.iter().any(|p| matches(p, name)) && self.scale(name) > 0.0
    }

    /// The share of the learning rate `name` trains at.
    pub fn scale(&self, name: &str) -> f64 {
        self.lr_scale
            .iter()
            .find(|(p, _)| matches(p, name))
            .map_or(1.0, |(_, f)| *f)
    }

    /// The mask (1 where a value may change) of parameter `name` with these values, or `None`
    /// when all may change. Only weight matrices are masked: norms and biases have no sparsity
    /// pattern, and adapters start at zero by design (LoRA's `B = 0`) and must leave it.
    pub fn mask(&self, name: &str, shape: &[usize], values: &[f32]) -> Option<Vec<f32>> {
        let adapter = name.contains(".adapter.") || name.starts_with("distill.");
        if shape.len() != 2 || adapter || self.keep_zeros == KeepZeros::Off {
            return None;
        }
        let zeros = values.iter().filter(|v| **v == 0.0).count();
        let sparse = zeros as f64 >= SPARSE_FRACTION * values.len() as f64;
        if zeros == 0 || (self.keep_zeros == KeepZeros::Auto && !sparse) {
            return None;
        }
        Some(
            values
                .iter()
                .map(|v| if *v == 0.0 { 0.0 } else { 1.0 })
                .collect(),
        )
    }

    /// Fails when nothing would train.
    pub fn check(&self, trained: usize) -> Result<()> {
        if trained > 0 {
            return Ok(());
        }
        Err(Error::Invalid(if self.adapters_only {
            "nothing to train: the model has no low-rank adapters (add them with `whittle \
             compensate` or `whittle quantize --eora-rank R`)"
                .into()
        } else {
            "nothing to train: every parameter is frozen".into()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_globs() {
        assert!(matches("embed", "embed"));
        assert!(!matches("embed", "embedding"));
        assert!(matches("layers.*.mlp_norm", "layers.12.mlp_norm"));
        assert!(matches("*adapter*", "layers.0.q_proj.adapter.a"));
        assert!(matches("layers.1*", "layers.12.up_proj"));
        assert!(!matches("layers.*.q_proj", "layers.1.k_proj"));
        assert!(!matches("a*b*c", "acb"));
        assert!(matches("a*b*c", "axbyc"));
    }

    #[test]
    fn groups_select_scale_and_mask() {
        let g = Groups {
            adapters_only: false,
            freeze: vec!["embed".into()],
            lr_scale: Groups::parse_lr_scale(&["layers.*=0.5".into(), "final_norm=0".into()])
                .unwrap(),
            keep_zeros: KeepZeros::Auto,
        };
        assert!(!g.trains("embed"));
        assert!(!g.trains("final_norm"));
        assert!(g.trains("layers.3.q_proj"));
        assert_eq!(g.scale("layers.3.q_proj"), 0.5);
        assert_eq!(g.scale("lm_head"), 1.0);
        let a = Groups {
            adapters_only: true,
            ..Groups::default()
        };
        assert!(a.trains("layers.0.q_proj.adapter.b") && !a.trains("layers.0.q_proj"));
        assert!(a.check(0).unwrap_err().to_string().contains("adapters"));
        // 2:4 keeps its zeros; a dense matrix with one stray zero does not (auto).
        let sparse = [0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0];
        assert_eq!(
            g.mask("w", &[2, 4], &sparse).unwrap(),
            vec![0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
        );
        let dense = [0.0, 1.0, 5.0, 2.0, 3.0, 6.0, 7.0, 4.0];
        assert!(g.mask("w", &[2, 4], &dense).is_none());
        assert!(g.mask("w", &[8], &sparse).is_none());
        let on = Groups {
            keep_zeros: KeepZeros::On,
            ..Groups::default()
        };
        assert!(on.mask("w", &[2, 4], &dense).is_some());
        assert!(on.mask("q.adapter.b", &[2, 4], &[0.0; 8]).is_none());
        for bad in ["x", "x=y", "x=-1"] {
            assert!(Groups::parse_lr_scale(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
