//! Downstream accuracy: lm-evaluation-harness's log-likelihood scoring of benchmark tasks
//! ([`crate::data::tasks`]), computed with shared prefixes instead of one full forward pass
//! per choice.
//!
//! Tokens are lm-eval's: trailing whitespace of a context moves to its continuation, the whole
//! string is encoded and the continuation is what follows the context's own encoding; a request
//! longer than the model's context loses tokens from the left. The log-likelihood of a
//! continuation is the sum of its tokens' log-probabilities, and it is "greedy" when every one
//! of its tokens is the argmax.
//!
//! Speed: the choices of an example share their context, so the context runs once into a
//! decode cache that each choice forks; the examples of a group (an MMLU subject: its five
//! dev examples) share their longest common token prefix the same way, once per group. A
//! thread scores a few examples together: their contexts in one batched pass, then all their
//! continuations in another, so that the products take hundreds of rows at once. The output
//! head, a fifth of the model, runs only on rows whose logits are scored. Packed weights
//! multiply f32 activations here (not decode's int16 ones), so that a packed model scores as
//! its f32 expansion does.

use crate::data::tasks::{Example, Scoring, Task};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::exp::logsumexp;
use crate::kernels::qdot_i16::with_f32_activations;
use crate::model::sampling::argmax;
use crate::model::KvCache;
use crate::{Error, Model, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// A shared prefix shorter than this is not worth a cache of its own.
const MIN_SHARED_PREFIX: usize = 16;

/// Examples one thread scores together: four HellaSwag items are ~160 context rows and ~400
/// continuation rows per pass, where the products run at their best rate per row.
const BATCH: usize = 4;

/// A request in tokens: the context, and the continuation whose likelihood is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// lm-eval's `_encode_pair`.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<TokenRequest> {
    encode_pair_memo(tok, context, continuation, &mut None)
}

/// [`encode_pair`] reusing the context's tokens from `memo` when the (trimmed) context is the
/// one encoded last: the choices of an example share it.
fn encode_pair_memo(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    memo: &mut Option<(String, Vec<u32>)>,
) -> Result<TokenRequest> {
    let kept = context.trim_end().len();
    let (context, continuation) = (
        &context[..kept],
        format!("{}{continuation}", &context[kept..]),
    );
    if context.is_empty() {
        return Err(Error::Invalid(
            "a request with an empty context (no token to condition on)".into(),
        ));
    }
    let whole = tok.encode(&format!("{context}{continuation}"))?;
    let ctx = match memo {
        Some((text, ids)) if text == context => ids.clone(),
        _ => {
            let ids = tok.encode(context)?;
            *memo = Some((context.to_owned(), ids.clone()));
            ids
        }
    };
    let mut cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    if cont.is_empty() {
        // The context's encoding swallowed the continuation (cannot happen with byte-level
        // BPE and a non-empty continuation, but a user tokenizer might): score it on its own.
        cont = tok.encode(&continuation)?;
    }
    Ok(TokenRequest {
        context: ctx,
        continuation: cont,
    })
}

/// What the model says about one request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Scored {
    /// Σ log p(continuation token | everything before it).
    pub loglik: f64,
    /// Every continuation token was the most likely one.
    pub greedy: bool,
}

/// Log-probability of `target` in a row of logits, and whether it is the argmax.
fn token_score(row: &[f32], target: u32) -> Result<(f64, bool)> {
    let lp = row[target as usize] as f64 - logsumexp(row) as f64;
    if !lp.is_finite() {
        return Err(Error::NonFinite {
            name: "logits of a scored token".into(),
            count: 1,
        });
    }
    Ok((lp, argmax(row) == target))
}

/// Rows of logits computed at once: a row is `vocab` floats (192 KiB for SmolLM2), so a long
/// continuation's head runs in slices.
const HEAD_ROWS: usize = 128;

/// Log-probability of each target given its row of `hidden`, and whether it is the argmax.
fn row_scores(model: &Model, hidden: &[f32], targets: &[u32]) -> Result<Vec<(f64, bool)>> {
    let h = model.config.hidden;
    let mut out = Vec::with_capacity(targets.len());
    for (rows, targets) in hidden.chunks(HEAD_ROWS * h).zip(targets.chunks(HEAD_ROWS)) {
        let logits = model.logits(rows);
        for (row, t) in logits.chunks_exact(model.config.vocab_size).zip(targets) {
            out.push(token_score(row, *t)?);
        }
    }
    Ok(out)
}

