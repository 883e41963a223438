//! The HF Hymba layout (`HymbaForCausalLM`, config and parameter names of nvidia/Hymba-1.5B-Base;
//! see `shared/fixtures/hymba-tiny/ARCHITECTURE.md`) read into the one model representation:
//! `mamba.in_proj` is split into its row blocks `[q | k | v | x | z]` (`[q | x | z]` in a layer
//! that reuses another layer's K/V), `moe.experts.0` becomes the layer's MLP, and the NTK RoPE base
//! is folded into `rope_theta`. [`config_json`] and [`tensors`] write a model back in the same
//! layout (the folded base as a plain `rope_theta`), so that a trained, distilled or pruned
//! Hymba is a folder again. A hidden size that no longer divides the SSM width (width pruning)
//! cannot be said with the official integer `mamba_expand`: such a folder is whittle's own
//! (`whittle_hymba`, the width in `conv_dim`), which transformers refuses by name.

use super::safetensors::Shards;
use crate::model::names::llama;
use crate::model::{
    Arch, Attention, AttnShape, KvSource, Layer, Linear, Mlp, Model, ModelConfig, Ssm, SsmShape,
};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::borrow::Cow;
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
    // The per-layer conv widths state the SSM width outright (whittle's own folders rely on
    // them); official configs list them too, equal to mamba_expand × hidden_size.
    let inner = match cfg["conv_dim"]["0"].as_u64() {
        Some(e) => e as usize,
        None => uint("mamba_expand")?
            .checked_mul(hidden)
            .ok_or_else(|| bad("mamba_expand × hidden_size overflows".into()))?,
    };
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

/// The model's Hymba settings, which its layers must share (the HF config has one of each).
struct Shared {
    attn: AttnShape,
    ssm: SsmShape,
    mlp: usize,
    window: usize,
    inner_norms: bool,
}

fn shared(model: &Model) -> Result<Shared> {
    let refuse = |why: String| Err(Error::Invalid(format!("Hymba export: {why}")));
    let first = &model.layers[0];
    let (Some(a), Some(m), Some(mlp)) = (&first.attn, &first.ssm, &first.mlp) else {
        return refuse("layer 0 lacks attention, SSM or MLP".into());
    };
    let out = Shared {
        attn: a.shape,
        ssm: m.shape,
        mlp: mlp.gate.out_features,
        window: model
            .layers
            .iter()
            .find_map(|l| l.attn.as_ref().and_then(|a| a.window))
            .unwrap_or(model.config.context_length),
        inner_norms: m.inner_norms.is_some(),
    };
    for (i, l) in model.layers.iter().enumerate() {
        let s = l.shape();
        if s.attn != Some(out.attn) || s.ssm != Some(out.ssm) || s.mlp != Some(out.mlp) {
            return refuse(format!(
                "layer {i}'s widths {s:?} differ from layer 0's (the HF config has one of each)"
            ));
        }
        let a = l.attn.as_ref().expect("shape checked");
        if a.window.is_some_and(|w| w != out.window) {
            return refuse(format!("layer {i}'s window differs from the others'"));
        }
        if !l.emulated.is_empty() {
            return refuse(format!("layer {i} has an emulated update"));
        }
        if l.linears().iter().any(|(_, _, lin)| lin.adapter.is_some()) {
            return refuse(format!("layer {i} has adapters (merge or drop them first)"));
        }
        let ssm = l.ssm.as_ref().expect("shape checked");
        if ssm.out.is_some() || l.fusion.is_none() || ssm.inner_norms.is_some() != out.inner_norms {
            return refuse(format!(
                "layer {i} is not a Hymba hybrid layer like layer 0"
            ));
        }
    }
    Ok(out)
}

