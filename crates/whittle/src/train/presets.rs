//! Model shapes for training from scratch: Llama, Mamba and Hymba at matched non-embedding
//! parameter counts (the controlled comparison of the Hymba paper, at small scale), with the
//! Hymba ablations (meta tokens off, KV sharing off).

use crate::model::random::random_model;
use crate::model::{Arch, AttnShape, KvSource, LayerShape, ModelConfig, SsmShape};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// For tests: trains in seconds.
    Tiny,
    /// For the study: hidden 128, about 1.2 M parameters outside the embedding.
    Small,
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preset {
    pub arch: Arch,
    pub size: Size,
    /// Hymba only: learned meta tokens.
    pub meta_tokens: bool,
    /// Hymba only: consecutive local layers share one KV cache.
    pub kv_sharing: bool,
}

/// Dimensions of one size.
struct Dims {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    /// MLP widths of [llama, hymba] (Mamba layers have none).
    mlp: [usize; 2],
    layers: [usize; 3],
    memory: usize,
    window: usize,
}

fn dims(size: Size) -> Dims {
    match size {
        // layers: [llama, mamba, hymba], chosen so that non-embedding parameters match. Hymba
        // needs six layers for a pair of consecutive local layers to share K/V.
        Size::Tiny => Dims {
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            mlp: [64, 16],
            layers: [2, 3, 6],
            memory: 4,
            window: 8,
        },
        Size::Small => Dims {
            hidden: 128,
            heads: 4,
            kv_heads: 2,
            mlp: [384, 128],
            layers: [6, 10, 6],
            memory: 16,
            window: 128,
        },
    }
}

impl Preset {
    /// A freshly initialised model with `vocab` tokens and room for `context` positions.
    pub fn build(&self, vocab: usize, context: usize, seed: u64) -> Result<Model> {
        let d = dims(self.size);
        let h = d.hidden;
        let head_dim = h / d.heads;
        let ssm = SsmShape {
            inner: 2 * h,
            d_state: 16,
            d_conv: 4,
            dt_rank: h.div_ceil(16),
        };
        let hymba = self.arch == Arch::Hymba;
        let memory = if hymba && self.meta_tokens {
            d.memory
        } else {
            0
        };
        let config = ModelConfig {
            arch: self.arch,
            vocab_size: vocab,
            hidden: h,
            rope_theta: 10000.0,
            rms_eps: 1e-6,
            context_length: context + memory,
            tie_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            memory_tokens: memory,
            window_rule: Default::default(),
            kv_cache: Default::default(),
        };
        let (n, shape) = match self.arch {
            Arch::Llama => (
                d.layers[0],
                LayerShape {
                    attn: Some(AttnShape::new(d.heads, d.kv_heads, head_dim)),
                    ssm: None,
                    mlp: Some(d.mlp[0]),
                },
            ),
            Arch::Mamba => (
                d.layers[1],
                LayerShape {
                    attn: None,
                    ssm: Some(ssm),
                    mlp: None,
                },
            ),
            Arch::Hymba => (
                d.layers[2],
                LayerShape {
                    attn: Some(AttnShape {
                        v_head_dim: ssm.inner / d.heads,
                        ..AttnShape::new(d.heads, d.kv_heads, head_dim)
                    }),
                    ssm: Some(ssm),
                    mlp: Some(d.mlp[1]),
                },
            ),
        };
        let mut model = random_model(config, &vec![shape; n], seed)?;
        // Embeddings (also the tied output head) with standard deviation 0.02, as GPT-2 and
        // Llama initialise them: the first logits are then near uniform.
        for v in model.embed.dense_weight_mut().iter_mut() {
            *v *= 0.02 * 3f32.sqrt();
        }
        if hymba {
            hymba_layout(&mut model, d.window, self.kv_sharing)?;
            let mut rng_state = seed ^ 0x5eed;
            let mem: Vec<f32> = (0..memory * h)
                .map(|_| {
                    // Small random meta tokens (xorshift: no extra RNG state to carry).
                    rng_state ^= rng_state << 13;
                    rng_state ^= rng_state >> 7;
                    rng_state ^= rng_state << 17;
                    ((rng_state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect();
            model = model.with_memory(mem)?;
        }
        Ok(model)
    }
}

/// Hymba's layout: the first, middle and last layers are global; the others use a sliding
/// window; with `share`, each run of consecutive local layers is cut into pairs whose second
/// layer reads the first one's K/V (and loses its own k/v projections).
fn hymba_layout(model: &mut Model, window: usize, share: bool) -> Result<()> {
    let n = model.layers.len();
    let global = [0, n / 2, n - 1];
    let mut producer: Option<usize> = None;
    for i in 0..n {
        let is_global = global.contains(&i);
        let attn = model.layers[i]
            .attn
            .as_mut()
            .ok_or_else(|| Error::Invalid("hymba layer without attention".into()))?;
        attn.window = (!is_global).then_some(window);
        match producer {
            Some(p) if share && !is_global => {
                attn.kv = KvSource::Shared(p);
                producer = None;
            }
            _ => producer = (!is_global).then_some(i),
        }
    }
    Ok(())
}
