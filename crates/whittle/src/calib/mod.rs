//! Calibration: streaming input statistics of every linear, and the sequential layer-by-layer
//! driver that compression methods run under.

pub mod hessian;
pub mod obs;
pub mod ridge;
pub mod sequential;
pub mod stats;
