//! Linear-probe accuracy of frozen features: multinomial logistic regression on the training
//! features (standardised with the training set's per-channel mean and deviation), full batch,
//! Adam on the closed-form gradient `Xᵀ(P − Y)/n + λW`, then accuracy on the test features.
//! Together with k-NN ([`super::knn`]) it is how encoders are compared: k-NN needs no training,
//! the probe asks whether the classes are linearly separable in the feature space.

use crate::{Error, Result};
use candle_core::{Device, Tensor, D};

/// The probe's optimisation settings.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub epochs: usize,
    pub lr: f64,
    /// L2 penalty on the weights.
    pub weight_decay: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            epochs: 300,
            lr: 0.05,
            weight_decay: 1e-4,
        }
    }
}

fn standardise(x: &Tensor, mean: &Tensor, std: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(mean)?.broadcast_div(std)?)
}

/// Trains a linear classifier on `train` (`rows × dim`) and returns its accuracy on `test`.
pub fn probe_accuracy(
    train: &[f32],
    train_labels: &[u8],
    test: &[f32],
    test_labels: &[u8],
    dim: usize,
    config: ProbeConfig,
) -> Result<f64> {
    let (n, m) = (train_labels.len(), test_labels.len());
    if n == 0 || dim == 0 || train.len() != n * dim || test.len() != m * dim {
        return Err(Error::Invalid(format!(
            "linear probe: {} train and {} test values do not hold {n} and {m} rows of {dim}",
            train.len(),
            test.len()
        )));
    }
    let classes = 1 + *train_labels.iter().chain(test_labels).max().unwrap_or(&0) as usize;
    let dev = &Device::Cpu;
    let x = Tensor::from_slice(train, (n, dim), dev)?;
    let mean = x.mean_keepdim(0)?;
    let std = (x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-8)?.sqrt()?;
    let x = standardise(&x, &mean, &std)?;
    let onehot: Vec<f32> = train_labels
        .iter()
        .flat_map(|&l| (0..classes).map(move |c| f32::from(c == l as usize)))
        .collect();
    let y = Tensor::from_vec(onehot, (n, classes), dev)?;
    let mut w = Tensor::zeros((dim, classes), candle_core::DType::F32, dev)?;
    let mut b = Tensor::zeros((1, classes), candle_core::DType::F32, dev)?;
    // Adam moments for W and b.
    let (mut mw, mut vw) = (w.zeros_like()?, w.zeros_like()?);
    let (mut mb, mut vb) = (b.zeros_like()?, b.zeros_like()?);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    for t in 1..=config.epochs {
        let logits = x.matmul(&w)?.broadcast_add(&b)?;
        let p = softmax_rows(&logits)?;
        let diff = ((p - &y)? / n as f64)?;
        let gw = (x.t()?.matmul(&diff)? + (&w * config.weight_decay)?)?;
        let gb = diff.sum_keepdim(0)?;
        let step = config.lr * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
        for (param, g, m, v) in [
            (&mut w, gw, &mut mw, &mut vw),
            (&mut b, gb, &mut mb, &mut vb),
        ] {
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            *param = (&*param - ((&*m * step)? / (v.sqrt()? + eps)?)?)?;
        }
    }
    let xt = standardise(&Tensor::from_slice(test, (m, dim), dev)?, &mean, &std)?;
    let predicted: Vec<u32> = xt
        .matmul(&w)?
        .broadcast_add(&b)?
        .argmax(D::Minus1)?
        .to_vec1()?;
    let correct = predicted
        .iter()
        .zip(test_labels)
        .filter(|(p, l)| **p == **l as u32)
        .count();
    Ok(correct as f64 / m.max(1) as f64)
}

/// k-NN (k = `k`) and linear-probe accuracy of the same features: how every encoder is
/// reported (teachers and students alike).
pub fn feature_accuracies(
    train: &[f32],
    train_labels: &[u8],
    test: &[f32],
    test_labels: &[u8],
    dim: usize,
    k: usize,
) -> Result<(f64, f64)> {
    let knn = super::knn::knn_accuracy(train, train_labels, test, test_labels, dim, k)?;
    let probe = probe_accuracy(
        train,
        train_labels,
        test,
        test_labels,
        dim,
        ProbeConfig::default(),
    )?;
    Ok((knn, probe))
}

fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    /// Three classes at different centres in 5 dimensions (one informative direction each),
    /// with noise: linearly separable up to the overlap of the noise.
    fn blobs(n: usize, seed: u64, shuffle_labels: bool) -> (Vec<f32>, Vec<u8>) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let c = (i % 3) as u8;
            for d in 0..5 {
                let centre = if d == c as usize { 3.0 } else { 0.0 };
                x.push(centre + rng.random_range(-1.0f32..1.0) + 100.0 * (d as f32));
            }
            y.push(if shuffle_labels {
                rng.random_range(0..3u8)
            } else {
                c
            });
        }
        (x, y)
    }

    #[test]
    fn separates_blobs_and_not_random_labels() {
        let (x, y) = blobs(300, 1, false);
        let (xt, yt) = blobs(150, 2, false);
        let acc = probe_accuracy(&x, &y, &xt, &yt, 5, ProbeConfig::default()).unwrap();
        assert!(acc > 0.97, "{acc}");
        // Labels unrelated to the features: no better than chance on fresh data.
        let (x, y) = blobs(300, 3, true);
        let (xt, yt) = blobs(300, 4, true);
        let acc = probe_accuracy(&x, &y, &xt, &yt, 5, ProbeConfig::default()).unwrap();
        assert!(acc < 0.5, "{acc}");
        assert!(probe_accuracy(&x, &y, &xt[..7], &yt, 5, ProbeConfig::default()).is_err());
    }
}
