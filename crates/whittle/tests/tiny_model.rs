//! The forward pass, cache, hooks and file formats on a tiny random model.

mod common;

use common::*;
use whittle::io::{gguf, resolve, safetensors, tokenizer::Tokenizer};
use whittle::model::{
    random::random_model, AttnShape, KvCache, LayerShape, Logits, Observer, Site,
};

const TOKENS: [u32; 12] = [5, 17, 200, 3, 99, 42, 42, 7, 255, 0, 128, 64];

fn logits(m: &whittle::Model, ids: &[u32]) -> Vec<f32> {
    m.forward(ids, None, Logits::All, None).unwrap()
}

#[test]
fn cached_decode_equals_full_forward() {
    let m = tiny_model(1);
    let full = logits(&m, &TOKENS);
    let mut cache = KvCache::new(&m, 20).unwrap();
    // Prefill 5, then one token at a time.
    let mut got = m
        .forward(&TOKENS[..5], Some(&mut cache), Logits::All, None)
        .unwrap();
    for &t in &TOKENS[5..] {
        got.extend(
            m.forward(&[t], Some(&mut cache), Logits::All, None)
                .unwrap(),
        );
    }
    assert!(max_abs_diff(&full, &got) < 1e-5);
    assert_eq!(cache.len(), TOKENS.len());
    let last = m.forward(&TOKENS, None, Logits::Last, None).unwrap();
    // One row goes through the matrix-vector kernel, many rows through GEMM: rounding differs.
    assert!(max_abs_diff(&last, &full[(TOKENS.len() - 1) * VOCAB..]) < 1e-5);
}

/// A cache kept in f16 holds half the bytes and decodes close to the full forward pass: past
/// 64 keys (the decode kernel's own path) and before (widened history), prefill included.
#[test]
fn f16_cache_decodes_close_to_full_forward() {
    let config = whittle::model::ModelConfig {
        context_length: 128,
        ..tiny_config(true)
    };
    let mut m = random_model(config, &uniform_shapes(3), 4).unwrap();
    let ids: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 256).collect();
    let full = logits(&m, &ids);
    let f32_bytes = KvCache::new(&m, 100).unwrap().bytes();
    m.config.kv_cache = whittle::model::KvDtype::F16;
    let mut cache = KvCache::new(&m, 100).unwrap();
    assert_eq!(cache.bytes() * 2, f32_bytes);
    assert_eq!(KvCache::footprint(&m, 100), cache.bytes());
    let mut got = m
        .forward(&ids[..10], Some(&mut cache), Logits::All, None)
        .unwrap();
    // Two tokens at once (the widened path), then one at a time.
    got.extend(
        m.forward(&ids[10..12], Some(&mut cache), Logits::All, None)
            .unwrap(),
    );
    for &t in &ids[12..] {
        got.extend(
            m.forward(&[t], Some(&mut cache), Logits::All, None)
                .unwrap(),
        );
    }
    let range = full.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = max_abs_diff(&full, &got);
    assert!(diff < 3e-3 * range, "{diff} vs logits up to {range}");
    // Rounded, not equal: the f16 rows really are used.
    assert!(diff > 0.0);
}

#[test]
fn safetensors_round_trip_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    for tied in [true, false] {
        let m = random_model(tiny_config(tied), &uniform_shapes(2), 3).unwrap();
        let tok = Tokenizer::from_spec(&tiny_tokenizer_spec()).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        safetensors::save(&m, Some(&tok), false, &out).unwrap();
        let loaded = resolve::load(&out).unwrap();
        assert_eq!(logits(&m, &TOKENS), logits(&loaded.model, &TOKENS));
        assert_eq!(loaded.model.config, m.config);
        assert_eq!(
            loaded.tokenizer.encode("a 12").unwrap(),
            vec![97, 32, 49, 50]
        );
        // Saving onto an existing folder is refused, never half-overwritten.
        assert!(safetensors::save(&m, Some(&tok), false, &out).is_err());
    }
}

