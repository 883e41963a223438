//! The real model at every SIMD level this CPU runs (`simd::for_each_level`: each level forced
//! on one thread): same logits as the default level, and no slow fallback. The second test is
//! the one that would have caught decode from Q4_1 blocks at 0.9 tok/s on AVX2 CPUs (a libm
//! `fmaf` per weight): at every level, decode from the packed blocks keeps pace with the same
//! level's f32 decode.

mod common;

use common::load_default;
use std::time::Instant;
use whittle::kernels::simd::{for_each_level, Level};
use whittle::model::{sampling::argmax, KvCache, Logits};
use whittle::Model;

fn prompt(loaded: &whittle::io::resolve::Loaded) -> Vec<u32> {
    common::split_ids(&loaded.tokenizer, "valid")[..48].to_vec()
}

/// Max |a − b| relative to the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / scale
}

#[test]
fn prefill_and_decode_logits_agree_at_every_level() {
    let loaded = load_default();
    let ids = prompt(&loaded);
    let m = loaded.model;
    let want = m.forward(&ids, None, Logits::Last, None).unwrap();
    let step = |m: &Model| {
        let mut cache = KvCache::new(m, 64).unwrap();
        let l = m
            .forward(&ids, Some(&mut cache), Logits::Last, None)
            .unwrap();
        m.forward(&[argmax(&l)], Some(&mut cache), Logits::Last, None)
            .unwrap()
    };
    let want_step = step(&m);
    for_each_level(|level| {
        let got = m.forward(&ids, None, Logits::Last, None).unwrap();
        let d = rel_diff(&got, &want);
        assert!(d < 1e-3, "{level}: prefill logits differ by {d:.2e}");
        assert_eq!(argmax(&got), argmax(&want), "{level}");
        // Decode reads the Q4_1 blocks through the level's quantized dot product.
        let d = rel_diff(&step(&m), &want_step);
        assert!(d < 1e-3, "{level}: decode logits differ by {d:.2e}");
    });
}

#[test]
fn decode_from_blocks_keeps_pace_with_f32_decode_at_every_level() {
    let loaded = load_default();
    let ids = prompt(&loaded);
    let packed = loaded.model;
    let mut dense = load_default().model;
    dense.densify();
    // Seconds of `steps` one-token decode steps after the prompt, best of `rounds`.
    let time = |m: &Model| {
        let mut cache = KvCache::new(m, 64).unwrap();
        let mut next = argmax(
            &m.forward(&ids, Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
        let s = Instant::now();
        for _ in 0..6 {
            next = argmax(
                &m.forward(&[next], Some(&mut cache), Logits::Last, None)
                    .unwrap(),
            );
        }
        s.elapsed().as_secs_f64()
    };
    let mut seen = Vec::new();
    for_each_level(|level: Level| {
        // Alternated, best of three each: other tests share the cores.
        let (mut tp, mut tf) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            tp = tp.min(time(&packed));
            tf = tf.min(time(&dense));
        }
        eprintln!(
            "{level}: decode from Q4_1 blocks {:.1} tok/s, from f32 weights {:.1} tok/s (1 thread)",
            6.0 / tp,
            6.0 / tf
        );
        seen.push(level);
        assert!(
            tp <= 3.0 * tf,
            "{level}: decode from packed blocks {tp:.3} s vs f32 {tf:.3} s: a slow fallback"
        );
    });
    assert_eq!(seen, Level::supported());
}
