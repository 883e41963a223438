//! The HF layout: `config.json` + `model.safetensors` (or shards) + `tokenizer.json`.
//! Loading memory-maps the shards and converts f32/f16/bf16 to f32; per-layer widths come from
//! tensor shapes, so pruned models round-trip. Saving writes into a temporary folder renamed into
//! place at the end, so an interrupted save never leaves a folder that looks complete.
//!
//! Dense and sparse models are plain transformers checkpoints. whittle's extensions, read back by
//! whittle (transformers does not know them):
//! - packed quantized linear at `P` (saved with `packed = true`): `P.qweight` U8
//!   `[out, in·bits/8]` — 32-weight blocks, layout of [`crate::kernels::qdot`]; `P.scales`, `P.mins`
//!   F32 `[out, ⌈in/group⌉]`; weight `= fma(scale, q, min)`; the file's `__metadata__` maps
//!   `P.qweight` to `{"bits": b, "group_size": g}`.
//! - low-rank adapter on the linear at `P`: `P.adapter_A` `[r, in]`, `P.adapter_B` `[out, r]`;
//!   output `W x + B (A x)`.
//! - emulated update of layer `i` (see [`crate::model::Emulation`]) at
//!   `P = model.layers.{i}.whittle_emulated.{mixer|mlp}`: `P.bias` `[hidden]`, maps
//!   `P.0.weight`, `P.1.weight` when present.
//!
//! A model that is not a plain Llama ([`Model::irregularity`]: widths that differ between
//! layers, removed sublayers, emulated updates) is written with `model_type` `whittle_llama`
//! and architecture `WhittleLlamaForCausalLM`, so transformers and vLLM refuse it by name
//! instead of filling the missing tensors with random weights; whittle reads it as Llama.

use super::tokenizer::Tokenizer;
use crate::model::{
    Arch, Attention, AttnShape, Emulated, Emulation, KvSource, Layer, Linear, LowRank, Mlp, Model,
    ModelConfig, Packed, Weight,
};

/// Prefix of emulated-update tensors within a layer.
const EMULATED: &str = "whittle_emulated";
use crate::model::names::llama;
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensors of all shards of a folder, converted to f32 on request.
pub(super) struct Shards {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name → index into `maps`.
    index: HashMap<String, usize>,
}