#[test]
fn gguf_round_trip_gives_identical_logits_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let m = tiny_model(4);
    let spec = tiny_tokenizer_spec();
    gguf::save(&m, Some(&spec), gguf::GgufType::F32, &path).unwrap();
    let loaded = resolve::load(&path).unwrap();
    // Q/K rows are permuted on save and un-permuted on load: logits must agree exactly.
    assert_eq!(logits(&m, &TOKENS), logits(&loaded.model, &TOKENS));
    let chat = loaded.tokenizer.render_chat("hi").unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = loaded.tokenizer.encode(&chat).unwrap();
    assert_eq!(ids[0], 258);
    assert_eq!(
        loaded.tokenizer.decode(&ids).unwrap(),
        "user\nhi\nassistant\n"
    );
}

#[test]
fn heterogeneous_and_removed_sublayers_run_and_round_trip() {
    let shapes = vec![
        LayerShape {
            attn: Some(AttnShape::new(2, 1, 8)),
            ssm: None,
            mlp: Some(20),
        },
        LayerShape {
            attn: None,
            ssm: None,
            mlp: Some(48),
        },
        LayerShape {
            attn: Some(AttnShape::new(4, 4, 8)),
            ssm: None,
            mlp: None,
        },
    ];
    let m = random_model(tiny_config(true), &shapes, 9).unwrap();
    let got: Vec<LayerShape> = m.layers.iter().map(|l| l.shape()).collect();
    assert_eq!(got, shapes);
    let full = logits(&m, &TOKENS);
    assert!(full.iter().all(|v| v.is_finite()));
    let mut cache = KvCache::new(&m, 16).unwrap();
    let mut inc = m
        .forward(&TOKENS[..7], Some(&mut cache), Logits::All, None)
        .unwrap();
    inc.extend(
        m.forward(&TOKENS[7..], Some(&mut cache), Logits::All, None)
            .unwrap(),
    );
    assert!(max_abs_diff(&full, &inc) < 1e-5);
    // whittle's HF folder keeps per-layer shapes; GGUF (llama.cpp's per-layer `deci`) refuses
    // the layer with attention and no MLP instead of writing a file llama.cpp would misread.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("st");
    safetensors::save(&m, None, false, &st).unwrap();
    assert_eq!(full, logits(&safetensors::load(&st).unwrap(), &TOKENS));
    let g = dir.path().join("m.gguf");
    let err = gguf::save(&m, None, gguf::GgufType::F32, &g).unwrap_err();
    assert!(
        err.to_string().contains("layer 2 has attention but no MLP"),
        "{err}"
    );
    assert!(!g.exists());
}

#[derive(Default)]
struct Seen(Vec<(usize, Site, usize, usize)>);

impl Observer for Seen {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], rows: usize) {
        self.0.push((layer, site, rows, x.len() / rows));
    }
}

#[test]
fn observer_sees_every_linear_input_once_per_site() {
    let m = tiny_model(2);
    let mut seen = Seen::default();
    m.forward(&TOKENS[..6], None, Logits::Last, Some(&mut seen))
        .unwrap();
    let want: Vec<_> = (0..3)
        .flat_map(|l| {
            [
                (l, Site::BlockIn, 6, 32),
                (l, Site::AttnIn, 6, 32),
                (l, Site::AttnOut, 6, 32),
                (l, Site::Mixed, 6, 32),
                (l, Site::MlpIn, 6, 32),
                (l, Site::MlpDown, 6, 48),
                (l, Site::BlockOut, 6, 32),
            ]
        })
        .collect();
    assert_eq!(seen.0, want);
}

#[test]
fn impossible_requests_are_errors() {
    let m = tiny_model(5);
    let long: Vec<u32> = vec![1; 65];
    assert!(m.forward(&long, None, Logits::Last, None).is_err());
    assert!(m.forward(&[], None, Logits::Last, None).is_err());
    assert!(m
        .forward(&[VOCAB as u32], None, Logits::Last, None)
        .is_err());
    assert!(KvCache::new(&m, 65).is_err());
    let mut cache = KvCache::new(&m, 4).unwrap();
    assert!(m
        .forward(&TOKENS[..5], Some(&mut cache), Logits::Last, None)
        .is_err());
}

