//! Vision encoders: the ViT that students and the DINOv2 teacher share, the teachers' readers,
//! and the image geometry they need (bicubic resizing).

pub mod dinov2;
pub mod distill;
pub mod efficientnet;
mod fold;
pub mod graph;
pub mod resize;
pub mod teachers;
pub mod vit;

pub use vit::{Vit, VitConfig};