/// `config.json` of a Hymba model: the fields [`parse`] reads plus the fixed settings of the
/// published configs (hybrid layers only, one expert, one SSM per layer).
pub(super) fn config_json(model: &Model, bos: Option<u32>, eos: Option<u32>) -> Result<Value> {
    let c = &model.config;
    let s = shared(model)?;
    let n = model.layers.len();
    let global: Vec<usize> = (0..n)
        .filter(|&i| {
            model.layers[i]
                .attn
                .as_ref()
                .is_some_and(|a| a.window.is_none())
        })
        .collect();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        if let Some(Attention {
            kv: KvSource::Shared(src),
            ..
        }) = &l.attn
        {
            match groups.iter_mut().find(|g| g[0] == *src) {
                Some(g) => g.push(i),
                None => groups.push(vec![*src, i]),
            }
        }
    }
    let e = s.ssm.inner;
    let integral = e.is_multiple_of(c.hidden);
    let tok = |id: Option<u32>| id.map_or(Value::Null, |v| json!(v));
    let mut v = json!({
        "architectures": ["HymbaForCausalLM"],
        "model_type": "hymba",
        "auto_map": {
            "AutoConfig": "configuration_hymba.HymbaConfig",
            "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"
        },
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden,
        "intermediate_size": s.mlp,
        "num_hidden_layers": n,
        "num_attention_heads": s.attn.n_heads,
        "num_key_value_heads": s.attn.n_kv_heads,
        "attn_hidden_size": s.attn.q_dim(),
        "kq_head_dim": s.attn.head_dim,
        "v_head_dim": s.attn.v_head_dim,
        "kq_norm": "none",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tok(c.bos_token_id.or(bos)),
        "eos_token_id": tok(c.eos_token_id.or(eos)),
        "torch_dtype": "float32",
    });
    let expand = if integral {
        json!(e / c.hidden)
    } else {
        json!(e as f64 / c.hidden as f64)
    };
    let conv_dim: serde_json::Map<_, _> = (0..n).map(|i| (i.to_string(), json!(e))).collect();
    for (key, value) in [
        ("mamba_expand", expand),
        ("conv_dim", Value::Object(conv_dim)),
        ("mamba_d_state", json!(s.ssm.d_state)),
        ("mamba_d_conv", json!(s.ssm.d_conv)),
        ("mamba_dt_rank", json!(s.ssm.dt_rank)),
        ("mamba_inner_layernorms", json!(s.inner_norms)),
        ("mamba_conv_bias", json!(true)),
        ("mamba_proj_bias", json!(false)),
        ("num_mamba", json!(1)),
        ("num_experts", json!(1)),
        ("num_experts_per_tok", json!(1)),
        ("layer_type", json!(vec!["h"; n])),
        ("sliding_window", json!(s.window)),
        ("global_attn_idx", json!(global)),
        ("kv_reuse_group", json!(groups)),
        ("kv_weight_reuse", json!(false)),
        ("kv_reuse_every_i_layer", json!(-1)),
        ("num_memory_tokens", json!(c.memory_tokens)),
        ("memory_tokens_interspersed_every", json!(0)),
        ("rope", json!(true)),
        ("rope_type", json!("default")),
        ("rope_theta", json!(c.rope_theta)),
        ("hidden_act", json!("silu")),
        ("mlp_hidden_act", json!("silu")),
    ] {
        v[key] = value;
    }
    if !integral {
        v["architectures"] = json!(["WhittleHymbaForCausalLM"]);
        v["model_type"] = json!("whittle_hymba");
        v["whittle_irregular"] = json!(format!(
            "SSM width {e} is not a multiple of the hidden size {}, so the official integer \
             mamba_expand cannot state it",
            c.hidden
        ));
    }
    Ok(v)
}

