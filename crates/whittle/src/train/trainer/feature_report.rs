//! Each feature head measured on the validation text once a run ends: the objective's feature
//! loss per distilled layer (whose shares say how the normaliser weighed the layers) and the
//! head's fidelity in the teacher's own space (`distill::fidelity`), which is comparable across
//! normalisers where the losses are not.

use super::{Teacher, TokenData, Trainer};
use crate::distill::fidelity::Fidelity;
use crate::distill::heads::BlockTap;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// One distilled layer pair at the current weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadReport {
    pub student: usize,
    pub teacher: usize,
    /// The feature loss of this layer as the objective computes it (normaliser's space), mean
    /// over the validation windows.
    pub loss: f64,
    /// Mean cosine and normalised MSE of the head's predictions mapped back to the teacher's
    /// features.
    pub cosine: f64,
    pub nmse: f64,
}

impl Trainer {
    /// The heads' report on the first `eval_tokens` of the validation text (the windows that
    /// validation perplexity uses); empty when the objective has no feature term.
    pub fn feature_report(&mut self, data: &TokenData) -> Result<Vec<HeadReport>> {
        let Some(spec) = self.objective.features()?.cloned() else {
            return Ok(Vec::new());
        };
        let Teacher::Live(teacher) = &self.teacher else {
            return Err(Error::Invalid(
                "feature report: feature distillation has a live teacher".into(),
            ));
        };
        self.params.write_back(&mut self.model)?;
        let seq = self.config.seq_len;
        let wins = crate::data::text::windows(&data.valid, seq, Some(self.config.eval_tokens))?;
        let t_layers: Vec<usize> = self.heads.iter().map(|h| h.head.teacher).collect();
        let s_layers: Vec<usize> = self.heads.iter().map(|h| h.head.student).collect();
        let mut ttap = BlockTap::new(teacher, &t_layers);
        let mut stap = BlockTap::new(&self.model, &s_layers);
        let hs = self.model.config.hidden;
        let mut loss = vec![0f64; self.heads.len()];
        let mut fid: Vec<Fidelity> = self
            .heads
            .iter()
            .map(|h| Fidelity::new(h.head.normalizer.channels))
            .collect();
        for w in &wins {
            teacher.hidden_states(w, None, Some(&mut ttap))?;
            self.model.hidden_states(w, None, Some(&mut stap))?;
            for (k, h) in self.heads.iter().enumerate() {
                let c = h.head.normalizer.channels;
                let rows = stap.out[k].len() / hs;
                let pred = self.project(
                    k,
                    &Tensor::from_slice(&stap.out[k], (rows, hs), &Device::Cpu)?,
                )?;
                let target =
                    h.normalise(Tensor::from_slice(&ttap.out[k], (rows, c), &Device::Cpu)?)?;
                loss[k] +=
                    spec.loss.loss(&pred, &target)?.to_scalar::<f32>()? as f64 / wins.len() as f64;
                let pred = pred.flatten_all()?.to_vec1::<f32>()?;
                fid[k].add_normalised(&h.head.normalizer, &pred, &ttap.out[k]);
            }
        }
        Ok(self
            .heads
            .iter()
            .zip(loss.into_iter().zip(fid))
            .map(|(h, (loss, f))| HeadReport {
                student: h.head.student,
                teacher: h.head.teacher,
                loss,
                cosine: f.cosine(),
                nmse: f.nmse(),
            })
            .collect())
    }
}