#[test]
fn gguf_block_types_stay_packed_and_match_their_f32_expansion() {
    use whittle::model::Weight;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(6);
    for ty in [
        gguf::GgufType::Q4_1,
        gguf::GgufType::Q4_0,
        gguf::GgufType::Q8_0,
    ] {
        let path = dir.path().join(format!("{ty:?}.gguf"));
        gguf::save(&m, None, ty, &path).unwrap();
        let (packed, mut file) = gguf::load(&path).unwrap();
        let q = &packed.layers[0].linears()[2].2;
        assert!(matches!(q.weight(), Weight::Packed(_)), "{ty:?}");
        // Bit-exact against candle's own dequantization of the same tensor.
        let (candle_f32, _) = file.tensor_f32("blk.0.attn_v.weight").unwrap();
        assert_eq!(&q.dense_weight()[..], &candle_f32[..], "{ty:?}");
        let (candle_up, _) = file.tensor_f32("blk.2.ffn_up.weight").unwrap();
        assert_eq!(
            &packed.layers[2].mlp.as_ref().unwrap().up.dense_weight()[..],
            &candle_up[..]
        );
        // Packed decode (on-the-fly matrix-vector) equals the f32 model's forward: to f32
        // rounding at the scalar level, and within the int16 activation rounding at the vector
        // levels (`kernels::qdot_i16`: ~1e-5 of the range per product).
        let mut dense = gguf::load(&path).unwrap().0;
        dense.densify();
        let want = logits(&dense, &TOKENS);
        let mut cache = KvCache::new(&packed, 16).unwrap();
        let mut got = Vec::new();
        for &t in &TOKENS {
            got.extend(
                packed
                    .forward(&[t], Some(&mut cache), Logits::All, None)
                    .unwrap(),
            );
        }
        let range = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&want, &got);
        assert!(d < 2e-4 * range.max(1.0), "{ty:?}: {d} of {range}");
        assert!(
            max_abs_diff(&want, &logits(&packed, &TOKENS)) < 1e-4,
            "{ty:?}"
        );
        // Prefill of enough rows for the tile path, which expands packed rows per work item:
        // the same products as on the f32 expansion, so the same logits to the bit.
        let long: Vec<u32> = (0..48).map(|i| (i * 37 % 256) as u32).collect();
        assert_eq!(logits(&dense, &long), logits(&packed, &long), "{ty:?}");
    }
}

/// A bf16 GGUF stores every matrix rounded to the nearest bf16 (ties to even) and the norms
/// as f32, and loads back as exactly those values.
#[test]
fn bf16_gguf_holds_the_rounded_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bf16.gguf");
    let m = tiny_model(7);
    gguf::save(&m, None, gguf::GgufType::BF16, &path).unwrap();
    let (back, _) = gguf::load(&path).unwrap();
    let bf16 = |v: f32| {
        let b = v.to_bits();
        f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
    };
    for (l, (orig, got)) in m.layers.iter().zip(&back.layers).enumerate() {
        assert_eq!(orig.attn_norm, got.attn_norm, "layer {l}: norms stay f32");
        for ((name, _, a), (_, _, b)) in orig.linears().into_iter().zip(got.linears()) {
            let want: Vec<f32> = a.dense_weight().iter().map(|&v| bf16(v)).collect();
            assert_eq!(b.dense_weight(), want, "layer {l} {name}");
        }
    }
}

