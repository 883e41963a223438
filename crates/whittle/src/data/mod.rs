//! Text corpora and the token windows cut from them; downstream benchmark tasks.

pub mod calib;
pub mod tasks;
pub mod text;
