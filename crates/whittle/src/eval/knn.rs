//! k-nearest-neighbour classification of image features, as DINO evaluates frozen encoders:
//! features L2-normalised, the k most cosine-similar training features vote for their labels
//! with weight `exp(similarity / T)`, T = 0.07. No training, so it measures the features alone.

use crate::{Error, Result};

/// The vote temperature of DINO's k-NN evaluation.
pub const TEMPERATURE: f32 = 0.07;

fn normalised(rows: &[f32], dim: usize) -> Vec<f32> {
    let mut out = rows.to_vec();
    for row in out.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

/// Accuracy (fraction correct) of k-NN on `test` given `train` features (`rows × dim`,
/// row-major) and labels `< classes`.
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[u8],
    test: &[f32],
    test_labels: &[u8],
    dim: usize,
    k: usize,
) -> Result<f64> {
    let n = train_labels.len();
    if dim == 0 || train.len() != n * dim || test.len() != test_labels.len() * dim {
        return Err(Error::Invalid(format!(
            "k-NN: {} train and {} test values do not hold {n} and {} rows of {dim}",
            train.len(),
            test.len(),
            test_labels.len()
        )));
    }
    if k == 0 || k > n {
        return Err(Error::Invalid(format!(
            "k-NN: k = {k} with {n} training rows"
        )));
    }
    let classes = 1 + *train_labels.iter().chain(test_labels).max().unwrap_or(&0) as usize;
    let (train, test) = (normalised(train, dim), normalised(test, dim));
    let mut correct = 0usize;
    let mut sims: Vec<(f32, u8)> = Vec::with_capacity(n);
    for (q, &label) in test.chunks_exact(dim).zip(test_labels) {
        sims.clear();
        sims.extend(
            train
                .chunks_exact(dim)
                .zip(train_labels)
                .map(|(t, &l)| (q.iter().zip(t).map(|(a, b)| a * b).sum(), l)),
        );
        sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0f32; classes];
        for &(s, l) in &sims[..k] {
            votes[l as usize] += (s / TEMPERATURE).exp();
        }
        let best = (0..classes)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
            .unwrap_or(0);
        correct += usize::from(best == label as usize);
    }
    Ok(correct as f64 / test_labels.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_of_the_nearest_by_angle() {
        // Class 0 points along +x, class 1 along +y; magnitudes must not matter.
        let train = [5.0, 0.1, 1.0, -0.1, 0.1, 3.0, -0.1, 0.5, 0.9, 0.8];
        let labels = [0, 0, 1, 1, 1];
        let test = [10.0, 1.0, 0.2, 7.0];
        let acc = knn_accuracy(&train, &labels, &test, &[0, 1], 2, 2).unwrap();
        assert_eq!(acc, 1.0);
        // With k = 5 every training point votes: the similarity weights let the two class-0
        // points near +x outvote the three class-1 points.
        let acc = knn_accuracy(&train, &labels, &[1.0, 0.05], &[0], 2, 5).unwrap();
        assert_eq!(acc, 1.0);
        assert!(knn_accuracy(&train, &labels, &test, &[0, 1], 2, 6).is_err());
        assert!(knn_accuracy(&train, &labels, &test[..3], &[0, 1], 2, 2).is_err());
    }
}