#[test]
fn sharded_half_precision_safetensors_load() {
    use ::safetensors::{serialize_to_file, tensor::TensorView, Dtype, SafeTensors};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let m = tiny_model(8);
    safetensors::save(&m, None, false, &src).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let out = dir.path().join("sharded");
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    // Layer 0 in f16 (shard 1), everything else in bf16 (shard 2).
    type Shard = Vec<(String, Vec<u8>, Vec<usize>, Dtype)>;
    let mut shards: [Shard; 2] = [vec![], vec![]];
    for (name, view) in st.tensors() {
        let f: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (i, dtype, data): (usize, Dtype, Vec<u8>) = if name.contains("layers.0.") {
            let d = f
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            (0, Dtype::F16, d)
        } else {
            let d = f
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            (1, Dtype::BF16, d)
        };
        shards[i].push((name, data, view.shape().to_vec(), dtype));
    }
    for (i, shard) in shards.iter().enumerate() {
        let views: Vec<(String, TensorView)> = shard
            .iter()
            .map(|(n, d, s, t)| (n.clone(), TensorView::new(*t, s.clone(), d).unwrap()))
            .collect();
        let path = out.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        serialize_to_file(views, None, &path).unwrap();
    }
    let loaded = safetensors::load(&out).unwrap();
    let q0 = m.layers[0].attn.as_ref().unwrap().q.dense_weight();
    let want: Vec<f32> = q0
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(
        &loaded.layers[0].attn.as_ref().unwrap().q.dense_weight()[..],
        &want[..]
    );
    let d1 = m.layers[1].mlp.as_ref().unwrap().down.dense_weight();
    let want: Vec<f32> = d1
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(
        &loaded.layers[1].mlp.as_ref().unwrap().down.dense_weight()[..],
        &want[..]
    );
    // bf16 rounding moves logits only slightly.
    assert!(max_abs_diff(&logits(&m, &TOKENS), &logits(&loaded, &TOKENS)) < 0.1);
}

#[test]
fn quantized_and_adapted_models_round_trip_packed() {
    use whittle::model::{LowRank, Weight};
    use whittle::quant::{quantize_model, QuantConfig, QuantMethod};
    let dir = tempfile::tempdir().unwrap();
    // Packing works on 32-wide blocks: an MLP of 64.
    let mut shapes = uniform_shapes(3);
    shapes.iter_mut().for_each(|s| s.mlp = Some(64));
    let mut m = random_model(tiny_config(true), &shapes, 11).unwrap();
    let cfg = QuantConfig {
        bits: 3,
        group: 64,
        sym: false,
    };
    let calib: Vec<u32> = (0..40).map(|i| (i * 37 % 250) as u32).collect();
    let windows = vec![&calib[..20], &calib[20..]];
    let reports = quantize_model(
        &mut m,
        &windows,
        QuantMethod::Gptq {
            block: 16,
            damp: 0.01,
            act_order: false,
        },
        cfg,
        &[],
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 3 * 7);
    assert!(reports.iter().all(|r| r.rel_error.unwrap() < 0.2));
    let lin = &mut m.layers[0].mlp.as_mut().unwrap().down;
    assert!(matches!(lin.weight(), Weight::Packed(_)));
    lin.adapter = Some(LowRank {
        rank: 2,
        a: vec![0.01; 2 * 64],
        b: vec![0.02; 32 * 2],
    });
    let out = dir.path().join("q");
    safetensors::save(&m, None, true, &out).unwrap();
    let back = safetensors::load(&out).unwrap();
    assert_eq!(logits(&m, &TOKENS), logits(&back, &TOKENS));
    let l = &back.layers[0].mlp.as_ref().unwrap().down;
    assert!(matches!(l.weight(), Weight::Packed(p) if p.bits == 3 && p.group == 64));
    // q_proj has 32 inputs: its single group is shorter than 64.
    assert!(matches!(
        back.layers[0].attn.as_ref().unwrap().q.weight(),
        Weight::Packed(_)
    ));
    assert_eq!(l.adapter.as_ref().unwrap().rank, 2);
    // Without `packed`, the same model is written as plain f32 with the same outputs.
    let flat = dir.path().join("f32");
    safetensors::save(&m, None, false, &flat).unwrap();
    let back = safetensors::load(&flat).unwrap();
    assert!(matches!(
        back.layers[0].mlp.as_ref().unwrap().down.weight(),
        Weight::Dense(_)
    ));
    assert!(max_abs_diff(&logits(&m, &TOKENS), &logits(&back, &TOKENS)) < 1e-5);
}

/// A 2-layer tiny model whose MLP is 64 wide (a multiple of the 32-weight packing block).
fn packable_model(seed: u64) -> whittle::Model {
    let mut shapes = uniform_shapes(2);
    shapes.iter_mut().for_each(|s| s.mlp = Some(64));
    random_model(tiny_config(true), &shapes, seed).unwrap()
}

