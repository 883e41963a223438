//! One-shot compression on SmolLM2-135M with small calibration slices: data-free methods must
//! reproduce the reference perplexities; calibrated methods must order as their papers say.
//! Evaluation: WikiText-2 test, windows of 2048 (reference protocol).

mod common;

use common::{load_default, split_ids};
use std::sync::OnceLock;
use whittle::data::calib::calibration_windows;
use whittle::eval::perplexity::perplexity;
use whittle::lowrank::{compensate_model, LowRankMethod};
use whittle::quant::{quantize_model, QuantConfig, QuantMethod};
use whittle::sparsity::{sparsify_model, Pattern, SparsityMethod};
use whittle::Model;

fn ids(split: &str) -> &'static [u32] {
    static TEST: OnceLock<Vec<u32>> = OnceLock::new();
    static VALID: OnceLock<Vec<u32>> = OnceLock::new();
    let cell = if split == "test" { &TEST } else { &VALID };
    cell.get_or_init(|| split_ids(&load_default().tokenizer, split))
}

fn ppl(m: &Model, tokens: usize) -> f64 {
    perplexity(m, ids("test"), 2048, Some(tokens), &mut |_, _| {})
        .unwrap()
        .ppl
}

/// Two calibration windows of 512 tokens (seeded like the reference).
fn calib() -> Vec<&'static [u32]> {
    calibration_windows(ids("valid"), 2, 512, 0).unwrap()
}

const INT4: QuantConfig = QuantConfig {
    bits: 4,
    group: 128,
    sym: false,
};

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() / want < rel
}

#[test]
fn data_free_methods_match_the_reference_exactly() {
    // Reference table (first 4 windows): magnitude 2:4 1935.06, RTN int4 g128 asym 33.8704.
    let mut m = load_default().model;
    magnitude_24(&mut m);
    let p = ppl(&m, 8192);
    assert!(close(p, 1935.06, 0.002), "magnitude 2:4: {p}");
    let mut m = load_default().model;
    quantize_model(&mut m, &[], QuantMethod::Rtn, INT4, &[], &mut |_, _| {}).unwrap();
    let p = ppl(&m, 8192);
    assert!(close(p, 33.8704, 0.002), "RTN int4: {p}");
}

