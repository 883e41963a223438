//! Autoregressive generation: one prefill over the prompt into a KV cache, then one-token decode
//! steps, streaming each new token to a callback, stopping at EOS or the token budget.

use super::sampling::Sampler;
use super::{KvCache, Logits, Model};
use crate::Result;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// True when generation stopped at the end-of-sequence token.
    pub stopped_at_eos: bool,
}

/// Generates up to `max_new` tokens after `prompt`. `on_token` sees each new token as it comes
/// and may stop generation by returning `false`.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation> {
    let room = model.config.context_length - model.config.memory_tokens;
    let mut cache = KvCache::new(model, (prompt.len() + max_new).min(room))?;
    let mut out = Generation::default();
    if max_new == 0 {
        return Ok(out);
    }
    let t0 = Instant::now();
    let mut logits = model.forward(prompt, Some(&mut cache), Logits::Last, None)?;
    out.prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&logits);
        if Some(next) == eos {
            out.stopped_at_eos = true;
            break;
        }
        out.tokens.push(next);
        if !on_token(next) || out.tokens.len() == max_new || cache.len() == cache.capacity() {
            break;
        }
        logits = model.forward(&[next], Some(&mut cache), Logits::Last, None)?;
    }
    out.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(out)
}