/// [`packable_model`] after RTN at `bits` (group 32, asymmetric): a base to compensate.
fn rtn_model(seed: u64, bits: u8) -> whittle::Model {
    use whittle::quant::{quantize_model, QuantConfig, QuantMethod};
    let mut m = packable_model(seed);
    let cfg = QuantConfig {
        bits,
        group: 32,
        sym: false,
    };
    quantize_model(&mut m, &[], QuantMethod::Rtn, cfg, &[], &mut |_, _| {}).unwrap();
    m
}

#[test]
fn sparsify_compensate_fold_and_peft_on_a_tiny_model() {
    use ::safetensors::SafeTensors;
    use whittle::lowrank::{compensate_model, LowRankMethod};
    use whittle::sparsity::{sparsify_model, Pattern, SparsityMethod};
    let dense = packable_model(21);
    let calib: Vec<u32> = (0..96).map(|i| (i * 53 % 256) as u32).collect();
    let windows: Vec<&[u32]> = calib.chunks(32).collect();
    // Sparsify: every 4-group of every targeted row keeps exactly 2.
    let mut sparse = packable_model(21);
    let nm = Pattern::NM { n: 2, m: 4 };
    let method = SparsityMethod::SparseGpt {
        block: 16,
        damp: 0.01,
    };
    let reports = sparsify_model(
        &mut sparse,
        &windows,
        method,
        nm,
        &["q_proj".into(), "down_proj".into()],
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 2 * 2);
    for l in &sparse.layers {
        for (name, _, lin) in l.linears() {
            let w = lin.dense_weight();
            let pruned = name.ends_with("q_proj") || name.ends_with("down_proj");
            for g in w.chunks_exact(4) {
                let nz = g.iter().filter(|v| **v != 0.0).count();
                assert!(if pruned { nz == 2 } else { nz == 4 }, "{name}");
            }
        }
    }
    // Quantize hard (2 bits), then compensate: EoRA's calibration error ≤ SVD's < none.
    let mut errs = Vec::new();
    for (method, fold) in [
        (LowRankMethod::Svd, false),
        (LowRankMethod::Eora, false),
        (LowRankMethod::Eora, true),
    ] {
        let mut m = rtn_model(21, 2);
        let r = compensate_model(
            &mut m,
            &dense,
            &windows,
            method,
            4,
            fold,
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        // The first layer sees the same inputs under both methods: compare there.
        let first: Vec<&_> = r.iter().filter(|x| x.layer == 0).collect();
        assert!(first
            .iter()
            .all(|x| x.rel_error.unwrap() < x.error_before.unwrap()));
        errs.push(first.iter().map(|x| x.rel_error.unwrap()).sum::<f64>());
        if fold {
            assert!(m
                .layers
                .iter()
                .all(|l| l.linears().iter().all(|(_, _, x)| x.adapter.is_none())));
            continue;
        }
        if method == LowRankMethod::Eora {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("peft");
            whittle::io::peft::save(&m, &p).unwrap();
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(p.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                (cfg["r"].as_u64(), cfg["lora_alpha"].as_u64()),
                (Some(4), Some(4))
            );
            assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 2 * 7);
            assert!(cfg["rank_pattern"].as_object().unwrap().is_empty());
            let bytes = std::fs::read(p.join("adapter_model.safetensors")).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.names().len(), 2 * 7 * 2);
            let a = st
                .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
                .unwrap();
            let b = st
                .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
                .unwrap();
            assert_eq!(
                (a.shape(), b.shape()),
                (&[4usize, 64][..], &[32usize, 4][..])
            );
        }
    }
    assert!(
        errs[1] <= errs[0] * (1.0 + 1e-6),
        "EoRA {} vs SVD {}",
        errs[1],
        errs[0]
    );
    assert!(
        (errs[2] - errs[1]).abs() < 1e-6 * (1.0 + errs[1]),
        "folding changes nothing"
    );
}

