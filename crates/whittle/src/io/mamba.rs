//! The HF Mamba layout (`MambaForCausalLM`: transformers' `MambaConfig` and parameter names, e.g.
//! state-spaces/mamba-130m-hf) read into and written from the one model representation: each
//! block is `x + out_proj(ssm(norm(x)))` with `in_proj` = `[x | z]`, which whittle holds as an
//! SSM-only layer (no attention, no MLP). A width-pruned Mamba whose hidden size no longer
//! divides the SSM width cannot be said with transformers' integer `expand`: such a folder is
//! whittle's own (`whittle_mamba`, the width in `intermediate_size`), refused by name.

use super::hymba::{dense, ends, push, stacked, vec1, Named};
use super::safetensors::Shards;
use crate::model::{Arch, Layer, Linear, Model, ModelConfig, Ssm, SsmShape};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::Path;

/// Mamba has no positions; whittle's windows and prompts are bounded by this instead.
const CONTEXT: usize = 1 << 20;

fn parse(cfg: &Value, path: &Path) -> Result<(ModelConfig, SsmShape, usize)> {
    let bad = |m: String| Error::format(path, m);
    let uint = |k: &str| -> Result<usize> {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("'{k}' missing or not a non-negative integer")))
    };
    if cfg["use_bias"].as_bool() == Some(true) || cfg["use_conv_bias"].as_bool() == Some(false) {
        return Err(bad(
            "projection biases (use_bias) and conv without bias are not supported".into(),
        ));
    }
    let hidden = uint("hidden_size")?;
    let n_layers = uint("num_hidden_layers")?;
    ModelConfig::check_layer_count(n_layers).map_err(|e| bad(e.to_string()))?;
    // whittle's own folders state the width; transformers computes it from `expand`.
    let inner = match cfg["model_type"].as_str() {
        Some("whittle_mamba") => uint("intermediate_size")?,
        _ => uint("expand")?
            .checked_mul(hidden)
            .ok_or_else(|| bad("expand × hidden_size overflows".into()))?,
    };
    let ssm = SsmShape {
        inner,
        d_state: uint("state_size")?,
        d_conv: uint("conv_kernel")?,
        dt_rank: match cfg["time_step_rank"].as_u64() {
            Some(r) => r as usize,
            None => hidden.div_ceil(16), // "auto"
        },
    };
    let id = |k: &str| cfg[k].as_u64().map(|v| v as u32);
    let config = ModelConfig {
        arch: Arch::Mamba,
        vocab_size: uint("vocab_size")?,
        hidden,
        rope_theta: 10000.0,
        rms_eps: cfg["layer_norm_epsilon"].as_f64().unwrap_or(1e-5) as f32,
        context_length: cfg["max_position_embeddings"]
            .as_u64()
            .map_or(CONTEXT, |v| v as usize),
        tie_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(true),
        bos_token_id: id("bos_token_id"),
        eos_token_id: id("eos_token_id"),
        memory_tokens: 0,
        window_rule: Default::default(),
        kv_cache: Default::default(),
    };
    Ok((config, ssm, n_layers))
}

/// Loads a Mamba checkpoint folder (`config.json` already parsed into `cfg`).
pub fn load(dir: &Path, cfg: &Value, cfg_path: &Path) -> Result<Model> {
    let (config, s, n_layers) = parse(cfg, cfg_path)?;
    let st = Shards::open(dir)?;
    let h = config.hidden;
    let (e, n, k, r) = (s.inner, s.d_state, s.d_conv, s.dt_rank);
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let m = |p: &str| format!("backbone.layers.{i}.mixer.{p}");
        let in_proj = st.f32(&m("in_proj.weight"), &[2 * e, h])?;
        let (x, z) = in_proj.split_at(e * h);
        layers.push(Layer {
            attn_norm: st.f32(&format!("backbone.layers.{i}.norm.weight"), &[h])?,
            attn: None,
            ssm: Some(Ssm {
                shape: s,
                in_x: Linear::dense(&m("in_proj.weight"), x.to_vec(), e, h)?,
                in_z: Linear::dense(&m("in_proj.weight"), z.to_vec(), e, h)?,
                conv_weight: st.f32(&m("conv1d.weight"), &[e, 1, k])?,
                conv_bias: st.f32(&m("conv1d.bias"), &[e])?,
                x_proj: st.linear(&m("x_proj.weight"), r + 2 * n, e)?,
                inner_norms: None,
                dt_proj: st.linear(&m("dt_proj.weight"), e, r)?,
                dt_bias: st.f32(&m("dt_proj.bias"), &[e])?,
                a_log: st.f32(&m("A_log"), &[e, n])?,
                d: st.f32(&m("D"), &[e])?,
                out: Some(st.linear(&m("out_proj.weight"), h, e)?),
            }),
            fusion: None,
            mlp_norm: vec![1.0; h],
            mlp: None,
            emulated: Default::default(),
        });
    }
    let vocab = config.vocab_size;
    let embed = st.linear("backbone.embeddings.weight", vocab, h)?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(st.linear("lm_head.weight", vocab, h)?)
    };
    let final_norm = st.f32("backbone.norm_f.weight", &[h])?;
    Model::new(config, embed, layers, final_norm, lm_head).map_err(|e| Error::format(dir, e))
}