impl Shards {
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; whittle never writes to its inputs. Another process
            // truncating the file while we run would be a user error we cannot guard against.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            maps.push((path, map));
        }
        Ok(Shards { maps, index })
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub(super) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (_, map) = &self.maps[*self.index.get(name)?];
        SafeTensors::deserialize(map)
            .ok()?
            .tensor(name)
            .ok()
            .map(|t| t.shape().to_vec())
    }

    pub(super) fn f32(&self, name: &str, want: &[usize]) -> Result<Vec<f32>> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("tensor '{name}' missing")))?;
        let (path, map) = &self.maps[i];
        let st = SafeTensors::deserialize(map).map_err(|e| Error::format(path, e))?;
        let t = st.tensor(name).map_err(|e| Error::format(path, e))?;
        if t.shape() != want {
            return Err(Error::format(
                path,
                Error::Shape {
                    name: name.into(),
                    expected: want.to_vec(),
                    found: t.shape().to_vec(),
                },
            ));
        }
        let b = t.data();
        let v = match t.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor '{name}': dtype {other:?} not supported (f32, f16, bf16)"),
                ))
            }
        };
        Ok(v)
    }

    /// The emulated update stored at `prefix` (`{prefix}.bias`, `{prefix}.{0,1}.weight`), if any.
    fn emulation(&self, prefix: &str, h: usize) -> Result<Option<Emulation>> {
        if !self.has(&format!("{prefix}.bias")) {
            return Ok(None);
        }
        let mut maps = Vec::new();
        let mut width = h;
        for k in 0..2 {
            let name = format!("{prefix}.{k}.weight");
            let Some(shape) = self.shape(&name) else {
                break;
            };
            let out = shape.first().copied().unwrap_or(0);
            maps.push(Linear::dense(
                &name,
                self.f32(&name, &[out, width])?,
                out,
                width,
            )?);
            width = out;
        }
        Ok(Some(Emulation {
            maps,
            bias: self.f32(&format!("{prefix}.bias"), &[h])?,
        }))
    }

    pub(super) fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Linear::dense(name, self.f32(name, &[out, inp])?, out, inp)
    }

    /// The linear at `prefix`: dense `.weight` or packed `.qweight/.scales/.mins`, plus an
    /// adapter `.adapter_A/.adapter_B` when present.
    fn linear_at(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let q = format!("{prefix}.qweight");
        let mut lin = if self.has(&q) {
            let (path, map) = &self.maps[self.index[&q]];
            let (_, header) =
                SafeTensors::read_metadata(map).map_err(|e| Error::format(path, e))?;
            let spec: Value = header
                .metadata()
                .as_ref()
                .and_then(|m| m.get(&q))
                .and_then(|s| serde_json::from_str(s).ok())
                .ok_or_else(|| {
                    Error::format(path, format!("'{q}': bits/group_size metadata missing"))
                })?;
            let (bits, group) = (
                spec["bits"].as_u64().unwrap_or(0),
                spec["group_size"].as_u64().unwrap_or(0),
            );
            let st = SafeTensors::deserialize(map).map_err(|e| Error::format(path, e))?;
            let data = st
                .tensor(&q)
                .map_err(|e| Error::format(path, e))?
                .data()
                .to_vec();
            let groups = inp.div_ceil((group as usize).max(1));
            let scales = self.f32(&format!("{prefix}.scales"), &[out, groups])?;
            let mins = self.f32(&format!("{prefix}.mins"), &[out, groups])?;
            let packed = Packed::new(
                prefix,
                (out, inp),
                bits as u8,
                group as usize,
                data,
                scales,
                mins,
            )
            .map_err(|e| Error::format(path, e))?;
            Linear::new(Weight::Packed(packed), out, inp)
        } else {
            self.linear(&format!("{prefix}.weight"), out, inp)?
        };
        let a = format!("{prefix}.adapter_A");
        if self.has(&a) {
            let rank = self.shape(&a).map_or(0, |s| s[0]);
            lin.adapter = Some(LowRank {
                rank,
                a: self.f32(&a, &[rank, inp])?,
                b: self.f32(&format!("{prefix}.adapter_B"), &[out, rank])?,
            });
        }
        Ok(lin)
    }
}

/// The weight files of a folder: the shards an index (`model.safetensors.index.json`) names, else
/// `model.safetensors`, else every `model*.safetensors`. Other safetensors files in the folder
/// (adapters, test fixtures) are not weights of the model.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&index, e))?;
        let mut files: Vec<PathBuf> = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::format(&index, "no weight_map"))?
            .values()
            .filter_map(|f| f.as_str().map(|f| dir.join(f)))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(
            dir,
            "no model*.safetensors file in the folder",
        ));
    }
    Ok(files)
}

/// Names, dtypes and shapes of all tensors in a folder's shards, sorted by name.
pub fn tensor_infos(dir: &Path) -> Result<Vec<(String, String, Vec<usize>)>> {
    let st = Shards::open(dir)?;
    let mut v = Vec::new();
    for (path, map) in &st.maps {
        let t = SafeTensors::deserialize(map).map_err(|e| Error::format(path, e))?;
        for (name, view) in t.tensors() {
            v.push((name, format!("{:?}", view.dtype()), view.shape().to_vec()));
        }
    }
    v.sort();
    Ok(v)
}

pub(super) fn read_config(dir: &Path) -> Result<(Value, PathBuf)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e))?;
    Ok((v, path))
}

/// Loads a model from an HF-layout folder, with the provenance the folder records.
pub fn load(dir: &Path) -> Result<Model> {
    let mut model = load_weights(dir)?;
    model.provenance = super::model_card::read(dir)?;
    Ok(model)
}

