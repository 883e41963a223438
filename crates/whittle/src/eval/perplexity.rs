//! Perplexity with the protocol of the reference (`shared/reference/README.md`): the text is
//! tokenized once without BOS, cut into non-overlapping windows each run from position 0, and
//! PPL = exp(mean NLL over the `seq_len − 1` predicted tokens of every window).

use crate::data::text::windows;
use crate::kernels::exp::logsumexp;
use crate::{Error, Model, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Rows of logits materialised at once (100 MB); all `2048 × 49152` logits would take 400 MB.
const LOGIT_ROWS: usize = 512;

#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    pub nll_sum: f64,
    pub predicted_tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Sum of next-token NLLs of one window (positions 0..t−1 predict 1..t).
pub fn window_nll(model: &Model, window: &[u32]) -> Result<f64> {
    let h = model.config.hidden;
    let vocab = model.config.vocab_size;
    let hidden = model.hidden_states(window, None, None)?;
    let predicting = window.len() - 1;
    let mut nll = 0f64;
    for r0 in (0..predicting).step_by(LOGIT_ROWS) {
        let r1 = (r0 + LOGIT_ROWS).min(predicting);
        let logits = model.logits(&hidden[r0 * h..r1 * h]);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let target = window[r0 + i + 1] as usize;
            let v = logsumexp(row) as f64 - row[target] as f64;
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    name: format!("logits at position {}", r0 + i),
                    count: 1,
                });
            }
            nll += v;
        }
    }
    Ok(nll)
}

/// Sum of the NLLs of `wins`, added in window order. Whole windows per thread while there are
/// enough of them: independent items scale better than one window's kernels split between
/// threads (see `threads::one_thread`); the tail that cannot fill every thread runs window by
/// window on all of them. `progress(done, total)` after each round.
pub fn windows_nll(
    model: &Model,
    wins: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<f64> {
    let mut nll_sum = 0f64;
    let per_round = crate::threads::threads();
    let in_rounds = match per_round {
        1 => 0,
        n => wins.len() - wins.len() % n,
    };
    let (rounds, tail) = wins.split_at(in_rounds);
    for (r, group) in rounds.chunks(per_round).enumerate() {
        let nlls: Vec<f64> = crate::threads::install(|| {
            group
                .par_iter()
                .map(|w| crate::threads::one_thread(|| window_nll(model, w)))
                .collect::<Result<_>>()
        })?;
        nlls.iter().for_each(|v| nll_sum += v);
        progress((r + 1) * per_round, wins.len());
    }
    for (i, w) in tail.iter().enumerate() {
        nll_sum += crate::threads::install(|| window_nll(model, w))?;
        progress(rounds.len() + i + 1, wins.len());
    }
    Ok(nll_sum)
}

/// Perplexity of `ids` over windows of `seq_len` (at most `max_tokens` tokens). `progress` is
/// called after each window with (done, total).
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    max_tokens: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport> {
    if seq_len > model.config.context_length {
        return Err(Error::Invalid(format!(
            "sequence length {seq_len} exceeds the model's context length {}",
            model.config.context_length
        )));
    }
    let wins = windows(ids, seq_len, max_tokens)?;
    let start = Instant::now();
    let nll_sum = windows_nll(model, &wins, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let predicted = wins.len() * (seq_len - 1);
    Ok(PplReport {
        ppl: (nll_sum / predicted as f64).exp(),
        nll_sum,
        predicted_tokens: predicted,
        windows: wins.len(),
        seq_len,
        seconds,
        tokens_per_s: (wins.len() * seq_len) as f64 / seconds,
    })
}