/// A continuation's score from its tokens' scores, in order.
fn total(tokens: &[(f64, bool)]) -> Scored {
    tokens.iter().fold(
        Scored {
            loglik: 0.0,
            greedy: true,
        },
        |s, &(lp, g)| Scored {
            loglik: s.loglik + lp,
            greedy: s.greedy && g,
        },
    )
}

/// A cache holding a token prefix, to fork from.
pub struct Prefix {
    tokens: Vec<u32>,
    cache: KvCache,
}

impl Prefix {
    /// Runs `tokens` into a cache with room for `capacity` tokens in all.
    pub fn new(model: &Model, tokens: &[u32], capacity: usize) -> Result<Prefix> {
        let mut cache = KvCache::new(model, capacity)?;
        model.hidden_states(tokens, Some(&mut cache), None)?;
        Ok(Prefix {
            tokens: tokens.to_vec(),
            cache,
        })
    }
}

/// A context and the continuations scored after it (the choices of an example).
pub type SharedContext<'a> = (&'a [u32], Vec<&'a [u32]>);

/// Scores requests grouped by shared context, several contexts at once: the contexts run in
/// one batched pass (each after `prefix`, when it starts with it), then every continuation of
/// every context, on its own fork of its context's cache, in a second one; the output head
/// takes all scored rows of a pass together. Products of a few hundred rows run at about twice
/// the rate per row of the ~25-row products of one continuation at a time. A group too long
/// for the model runs alone, cut from the left as lm-eval does; its flag says that happened.
pub fn score_contexts(
    model: &Model,
    groups: &[SharedContext],
    prefix: Option<&Prefix>,
) -> Result<Vec<(Vec<Scored>, bool)>> {
    let max_len = model.config.context_length - model.config.memory_tokens;
    let mut out: Vec<(Vec<Scored>, bool)> = vec![(Vec::new(), false); groups.len()];
    // Contexts that fit, each with its cache and the position it runs from.
    let mut fits: Vec<(usize, KvCache, usize)> = Vec::new();
    for (g, (context, conts)) in groups.iter().enumerate() {
        if conts.iter().any(|c| c.is_empty()) {
            return Err(Error::Invalid(
                "an empty continuation (no token to score)".into(),
            ));
        }
        let longest = conts.iter().map(|c| c.len()).max().unwrap_or(0);
        if context.len() + longest > max_len {
            out[g] = (
                conts
                    .iter()
                    .map(|c| score_truncated(model, context, c, max_len))
                    .collect::<Result<_>>()?,
                true,
            );
            continue;
        }
        let (cache, start) = match prefix {
            Some(p) if p.tokens.len() < context.len() && context.starts_with(&p.tokens) => {
                (p.cache.clone(), p.tokens.len())
            }
            _ => (KvCache::new(model, context.len() + longest)?, 0),
        };
        fits.push((g, cache, start));
    }
    if fits.is_empty() {
        return Ok(out);
    }
    let h = model.config.hidden;
    let mut seqs: Vec<(&[u32], &mut KvCache)> = fits
        .iter_mut()
        .map(|(g, cache, start)| (&groups[*g].0[*start..], cache))
        .collect();
    let hidden = model.hidden_states_many(&mut seqs)?;
    // Each context's last row predicts its continuations' first tokens.
    let mut lasts = Vec::with_capacity(fits.len() * h);
    let mut end = 0;
    for (g, _, start) in &fits {
        end += groups[*g].0.len() - start;
        lasts.extend_from_slice(&hidden[(end - 1) * h..end * h]);
    }
    let first = model.logits(&lasts);
    let mut scores: Vec<Vec<Vec<(f64, bool)>>> = fits
        .iter()
        .zip(first.chunks_exact(model.config.vocab_size))
        .map(|((g, _, _), row)| {
            groups[*g]
                .1
                .iter()
                .map(|c| token_score(row, c[0]).map(|s| vec![s]))
                .collect()
        })
        .collect::<Result<_>>()?;
    // The other tokens: each continuation on a fork of its context's cache (the last one of a
    // context takes the cache itself).
    let groups_of: Vec<usize> = fits.iter().map(|(g, _, _)| *g).collect();
    let mut forks: Vec<(usize, usize, KvCache)> = Vec::new();
    for (f, (g, cache, _)) in fits.into_iter().enumerate() {
        let longer: Vec<usize> = (0..groups[g].1.len())
            .filter(|&c| groups[g].1[c].len() > 1)
            .collect();
        if let Some((&last, rest)) = longer.split_last() {
            forks.extend(rest.iter().map(|&c| (f, c, cache.clone())));
            forks.push((f, last, cache));
        }
    }
    if !forks.is_empty() {
        let cont = |f: usize, c: usize| groups[groups_of[f]].1[c];
        let targets: Vec<u32> = forks
            .iter()
            .flat_map(|(f, c, _)| cont(*f, *c)[1..].iter().copied())
            .collect();
        let mut seqs: Vec<(&[u32], &mut KvCache)> = forks
            .iter_mut()
            .map(|(f, c, cache)| {
                let tokens = cont(*f, *c);
                (&tokens[..tokens.len() - 1], cache)
            })
            .collect();
        let rest = model.hidden_states_many(&mut seqs)?;
        let mut rows = row_scores(model, &rest, &targets)?.into_iter();
        for (f, c, _) in &forks {
            scores[*f][*c].extend(rows.by_ref().take(cont(*f, *c).len() - 1));
        }
    }
    for (g, s) in groups_of.into_iter().zip(scores) {
        out[g] = (s.iter().map(|t| total(t)).collect(), false);
    }
    Ok(out)
}

