//! Throughput with the reference's protocol (`shared/reference/harness/bench.py`): prefill is one
//! forward over T tokens with logits for the last position only; decode is 127 greedy one-token
//! steps after a 128-token prompt (the prefill that yields the first new token is not timed).
//! Each figure is the median of `reps` timed runs after one warm-up.

use crate::model::sampling::{argmax, Sampler, SamplingConfig};
use crate::model::{generate::generate, KvCache, Logits};
use crate::{Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    pub what: String,
    pub tokens: usize,
    pub median_s: f64,
    pub tokens_per_s: f64,
    pub runs_s: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn row(what: &str, tokens: usize, runs: Vec<f64>) -> SpeedRow {
    let m = median(runs.clone());
    SpeedRow {
        what: what.into(),
        tokens,
        median_s: m,
        tokens_per_s: tokens as f64 / m,
        runs_s: runs,
    }
}

/// Prefill throughput over the first `t` tokens of `ids`, one row per model. The models are
/// timed in turn within each repetition (after one warm-up each), so that a drift of the host
/// during the measurement (±10 % within minutes on the development VMs) reaches all alike.
pub fn prefill(models: &[&Model], ids: &[u32], t: usize, reps: usize) -> Result<Vec<SpeedRow>> {
    let x = ids.get(..t).ok_or_else(|| {
        Error::Invalid(format!("bench needs {t} tokens of text, has {}", ids.len()))
    })?;
    let mut runs = vec![Vec::with_capacity(reps); models.len()];
    for i in 0..=reps {
        for (model, runs) in models.iter().zip(&mut runs) {
            let s = Instant::now();
            let l = model.forward(x, None, Logits::Last, None)?;
            std::hint::black_box(argmax(&l));
            if i > 0 {
                runs.push(s.elapsed().as_secs_f64());
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|r| row(&format!("prefill {t}"), t, r))
        .collect())
}

/// Greedy decode throughput: `new` tokens after a `prompt_len`-token prompt, timing the
/// `new − 1` one-token steps. Also returns the generated ids (for consistency checks).
pub fn decode(
    model: &Model,
    ids: &[u32],
    prompt_len: usize,
    new: usize,
    reps: usize,
) -> Result<(SpeedRow, Vec<u32>)> {
    let prompt = ids
        .get(..prompt_len)
        .ok_or_else(|| Error::Invalid(format!("bench needs {prompt_len} tokens of text")))?;
    let mut runs = Vec::with_capacity(reps);
    let mut tokens = Vec::new();
    for i in 0..=reps {
        let mut sampler = Sampler::new(SamplingConfig::default())?;
        // No EOS: the protocol times exactly `new` tokens.
        let g = generate(model, prompt, new, &mut sampler, None, &mut |_| true)?;
        if i > 0 {
            runs.push(g.decode_seconds);
        }
        tokens = g.tokens;
    }
    Ok((
        row(&format!("decode {new} after {prompt_len}"), new - 1, runs),
        tokens,
    ))
}

/// Decode throughput at a long context: the first `context` tokens of `ids` are prefilled into a
/// cache (not timed), then `steps` greedy one-token steps are timed. Also returns the cache's
/// bytes at the end, which is what grows with context.
pub fn decode_at_context(
    model: &Model,
    ids: &[u32],
    context: usize,
    steps: usize,
    reps: usize,
) -> Result<(SpeedRow, usize)> {
    let prompt = ids
        .get(..context)
        .ok_or_else(|| Error::Invalid(format!("bench needs {context} tokens of text")))?;
    let mut runs = Vec::with_capacity(reps);
    let mut bytes = 0;
    for i in 0..=reps {
        let mut cache = KvCache::new(model, context + steps)?;
        let mut logits = model.forward(prompt, Some(&mut cache), Logits::Last, None)?;
        let s = Instant::now();
        for _ in 0..steps {
            let next = argmax(&logits);
            logits = model.forward(&[next], Some(&mut cache), Logits::Last, None)?;
        }
        if i > 0 {
            runs.push(s.elapsed().as_secs_f64());
        }
        bytes = cache.bytes();
    }
    Ok((row(&format!("decode at {context}"), steps, runs), bytes))
}
