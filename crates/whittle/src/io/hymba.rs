//! The HF Hymba layout (`HymbaForCausalLM`, config and parameter names of nvidia/Hymba-1.5B-Base;
//! see `shared/fixtures/hymba-tiny/ARCHITECTURE.md`) read into the one model representation:
//! `mamba.in_proj` is split into its row blocks `[q | k | v | x | z]` (`[q | x | z]` in a layer
//! that reuses another layer's K/V), `moe.experts.0` becomes the layer's MLP, and the NTK RoPE base
//! is folded into `rope_theta`.

use super::safetensors::Shards;
use crate::model::names::llama;
use crate::model::{
    Arch, Attention, AttnShape, KvSource, Layer, Linear, Mlp, Model, ModelConfig, Ssm, SsmShape,
};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Settings of the HF config that whittle reads, with the ones it does not implement rejected.
struct HymbaConfig {
    hidden: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    q_dim: usize,
    head_dim: usize,
    ssm: SsmShape,
    window: usize,
    global: Vec<usize>,
    /// `producer[i]`: the layer whose K/V layer `i` reads (`None`: its own).
    producer: Vec<Option<usize>>,
    inner_norms: bool,
}

fn parse(cfg: &Value, path: &Path) -> Result<(ModelConfig, HymbaConfig)> {
    let bad = |m: String| Error::format(path, m);
    let int = |k: &str| -> Result<i64> {
        cfg[k]
            .as_i64()
            .ok_or_else(|| bad(format!("'{k}' missing or not an integer")))
    };
    let uint = |k: &str| -> Result<usize> {
        usize::try_from(int(k)?).map_err(|_| bad(format!("'{k}' must not be negative")))
    };
    let opt = |k: &str, default: i64| cfg[k].as_i64().unwrap_or(default);
    // Features of the upstream code that the published configs leave off.
    for (k, want) in [
        ("num_mamba", 1),
        ("num_experts", 1),
        ("memory_tokens_interspersed_every", 0),
    ] {
        if opt(k, want) != want {
            return Err(bad(format!(
                "'{k}' = {} is not supported (only {want})",
                opt(k, want)
            )));
        }
    }
    if cfg["kv_weight_reuse"].as_bool() == Some(true) || opt("kv_reuse_every_i_layer", -1) > 0 {
        return Err(bad(
            "kv_weight_reuse / kv_reuse_every_i_layer are not supported".into(),
        ));
    }
    if cfg["kq_norm"].as_str().is_some_and(|s| s != "none") {
        return Err(bad("kq_norm other than \"none\" is not supported".into()));
    }
    if cfg["rope"].as_bool() == Some(false) {
        return Err(bad("models without RoPE are not supported".into()));
    }
    let n_layers = uint("num_hidden_layers")?;
    ModelConfig::check_layer_count(n_layers).map_err(|e| bad(e.to_string()))?;
    if let Some(types) = cfg["layer_type"].as_array() {
        if types.iter().any(|t| t.as_str() != Some("h")) {
            return Err(bad(
                "only hybrid layers (layer_type \"h\") are supported".into()
            ));
        }
    }
    let hidden = uint("hidden_size")?;
    let n_heads = uint("num_attention_heads")?.max(1);
    let n_kv_heads = uint("num_key_value_heads")?;
    let q_dim = match opt("attn_hidden_size", -1) {
        d if d > 0 => d as usize,
        _ => hidden,
    };
    let head_dim = match opt("kq_head_dim", -1) {
        d if d > 0 => d as usize,
        _ => q_dim / n_heads,
    };
    let inner = uint("mamba_expand")?
        .checked_mul(hidden)
        .ok_or_else(|| bad("mamba_expand × hidden_size overflows".into()))?;
    let ssm = SsmShape {
        inner,
        d_state: uint("mamba_d_state")?,
        d_conv: uint("mamba_d_conv")?,
        dt_rank: match opt("mamba_dt_rank", -1) {
            r if r > 0 => r as usize,
            _ => hidden.div_ceil(16),
        },
    };
    let mut producer = vec![None; n_layers];
    for group in cfg["kv_reuse_group"].as_array().into_iter().flatten() {
        let g = indices(group);
        for &c in g.iter().skip(1) {
            if c >= n_layers || c <= g[0] {
                return Err(bad(format!("kv_reuse_group {g:?}: bad layer index")));
            }
            producer[c] = Some(g[0]);
        }
    }
    let max_pos = uint("max_position_embeddings")?;
    let mut theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0);
    if cfg["rope_type"].as_str() == Some("ntk") {
        // A fixed NTK base change with factor 2, as HymbaAttention._init_rope computes it.
        let factor = 2.0;
        let orig = cfg["orig_max_position_embeddings"]
            .as_f64()
            .ok_or_else(|| bad("'orig_max_position_embeddings' missing (rope_type ntk)".into()))?;
        let d = head_dim as f64;
        theta *= (factor * max_pos as f64 / orig - (factor - 1.0)).powf(d / (d - 2.0));
    }
    let id = |k: &str| cfg[k].as_u64().map(|v| v as u32);
    let config = ModelConfig {
        arch: Arch::Hymba,
        vocab_size: uint("vocab_size")?,
        hidden,
        rope_theta: theta as f32,
        rms_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        context_length: max_pos,
        tie_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(true),
        bos_token_id: id("bos_token_id"),
        eos_token_id: id("eos_token_id"),
        memory_tokens: opt("num_memory_tokens", 0).max(0) as usize,
        window_rule: Default::default(),
        kv_cache: Default::default(),
    };
    let hy = HymbaConfig {
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        q_dim,
        head_dim,
        ssm,
        window: uint("sliding_window")?,
        global: indices(&cfg["global_attn_idx"]),
        producer,
        inner_norms: cfg["mamba_inner_layernorms"].as_bool().unwrap_or(true),
    };
    Ok((config, hy))
}