/// SVD adapters do not depend on data: without calibration windows they are the same, errors
/// are reported in weight space, and EoRA refuses to run.
#[test]
fn svd_compensation_runs_without_calibration() {
    use whittle::lowrank::{compensate_model, LowRankMethod};
    let dense = packable_model(5);
    let calib: Vec<u32> = (0..64).map(|i| (i * 31 % 256) as u32).collect();
    let windows: Vec<&[u32]> = calib.chunks(32).collect();
    let run = |method, windows: &[&[u32]]| {
        let mut m = rtn_model(5, 3);
        compensate_model(
            &mut m,
            &dense,
            windows,
            method,
            3,
            false,
            &[],
            &mut |_, _| {},
        )
        .map(|r| (m, r))
    };
    let (with, _) = run(LowRankMethod::Svd, &windows).unwrap();
    let (without, reports) = run(LowRankMethod::Svd, &[]).unwrap();
    assert_eq!(reports.len(), 2 * 7);
    for r in &reports {
        let (before, after) = (r.error_before.unwrap(), r.rel_error.unwrap());
        assert!(
            after < before && before > 0.0,
            "{}: {before} -> {after}",
            r.name
        );
    }
    for (a, b) in with.layers.iter().zip(&without.layers) {
        for ((_, _, x), (_, _, y)) in a.linears().iter().zip(b.linears()) {
            assert_eq!(x.adapter, y.adapter);
        }
    }
    assert!(run(LowRankMethod::Eora, &[]).is_err());
}

