//! Structured pruning on tiny random models: scores against independent computations, pruned
//! models against the same model with the pruned parts zeroed, exports, and bad requests.

mod common;

use common::{max_abs_diff, tiny_model, VOCAB};
use whittle::model::{Linear, Logits, Model, Weight};
use whittle::prune::emulate::{fit_emulations, EmulateKind};
use whittle::prune::importance::{activation_scores, Scores};
use whittle::prune::shapley::{loss_without, shapley};
use whittle::prune::width::{prune_width, top_indices, WidthTarget};
use whittle::prune::{depth, prune_model, DepthMetric, PruneSpec, Unit};

fn windows() -> Vec<Vec<u32>> {
    (0..3)
        .map(|w| {
            (0..24)
                .map(|i| ((i * 37 + w * 11) % VOCAB) as u32)
                .collect()
        })
        .collect()
}

fn refs(w: &[Vec<u32>]) -> Vec<&[u32]> {
    w.iter().map(|v| &v[..]).collect()
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    m.forward(tokens, None, Logits::All, None).unwrap()
}

fn scores_of(m: &mut Model) -> Scores {
    let w = windows();
    Scores {
        fingerprint: m.fingerprint(),
        calibration: "test".into(),
        activation: activation_scores(m, &refs(&w), &mut |_, _| {}).unwrap(),
        shapley: Some(shapley(m, &refs(&w), 8, 0.5, 1, &mut |_, _| {}).unwrap()),
    }
}

fn spec() -> PruneSpec {
    PruneSpec {
        width: WidthTarget::default(),
        units: vec![],
        drop_blocks: 0,
        drop_attn: 0,
        drop_mlp: 0,
        metric: DepthMetric::Cosine,
        emulate: EmulateKind::None,
    }
}

/// Block metrics recomputed from layer inputs and outputs produced one layer at a time.
#[test]
fn depth_metrics_match_a_layer_by_layer_loop() {
    let m = tiny_model(1);
    let w = windows();
    let s = activation_scores(&m, &refs(&w), &mut |_, _| {}).unwrap();
    let h = m.config.hidden;
    let mut cos_sum = [0f64; 3];
    let mut l2_sum = [0f64; 3];
    let mut n = 0;
    for win in &w {
        let mut x = m.embed_tokens(win).unwrap();
        for (i, (c, l2)) in cos_sum.iter_mut().zip(l2_sum.iter_mut()).enumerate() {
            let before = x.clone();
            m.run_layer(i, &mut x, win.len(), None).unwrap();
            for (a, b) in before.chunks(h).zip(x.chunks(h)) {
                let dot: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (*p as f64) * (*q as f64))
                    .sum();
                let na: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                *c += 1.0 - dot / (na * nb);
                let d: f64 = a.iter().zip(b).map(|(p, q)| ((q - p) as f64).powi(2)).sum();
                *l2 += d.sqrt() / na;
            }
        }
        n += win.len();
    }
    for i in 0..3 {
        let b = s.depth.block[i];
        assert!((b.cosine - cos_sum[i] / n as f64).abs() < 1e-5, "layer {i}");
        assert!((b.rel_l2 - l2_sum[i] / n as f64).abs() < 1e-5);
        assert!(b.angular > 0.0 && b.rel_l1 > 0.0);
        // A block's update is its two sublayers' updates: both are nonzero.
        assert!(s.depth.attn[i].cosine > 0.0 && s.depth.mlp[i].cosine > 0.0);
    }
    assert_eq!(s.tokens, n);
    assert_eq!(s.width.channels.len(), h);
    assert!(s.width.neurons.iter().all(|v| v.len() == 48));
    assert!(s.width.heads.iter().all(|v| v.len() == 4));
    for (g, hd) in s.width.kv_groups.iter().zip(&s.width.heads) {
        assert!((g[0] - hd[0] - hd[1]).abs() < 1e-9 && (g[1] - hd[2] - hd[3]).abs() < 1e-9);
    }
}

