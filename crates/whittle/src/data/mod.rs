//! Text corpora and the token windows cut from them.

pub mod calib;
pub mod text;
