//! A plain Mamba model (SSM-only layers) built from the same parts as Hymba's SSM branch: its
//! forward pass against an independent f64 transcription of the Mamba-1 block, and cached decode
//! against the full pass.

mod common;

use whittle::model::{KvCache, Logits};
use whittle::Model;

fn mamba(seed: u64) -> Model {
    common::tiny_mamba(3, 48, None, seed)
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * *w as f64).collect()
}

fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| *a as f64 * b).sum())
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// Logits of every position, written from the Mamba-1 equations with no code shared with whittle.
fn reference_logits(m: &Model, ids: &[u32]) -> Vec<f64> {
    let h = m.config.hidden;
    let eps = m.config.rms_eps as f64;
    let emb = m.embed.dense_weight();
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&i| {
            emb[i as usize * h..(i as usize + 1) * h]
                .iter()
                .map(|v| *v as f64)
                .collect()
        })
        .collect();
    for layer in &m.layers {
        let s = layer.ssm.as_ref().unwrap();
        let (e, n, k, r) = (
            s.shape.inner,
            s.shape.d_state,
            s.shape.d_conv,
            s.shape.dt_rank,
        );
        let normed: Vec<Vec<f64>> = xs.iter().map(|x| rms(x, &layer.attn_norm, eps)).collect();
        let xin: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| matvec(&s.in_x.dense_weight(), x))
            .collect();
        let mut state = vec![0f64; e * n];
        for (t, x) in xs.iter_mut().enumerate() {
            let z = matvec(&s.in_z.dense_weight(), &normed[t]);
            let xc: Vec<f64> = (0..e)
                .map(|c| {
                    let mut acc = s.conv_bias[c] as f64;
                    for j in 0..k {
                        if let Some(src) = (t + j).checked_sub(k - 1) {
                            acc += s.conv_weight[c * k + j] as f64 * xin[src][c];
                        }
                    }
                    silu(acc)
                })
                .collect();
            let p = matvec(&s.x_proj.dense_weight(), &xc);
            let (dt_r, b, cc) = (&p[..r], &p[r..r + n], &p[r + n..]);
            let dt_lin = matvec(&s.dt_proj.dense_weight(), dt_r);
            let mut y = vec![0f64; e];
            for c in 0..e {
                let v = dt_lin[c] + s.dt_bias[c] as f64;
                let delta = if v > 20.0 { v } else { v.exp().ln_1p() };
                let mut acc = 0.0;
                for i in 0..n {
                    let a = -(s.a_log[c * n + i] as f64).exp();
                    let st = &mut state[c * n + i];
                    *st = (delta * a).exp() * *st + delta * xc[c] * b[i];
                    acc += *st * cc[i];
                }
                y[c] = (acc + s.d[c] as f64 * xc[c]) * silu(z[c]);
            }
            let out = matvec(&s.out.as_ref().unwrap().dense_weight(), &y);
            x.iter_mut().zip(out).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .flat_map(|x| matvec(&emb, &rms(x, &m.final_norm, eps)))
        .collect()
}

#[test]
fn forward_matches_independent_f64_mamba() {
    let m = mamba(3);
    let ids: Vec<u32> = (0..23).map(|i| (i * 41 + 7) % 256).collect();
    let got = m.forward(&ids, None, Logits::All, None).unwrap();
    let want = reference_logits(&m, &ids);
    for (a, b) in got.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn decode_with_ssm_state_equals_full_pass() {
    let m = mamba(4);
    let ids: Vec<u32> = (0..30).map(|i| (i * 13 + 5) % 256).collect();
    let full = m.forward(&ids, None, Logits::All, None).unwrap();
    let mut cache = KvCache::new(&m, ids.len()).unwrap();
    // The cache of an SSM-only model is the conv and scan state: no per-token growth.
    assert_eq!(KvCache::footprint(&m, 1), KvCache::footprint(&m, 30));
    let mut got = m
        .forward(&ids[..7], Some(&mut cache), Logits::All, None)
        .unwrap();
    got.extend(
        m.forward(&ids[7..12], Some(&mut cache), Logits::All, None)
            .unwrap(),
    );
    for &t in &ids[12..] {
        got.extend(
            m.forward(&[t], Some(&mut cache), Logits::Last, None)
                .unwrap(),
        );
    }
    assert!(common::max_abs_diff(&got, &full) < 1e-4);
}

/// A Mamba is written in transformers' `MambaForCausalLM` layout (`in_proj` = `[x | z]`,
/// `expand` from the widths) and loads back into the same model; a layer with an MLP (not a
/// Mamba block) is refused and leaves no folder.
#[test]
fn hf_layout_round_trips() {
    // SSM width 64 = 2 × hidden 32: transformers' integer `expand` states it.
    let m = common::tiny_mamba(3, 64, None, 8);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    whittle::io::safetensors::save(&m, None, false, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mamba");
    let inner = m.layers[0].ssm.as_ref().unwrap().shape.inner;
    assert_eq!(cfg["expand"], inner / m.config.hidden);
    let back = whittle::io::safetensors::load(&dir).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 13 % 200) as u32).collect();
    let logits = |m: &Model| m.forward(&ids, None, Logits::All, None).unwrap();
    assert_eq!(logits(&back), logits(&m));
    let with_mlp = common::tiny_mamba(2, 64, Some(48), 1);
    let out = tmp.path().join("x");
    let e = whittle::io::safetensors::save(&with_mlp, None, false, &out).unwrap_err();
    assert!(e.to_string().contains("not a plain Mamba block"), "{e}");
    assert!(!out.exists());
}