#[test]
fn calibrated_methods_beat_their_baselines() {
    let dense = load_default().model;
    let windows = calib();
    let nm = Pattern::NM { n: 2, m: 4 };
    // One window of 2048 for speed (dense: 15.1467).
    // Returns (perplexity, mean relative output error on the calibration inputs).
    let run_sparse = |method| {
        let mut m = load_default().model;
        let reports = sparsify_model(&mut m, &windows, method, nm, &[], &mut |_, _| {}).unwrap();
        assert_eq!(reports.len(), 30 * 7);
        let errs: Vec<f64> = reports.iter().filter_map(|r| r.rel_error).collect();
        (
            ppl(&m, 2048),
            errs.iter().sum::<f64>() / errs.len().max(1) as f64,
        )
    };
    let (magnitude, _) = run_sparse(SparsityMethod::Magnitude);
    let (wanda, wanda_err) = run_sparse(SparsityMethod::Wanda);
    let (sparsegpt, sgpt_err) = run_sparse(SparsityMethod::SparseGpt {
        block: 128,
        damp: 0.01,
    });
    eprintln!(
        "2:4 first window: magnitude {magnitude:.2}, Wanda {wanda:.2} (calib error {wanda_err:.4}), \
         SparseGPT {sparsegpt:.2} ({sgpt_err:.4})"
    );
    // SparseGPT minimises the output error on the calibration inputs, so it must beat Wanda
    // there; on held-out text 1,024 calibration tokens are too few for it to win (with the
    // reference's 8 × 2048 it does: 90.19 vs 203.36, BENCHMARKS.md), so only both beating
    // magnitude pruning by far is asserted.
    assert!(
        sgpt_err < wanda_err,
        "calibration error: SparseGPT {sgpt_err} vs Wanda {wanda_err}"
    );
    assert!(sparsegpt < magnitude / 4.0 && wanda < magnitude / 4.0);

    let mut rtn = load_default().model;
    quantize_model(&mut rtn, &[], QuantMethod::Rtn, INT4, &[], &mut |_, _| {}).unwrap();
    let rtn_ppl = ppl(&rtn, 2048);
    let mut gptq = load_default().model;
    let gptq_method = QuantMethod::Gptq {
        block: 128,
        damp: 0.01,
        act_order: false,
    };
    quantize_model(&mut gptq, &windows, gptq_method, INT4, &[], &mut |_, _| {}).unwrap();
    let gptq_ppl = ppl(&gptq, 2048);
    // With 2 × 512 calibration tokens on weights that were already 4-bit, GPTQ lands near RTN.
    assert!(
        close(gptq_ppl, rtn_ppl, 0.15),
        "GPTQ {gptq_ppl} vs RTN {rtn_ppl}"
    );

    let compensated = |method| {
        let mut m = load_default().model;
        quantize_model(&mut m, &[], QuantMethod::Rtn, INT4, &[], &mut |_, _| {}).unwrap();
        compensate_model(
            &mut m,
            &dense,
            &windows,
            method,
            16,
            false,
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        ppl(&m, 2048)
    };
    let (svd, eora) = (
        compensated(LowRankMethod::Svd),
        compensated(LowRankMethod::Eora),
    );
    eprintln!("int4 first window: RTN {rtn_ppl:.3}, GPTQ {gptq_ppl:.3}, +SVD r16 {svd:.3}, +EoRA r16 {eora:.3}");
    assert!(eora < svd && svd < rtn_ppl);
}

/// Magnitude 2:4 on all seven linears of every layer (data-free).
fn magnitude_24(m: &mut Model) {
    let nm = Pattern::NM { n: 2, m: 4 };
    sparsify_model(m, &[], SparsityMethod::Magnitude, nm, &[], &mut |_, _| {}).unwrap();
}

/// Logits of a 64-token WikiText-2 validation prompt and of `steps` greedy tokens after it.
fn greedy_logits(m: &Model, steps: usize) -> Vec<Vec<f32>> {
    use whittle::model::{sampling::argmax, KvCache, Logits};
    let prompt = &ids("valid")[..64];
    let mut cache = KvCache::new(m, 64 + steps).unwrap();
    let mut rows = vec![m
        .forward(prompt, Some(&mut cache), Logits::Last, None)
        .unwrap()];
    for _ in 0..steps {
        let next = argmax(rows.last().unwrap());
        rows.push(
            m.forward(&[next], Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
    }
    rows
}

/// `b` decodes `steps` greedy tokens as `a` does, logits within `tol` of their range.
fn decodes_alike(a: &Model, b: &Model, steps: usize, tol: f32, what: &str) {
    let (a, b) = (greedy_logits(a, steps), greedy_logits(b, steps));
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        let argmax = whittle::model::sampling::argmax;
        assert_eq!(argmax(a), argmax(b), "step {i}, {what}");
        let range = a.iter().fold(0f32, |r, v| r.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < tol * range, "step {i}, {what}: {diff} of {range}");
    }
}

/// The "2:4 + int4" chain (magnitude 2:4, then RTN int4 on a symmetric grid, group 128) stored
/// as 2:4 codes where the level has their kernel: every linear packs, perplexity is that of
/// the dense blocks (prefill expands both to the same weights), and greedy decode through the
/// 2:4 integer dot picks the same tokens with logits within 1e-3 of their range.
#[test]
fn two_four_int4_codes_decode_like_their_dense_blocks() {
    use whittle::kernels::simd::{with_level, Level};
    use whittle::kernels::sparse24_int;
    let mut blocks = load_default().model;
    magnitude_24(&mut blocks);
    let sym = QuantConfig { sym: true, ..INT4 };
    quantize_model(&mut blocks, &[], QuantMethod::Rtn, sym, &[], &mut |_, _| {}).unwrap();
    for level in Level::supported()
        .into_iter()
        .filter(|l| sparse24_int::takes(*l, 4))
    {
        with_level(level, || {
            let mut codes = blocks.clone();
            assert_eq!(codes.pack_sparse24(), 30 * 7, "{level}");
            assert_eq!(ppl(&codes, 2048), ppl(&blocks, 2048), "{level}");
            decodes_alike(&blocks, &codes, 16, 1e-3, level.name());
        });
    }
}

/// SmolLM2 read as bf16 (every weight cut to bf16), magnitude 2:4: the linears pack with bf16
/// kept values where the level packs 2:4 at all, and decode through them picks the tokens of
/// the dense bf16 model, logits within 1e-4 of their range (the same values, other sums).
#[test]
fn two_four_bf16_model_decodes_like_its_dense_twin() {
    use whittle::kernels::simd::{with_level, Level};
    use whittle::kernels::sparse24::packed_is_faster;
    use whittle::model::sparse::{KeptValues, Sparse24};
    use whittle::model::Weight;
    let mut dense = load_default().model;
    dense.densify();
    let layers = dense.layers.iter_mut().flat_map(|l| l.linears_mut());
    for (_, _, lin) in layers {
        let w = lin.dense_weight_mut();
        w.iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    }
    magnitude_24(&mut dense);
    for level in Level::supported()
        .into_iter()
        .filter(|l| packed_is_faster(*l))
    {
        with_level(level, || {
            let mut packed = dense.clone();
            assert_eq!(packed.pack_sparse24(), 30 * 7, "{level}");
            let bf16 = |l: &whittle::model::Linear| {
                matches!(
                    l.weight(),
                    Weight::Sparse24(Sparse24 {
                        values: KeptValues::Bf16(_),
                        ..
                    })
                )
            };
            assert!(packed
                .layers
                .iter()
                .all(|l| l.linears().iter().all(|(_, _, x)| bf16(x))));
            decodes_alike(&dense, &packed, 8, 1e-4, level.name());
        });
    }
}