/// `x` with columns (`cols = true`) or rows outside `keep` set to zero.
fn zero_outside(l: &mut Linear, keep: &[usize], cols: bool) {
    let (out, inp) = (l.out_features, l.in_features);
    let mut w = l.dense_weight().into_owned();
    for r in 0..out {
        for c in 0..inp {
            let idx = if cols { c } else { r };
            if !keep.contains(&idx) {
                w[r * inp + c] = 0.0;
            }
        }
    }
    l.set_weight(Weight::Dense(w));
}

/// Removing neurons or heads equals zeroing what reads them (down_proj columns, o_proj columns).
#[test]
fn width_pruning_equals_zeroing_the_pruned_units() {
    let mut m = tiny_model(2);
    let s = scores_of(&mut m);
    let w = &s.activation.width;
    let mut zeroed = tiny_model(2);
    for (i, l) in zeroed.layers.iter_mut().enumerate() {
        let keep = top_indices(&w.neurons[i], 20);
        zero_outside(&mut l.mlp.as_mut().unwrap().down, &keep, true);
        // 4 heads in 2 KV groups of 2: keep the better head of each group.
        let heads: Vec<usize> = (0..2)
            .map(|g| 2 * g + top_indices(&w.heads[i][2 * g..2 * g + 2], 1)[0])
            .collect();
        let cols: Vec<usize> = heads.iter().flat_map(|h| h * 8..h * 8 + 8).collect();
        zero_outside(&mut l.attn.as_mut().unwrap().o, &cols, true);
    }
    let target = WidthTarget {
        hidden: None,
        ffn: Some(20),
        heads_per_group: Some(1),
    };
    prune_width(&mut m, w, &target).unwrap();
    let shape = m.layers[0].shape();
    assert_eq!((shape.mlp, shape.attn.unwrap().n_heads), (Some(20), 2));
    let toks = &windows()[0];
    let d = max_abs_diff(&logits(&m, toks), &logits(&zeroed, toks));
    assert!(d < 1e-4, "{d}");
    assert!(m.irregularity().is_none());
    // The hidden size: keeping every channel changes nothing; fewer give a smaller valid model.
    let mut all = tiny_model(2);
    let full = WidthTarget {
        hidden: Some(32),
        ..Default::default()
    };
    prune_width(&mut all, w, &full).unwrap();
    assert_eq!(logits(&all, toks), logits(&tiny_model(2), toks));
    let narrow = WidthTarget {
        hidden: Some(24),
        ..Default::default()
    };
    prune_width(&mut all, w, &narrow).unwrap();
    assert_eq!(all.config.hidden, 24);
    assert!(logits(&all, toks).iter().all(|v| v.is_finite()));
    // 24 channels and 4 heads: a plain Llama for whittle and GGUF; 22 is not a multiple of the
    // heads, which transformers' LlamaConfig rejects, so the HF folder says so by its type.
    let dir = tempfile::tempdir().unwrap();
    let odd = WidthTarget {
        hidden: Some(22),
        ..Default::default()
    };
    for (m, name, marked) in [(&mut all, "a", false), (&mut tiny_model(2), "b", true)] {
        if marked {
            prune_width(m, w, &odd).unwrap();
        }
        let path = dir.path().join(name);
        whittle::io::safetensors::save(m, None, false, &path).unwrap();
        let cfg = std::fs::read_to_string(path.join("config.json")).unwrap();
        assert_eq!(cfg.contains("whittle_llama"), marked, "{cfg}");
        assert_eq!(
            logits(&whittle::io::safetensors::load(&path).unwrap(), toks),
            logits(m, toks)
        );
    }
}

