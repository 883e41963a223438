//! A model's fingerprint: its shapes and a hash of a sample of its weights. Anything computed
//! from one model and reused later (importance scores, a teacher's cached outputs) stores it, so
//! that using it on another model, or on this one after it changed, is an error rather than a
//! silently wrong result.

use super::{LayerShape, Model};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub arch: String,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: Vec<LayerShape>,
    /// FNV-1a (64-bit, hex) of every norm weight and the first row of every linear: cheap, and
    /// any compression or training step changes it.
    pub weights: String,
}

/// FNV-1a over f32 bit patterns.
struct Fnv(u64);

impl Fnv {
    fn add(&mut self, values: &[f32]) {
        for v in values {
            for b in v.to_bits().to_le_bytes() {
                self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
}

impl Model {
    pub fn fingerprint(&self) -> Fingerprint {
        let mut f = Fnv(0xcbf2_9ce4_8422_2325);
        f.add(&self.final_norm);
        let mut row = Vec::new();
        let mut first_row = |f: &mut Fnv, l: &super::Linear| {
            row.resize(l.in_features, 0.0);
            l.row_into(0, &mut row);
            f.add(&row);
        };
        first_row(&mut f, &self.embed);
        for l in &self.layers {
            f.add(&l.attn_norm);
            f.add(&l.mlp_norm);
            for (_, _, lin) in l.linears() {
                first_row(&mut f, lin);
            }
            for (_, e) in l.emulated.named() {
                f.add(&e.bias);
            }
        }
        Fingerprint {
            arch: self.config.arch.name().into(),
            vocab_size: self.config.vocab_size,
            hidden: self.config.hidden,
            layers: self.layers.iter().map(|l| l.shape()).collect(),
            weights: format!("{:016x}", f.0),
        }
    }
}

impl Fingerprint {
    /// Fails unless `model` is the model this fingerprint was taken of; `what` names the data
    /// (e.g. "scores in s.json") for the message.
    pub fn check(&self, model: &Model, what: &str) -> Result<()> {
        let now = model.fingerprint();
        let why = if (self.arch.as_str(), self.vocab_size, self.hidden)
            != (now.arch.as_str(), now.vocab_size, now.hidden)
            || self.layers.len() != now.layers.len()
        {
            format!(
                "they were computed on a {} model with {} layers of width {}, this is a {} model \
                 with {} layers of width {}",
                self.arch,
                self.layers.len(),
                self.hidden,
                now.arch,
                now.layers.len(),
                now.hidden
            )
        } else if let Some(i) = (0..now.layers.len()).find(|&i| self.layers[i] != now.layers[i]) {
            format!(
                "layer {i} was {:?} and is now {:?}",
                self.layers[i], now.layers[i]
            )
        } else if self.weights != now.weights {
            "the shapes match but the weights differ (another checkpoint, or this one after \
             compression or training)"
                .into()
        } else {
            return Ok(());
        };
        Err(Error::Invalid(format!(
            "{what} belong to another model: {why}. Recompute them on this model"
        )))
    }
}
