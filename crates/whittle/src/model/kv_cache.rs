//! Key/value cache for decoding: per layer, preallocated `capacity` rows of K and V (post-RoPE),
//! so that decode steps never allocate or copy the history.

use super::Model;
use crate::{Error, Result};

pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    kv_dim: usize,
}

pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions (at most the model's context length).
    pub fn new(model: &Model, capacity: usize) -> Result<Self> {
        if capacity > model.config.context_length {
            return Err(Error::Invalid(format!(
                "KV cache of {capacity} positions exceeds the model's context length {}",
                model.config.context_length
            )));
        }
        let layers = model
            .layers
            .iter()
            .map(|l| {
                l.attn.as_ref().map(|a| {
                    let kv_dim = a.shape.kv_dim();
                    LayerCache {
                        k: vec![0.0; capacity * kv_dim],
                        v: vec![0.0; capacity * kv_dim],
                        kv_dim,
                    }
                })
            })
            .collect();
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by K and V for all layers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|c| (c.k.len() + c.v.len()) * 4)
            .sum()
    }

    /// Forgets all positions (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::Invalid(format!(
                "KV cache full: {} + {t} positions exceed its capacity {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

impl LayerCache {
    /// Appends `t` rows at position `at` and returns the K and V history `0..at+t`.
    pub(crate) fn append(&mut self, at: usize, k: &[f32], v: &[f32]) -> (&[f32], &[f32]) {
        let (lo, hi) = (at * self.kv_dim, at * self.kv_dim + k.len());
        self.k[lo..hi].copy_from_slice(k);
        self.v[lo..hi].copy_from_slice(v);
        (&self.k[..hi], &self.v[..hi])
    }
}