#[test]
fn impossible_widths_and_stale_scores_are_errors_and_change_nothing() {
    let mut m = tiny_model(3);
    let s = scores_of(&mut m);
    let w = &s.activation.width;
    for t in [
        WidthTarget {
            ffn: Some(49),
            ..Default::default()
        },
        WidthTarget {
            ffn: Some(0),
            ..Default::default()
        },
        WidthTarget {
            heads_per_group: Some(3),
            ..Default::default()
        },
        WidthTarget {
            hidden: Some(33),
            ..Default::default()
        },
    ] {
        let before = m.fingerprint();
        assert!(prune_width(&mut m, w, &t).is_err(), "{t:?}");
        assert_eq!(m.fingerprint(), before);
    }
    let other = tiny_model(4);
    let err = s
        .fingerprint
        .check(&other, "scores")
        .unwrap_err()
        .to_string();
    assert!(err.contains("weights differ"), "{err}");
    let mut drop_all = spec();
    drop_all.drop_blocks = 3;
    assert!(prune_model(&mut m, &s, &drop_all, &[], &mut |_, _| {}).is_err());
    let mut twice = spec();
    twice.units = vec![Unit::Block(1), Unit::Attn(1)];
    assert!(prune_model(&mut m, &s, &twice, &[], &mut |_, _| {}).is_err());
    let mut past = spec();
    past.units = vec![Unit::Block(7)];
    assert!(prune_model(&mut m, &s, &past, &[], &mut |_, _| {}).is_err());
    // Once pruned, the scores are stale for the result.
    let mut one = spec();
    one.drop_blocks = 1;
    prune_model(&mut m, &s, &one, &[], &mut |_, _| {}).unwrap();
    assert!(prune_model(&mut m, &s, &one, &[], &mut |_, _| {}).is_err());
}

/// Leave-one-out values are the loss increase of the model pruned for real.
#[test]
fn leave_one_out_is_the_loss_of_the_pruned_model() {
    let mut m = tiny_model(5);
    let w = windows();
    let s = scores_of(&mut m);
    let sh = s.shapley.as_ref().unwrap();
    let loss = |m: &Model| {
        let nll: f64 = w
            .iter()
            .map(|x| whittle::eval::perplexity::window_nll(m, x).unwrap())
            .sum();
        nll / (w.len() * 23) as f64
    };
    assert!((sh.base_loss - loss(&m)).abs() < 1e-6);
    for u in [Unit::Block(1), Unit::Attn(0), Unit::Mlp(2)] {
        let mut p = tiny_model(5);
        depth::remove_units(&mut p, &[u], vec![]).unwrap();
        let want = loss(&p) - sh.base_loss;
        assert!((sh.leave_one_out.get(u) - want).abs() < 1e-6, "{u}");
    }
    // The model is whole again after the measurements.
    assert_eq!(m.fingerprint(), tiny_model(5).fingerprint());
    let mc = sh.monte_carlo.as_ref().unwrap();
    assert!(mc
        .block
        .iter()
        .chain(&mc.attn)
        .chain(&mc.mlp)
        .all(|v| v.is_finite()));
    let l = loss_without(&mut m, &[Unit::Block(0), Unit::Block(2)], &refs(&w)).unwrap();
    assert!(l.is_finite() && l != sh.base_loss);
}

