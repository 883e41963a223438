//! One declaration per one-shot method: a serde struct of its settings (which is also its recipe
//! stage and, with the `cli` feature, its command-line arguments) implementing [`OneShot`]. The
//! recipe runner and the CLI's one driver only see the trait, so a new method is one struct, one
//! `impl`, and one line in [`super::Stage`] and in the CLI's verb list.

use crate::calib::sequential::LinearReport;
use crate::{Model, Result};
use serde::Serialize;

/// What a method gets besides the model it rewrites.
pub struct Context<'a> {
    /// The model before compression, for methods that measure against it (compensation).
    pub reference: Option<&'a Model>,
    /// Calibration windows (empty when none were drawn).
    pub windows: &'a [&'a [u32]],
    /// `(done, total)` of the method's own unit of work.
    pub progress: &'a mut dyn FnMut(usize, usize),
}

/// What a method reports.
#[derive(Debug, Default, Serialize)]
pub struct StageReport {
    /// Per-linear errors and times (methods that rewrite linears).
    pub linears: Vec<LinearReport>,
    /// Lines for people (e.g. the units a pruning run removed).
    pub notes: Vec<String>,
    /// The same, for JSON.
    pub details: serde_json::Value,
}

impl From<Vec<LinearReport>> for StageReport {
    fn from(linears: Vec<LinearReport>) -> Self {
        StageReport {
            linears,
            ..Default::default()
        }
    }
}

pub trait OneShot {
    /// One line for tables and provenance: `sparsify sparsegpt 2:4`.
    fn describe(&self) -> String;
    /// Parses every setting, so that a typo fails before hours of work.
    fn check(&self) -> Result<()>;
    /// Whether the method cannot run without calibration windows.
    fn needs_calibration(&self) -> bool;
    /// Whether it uses windows when they are offered (SVD compensation measures its error on
    /// them, but runs without).
    fn uses_calibration(&self) -> bool {
        self.needs_calibration()
    }
    /// Whether it measures against the model before compression.
    fn needs_reference(&self) -> bool {
        false
    }
    /// Whether its output keeps quantized linears packed when written.
    fn writes_packed(&self) -> bool {
        false
    }
    /// Whether it changes the model's shapes, so that later stages measure against its output
    /// instead of the model before compression.
    fn changes_shapes(&self) -> bool {
        false
    }
    fn run(&self, model: &mut Model, cx: Context) -> Result<StageReport>;
}
