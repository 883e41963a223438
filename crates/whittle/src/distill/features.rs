//! Hidden-state (feature) distillation: which teacher layer each student layer learns from, and
//! the loss between a student's projected features and the teacher's normalised ones.

use crate::{Error, Result};
use candle_core::{Tensor, D};

/// How student features are compared with the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureLoss {
    /// Mean squared error over tokens and channels.
    Mse,
    /// `1 − cos` per token, averaged: ignores scale, so it needs no normaliser.
    Cosine,
}

impl FeatureLoss {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(FeatureLoss::Mse),
            "cosine" | "cos" => Ok(FeatureLoss::Cosine),
            other => Err(Error::Invalid(format!(
                "unknown feature loss '{other}' (mse, cosine)"
            ))),
        }
    }

    /// The loss between `student` and `teacher` features, both `[tokens, channels]`; the
    /// teacher side carries no gradient.
    pub fn loss(self, student: &Tensor, teacher: &Tensor) -> candle_core::Result<Tensor> {
        let teacher = teacher.detach();
        match self {
            FeatureLoss::Mse => (student - &teacher)?.sqr()?.mean_all(),
            FeatureLoss::Cosine => {
                let dot = (student * &teacher)?.sum(D::Minus1)?;
                let norms = (student.sqr()?.sum(D::Minus1)?.sqrt()?
                    * teacher.sqr()?.sum(D::Minus1)?.sqrt()?)?;
                let cos = (dot / (norms + 1e-12)?)?;
                (1.0 - cos)?.mean_all()
            }
        }
    }
}

/// The teacher layer each of `student` layers learns from when the teacher has `teacher`
/// layers: layer `i` (counted from 1 at the output of the first block) is matched with the
/// teacher layer at the same relative depth, `round(i · teacher / student)`, so the last layers
/// always correspond. Indices are 0-based outputs of blocks.
pub fn layer_map(
    student_layers: &[usize],
    student: usize,
    teacher: usize,
) -> Result<Vec<(usize, usize)>> {
    student_layers
        .iter()
        .map(|&s| {
            if s >= student {
                return Err(Error::Invalid(format!(
                    "feature layer {s} out of range: the student has {student} layers"
                )));
            }
            let t = (((s + 1) * teacher) as f64 / student as f64).round() as usize;
            Ok((s, t.clamp(1, teacher) - 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn losses_match_their_definitions_with_gradients() {
        let (n, c) = (3, 5);
        let s: Vec<f32> = (0..n * c)
            .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.5)
            .collect();
        let t: Vec<f32> = (0..n * c)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.3)
            .collect();
        let var = Var::from_vec(s.clone(), (n, c), &Device::Cpu).unwrap();
        let tt = Tensor::from_vec(t.clone(), (n, c), &Device::Cpu).unwrap();
        // MSE and its gradient 2 (s − t) / (n c).
        let l = FeatureLoss::Mse.loss(var.as_tensor(), &tt).unwrap();
        let want: f32 =
            s.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / (n * c) as f32;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        let g = crate::train::grad_of(&l, &var);
        for i in 0..n * c {
            assert!((g[i] - 2.0 * (s[i] - t[i]) / (n * c) as f32).abs() < 1e-6);
        }
        // Cosine: 1 − mean over rows of cos(s_r, t_r).
        let l = FeatureLoss::Cosine.loss(var.as_tensor(), &tt).unwrap();
        let want: f32 = (0..n)
            .map(|r| {
                let (a, b) = (&s[r * c..(r + 1) * c], &t[r * c..(r + 1) * c]);
                let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
                1.0 - dot / (na * nb)
            })
            .sum::<f32>()
            / n as f32;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        // Scale-free: a scaled student has the same cosine loss.
        let scaled = (var.as_tensor() * 7.0).unwrap();
        let l2 = FeatureLoss::Cosine.loss(&scaled, &tt).unwrap();
        assert!((l2.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn shallower_students_map_to_the_same_relative_depth() {
        // 10 student layers learning from 30: layer i ↔ teacher 3(i+1) − 1.
        let m = layer_map(&[0, 4, 9], 10, 30).unwrap();
        assert_eq!(m, vec![(0, 2), (4, 14), (9, 29)]);
        // Same depth: the identity.
        assert_eq!(layer_map(&[3, 7], 30, 30).unwrap(), vec![(3, 3), (7, 7)]);
        assert!(layer_map(&[10], 10, 30).is_err());
        assert!(FeatureLoss::parse("l1").is_err());
    }
}