/// The tensors of a Hymba model under the names [`load`] reads: `(name, values, shape)`.
pub(super) fn tensors(model: &Model) -> Result<Vec<Named<'_>>> {
    let c = &model.config;
    let s = shared(model)?;
    let (h, e, k) = (c.hidden, s.ssm.inner, s.ssm.d_conv);
    let mut out = ends(
        model,
        &format!("{}.weight", llama::EMBED.hf),
        "model.final_layernorm.weight",
    );
    if c.memory_tokens > 0 {
        push(
            &mut out,
            "model.memory_tokens".into(),
            (Cow::Borrowed(&model.memory[..]), vec![c.memory_tokens, h]),
        );
    }
    for (i, l) in model.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let m = |s: &str| p(&format!("mamba.{s}"));
        let (a, ssm, mlp) = match (&l.attn, &l.ssm, &l.mlp) {
            (Some(a), Some(ssm), Some(mlp)) => (a, ssm, mlp),
            _ => unreachable!("checked by shared()"),
        };
        push(
            &mut out,
            p(&format!("{}.weight", llama::ATTN_NORM.hf)),
            vec1(&l.attn_norm),
        );
        push(&mut out, p("pre_moe_layernorm.weight"), vec1(&l.mlp_norm));
        // in_proj = [q | k | v | x | z] (no k, v where the layer reads another's K/V).
        let mut parts = vec![&a.q];
        if let KvSource::Own { k, v } = &a.kv {
            parts.extend([k, v]);
        }
        parts.extend([&ssm.in_x, &ssm.in_z]);
        push(&mut out, m("in_proj.weight"), stacked(&parts));
        push(
            &mut out,
            m("conv1d.weight"),
            (Cow::Borrowed(&ssm.conv_weight[..]), vec![e, 1, k]),
        );
        push(&mut out, m("conv1d.bias"), vec1(&ssm.conv_bias));
        push(&mut out, m("x_proj.0.weight"), dense(&ssm.x_proj));
        if let Some([dt, b, cn]) = &ssm.inner_norms {
            push(&mut out, m("dt_layernorm.weight"), vec1(dt));
            push(&mut out, m("B_layernorm.weight"), vec1(b));
            push(&mut out, m("C_layernorm.weight"), vec1(cn));
        }
        push(&mut out, m("dt_proj.0.weight"), dense(&ssm.dt_proj));
        push(&mut out, m("dt_proj.0.bias"), vec1(&ssm.dt_bias));
        push(
            &mut out,
            m("A_log.0"),
            (Cow::Borrowed(&ssm.a_log[..]), vec![e, s.ssm.d_state]),
        );
        push(&mut out, m("D.0"), vec1(&ssm.d));
        push(&mut out, m("out_proj.weight"), dense(&a.o));
        let [f1, f2] = l.fusion.as_ref().expect("checked by shared()");
        push(&mut out, m("pre_avg_layernorm1.weight"), vec1(f1));
        push(&mut out, m("pre_avg_layernorm2.weight"), vec1(f2));
        let expert = |s: &str| p(&format!("moe.experts.0.{s}.weight"));
        push(&mut out, expert("gate_proj"), dense(&mlp.gate));
        push(&mut out, expert("up_proj"), dense(&mlp.up));
        push(&mut out, expert("down_proj"), dense(&mlp.down));
    }
    Ok(out)
}

/// A tensor's values and shape.
pub(super) type Tensor<'a> = (Cow<'a, [f32]>, Vec<usize>);

/// The embedding, an untied head and the final norm, under a layout's names for the first and
/// the last.
pub(super) fn ends<'a>(model: &'a Model, embed: &str, final_norm: &str) -> Vec<Named<'a>> {
    let mut out = Vec::new();
    push(&mut out, embed.into(), dense(&model.embed));
    if let Some(head) = &model.lm_head {
        push(&mut out, "lm_head.weight".into(), dense(head));
    }
    push(&mut out, final_norm.into(), vec1(&model.final_norm));
    out
}

/// Linears reading the same input stacked row-wise into one matrix (a fused `in_proj`).
pub(super) fn stacked(parts: &[&Linear]) -> Tensor<'static> {
    let rows = parts.iter().map(|l| l.out_features).sum();
    let inp = parts.first().map_or(0, |l| l.in_features);
    let w: Vec<f32> = parts
        .iter()
        .flat_map(|l| l.dense_weight().into_owned())
        .collect();
    (Cow::Owned(w), vec![rows, inp])
}

/// A tensor under its checkpoint name.
pub(super) type Named<'a> = (String, Cow<'a, [f32]>, Vec<usize>);

pub(super) fn push<'a>(out: &mut Vec<Named<'a>>, name: String, (v, shape): Tensor<'a>) {
    out.push((name, v, shape));
}

pub(super) fn dense(l: &Linear) -> Tensor<'_> {
    (l.dense_weight(), vec![l.out_features, l.in_features])
}

pub(super) fn vec1(v: &[f32]) -> Tensor<'_> {
    (Cow::Borrowed(v), vec![v.len()])
}
