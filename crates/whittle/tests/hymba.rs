//! Hymba parity with the reference outputs of the official modeling code
//! (`shared/fixtures/hymba-tiny`): logits, per-layer inputs, both branch outputs, cached greedy
//! decode under both window rules, and the compact cache's size.
//!
//! Tolerance: the issue asks for 1e-4 in f32; whittle measures about 2.7e-5 (logit magnitudes
//! ~17), the fixture's own independent re-implementation 1.7e-5. `TOL` sits between.

mod common;

use safetensors::SafeTensors;
use whittle::kernels::norm::rms_norm;
use whittle::model::{KvCache, Logits, Observer, Site, WindowRule};
use whittle::Model;

const TOL: f32 = 5e-5;

struct Expected(Vec<u8>);

impl Expected {
    fn load() -> Self {
        Expected(std::fs::read(common::hymba_fixture().join("expected.safetensors")).unwrap())
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect()
    }
}

fn model() -> Model {
    common::hymba_tiny()
}

/// Records, per layer, the mixer's normalised input and the two branch outputs.
#[derive(Default)]
struct Capture(std::collections::HashMap<(usize, Site), Vec<f32>>);

impl Observer for Capture {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], _rows: usize) {
        if matches!(site, Site::AttnIn | Site::AttnHeads | Site::SsmGated) {
            self.0.insert((layer, site), x.to_vec());
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32
}

#[test]
fn loads_the_hf_layout_with_its_structure() {
    let m = model();
    assert_eq!(m.config.memory_tokens, 8);
    assert_eq!(m.layers.len(), 8);
    let windows: Vec<_> = m
        .layers
        .iter()
        .map(|l| l.attn.as_ref().unwrap().window)
        .collect();
    let g = None;
    let w = Some(8);
    assert_eq!(windows, vec![g, w, w, g, w, w, w, g]);
    // Consumers (2, 5, 6) have no k/v projections.
    let own: Vec<usize> = m.layers.iter().map(|l| l.linears().len()).collect();
    assert_eq!(own, vec![11, 11, 9, 11, 11, 9, 9, 11]);
    // NTK base: 1e4 · 7^(16/14).
    let want = 1e4 * 7f64.powf(16.0 / 14.0);
    assert!((m.config.rope_theta as f64 - want).abs() / want < 1e-6);
}

/// whittle writes the layout back: the official config's settings (its NTK base folded into a
/// plain `rope_theta`), and a folder that loads into the same model.
#[test]
fn writes_the_hf_layout_back() {
    let m = model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("h");
    whittle::io::safetensors::save(&m, None, false, &dir).unwrap();
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (ours, official) = (
        json(dir.join("config.json")),
        json(common::hymba_fixture().join("config.json")),
    );
    for key in [
        "architectures",
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "v_head_dim",
        "mamba_expand",
        "conv_dim",
        "mamba_d_state",
        "mamba_d_conv",
        "mamba_dt_rank",
        "mamba_inner_layernorms",
        "layer_type",
        "sliding_window",
        "global_attn_idx",
        "kv_reuse_group",
        "num_memory_tokens",
        "tie_word_embeddings",
    ] {
        assert_eq!(ours[key], official[key], "{key}");
    }
    let back = whittle::io::safetensors::load(&dir).unwrap();
    assert_eq!(back.config.rope_theta, m.config.rope_theta);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 200) as u32).collect();
    let logits = |m: &Model| m.forward(&ids, None, Logits::All, None).unwrap();
    assert_eq!(logits(&back), logits(&m));
}

#[test]
fn logits_hidden_states_and_branches_match_the_reference() {
    let m = model();
    let ex = Expected::load();
    let (h, eps, mem) = (m.config.hidden, m.config.rms_eps, m.config.memory_tokens);
    for seq in ["seq12", "seq40"] {
        let ids = ex.ids(&format!("{seq}.input_ids"));
        let mut cap = Capture::default();
        let logits = m
            .forward(&ids, None, Logits::All, Some(&mut cap as &mut dyn Observer))
            .unwrap();
        let want = ex.f32(&format!("{seq}.logits"));
        let diff = common::max_abs_diff(&logits, &want);
        eprintln!("{seq}: max |Δ logits| = {diff:.2e}");
        assert!(diff <= TOL, "{seq}: logits differ by {diff}");
        for (row, want_row) in logits.chunks_exact(256).zip(want.chunks_exact(256)) {
            assert_eq!(argmax(row), argmax(want_row));
        }
        for l in 0..m.layers.len() {
            // The input of layer l, through layer l's input norm, is what its projections read.
            let hs = ex.f32(&format!("{seq}.hidden_states.{l}"));
            assert_eq!(hs.len(), (mem + ids.len()) * h);
            let mut normed = vec![0f32; hs.len()];
            rms_norm(&hs, &m.layers[l].attn_norm, eps, &mut normed);
            let d = common::max_abs_diff(&cap.0[&(l, Site::AttnIn)], &normed);
            assert!(d <= TOL, "{seq} layer {l} input: {d}");
            for (site, name) in [
                (Site::AttnHeads, "attn_branch"),
                (Site::SsmGated, "ssm_branch"),
            ] {
                let want = ex.f32(&format!("{seq}.layer{l}.{name}"));
                let d = common::max_abs_diff(&cap.0[&(l, site)], &want);
                assert!(d <= TOL, "{seq} layer {l} {name}: {d}");
            }
        }
    }
}