/// lm-eval's truncation: the last `max_len + 1` tokens of context + continuation, the final
/// token only predicted.
fn score_truncated(model: &Model, context: &[u32], cont: &[u32], max_len: usize) -> Result<Scored> {
    let all: Vec<u32> = context.iter().chain(cont).copied().collect();
    let window = &all[all.len().saturating_sub(max_len + 1)..];
    let input = &window[..window.len() - 1];
    let hidden = model.hidden_states(input, None, None)?;
    let h = model.config.hidden;
    let scored_rows = cont.len().min(input.len());
    let tokens = row_scores(
        model,
        &hidden[(input.len() - scored_rows) * h..],
        &cont[cont.len() - scored_rows..],
    )?;
    Ok(total(&tokens))
}

/// One example's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The example's position in the list scored (in [`run_task`]'s result: in the split).
    pub index: usize,
    pub gold: usize,
    pub scores: Vec<Scored>,
    pub truncated: bool,
    /// Whether the example counts as right under each of its task's metrics (filled by
    /// [`run_task`]), so that two models scored on the same examples can be compared example
    /// by example: a paired difference has a far smaller error than two separate accuracies.
    pub hits: Vec<(&'static str, bool)>,
}

/// An example in tokens: its requests grouped by context (all choices of a multiple-choice
/// item share one; Winogrande's differ).
struct Tokenized {
    contexts: Vec<(Vec<u32>, Vec<Vec<u32>>)>,
}

fn tokenize(tok: &Tokenizer, ex: &Example) -> Result<Tokenized> {
    let mut contexts: Vec<(Vec<u32>, Vec<Vec<u32>>)> = Vec::new();
    let mut memo = None;
    for r in &ex.requests {
        let t = encode_pair_memo(tok, &r.context, &r.continuation, &mut memo)?;
        match contexts.last_mut() {
            Some((c, conts)) if *c == t.context => conts.push(t.continuation),
            _ => contexts.push((t.context, vec![t.continuation])),
        }
    }
    Ok(Tokenized { contexts })
}

/// Scores examples together (all their contexts in one pass, then all their continuations):
/// each example's scores in order, and whether one of its requests was cut.
fn score_batch(
    model: &Model,
    items: &[Tokenized],
    prefix: Option<&Prefix>,
) -> Result<Vec<(Vec<Scored>, bool)>> {
    let groups: Vec<SharedContext> = items
        .iter()
        .flat_map(|t| &t.contexts)
        .map(|(ctx, conts)| (&ctx[..], conts.iter().map(Vec::as_slice).collect()))
        .collect();
    let mut scored = score_contexts(model, &groups, prefix)?.into_iter();
    Ok(items
        .iter()
        .map(|t| {
            scored.by_ref().take(t.contexts.len()).fold(
                (Vec::new(), false),
                |(mut all, cut), (s, c)| {
                    all.extend(s);
                    (all, cut || c)
                },
            )
        })
        .collect())
}

