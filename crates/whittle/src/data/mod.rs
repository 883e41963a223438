//! Text corpora and the token windows cut from them; downstream benchmark tasks; images.

pub mod calib;
pub mod images;
pub mod tasks;
pub mod text;