#[test]
fn rank_budget_spends_adapter_parameters_where_the_error_is() {
    use whittle::lowrank::{allocate_ranks, compensate_with_ranks, spectra, LowRankMethod, Ranks};
    let dense = packable_model(31);
    let calib: Vec<u32> = (0..96).map(|i| (i * 37 % 256) as u32).collect();
    let windows: Vec<&[u32]> = calib.chunks(32).collect();
    let mut m = rtn_model(31, 2);
    let spec = spectra(
        &mut m,
        &dense,
        &windows,
        LowRankMethod::Eora,
        &[],
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(spec.len(), 2 * 7);
    // The budget of rank 4 everywhere.
    let budget: usize = spec.iter().map(|(_, cost, _)| 4 * cost).sum();
    let ranks = allocate_ranks(&spec, budget);
    let spent: usize = spec.iter().map(|(n, cost, _)| ranks[n] * cost).sum();
    assert!(
        spent <= budget && spent + 96 > budget,
        "spent {spent} of {budget}"
    );
    assert!(ranks.values().any(|r| *r != 4), "{ranks:?}");
    // Error left in the metric EoRA truncates in: no more than with the uniform rank.
    let tail = |r: &dyn Fn(&str) -> usize| -> f64 {
        spec.iter()
            .map(|(n, _, s)| s.iter().skip(r(n)).map(|v| v * v).sum::<f64>())
            .sum()
    };
    assert!(tail(&|n| ranks[n]) <= tail(&|_| 4));
    let reports = compensate_with_ranks(
        &mut m,
        &dense,
        &windows,
        LowRankMethod::Eora,
        &Ranks::PerLinear(ranks.clone()),
        false,
        &[],
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 2 * 7);
    for (i, l) in m.layers.iter().enumerate() {
        for (name, _, lin) in l.linears() {
            let want = ranks[&format!("layers.{i}.{name}")];
            assert_eq!(lin.adapter.as_ref().map_or(0, |a| a.rank), want);
        }
    }
    // PEFT: the most common rank is `r`, the rest in rank_pattern / alpha_pattern.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("peft");
    whittle::io::peft::save(&m, &p).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap();
    let pattern = cfg["rank_pattern"].as_object().unwrap();
    assert!(!pattern.is_empty());
    assert_eq!(pattern, cfg["alpha_pattern"].as_object().unwrap());
}

/// Wanda's statistics sample the covariance (it only measures the reported error) but keep
/// exact column norms: the norms equal the full statistics' diagonal, and the sampled error
/// estimate is close to the full one.
#[test]
fn sampled_statistics_keep_exact_column_norms() {
    use whittle::calib::sequential::compress_sequential;
    use whittle::calib::stats::{Covariance, InputStats};
    let mut m = tiny_model(4);
    let ids: Vec<u32> = (0..64).map(|i| (i * 37 % 250) as u32).collect();
    let windows: Vec<&[u32]> = ids.chunks(32).collect();
    let collect = |m: &mut whittle::Model, cov| {
        let mut first: Vec<(whittle::model::Site, InputStats)> = Vec::new();
        compress_sequential(m, &windows, cov, &mut |_, _| {}, &mut |i, _, stats| {
            if i == 0 {
                first = stats.sites.iter().map(|(s, v)| (*s, v.clone())).collect();
            }
            Ok(())
        })
        .unwrap();
        first
    };
    let full = collect(&mut m, Covariance::Full);
    let sampled = collect(&mut m, Covariance::Sampled(4));
    assert_eq!(full.len(), sampled.len());
    for (site, f) in &full {
        let s = &sampled.iter().find(|(x, _)| x == site).unwrap().1;
        assert_eq!((s.tokens, s.xtx_tokens, f.xtx_tokens), (64, 16, 64));
        for (a, b) in f.column_norms().iter().zip(s.column_norms()) {
            assert!((a - b).abs() <= 1e-5 * a.max(1e-3), "{site:?}: {a} vs {b}");
        }
    }
}

#[test]
fn perplexity_sums_windows_in_order_on_any_thread_count() {
    use whittle::eval::perplexity::{perplexity, window_nll};
    let m = tiny_model(4);
    // Five windows: with two threads, two rounds of whole windows per thread and a tail of one.
    let ids: Vec<u32> = (0..5 * 48).map(|i| (i * 37 % 251) as u32).collect();
    let many = perplexity(&m, &ids, 48, None, &mut |_, _| {}).unwrap();
    let one = whittle::threads::one_thread(|| perplexity(&m, &ids, 48, None, &mut |_, _| {}));
    let mut direct = 0f64;
    for w in ids.chunks_exact(48) {
        direct += whittle::threads::one_thread(|| window_nll(&m, w)).unwrap();
    }
    assert_eq!(many.windows, 5);
    assert_eq!(many.nll_sum, one.unwrap().nll_sum);
    assert_eq!(many.nll_sum, direct);
}

/// Sequences run in one batched pass as they run alone — continuations on forks of one
/// context cache, and full passes from empty caches: the same hidden rows, and caches that
/// decode the next token the same. Llama (attention), Mamba (a scan state per sequence) and
/// Hymba (sliding windows and meta tokens: run one by one).
#[test]
fn sequences_run_together_as_they_run_alone() {
    let models = [
        ("llama", tiny_model(6)),
        ("mamba", tiny_mamba(2, 48, Some(40), 6)),
        ("hymba", hymba_tiny()),
    ];
    let conts: [&[u32]; 4] = [&TOKENS[5..9], &TOKENS[9..10], &TOKENS[2..12], &TOKENS[..3]];
    for (name, m) in &models {
        let mut context = KvCache::new(m, 40).unwrap();
        m.hidden_states(&TOKENS[..5], Some(&mut context), None)
            .unwrap();
        for (case, from) in [("forks", context), ("empty", KvCache::new(m, 40).unwrap())] {
            let mut alone_caches = vec![from.clone(); conts.len()];
            let mut alone = Vec::new();
            for (c, cache) in conts.iter().zip(&mut alone_caches) {
                alone.extend(m.hidden_states(c, Some(cache), None).unwrap());
            }
            let mut caches = vec![from; conts.len()];
            let mut seqs: Vec<(&[u32], &mut KvCache)> =
                conts.iter().copied().zip(&mut caches).collect();
            let together = m.hidden_states_many(&mut seqs).unwrap();
            let diff = max_abs_diff(&alone, &together);
            assert!(diff < 1e-4, "{name}, {case}: hidden rows differ by {diff}");
            for (a, b) in alone_caches.iter_mut().zip(&mut caches) {
                assert_eq!(a.len(), b.len());
                let next_a = m.forward(&[7], Some(a), Logits::All, None).unwrap();
                let next_b = m.forward(&[7], Some(b), Logits::All, None).unwrap();
                let diff = max_abs_diff(&next_a, &next_b);
                assert!(diff < 1e-4, "{name}, {case}: next logits differ by {diff}");
            }
        }
    }
    // An empty sequence is an error, not a panic.
    let m = tiny_model(6);
    let mut c = [KvCache::new(&m, 8).unwrap(), KvCache::new(&m, 8).unwrap()];
    let [a, b] = &mut c;
    assert!(m
        .hidden_states_many(&mut [(&TOKENS[..1], a), (&[], b)])
        .is_err());
}
