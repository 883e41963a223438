//! Distillation building blocks. So far: teacher-feature standardisation (PHI-S and its
//! baselines) and the Hadamard matrices it needs; the training engine that uses them comes with
//! issue 17.

pub mod hadamard;
pub mod normalizer;