/// Prefill of the prompt into a cache, then one step per generated token: the logits of every
/// step (row 0 from the prefill).
fn cached_steps(m: &Model, prompt: &[u32], fed: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(m, prompt.len() + fed.len()).unwrap();
    let mut out = m
        .forward(prompt, Some(&mut cache), Logits::Last, None)
        .unwrap();
    for &t in fed {
        out.extend(
            m.forward(&[t], Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
    }
    out
}

#[test]
fn cached_greedy_decode_matches_upstream_and_the_consistent_window() {
    let mut m = model();
    let ex = Expected::load();
    let prompt = ex.ids("decode.prompt_ids");
    let generated = ex.ids("decode.generated_ids");
    // Upstream rule: decode sees W positions; greedy picks the reference's tokens.
    let steps = cached_steps(&m, &prompt, &generated);
    let d = common::max_abs_diff(&steps, &ex.f32("decode.step_logits"));
    assert!(d <= TOL, "upstream decode logits differ by {d}");
    let picks: Vec<u32> = steps.chunks_exact(256).map(argmax).collect();
    assert_eq!(&picks[..5], &generated[..]);
    // Consistent rule: decode equals a full forward pass over the same positions.
    m.config.window_rule = WindowRule::Consistent;
    let steps = cached_steps(&m, &prompt, &generated);
    let d = common::max_abs_diff(&steps, &ex.f32("decode.nocache_logits_same_positions"));
    assert!(d <= TOL, "consistent decode vs no-cache forward: {d}");
}

#[test]
fn consistent_decode_equals_full_prefill_across_window_boundaries() {
    let mut m = model();
    m.config.window_rule = WindowRule::Consistent;
    let ids: Vec<u32> = (0..60).map(|i| (i * 37 + 11) % 256).collect();
    let full = m.forward(&ids, None, Logits::All, None).unwrap();
    // Prefill 5 tokens (inside the window), then 55 decode steps that slide it many times;
    // also a multi-token append after the prefill, which steps through the ring.
    let mut cache = KvCache::new(&m, ids.len()).unwrap();
    let mut got = m
        .forward(&ids[..5], Some(&mut cache), Logits::All, None)
        .unwrap();
    got.extend(
        m.forward(&ids[5..9], Some(&mut cache), Logits::All, None)
            .unwrap(),
    );
    for &t in &ids[9..] {
        got.extend(
            m.forward(&[t], Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
    }
    let d = common::max_abs_diff(&got, &full);
    assert!(d <= TOL, "decode vs full forward: {d}");
}

#[test]
fn cache_size_follows_the_config_formula() {
    let m = model();
    // From config.json: M = 8 meta tokens, W = 8; K rows 2 heads × 16, V rows 2 heads × 32;
    // global layers 0, 3, 7 keep every position; SWA producers 1 and 4 keep M + W rows;
    // consumers 2, 5, 6 keep none; every layer keeps conv (K−1)·E and scan E·N states.
    let (mem, w, kv_row, ssm) = (
        8usize,
        8usize,
        (2 * 16 + 2 * 32) * 4,
        (3 * 128 + 128 * 16) * 4,
    );
    let formula = |tokens: usize| {
        let pos = mem + tokens;
        3 * pos * kv_row + 2 * pos.min(mem + w) * kv_row + 8 * ssm
    };
    for tokens in [1, 5, 40, 1000, 8000] {
        assert_eq!(KvCache::footprint(&m, tokens), formula(tokens), "{tokens}");
        assert_eq!(KvCache::new(&m, tokens).unwrap().bytes(), formula(tokens));
    }
    // Per-token growth comes from the three global layers only.
    let per_token = KvCache::footprint(&m, 8001) - KvCache::footprint(&m, 8000);
    assert_eq!(per_token, 3 * kv_row);
}

/// What the Hymba layout cannot hold (packed linears; layers of other widths) is a clear error
/// that leaves no folder.
#[test]
fn hf_export_of_what_the_hymba_layout_cannot_hold_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let e = whittle::io::safetensors::save(&model(), None, true, &out).unwrap_err();
    assert!(e.to_string().contains("packed (quantized) hymba"), "{e}");
    let mut m = model();
    let mlp = m.layers[3].mlp.as_mut().unwrap();
    let keep: Vec<usize> = (0..100).collect();
    mlp.gate = whittle::prune::width::slice_linear(&mlp.gate, Some(&keep), None).unwrap();
    mlp.up = whittle::prune::width::slice_linear(&mlp.up, Some(&keep), None).unwrap();
    mlp.down = whittle::prune::width::slice_linear(&mlp.down, None, Some(&keep)).unwrap();
    m.revalidate().unwrap();
    let e = whittle::io::safetensors::save(&m, None, false, &out).unwrap_err();
    assert!(e.to_string().contains("layer 3's widths"), "{e}");
    assert!(!out.exists());
}