/// The SSM shape every layer shares (the HF config has one), or why the model is not a Mamba
/// the layout can hold.
fn shared(model: &Model) -> Result<SsmShape> {
    let refuse = |why: String| Err(Error::Invalid(format!("Mamba export: {why}")));
    let Some(first) = model.layers[0].ssm.as_ref().map(|s| s.shape) else {
        return refuse("layer 0 has no SSM".into());
    };
    for (i, l) in model.layers.iter().enumerate() {
        let plain = l.attn.is_none() && l.mlp.is_none() && l.emulated.is_empty();
        match &l.ssm {
            Some(s) if plain && s.shape == first && s.out.is_some() && s.inner_norms.is_none() => {}
            _ => {
                return refuse(format!(
                    "layer {i} is not a plain Mamba block with layer 0's widths (SSM only)"
                ))
            }
        }
        if l.linears().iter().any(|(_, _, lin)| lin.adapter.is_some()) {
            return refuse(format!("layer {i} has adapters (merge or drop them first)"));
        }
    }
    Ok(first)
}

/// `config.json` of a Mamba model in transformers' `MambaConfig` fields.
pub(super) fn config_json(model: &Model, bos: Option<u32>, eos: Option<u32>) -> Result<Value> {
    let c = &model.config;
    let s = shared(model)?;
    let integral = s.inner.is_multiple_of(c.hidden);
    let tok = |id: Option<u32>| id.map_or(Value::Null, |v| json!(v));
    let mut v = json!({
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden,
        "intermediate_size": s.inner,
        "expand": if integral { json!(s.inner / c.hidden) } else { json!(s.inner as f64 / c.hidden as f64) },
        "state_size": s.d_state,
        "conv_kernel": s.d_conv,
        "time_step_rank": s.dt_rank,
        "num_hidden_layers": model.layers.len(),
        "layer_norm_epsilon": c.rms_eps,
        "use_bias": false,
        "use_conv_bias": true,
        "hidden_act": "silu",
        "residual_in_fp32": true,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tok(c.bos_token_id.or(bos)),
        "eos_token_id": tok(c.eos_token_id.or(eos)),
        "torch_dtype": "float32",
    });
    if c.context_length != CONTEXT {
        // Not a transformers field: the context whittle's model was built with.
        v["max_position_embeddings"] = json!(c.context_length);
    }
    if !integral {
        v["architectures"] = json!(["WhittleMambaForCausalLM"]);
        v["model_type"] = json!("whittle_mamba");
        v["whittle_irregular"] = json!(format!(
            "SSM width {} is not a multiple of the hidden size {}, so transformers' integer \
             expand cannot state it",
            s.inner, c.hidden
        ));
    }
    Ok(v)
}

/// The tensors of a Mamba model under the names [`load`] reads.
pub(super) fn tensors(model: &Model) -> Result<Vec<Named<'_>>> {
    let s = shared(model)?;
    let e = s.inner;
    let mut out = ends(
        model,
        "backbone.embeddings.weight",
        "backbone.norm_f.weight",
    );
    for (i, l) in model.layers.iter().enumerate() {
        let m = |p: &str| format!("backbone.layers.{i}.mixer.{p}");
        let ssm = l.ssm.as_ref().expect("checked by shared()");
        let out_proj = ssm.out.as_ref().expect("checked by shared()");
        push(
            &mut out,
            format!("backbone.layers.{i}.norm.weight"),
            vec1(&l.attn_norm),
        );
        push(
            &mut out,
            m("in_proj.weight"),
            stacked(&[&ssm.in_x, &ssm.in_z]),
        );
        push(
            &mut out,
            m("conv1d.weight"),
            (Cow::Borrowed(&ssm.conv_weight[..]), vec![e, 1, s.d_conv]),
        );
        push(&mut out, m("conv1d.bias"), vec1(&ssm.conv_bias));
        push(&mut out, m("x_proj.weight"), dense(&ssm.x_proj));
        push(&mut out, m("dt_proj.weight"), dense(&ssm.dt_proj));
        push(&mut out, m("dt_proj.bias"), vec1(&ssm.dt_bias));
        push(
            &mut out,
            m("A_log"),
            (Cow::Borrowed(&ssm.a_log[..]), vec![e, s.d_state]),
        );
        push(&mut out, m("D"), vec1(&ssm.d));
        push(&mut out, m("out_proj.weight"), dense(out_proj));
    }
    Ok(out)
}