/// Removal by ranking takes the least important units; a removed block leaves the layer list
/// (a plain Llama), a removed sublayer leaves an irregular layer that GGUF export refuses.
#[test]
fn depth_pruning_removes_the_lowest_ranked_units_and_exports_honestly() {
    let mut m = tiny_model(6);
    let s = scores_of(&mut m);
    let ranked = depth::ranking(&s, depth::Family::Block, DepthMetric::Angular).unwrap();
    let mut sp = spec();
    sp.drop_blocks = 1;
    sp.metric = DepthMetric::Angular;
    let r = prune_model(&mut m, &s, &sp, &[], &mut |_, _| {}).unwrap();
    assert_eq!(r.removed[0].0, ranked[0].0);
    assert_eq!(m.layers.len(), 2);
    assert!(m.irregularity().is_none());
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("d.gguf");
    whittle::io::gguf::save(&m, None, whittle::io::gguf::GgufType::F32, &g).unwrap();
    let (back, _) = whittle::io::gguf::load(&g).unwrap();
    let toks = &windows()[1];
    assert!(max_abs_diff(&logits(&back, toks), &logits(&m, toks)) < 1e-5);

    let mut m = tiny_model(6);
    let mut sp = spec();
    sp.drop_attn = 2;
    sp.metric = DepthMetric::Loo;
    sp.emulate = EmulateKind::LowRank(4);
    let w = windows();
    prune_model(&mut m, &s, &sp, &refs(&w), &mut |_, _| {}).unwrap();
    assert_eq!(m.layers.iter().filter(|l| l.attn.is_none()).count(), 2);
    let why = m.irregularity().unwrap();
    assert!(why.contains("emulated update"), "{why}");
    let err = whittle::io::gguf::save(
        &m,
        None,
        whittle::io::gguf::GgufType::F32,
        &g.with_extension("x.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("emulated update"), "{err}");
    // whittle's own folder keeps it, marked so that transformers refuses it by name.
    let hf = dir.path().join("hf");
    whittle::io::safetensors::save(&m, None, false, &hf).unwrap();
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(cfg.contains("whittle_llama"));
    let back = whittle::io::safetensors::load(&hf).unwrap();
    assert_eq!(logits(&back, toks), logits(&m, toks));
}

/// Hidden channels and MLP neurons of SSM models (the Hymba fixture: attention + SSM heads in
/// parallel, meta tokens, shared K/V; a tiny Mamba) are pruned through every reader and writer
/// of the residual stream: keeping everything changes nothing, fewer give a smaller model that
/// round-trips through its HF folder (whittle's own: the hidden size no longer divides the SSM
/// width), and query heads (fused with the SSM channels) are refused.
#[test]
fn ssm_models_prune_hidden_and_mlp_widths() {
    for (name, fresh) in [
        ("hymba", common::hymba_tiny as fn() -> Model),
        ("mamba", || common::tiny_mamba(2, 64, None, 4)),
    ] {
        let mut m = fresh();
        // Ids below 200: the fixture's vocabulary is 256.
        let wins: Vec<Vec<u32>> = (0..3).map(|i| common::stream(24, i)).collect();
        let w = activation_scores(&m, &refs(&wins), &mut |_, _| {})
            .unwrap()
            .width;
        let toks = &wins[0];
        let h = m.config.hidden;
        let f = m.layers[0].shape().mlp;
        let all = WidthTarget {
            hidden: Some(h),
            ffn: f,
            heads_per_group: None,
        };
        let mut same = fresh();
        prune_width(&mut same, &w, &all).unwrap();
        assert_eq!(logits(&same, toks), logits(&m, toks), "{name}");
        let fewer = WidthTarget {
            hidden: Some(h - h / 4),
            ffn: f.map(|f| f / 2),
            heads_per_group: None,
        };
        prune_width(&mut m, &w, &fewer).unwrap();
        assert_eq!(m.config.hidden, h - h / 4, "{name}");
        assert_eq!(m.memory.len(), m.config.memory_tokens * m.config.hidden);
        assert!(m.layers.iter().all(|l| l.shape().mlp == f.map(|f| f / 2)));
        let out = logits(&m, toks);
        assert!(out.iter().all(|v| v.is_finite()), "{name}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        whittle::io::safetensors::save(&m, None, false, &dir).unwrap();
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(cfg.contains(&format!("whittle_{name}")), "{cfg}");
        let back = whittle::io::safetensors::load(&dir).unwrap();
        assert_eq!(logits(&back, toks), out, "{name}");
        if m.layers.iter().any(|l| l.attn.is_some()) {
            let heads = WidthTarget {
                heads_per_group: Some(1),
                ..Default::default()
            };
            let err = prune_width(&mut m, &w, &heads).unwrap_err().to_string();
            assert!(err.contains("SSM"), "{err}");
        }
    }
}

/// Per-layer widths and attention-free layers are written as llama.cpp's `deci` (head and FFN
/// counts per layer, 0 for a missing attention) and read back as the same Llama; a layer with
/// attention and no MLP is refused, because llama.cpp's `deci` graph drops its attention
/// (measured: logits off by 11.5 on the real model, `benches/gguf_parity.py`).
#[test]
fn per_layer_widths_export_as_deci_gguf() {
    use whittle::io::gguf::{load, save, GgufType};
    use whittle::model::{random::random_model, AttnShape, LayerShape};
    let layer = |attn: Option<(usize, usize)>, mlp| LayerShape {
        attn: attn.map(|(q, kv)| AttnShape::new(q, kv, 8)),
        ssm: None,
        mlp,
    };
    let shapes = [
        layer(Some((4, 2)), Some(48)),
        layer(None, Some(40)),
        layer(Some((2, 1)), Some(24)),
        layer(Some((4, 2)), Some(48)),
    ];
    let m = random_model(common::tiny_config(true), &shapes, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("deci.gguf");
    save(&m, None, GgufType::F32, &g).unwrap();
    let (back, file) = load(&g).unwrap();
    let meta = file.metadata();
    assert_eq!(meta["general.architecture"].to_string().unwrap(), "deci");
    let counts = |key: &str| -> Vec<u32> {
        let v = meta[key].to_vec().unwrap();
        v.iter().map(|x| x.to_u32().unwrap()).collect()
    };
    assert_eq!(counts("deci.attention.head_count"), [4, 0, 2, 4]);
    assert_eq!(counts("deci.attention.head_count_kv"), [2, 0, 1, 2]);
    assert_eq!(counts("deci.feed_forward_length"), [48, 40, 24, 48]);
    // No norm of the missing attention: llama.cpp refuses tensors it does not create.
    assert!(!file.has_tensor("blk.1.attn_norm.weight"));
    let shapes_back: Vec<_> = back.layers.iter().map(|l| l.shape()).collect();
    assert_eq!(shapes_back, shapes);
    let toks = &windows()[0];
    assert!(max_abs_diff(&logits(&back, toks), &logits(&m, toks)) < 1e-5);

    // A `deci` layer with heads but no query projection (Nemotron-51B's linear attention) is
    // refused, not read as a layer without attention: rename layer 0's query tensor in place.
    let mut bytes = std::fs::read(&g).unwrap();
    let (from, to) = (b"blk.0.attn_q.weight", b"blk.0.attn_x.weight");
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + to.len()].copy_from_slice(to);
    let linear = dir.path().join("linear.gguf");
    std::fs::write(&linear, bytes).unwrap();
    let err = load(&linear).err().unwrap().to_string();
    assert!(err.contains("linear-attention layer"), "{err}");

    let mut no_mlp = shapes.to_vec();
    no_mlp[2].mlp = None;
    let m = random_model(common::tiny_config(true), &no_mlp, 3).unwrap();
    let err = save(&m, None, GgufType::F32, &dir.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 2 has attention but no MLP"), "{err}");
    assert!(!dir.path().join("x.gguf").exists());
}

/// Emulated updates fitted on exactly affine updates recover them; on a real block they lower
/// the loss of removing it.
#[test]
fn emulated_updates_fit_affine_maps_and_help() {
    let w = windows();
    let mut m = tiny_model(7);
    let s = scores_of(&mut m);
    let base = s.shapley.as_ref().unwrap().base_loss;
    let loss_of = |emulate| {
        let mut p = tiny_model(7);
        let mut sp = spec();
        sp.units = vec![Unit::Block(1)];
        sp.emulate = emulate;
        prune_model(&mut p, &s, &sp, &refs(&w), &mut |_, _| {}).unwrap();
        let nll: f64 = w
            .iter()
            .map(|x| whittle::eval::perplexity::window_nll(&p, x).unwrap())
            .sum();
        nll / (w.len() * 23) as f64 - base
    };
    let none = loss_of(EmulateKind::None);
    let linear = loss_of(EmulateKind::Linear);
    assert!(linear < none, "linear {linear} vs none {none}");
    // A model whose layer 1 is already an affine map: the fit reproduces it.
    let mut affine = tiny_model(8);
    let mut sp = spec();
    sp.units = vec![Unit::Block(1)];
    sp.emulate = EmulateKind::Linear;
    let sa = scores_of(&mut affine);
    prune_model(&mut affine, &sa, &sp, &refs(&w), &mut |_, _| {}).unwrap();
    let fitted = fit_emulations(
        &affine,
        &[Unit::Block(1)],
        &refs(&w),
        EmulateKind::Linear,
        &mut |_, _| {},
    )
    .unwrap();
    let (e0, e1) = (
        affine.layers[1].emulated.mixer.as_ref().unwrap(),
        &fitted[0],
    );
    let d = max_abs_diff(&e0.maps[0].dense_weight(), &e1.maps[0].dense_weight());
    assert!(d < 2e-3, "{d}");
}

/// Every candidate of the budget search has the parameter count it claims once pruned, fits the
/// budget, and the search returns them by KL, the best first.
#[test]
fn budget_search_counts_parameters_exactly() {
    use whittle::prune::search::{candidates, search};
    let mut m = tiny_model(9);
    let s = scores_of(&mut m);
    let budget = m.n_params() * 3 / 4;
    let all = candidates(&m, budget, 1000).unwrap();
    assert!(all.len() > 5);
    for c in all.iter().step_by(all.len() / 5) {
        let mut p = m.clone();
        prune_model(
            &mut p,
            &s,
            &c.spec(&m, DepthMetric::Cosine),
            &[],
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(p.n_params(), c.params, "{c:?}");
        assert!(c.params <= budget);
    }
    let w = windows();
    let best = search(
        &m,
        &s,
        budget,
        4,
        DepthMetric::Cosine,
        &refs(&w),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(best.len(), 4);
    let kls: Vec<f64> = best.iter().map(|c| c.kl.unwrap()).collect();
    assert!(
        kls.windows(2).all(|k| k[0] <= k[1]) && kls[0] > 0.0,
        "{kls:?}"
    );
    assert!(candidates(&m, 100, 4).is_err());
}

/// prune → int4 → EoRA in one recipe: compensation measures against the pruned model.
#[test]
fn recipe_prunes_then_quantizes_and_compensates() {
    let mut m = tiny_model(10);
    let s = scores_of(&mut m);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.json");
    std::fs::write(&path, serde_json::to_string(&s).unwrap()).unwrap();
    let text = format!(
        "[[stage]]\nkind = \"prune\"\nscores = {path:?}\ndrop_layers = 1\nffn = 32\n\
         emulate = \"linear\"\n\
         [[stage]]\nkind = \"quantize\"\nmethod = \"rtn\"\nbits = 4\ngroup_size = 32\n\
         [[stage]]\nkind = \"compensate\"\nmethod = \"eora\"\nrank = 4\n"
    );
    let file = dir.path().join("r.toml");
    std::fs::write(&file, text).unwrap();
    let recipe = whittle::recipe::Recipe::from_file(&file).unwrap();
    let w = windows();
    let reference = tiny_model(10);
    let reports = recipe
        .run(&mut m, &reference, &refs(&w), &mut |_, _, _| {})
        .unwrap();
    assert_eq!(reports.len(), 3);
    assert!(m
        .layers
        .iter()
        .filter_map(|l| l.shape().mlp)
        .all(|f| f == 32));
    assert_eq!(m.layers.iter().filter(|l| l.attn.is_none()).count(), 1);
    let comp = &reports[2].1.linears;
    assert!(!comp.is_empty());
    for r in comp {
        assert!(r.rel_error.unwrap() < r.error_before.unwrap(), "{r:?}");
    }
}
