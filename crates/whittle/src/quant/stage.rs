//! `quantize` as a one-shot method: its settings, recipe stage and command-line arguments.

use super::{quantize_model, QuantConfig, QuantMethod};
use crate::recipe::method::{Context, OneShot, StageReport};
use crate::{Model, Result};
use serde::{Deserialize, Serialize};

fn default_bits() -> u8 {
    4
}
fn default_group() -> usize {
    128
}

/// Quantize weights to 2-8 bits per group (RTN, GPTQ); stored packed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Quantize {
    /// rtn | gptq
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    #[serde(default = "default_bits")]
    pub bits: u8,
    /// Inputs per scale/zero group (a multiple of 32; 0 = per output channel).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    #[serde(default = "default_group")]
    pub group_size: usize,
    /// Symmetric grid (default asymmetric).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub sym: bool,
    /// GPTQ: walk columns by decreasing Hessian diagonal (static groups).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub act_order: bool,
    /// Linears to compress (names or suffixes: q_proj,k_proj,...); default all seven.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl Quantize {
    fn parsed(&self) -> Result<(QuantMethod, QuantConfig)> {
        let cfg = QuantConfig {
            bits: self.bits,
            group: self.group_size,
            sym: self.sym,
        };
        cfg.check("quantize", 32)?;
        Ok((QuantMethod::parse(&self.method, self.act_order)?, cfg))
    }
}

impl OneShot for Quantize {
    fn describe(&self) -> String {
        format!(
            "quantize {} int{} g{}",
            self.method, self.bits, self.group_size
        )
    }
    fn check(&self) -> Result<()> {
        self.parsed().map(|_| ())
    }
    fn needs_calibration(&self) -> bool {
        self.parsed().is_ok_and(|(m, _)| m.needs_calibration())
    }
    fn writes_packed(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport> {
        let (method, cfg) = self.parsed()?;
        let w = if method.needs_calibration() {
            cx.windows
        } else {
            &[]
        };
        Ok(quantize_model(model, w, method, cfg, &self.targets, cx.progress)?.into())
    }
}