/// The longest token prefix every example's every context starts with, minus one token so that
/// each context still has a position of its own to run.
fn common_prefix(items: &[Tokenized]) -> Vec<u32> {
    let mut ctxs = items.iter().flat_map(|t| t.contexts.iter().map(|c| &c.0));
    let Some(first) = ctxs.next() else {
        return Vec::new();
    };
    let mut len = first.len().saturating_sub(1);
    for c in ctxs {
        len = len.min(c.len().saturating_sub(1));
        len = first[..len]
            .iter()
            .zip(c)
            .take_while(|(a, b)| a == b)
            .count();
    }
    first[..len].to_vec()
}

/// Scores examples (in order), the examples of one `group` key sharing their common prefix.
/// `progress(done, total)` after each round of examples.
pub fn score_examples(
    model: &Model,
    tok: &Tokenizer,
    examples: &[Example],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Sample>> {
    let tokenized: Vec<Tokenized> = crate::threads::install(|| {
        examples
            .par_iter()
            .map(|e| tokenize(tok, e))
            .collect::<Result<_>>()
    })?;
    let max_len = model.config.context_length - model.config.memory_tokens;
    let mut samples = Vec::with_capacity(examples.len());
    let mut start = 0;
    while start < examples.len() {
        // A group: consecutive examples of one subject (all of a task without subjects).
        let end = start
            + examples[start..]
                .iter()
                .take_while(|e| e.subject == examples[start].subject)
                .count();
        let items = &tokenized[start..end];
        let shared = common_prefix(items);
        let longest = items
            .iter()
            .flat_map(|t| &t.contexts)
            .map(|(c, conts)| c.len() + conts.iter().map(Vec::len).max().unwrap_or(0))
            .filter(|n| *n <= max_len)
            .max()
            .unwrap_or(0);
        // (Examples too long for the model are cut from the left and run alone.)
        let prefix = if shared.len() >= MIN_SHARED_PREFIX && longest > shared.len() {
            Some(crate::threads::install(|| {
                Prefix::new(model, &shared, longest)
            })?)
        } else {
            None
        };
        // Rounds of batches, one thread each (short sequences scale better over examples than
        // split inside one forward pass). Eight batches per thread: batches differ in length,
        // and a thread waits at a round's end for the last one.
        let round = crate::threads::threads() * BATCH * 8;
        for (r, chunk) in items.chunks(round).enumerate() {
            let done: Vec<Vec<(Vec<Scored>, bool)>> = crate::threads::install(|| {
                chunk
                    .par_chunks(BATCH)
                    .map(|batch| {
                        crate::threads::one_thread(|| {
                            with_f32_activations(|| score_batch(model, batch, prefix.as_ref()))
                        })
                    })
                    .collect::<Result<_>>()
            })?;
            for (i, (scores, truncated)) in done.into_iter().flatten().enumerate() {
                let index = start + r * round + i;
                samples.push(Sample {
                    index,
                    gold: examples[index].gold,
                    scores,
                    truncated,
                    hits: Vec::new(),
                });
            }
            progress(samples.len(), examples.len());
        }
        start = end;
    }
    Ok(samples)
}

/// A metric with its standard error (of the mean over examples, as lm-eval's `mean_stderr`).
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
    pub stderr: f64,
}

/// Mean and standard error of the mean (sample standard deviation / √n).
fn mean_stderr(name: &'static str, xs: &[f64]) -> Metric {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Metric {
        name,
        value: mean,
        stderr: (var / n).sqrt(),
    }
}

