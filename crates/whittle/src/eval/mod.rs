//! Measuring a model: perplexity, downstream task accuracy, speed; k-NN accuracy of image features.

pub mod kernel_speed;
pub mod knn;
pub mod perplexity;
pub mod probe;
pub mod speed;
pub mod tasks;
