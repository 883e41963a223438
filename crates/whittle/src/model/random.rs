//! Seeded random models: the "tiny random model" every method and kernel test runs on.

use super::{Attention, KvSource, Layer, LayerShape, Linear, Mlp, Model, ModelConfig};
use crate::Result;
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Uniform weights scaled by `1/√in` (so activations stay O(1) through depth), norm weights near 1.
pub fn random_model(config: ModelConfig, shapes: &[LayerShape], seed: u64) -> Result<Model> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let h = config.hidden;
    let mut lin = |out: usize, inp: usize| random_linear(&mut rng, out, inp);
    let mut layers = Vec::with_capacity(shapes.len());
    for s in shapes {
        let attn = match s.attn {
            Some(sh) => Some(Attention {
                shape: sh,
                q: lin(sh.q_dim(), h)?,
                kv: KvSource::Own {
                    k: lin(sh.kv_dim(), h)?,
                    v: lin(sh.v_dim(), h)?,
                },
                o: lin(h, sh.out_dim())?,
                window: None,
            }),
            None => None,
        };
        let mlp = match s.mlp {
            Some(w) => Some(Mlp {
                gate: lin(w, h)?,
                up: lin(w, h)?,
                down: lin(h, w)?,
            }),
            None => None,
        };
        layers.push(Layer {
            attn_norm: vec![1.0; h],
            attn,
            ssm: None,
            fusion: None,
            mlp_norm: vec![1.0; h],
            mlp,
        });
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let embed = (0..config.vocab_size * h)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let embed = Linear::dense("embed_tokens", embed, config.vocab_size, h)?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(random_linear(&mut rng, config.vocab_size, h)?)
    };
    let final_norm = (0..h).map(|_| rng.random_range(0.8f32..1.2)).collect();
    Model::new(config, embed, layers, final_norm, lm_head)
}

fn random_linear(rng: &mut SmallRng, out: usize, inp: usize) -> Result<Linear> {
    let a = 1.0 / (inp as f32).sqrt();
    let w = (0..out * inp).map(|_| rng.random_range(-a..a)).collect();
    Linear::dense("random", w, out, inp)
}