/// Index of the largest value, the first on ties (numpy's `argmax`).
fn first_max(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Whether one example is right under each accuracy metric of its task: `acc` (the choice of
/// highest log-likelihood is the gold one; the first on ties, as numpy's argmax) and, where
/// lm-eval reports it, `acc_norm` (each log-likelihood divided by its choice's length in
/// characters); for LAMBADA `acc` is the greedy last word.
pub fn hits(task: Task, example: &Example, sample: &Sample) -> Vec<(&'static str, bool)> {
    match task.scoring() {
        Scoring::Choice { norm } => {
            let acc = first_max(sample.scores.iter().map(|c| c.loglik)) == sample.gold;
            let mut out = vec![("acc", acc)];
            if norm {
                let normed = sample
                    .scores
                    .iter()
                    .zip(&example.choice_chars)
                    .map(|(c, n)| c.loglik / (*n).max(1) as f64);
                out.push(("acc_norm", first_max(normed) == sample.gold));
            }
            out
        }
        Scoring::LastWord => vec![("acc", sample.scores[0].greedy)],
    }
}

/// lm-eval's metrics of a task from its samples: the accuracies of [`hits`], and for LAMBADA
/// also `perplexity` (exp of minus the mean log-likelihood; its error by the delta method,
/// where lm-eval bootstraps).
pub fn metrics(task: Task, examples: &[Example], samples: &[Sample]) -> Vec<Metric> {
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    let per_example: Vec<_> = samples
        .iter()
        .map(|s| hits(task, &examples[s.index], s))
        .collect();
    let mut out: Vec<Metric> = (0..hits(task, &examples[first.index], first).len())
        .map(|m| {
            let xs: Vec<f64> = per_example
                .iter()
                .map(|h| f64::from(u8::from(h[m].1)))
                .collect();
            mean_stderr(per_example[0][m].0, &xs)
        })
        .collect();
    if task.scoring() == Scoring::LastWord {
        let ll: Vec<f64> = samples.iter().map(|s| s.scores[0].loglik).collect();
        let m = mean_stderr("loglik", &ll);
        let ppl = (-m.value).exp();
        out.push(Metric {
            name: "perplexity",
            value: ppl,
            stderr: ppl * m.stderr,
        });
    }
    out
}

/// Accuracy per MMLU subject: (correct, examples).
pub fn per_subject(examples: &[Example], samples: &[Sample]) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for s in samples {
        if let Some(sub) = &examples[s.index].subject {
            let e = out.entry(sub.clone()).or_default();
            e.0 += usize::from(first_max(s.scores.iter().map(|c| c.loglik)) == s.gold);
            e.1 += 1;
        }
    }
    out
}

/// One task's result.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub task: Task,
    pub split: &'static str,
    pub shots: usize,
    pub examples: usize,
    pub metrics: Vec<Metric>,
    /// Examples with a request cut from the left to fit the model's context.
    pub truncated: usize,
    pub seconds: f64,
    /// MMLU: correct and total per subject.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subjects: BTreeMap<String, (usize, usize)>,
}

impl TaskReport {
    /// The metrics as provenance figures (fractions, as lm-eval reports them).
    pub fn figures(&self) -> Vec<crate::model::provenance::Figure> {
        self.metrics
            .iter()
            .map(|m| crate::model::provenance::Figure {
                task: self.task.name().to_string(),
                metric: m.name.to_string(),
                value: m.value,
                stderr: Some(m.stderr),
                setting: format!(
                    "{}-shot, {} examples of the {} split",
                    self.shots, self.examples, self.split
                ),
            })
            .collect()
    }
}

/// Runs one task on the first `limit` examples (MMLU: of each subject, as lm-eval's
/// `--limit` does for its subtasks). Returns the report and the per-example samples.
pub fn run_task(
    model: &Model,
    tok: &Tokenizer,
    task: Task,
    data_dir: &std::path::Path,
    shots: usize,
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(TaskReport, Vec<Sample>)> {
    let shots = if task == Task::Mmlu { shots } else { 0 };
    let mut examples = task.load(data_dir, shots)?;
    // Positions in the whole split, so that samples name their example even after `limit`.
    let mut kept: Vec<usize> = (0..examples.len()).collect();
    if let Some(n) = limit {
        let mut seen: BTreeMap<Option<String>, usize> = BTreeMap::new();
        kept.retain(|&i| {
            let c = seen.entry(examples[i].subject.clone()).or_default();
            *c += 1;
            *c <= n
        });
        examples = kept.iter().map(|&i| examples[i].clone()).collect();
    }
    let t = Instant::now();
    let mut samples = score_examples(model, tok, &examples, progress)?;
    let report = TaskReport {
        task,
        split: task.split(),
        shots,
        examples: samples.len(),
        metrics: metrics(task, &examples, &samples),
        truncated: samples.iter().filter(|s| s.truncated).count(),
        seconds: t.elapsed().as_secs_f64(),
        subjects: per_subject(&examples, &samples),
    };
    for s in &mut samples {
        s.hits = hits(task, &examples[s.index], s);
        s.index = kept[s.index];
    }
    Ok((report, samples))
}