/// A JSON array of layer indices (empty when absent).
fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect()
        })
        .unwrap_or_default()
}

/// Cuts a `[rows, inp]` weight into consecutive row blocks of the given heights.
fn split_rows(name: &str, w: &[f32], inp: usize, heights: &[usize]) -> Result<Vec<Linear>> {
    let mut at = 0;
    heights
        .iter()
        .map(|&rows| {
            let part = w[at * inp..(at + rows) * inp].to_vec();
            at += rows;
            Linear::dense(name, part, rows, inp)
        })
        .collect()
}

/// Loads a Hymba checkpoint folder (`config.json` already parsed into `cfg`).
pub fn load(dir: &Path, cfg: &Value, cfg_path: &Path) -> Result<Model> {
    let (config, hy) = parse(cfg, cfg_path)?;
    let st = Shards::open(dir)?;
    let h = hy.hidden;
    let (e, n, k, r) = (hy.ssm.inner, hy.ssm.d_state, hy.ssm.d_conv, hy.ssm.dt_rank);
    let shape = AttnShape {
        n_heads: hy.n_heads,
        n_kv_heads: hy.n_kv_heads,
        head_dim: hy.head_dim,
        // HymbaBlock overrides the config's v_head_dim with E / heads.
        v_head_dim: e / hy.n_heads,
    };
    let mut layers = Vec::with_capacity(hy.n_layers);
    for i in 0..hy.n_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let m = |s: &str| p(&format!("mamba.{s}"));
        let own = hy.producer[i].is_none();
        let mut heights = vec![hy.q_dim];
        if own {
            heights.extend([shape.kv_dim(), shape.v_dim()]);
        }
        heights.extend([e, e]);
        let rows: usize = heights.iter().sum();
        let in_proj = st.f32(&m("in_proj.weight"), &[rows, h])?;
        let mut parts = split_rows(&m("in_proj.weight"), &in_proj, h, &heights)?.into_iter();
        let mut next = || parts.next().expect("one part per height");
        let q = next();
        let kv = match hy.producer[i] {
            None => KvSource::Own {
                k: next(),
                v: next(),
            },
            Some(src) => KvSource::Shared(src),
        };
        let (in_x, in_z) = (next(), next());
        let norm = |name: &str, len: usize| st.f32(&m(&format!("{name}.weight")), &[len]);
        let ssm = Ssm {
            shape: hy.ssm,
            in_x,
            in_z,
            conv_weight: st.f32(&m("conv1d.weight"), &[e, 1, k])?,
            conv_bias: st.f32(&m("conv1d.bias"), &[e])?,
            x_proj: st.linear(&m("x_proj.0.weight"), r + 2 * n, e)?,
            inner_norms: if hy.inner_norms {
                Some([
                    norm("dt_layernorm", r)?,
                    norm("B_layernorm", n)?,
                    norm("C_layernorm", n)?,
                ])
            } else {
                None
            },
            dt_proj: st.linear(&m("dt_proj.0.weight"), e, r)?,
            dt_bias: st.f32(&m("dt_proj.0.bias"), &[e])?,
            a_log: st.f32(&m("A_log.0"), &[e, n])?,
            d: st.f32(&m("D.0"), &[e])?,
            out: None,
        };
        let expert = |s: &str| p(&format!("moe.experts.0.{s}.weight"));
        let width = st.shape(&expert("gate_proj")).map_or(0, |s| s[0]);
        layers.push(Layer {
            attn_norm: st.f32(&p(&format!("{}.weight", llama::ATTN_NORM.hf)), &[h])?,
            attn: Some(Attention {
                shape,
                q,
                kv,
                o: st.linear(&m("out_proj.weight"), h, e)?,
                window: (!hy.global.contains(&i)).then_some(hy.window),
            }),
            ssm: Some(ssm),
            fusion: Some([
                norm("pre_avg_layernorm1", e)?,
                norm("pre_avg_layernorm2", e)?,
            ]),
            mlp_norm: st.f32(&p("pre_moe_layernorm.weight"), &[h])?,
            mlp: Some(Mlp {
                gate: st.linear(&expert("gate_proj"), width, h)?,
                up: st.linear(&expert("up_proj"), width, h)?,
                down: st.linear(&expert("down_proj"), h, width)?,
            }),
            emulated: Default::default(),
        });
    }
    let vocab = config.vocab_size;
    let embed = st.linear(&format!("{}.weight", llama::EMBED.hf), vocab, h)?;
    // save_pretrained drops a tied head; an untied one must be present.
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(st.linear("lm_head.weight", vocab, h)?)
    };
    let final_norm = st.f32("model.final_layernorm.weight", &[h])?;
    let memory = if config.memory_tokens > 0 {
        st.f32("model.memory_tokens", &[config.memory_tokens, h])?
    } else {
        Vec::new()
    };
    Model::new(config, embed, layers, final_norm, lm_head)
        .and_then(|m| m.with_memory(memory))
        .map_err(|e| Error::format(dir, e))
}