fn load_weights(dir: &Path) -> Result<Model> {
    let (cfg, cfg_path) = read_config(dir)?;
    let arch_name = cfg["architectures"][0]
        .as_str()
        .or(cfg["model_type"].as_str())
        .unwrap_or("<missing>");
    let arch = Arch::parse(arch_name)?;
    match arch {
        Arch::Hymba => return super::hymba::load(dir, &cfg, &cfg_path),
        Arch::Mamba => return super::mamba::load(dir, &cfg, &cfg_path),
        Arch::Llama => {}
    }
    let num = |k: &str| -> Result<usize> {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::format(&cfg_path, format!("'{k}' missing or not an integer")))
    };
    let hidden = num("hidden_size")?;
    let n_heads = num("num_attention_heads")?;
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map_or(hidden / n_heads.max(1), |v| v as usize);
    if head_dim == 0 {
        return Err(Error::format(&cfg_path, "head dimension is 0"));
    }
    let id = |k: &str| cfg[k].as_u64().map(|v| v as u32);
    let config = ModelConfig {
        arch,
        vocab_size: num("vocab_size")?,
        hidden,
        rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
        rms_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        context_length: num("max_position_embeddings")?,
        tie_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(false),
        bos_token_id: id("bos_token_id"),
        eos_token_id: id("eos_token_id"),
        memory_tokens: 0,
        window_rule: Default::default(),
        kv_cache: Default::default(),
    };
    let n_layers = num("num_hidden_layers")?;
    ModelConfig::check_layer_count(n_layers).map_err(|e| Error::format(&cfg_path, e))?;
    let st = Shards::open(dir)?;
    let h = hidden;
    let embed = st.linear(&format!("{}.weight", llama::EMBED.hf), config.vocab_size, h)?;
    let final_norm = st.f32(&format!("{}.weight", llama::FINAL_NORM.hf), &[h])?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(st.linear(
            &format!("{}.weight", llama::LM_HEAD.hf),
            config.vocab_size,
            h,
        )?)
    };
    let rows = |n: &str| {
        st.shape(&format!("{n}.weight"))
            .or_else(|| st.shape(&format!("{n}.qweight")))
            .map_or(0, |s| s[0])
    };
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let present =
            |s: &str| st.has(&format!("{}.weight", p(s))) || st.has(&format!("{}.qweight", p(s)));
        let attn = if present(llama::Q.hf) {
            let shape = AttnShape::new(
                rows(&p(llama::Q.hf)) / head_dim,
                rows(&p(llama::K.hf)) / head_dim,
                head_dim,
            );
            Some(Attention {
                shape,
                q: st.linear_at(&p(llama::Q.hf), shape.q_dim(), h)?,
                kv: KvSource::Own {
                    k: st.linear_at(&p(llama::K.hf), shape.kv_dim(), h)?,
                    v: st.linear_at(&p(llama::V.hf), shape.kv_dim(), h)?,
                },
                o: st.linear_at(&p(llama::O.hf), h, shape.q_dim())?,
                window: None,
            })
        } else {
            None
        };
        let mlp = if present(llama::GATE.hf) {
            let w = rows(&p(llama::GATE.hf));
            Some(Mlp {
                gate: st.linear_at(&p(llama::GATE.hf), w, h)?,
                up: st.linear_at(&p(llama::UP.hf), w, h)?,
                down: st.linear_at(&p(llama::DOWN.hf), h, w)?,
            })
        } else {
            None
        };
        let norm = |n: &str| -> Result<Vec<f32>> {
            if st.has(n) {
                st.f32(n, &[h])
            } else {
                Ok(vec![1.0; h])
            }
        };
        layers.push(Layer {
            attn_norm: norm(&p(&format!("{}.weight", llama::ATTN_NORM.hf)))?,
            attn,
            ssm: None,
            fusion: None,
            mlp_norm: norm(&p(&format!("{}.weight", llama::MLP_NORM.hf)))?,
            mlp,
            emulated: Emulated {
                mixer: st.emulation(&p(&format!("{EMULATED}.mixer")), h)?,
                mlp: st.emulation(&p(&format!("{EMULATED}.mlp")), h)?,
            },
        });
    }
    Model::new(config, embed, layers, final_norm, lm_head).map_err(|e| Error::format(dir, e))
}

/// A tensor for the safetensors writer; f32 bytes are produced per tensor while writing.
enum OutView<'a> {
    F32(Cow<'a, [f32]>, Vec<usize>),
    U8(Cow<'a, [u8]>, Vec<usize>),
}

impl View for OutView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutView::F32(..) => Dtype::F32,
            OutView::U8(..) => Dtype::U8,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutView::F32(_, s) | OutView::U8(_, s) => s,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutView::F32(d, _) => Cow::Owned(d.iter().flat_map(|v| v.to_le_bytes()).collect()),
            OutView::U8(d, _) => Cow::Borrowed(d.as_ref()),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutView::F32(d, _) => d.len() * 4,
            OutView::U8(d, _) => d.len(),
        }
    }
}

