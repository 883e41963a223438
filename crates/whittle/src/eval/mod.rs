//! Measuring a model: perplexity, downstream task accuracy, speed; k-NN accuracy of image features.

pub mod kernel_speed;
pub mod knn;
pub mod perplexity;
pub mod speed;
pub mod tasks;