/// `config.json` for a model. Per-layer widths that differ from layer 0 are listed under
/// `whittle_layers` (whittle reads widths from tensor shapes; the list is for people).
fn config_json(model: &Model, tokenizer: Option<&Tokenizer>) -> Value {
    let c = &model.config;
    let shapes: Vec<_> = model.layers.iter().map(|l| l.shape()).collect();
    let attn = shapes.iter().find_map(|s| s.attn);
    let mlp = shapes.iter().find_map(|s| s.mlp).unwrap_or(0);
    let uniform = shapes.iter().all(|s| s.attn == attn && s.mlp == Some(mlp));
    let tok_id = |id: Option<u32>| id.map_or(Value::Null, |v| json!(v));
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": c.arch.name(),
        "hidden_size": c.hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": shapes.len(),
        "num_attention_heads": attn.map_or(1, |a| a.n_heads),
        "num_key_value_heads": attn.map_or(1, |a| a.n_kv_heads),
        "head_dim": attn.map_or(c.hidden, |a| a.head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tok_id(c.bos_token_id.or(tokenizer.and_then(|t| t.bos))),
        "eos_token_id": tok_id(c.eos_token_id.or(tokenizer.and_then(|t| t.eos))),
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if !uniform {
        v["whittle_layers"] = serde_json::to_value(&shapes).unwrap_or(Value::Null);
    }
    if let Some(why) = model.irregularity().or_else(|| transformers_refuses(model)) {
        v["architectures"] = json!(["WhittleLlamaForCausalLM"]);
        v["model_type"] = json!("whittle_llama");
        v["whittle_irregular"] = json!(why);
    }
    v
}

/// Why transformers' `LlamaConfig` would reject a model that is otherwise a plain Llama: it
/// requires the hidden size to be a multiple of the attention heads (even with `head_dim` set),
/// which width pruning can break (e.g. 448 channels and 9 heads).
fn transformers_refuses(model: &Model) -> Option<String> {
    let heads = model.layers.first()?.attn.as_ref()?.shape.n_heads;
    (!model.config.hidden.is_multiple_of(heads)).then(|| {
        format!(
            "hidden size {} is not a multiple of the {heads} attention heads, which \
             transformers' LlamaConfig requires",
            model.config.hidden
        )
    })
}

/// Writes `model` (and `tokenizer`) as an HF folder at `dir`, atomically: everything goes to a
/// sibling temporary folder first, renamed to `dir` when complete. `dir` must not exist yet.
pub fn save(model: &Model, tokenizer: Option<&Tokenizer>, packed: bool, dir: &Path) -> Result<()> {
    if packed && model.config.arch != Arch::Llama {
        return Err(Error::Invalid(format!(
            "{} export writes f32 weights; packed (quantized) {} linears are not exported yet",
            model.config.arch.name(),
            model.config.arch.name()
        )));
    }
    super::atomic::write_dir(dir, super::atomic::Existing::Refuse, |tmp| {
        write_folder(model, tokenizer, packed, tmp)
    })
}

fn write_folder(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    packed: bool,
    dir: &Path,
) -> Result<()> {
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    let (bos, eos) = (tokenizer.and_then(|t| t.bos), tokenizer.and_then(|t| t.eos));
    let cfg = match model.config.arch {
        Arch::Llama => config_json(model, tokenizer),
        Arch::Hymba => super::hymba::config_json(model, bos, eos)?,
        Arch::Mamba => super::mamba::config_json(model, bos, eos)?,
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )?;
    if let Some(t) = tokenizer {
        write("tokenizer.json", t.json().to_string())?;
        let name = |id: Option<u32>| id.and_then(|i| t.id_to_token(i));
        let tc = json!({
            "chat_template": t.chat_template(),
            "bos_token": name(t.bos),
            "eos_token": name(t.eos),
            "add_bos_token": false,
            "tokenizer_class": "GPT2Tokenizer",
        });
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tc).unwrap_or_default(),
        )?;
    }
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    super::model_card::write(model, packed, dir)?;
    let path = dir.join("model.safetensors");
    let named = match model.config.arch {
        Arch::Llama => None,
        Arch::Hymba => Some(super::hymba::tensors(model)?),
        Arch::Mamba => Some(super::mamba::tensors(model)?),
    };
    let views = match named {
        Some(t) => t
            .into_iter()
            .map(|(name, v, shape)| (name, OutView::F32(v, shape)))
            .collect(),
        None => llama_views(model, packed, &mut meta),
    };
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::format(&path, e))
}

/// The tensors of a Llama model, in the layout described at the top of this module.
fn llama_views<'a>(
    model: &'a Model,
    packed: bool,
    meta: &mut HashMap<String, String>,
) -> Vec<(String, OutView<'a>)> {
    let h = model.config.hidden;
    // Embeddings and head are always f32, as transformers expects them.
    let mut views: Vec<(String, OutView)> = vec![
        dense_view(&format!("{}.weight", llama::EMBED.hf), &model.embed),
        view(
            &format!("{}.weight", llama::FINAL_NORM.hf),
            &model.final_norm,
            vec![h],
        ),
    ];
    if let Some(head) = &model.lm_head {
        views.push(dense_view(&format!("{}.weight", llama::LM_HEAD.hf), head));
    }
    for (i, l) in model.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        views.push(view(
            &p(&format!("{}.weight", llama::ATTN_NORM.hf)),
            &l.attn_norm,
            vec![h],
        ));
        views.push(view(
            &p(&format!("{}.weight", llama::MLP_NORM.hf)),
            &l.mlp_norm,
            vec![h],
        ));
        for (name, _, lin) in l.linears() {
            linear_views(&p(name), lin, packed, &mut views, meta);
        }
        for (name, e) in l.emulated.named() {
            let p = |s: String| p(&format!("{EMULATED}.{name}.{s}"));
            for (k, m) in e.maps.iter().enumerate() {
                views.push(dense_view(&p(format!("{k}.weight")), m));
            }
            views.push(view(&p("bias".into()), &e.bias, vec![h]));
        }
    }
    views
}

fn view<'a>(name: &str, data: &'a [f32], shape: Vec<usize>) -> (String, OutView<'a>) {
    (name.to_string(), OutView::F32(Cow::Borrowed(data), shape))
}

fn dense_view<'a>(name: &str, l: &'a Linear) -> (String, OutView<'a>) {
    let shape = vec![l.out_features, l.in_features];
    (name.to_string(), OutView::F32(l.dense_weight(), shape))
}

/// The tensors of one linear at `prefix` (e.g. `model.layers.0.self_attn.q_proj`), in the
/// layout described at the top of this module.
fn linear_views<'a>(
    prefix: &str,
    l: &'a Linear,
    packed: bool,
    views: &mut Vec<(String, OutView<'a>)>,
    meta: &mut HashMap<String, String>,
) {
    let out = l.out_features;
    match l.packed_weight().filter(|_| packed) {
        Some(p) => {
            let groups = p.scales.len() / out;
            let (bits, group) = (p.bits, p.group);
            let (data, scales, mins) = match p {
                Cow::Borrowed(p) => (
                    Cow::Borrowed(&p.data[..]),
                    Cow::Borrowed(&p.scales[..]),
                    Cow::Borrowed(&p.mins[..]),
                ),
                Cow::Owned(p) => (Cow::Owned(p.data), Cow::Owned(p.scales), Cow::Owned(p.mins)),
            };
            let row_bytes = data.len() / out;
            views.push((
                format!("{prefix}.qweight"),
                OutView::U8(data, vec![out, row_bytes]),
            ));
            views.push((
                format!("{prefix}.scales"),
                OutView::F32(scales, vec![out, groups]),
            ));
            views.push((
                format!("{prefix}.mins"),
                OutView::F32(mins, vec![out, groups]),
            ));
            meta.insert(
                format!("{prefix}.qweight"),
                format!("{{\"bits\":{bits},\"group_size\":{group}}}"),
            );
        }
        None => views.push(dense_view(&format!("{prefix}.weight"), l)),
    }
    if let Some(a) = &l.adapter {
        let (r, inp) = (a.rank, l.in_features);
        views.push(view(&format!("{prefix}.adapter_A"), &a.a, vec![r, inp]));
        views.push(view(&format!("{prefix}.adapter_B"), &a.b, vec![out, r]));
    }
}
