//! GGUF loading: metadata → [`ModelConfig`], tensors dequantized to f32 (candle's reader does the
//! block formats), tokenizer and chat template from `tokenizer.ggml.*`. Per-layer widths are read
//! off tensor shapes, not metadata, so pruned models load like dense ones.

use super::tokenizer::TokenizerSpec;
use crate::model::names::{llama, TensorName};
use crate::model::{
    Arch, Attention, AttnShape, KvSource, Layer, LayerShape, Linear, Mlp, Model, ModelConfig,
    Packed, Weight,
};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// llama.cpp's name for Llama models whose layers differ (NVIDIA's NAS-pruned Nemotron-51B,
/// DeciLM): head and FFN counts per layer, zero for a missing sublayer. whittle writes pruned
/// models with per-layer widths or missing sublayers under it and reads it back as Llama.
const DECI: &str = "deci";

/// An opened GGUF file: parsed header, tensors still on disk.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        super::gguf_check::check(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| Error::format(path, format!("not a valid GGUF file: {e}")))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Names, ggml types and shapes (`[out, in]`) of all tensors, sorted by name.
    pub fn tensor_infos(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    format!("{:?}", t.ggml_dtype),
                    t.shape.dims().to_vec(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.path, msg)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.err(format!("metadata '{key}' is not a string"))),
            None => Err(self.err(format!("metadata '{key}' missing"))),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .map(|x| x as usize)
                    .map_err(|_| self.err(format!("metadata '{key}' is not an integer")))
            })
            .transpose()
    }

    /// An integer, or the largest of a per-layer array of them (`deci` files give head counts
    /// per layer; only the head width is derived from it, and the widths are read off the
    /// tensors).
    fn uint_or_largest(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| {
                    x.to_u32()
                        .map(|x| x as usize)
                        .or_else(|_| x.to_i32().map(|x| x.max(0) as usize))
                })
                .try_fold(0, |m, x| x.map(|x| m.max(x)))
                .map_err(|_| self.err(format!("metadata '{key}' is not an integer array"))),
            _ => self.req_uint(key),
        }
    }

    fn req_uint(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .ok_or_else(|| self.err(format!("metadata '{key}' missing")))
    }

    fn float(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| {
                v.to_f32()
                    .or_else(|_| v.to_f64().map(|x| x as f32))
                    .map_err(|_| self.err(format!("metadata '{key}' is not a number")))
            })
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .get(key)
            .ok_or_else(|| self.err(format!("metadata '{key}' missing")))?
            .to_vec()
            .map_err(|_| self.err(format!("metadata '{key}' is not an array")))?;
        arr.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.err(format!("metadata '{key}' holds a non-string")))
            })
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape `[out, in]` (or `[n]`) of a tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// Reads and dequantizes one tensor to f32.
    pub fn tensor_f32(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::format(&self.path, format!("tensor '{name}': {e}")))?;
        let shape = q.shape().dims().to_vec();
        let data = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::format(&self.path, format!("tensor '{name}': {e}")))?;
        Ok((data, shape))
    }

    /// Model configuration from `general.architecture` and `<arch>.*` keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self.string("general.architecture")?;
        let arch = if arch_name == DECI {
            Arch::Llama
        } else {
            Arch::parse(&arch_name)?
        };
        let a = |k: &str| format!("{arch_name}.{k}");
        let vocab_size = match self.uint(&a("vocab_size"))? {
            Some(v) => v,
            None => self
                .shape(&format!("{}.weight", llama::EMBED.gguf))
                .map(|s| s[0])
                .ok_or_else(|| self.err("tensor 'token_embd.weight' missing"))?,
        };
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden: self.req_uint(&a("embedding_length"))?,
            rope_theta: self.float(&a("rope.freq_base"))?.unwrap_or(10000.0),
            rms_eps: self
                .float(&a("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            context_length: self.req_uint(&a("context_length"))?,
            tie_embeddings: !self.has_tensor(&format!("{}.weight", llama::LM_HEAD.gguf)),
            bos_token_id: self.uint("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_id: self.uint("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
            memory_tokens: 0,
            window_rule: Default::default(),
            kv_cache: Default::default(),
        })
    }

    /// Tokenizer description from `tokenizer.ggml.*` (byte-level BPE only).
    pub fn tokenizer_spec(&self) -> Result<TokenizerSpec> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')",
                self.path.display()
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match self.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| self.err("'tokenizer.ggml.token_type' is not an array"))?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        // ggml token type 3 = control (special) token.
        let special = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3)
            .map(|(i, _)| i as u32)
            .collect();
        let pre = self
            .string("tokenizer.ggml.pre")
            .unwrap_or_else(|_| "default".into());
        Ok(TokenizerSpec {
            tokens,
            merges,
            special,
            split_digits: pre == "smollm",
            chat_template: self.string("tokenizer.chat_template").ok(),
            bos: self.uint("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos: self.uint("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
        })
    }

    /// Loads the whole model (all tensors dequantized to f32).
    pub fn load_model(&mut self) -> Result<Model> {
        let config = self.config()?;
        // The file's own name: `deci` files use `deci.*` keys.
        let arch = self.string("general.architecture")?;
        let n_layers = self.req_uint(&format!("{arch}.block_count"))?;
        ModelConfig::check_layer_count(n_layers).map_err(|e| self.err(e))?;
        let n_heads = self.uint_or_largest(&format!("{arch}.attention.head_count"))?;
        let head_dim = match self.uint(&format!("{arch}.attention.key_length"))? {
            Some(d) => d,
            None => self
                .uint(&format!("{arch}.rope.dimension_count"))?
                .unwrap_or(config.hidden / n_heads.max(1)),
        };
        if head_dim == 0 {
            return Err(self.err("head dimension is 0"));
        }
        let h = config.hidden;
        let embed = self.linear(
            &format!("{}.weight", llama::EMBED.gguf),
            config.vocab_size,
            h,
        )?;
        let final_name = format!("{}.weight", llama::FINAL_NORM.gguf);
        let (final_norm, ns) = self.tensor_f32(&final_name)?;
        self.expect(&final_name, &ns, &[h])?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(self.linear(
                &format!("{}.weight", llama::LM_HEAD.gguf),
                config.vocab_size,
                h,
            )?)
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |t: TensorName| format!("blk.{i}.{}.weight", t.gguf);
            let attn = if self.has_tensor(&p(llama::Q)) {
                let rows = |n: &str| self.shape(n).map_or(0, |s| s[0]);
                let shape = AttnShape::new(
                    rows(&p(llama::Q)) / head_dim,
                    rows(&p(llama::K)) / head_dim,
                    head_dim,
                );
                let mut q = self.linear(&p(llama::Q), shape.q_dim(), h)?;
                let mut k = self.linear(&p(llama::K), shape.kv_dim(), h)?;
                unpermute_rows(&mut q, shape.n_heads, head_dim);
                unpermute_rows(&mut k, shape.n_kv_heads, head_dim);
                Some(Attention {
                    shape,
                    q,
                    kv: KvSource::Own {
                        k,
                        v: self.linear(&p(llama::V), shape.kv_dim(), h)?,
                    },
                    o: self.linear(&p(llama::O), h, shape.q_dim())?,
                    window: None,
                })
            } else if self.has_tensor(&p(llama::O)) {
                // Nemotron-51B's `deci` layers with heads but no K/V: one linear map in place of
                // attention, which whittle does not represent.
                return Err(self.err(format!(
                    "layer {i} has an attention output but no query projection (a `deci` \
                     linear-attention layer), which is not supported"
                )));
            } else {
                None
            };
            let mlp = if self.has_tensor(&p(llama::GATE)) {
                let w = self.shape(&p(llama::GATE)).map_or(0, |s| s[0]);
                Some(Mlp {
                    gate: self.linear(&p(llama::GATE), w, h)?,
                    up: self.linear(&p(llama::UP), w, h)?,
                    down: self.linear(&p(llama::DOWN), h, w)?,
                })
            } else {
                None
            };
            let norm = |s: &mut Self, name: &str| -> Result<Vec<f32>> {
                if !s.has_tensor(name) {
                    return Ok(vec![1.0; h]);
                }
                let (v, sh) = s.tensor_f32(name)?;
                s.expect(name, &sh, &[h])?;
                Ok(v)
            };
            layers.push(Layer {
                attn_norm: norm(self, &p(llama::ATTN_NORM))?,
                attn,
                ssm: None,
                fusion: None,
                mlp_norm: norm(self, &p(llama::MLP_NORM))?,
                mlp,
                emulated: Default::default(),
            });
        }
        let mut model = Model::new(config, embed, layers, final_norm, lm_head)
            .map_err(|e| Error::format(&self.path, e))?;
        model.provenance = super::gguf_provenance::read(self.metadata());
        Ok(model)
    }

    fn expect(&self, name: &str, found: &[usize], want: &[usize]) -> Result<()> {
        if found != want {
            return Err(Error::format(
                &self.path,
                Error::Shape {
                    name: name.into(),
                    expected: want.to_vec(),
                    found: found.to_vec(),
                },
            ));
        }
        Ok(())
    }

    /// A linear layer; Q4_0, Q4_1 and Q8_0 tensors stay in their blocks (bit-exact, see
    /// [`Packed`]), every other type is dequantized to f32.
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(self.err(format!("tensor '{name}' missing")));
        };
        let dtype = info.ggml_dtype;
        self.expect(name, info.shape.dims(), &[out, inp])?;
        let kept = matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0);
        if !kept || !inp.is_multiple_of(32) {
            let (w, _) = self.tensor_f32(name)?;
            return Linear::dense(name, w, out, inp);
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .and_then(|q| q.data().map(|d| d.into_owned()))
            .map_err(|e| Error::format(&self.path, format!("tensor '{name}': {e}")))?;
        let packed =
            unpack_blocks(name, dtype, &q, out, inp).map_err(|e| Error::format(&self.path, e))?;
        Ok(Linear::new(Weight::Packed(packed), out, inp))
    }
}

/// Converts GGML blocks of 32 to [`Packed`]: Q4_1 `w = d·q + m`; Q4_0 `w = d·(q − 8)`, stored as
/// min `−8d`; Q8_0 `w = d·q` with signed `q`, stored as `q + 128` and min `−128d`. Every product
/// and shift here is exact in f32, so `fma(scale, q, min)` equals GGML's dequantization.
fn unpack_blocks(
    name: &str,
    dtype: GgmlDType,
    raw: &[u8],
    out: usize,
    inp: usize,
) -> Result<Packed> {
    let (block, bits, head) = match dtype {
        GgmlDType::Q4_1 => (20, 4u8, 4),
        GgmlDType::Q4_0 => (18, 4, 2),
        _ => (34, 8, 2),
    };
    let blocks = out * inp / 32;
    if raw.len() != blocks * block {
        return Err(Error::Invalid(format!(
            "tensor '{name}': {} bytes for {blocks} {dtype:?} blocks",
            raw.len()
        )));
    }
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut data = Vec::with_capacity(blocks * 32 * bits as usize / 8);
    let (mut scales, mut mins) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    for b in raw.chunks_exact(block) {
        let d = f16(&b[0..2]);
        scales.push(d);
        match dtype {
            GgmlDType::Q4_1 => mins.push(f16(&b[2..4])),
            GgmlDType::Q4_0 => mins.push(-8.0 * d),
            _ => mins.push(-128.0 * d),
        }
        if bits == 8 {
            data.extend(b[head..].iter().map(|q| q ^ 0x80));
        } else {
            data.extend_from_slice(&b[head..]);
        }
    }
    Packed::new(name, (out, inp), bits, 32, data, scales, mins)
}

/// GGUF (llama.cpp's converter) stores Q/K rows of each head interleaved for the "NORM" RoPE:
/// row `2i + j` of a head holds what HF stores at row `j·d/2 + i`. Loading undoes it so that
/// the forward pass uses half-split RoPE for every file format; saving redoes it.
/// Works on any row-major array whose rows are `inp` elements long.
fn permuted_rows<T: Copy>(
    w: &[T],
    inp: usize,
    n_heads: usize,
    head_dim: usize,
    to_gguf: bool,
) -> Vec<T> {
    let mut out = w.to_vec();
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * head_dim + 2 * i + j;
                let hf_row = h * head_dim + j * half + i;
                let (from, to) = if to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[to * inp..(to + 1) * inp].copy_from_slice(&w[from * inp..(from + 1) * inp]);
            }
        }
    }
    out
}

fn unpermute_rows(lin: &mut Linear, n_heads: usize, head_dim: usize) {
    let (out, inp) = (lin.out_features, lin.in_features);
    let un = |v: &[_], row| permuted_rows(v, row, n_heads, head_dim, false);
    match lin.weight_mut() {
        Weight::Dense(w) => *w = un(w, inp),
        Weight::Packed(p) => {
            let row_bytes = inp * p.bits as usize / 8;
            let groups = inp.div_ceil(p.group);
            *p = Packed::new(
                "q/k",
                (out, inp),
                p.bits,
                p.group,
                permuted_rows(&p.data, row_bytes, n_heads, head_dim, false),
                un(&p.scales, groups),
                un(&p.mins, groups),
            )
            .expect("a row permutation keeps the packed shape valid");
        }
        Weight::Sparse24(s) => {
            match &mut s.values {
                crate::model::sparse::KeptValues::F32(v) => *v = un(v, inp / 2),
                crate::model::sparse::KeptValues::Bf16(v) => {
                    *v = permuted_rows(v, inp / 2, n_heads, head_dim, false)
                }
            }
            s.index = permuted_rows(&s.index, inp.div_ceil(8), n_heads, head_dim, false);
        }
        Weight::Sparse24Int(s) => {
            let steps = inp / crate::kernels::sparse24_int::STEP;
            let row_bytes = steps * crate::kernels::sparse24_int::step_bytes(s.bits);
            s.codes = permuted_rows(&s.codes, row_bytes, n_heads, head_dim, false);
            s.index = permuted_rows(&s.index, steps, n_heads, head_dim, false);
            s.scales = un(&s.scales, inp.div_ceil(s.group));
        }
    }
}

/// Storage type of the matrices in an exported GGUF file (norms are always F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    /// bf16 matrices: the native dtype of most HF checkpoints; the tile path multiplies them
    /// with half the piece products of f32 weights (see `kernels::amx`).
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::BF16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
        }
    }
}

/// Writes `model` as a GGUF file that llama.cpp and whittle load, atomically (temporary file +
/// rename), matrices stored as `dtype` (F32 where a row is not a multiple of its block, 32 wide
/// for the Q types).
/// The tokenizer metadata is included when `tokenizer` is given.
pub fn save(
    model: &Model,
    tokenizer: Option<&TokenizerSpec>,
    dtype: GgufType,
    path: &Path,
) -> Result<()> {
    super::atomic::write_file(path, |tmp| write_gguf(model, tokenizer, dtype, tmp))
}

fn write_gguf(
    model: &Model,
    tokenizer: Option<&TokenizerSpec>,
    dtype: GgufType,
    path: &Path,
) -> Result<()> {
    use candle_core::quantized::QTensor;
    let c = &model.config;
    if c.arch != Arch::Llama {
        return Err(Error::Invalid(format!(
            "GGUF export writes Llama models; this one is {}",
            c.arch.name()
        )));
    }
    if let Some(i) = model.layers.iter().position(|l| !l.emulated.is_empty()) {
        return Err(Error::Invalid(format!(
            "GGUF export writes plain or per-layer-width Llama models and this one is not: \
             layer {i} has an emulated update (a stand-in map llama.cpp has no tensor for). \
             Keep it as a whittle HF folder instead"
        )));
    }
    let shapes: Vec<_> = model.layers.iter().map(|l| l.shape()).collect();
    if let Some(i) = shapes
        .iter()
        .position(|s| s.attn.is_some() && s.mlp.is_none())
    {
        // llama.cpp's `deci` graph skips the rest of a layer without FFN before adding its
        // attention to the residual stream, so such a file would load and compute wrongly.
        return Err(Error::Invalid(format!(
            "layer {i} has attention but no MLP, which llama.cpp's per-layer (`deci`) graph \
             drops the attention of; keep the model as a whittle HF folder, or prune \
             attention sublayers instead (--drop-attn)"
        )));
    }
    let per_layer = model.irregularity().is_some();
    let arch = if per_layer { DECI } else { c.arch.name() };
    let first_attn = shapes.iter().find_map(|s| s.attn);
    let first_mlp = shapes.iter().find_map(|s| s.mlp).unwrap_or(0);
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta = super::gguf_provenance::write(model, dtype);
    if per_layer {
        for (key, v) in &mut meta {
            if key == "general.architecture" {
                *v = Value::String(DECI.into());
            }
        }
    }
    // One count, or one per layer for `deci`.
    let count = |f: &dyn Fn(&LayerShape) -> usize, first: usize| {
        if per_layer {
            Value::Array(shapes.iter().map(|s| Value::U32(f(s) as u32)).collect())
        } else {
            Value::U32(first as u32)
        }
    };
    meta.extend([
        (k("block_count"), Value::U32(model.layers.len() as u32)),
        (k("context_length"), Value::U32(c.context_length as u32)),
        (k("embedding_length"), Value::U32(c.hidden as u32)),
        (
            k("feed_forward_length"),
            count(&|s| s.mlp.unwrap_or(0), first_mlp),
        ),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_eps)),
    ]);
    if let Some(a) = first_attn {
        meta.extend([
            (
                k("attention.head_count"),
                count(&|s| s.attn.map_or(0, |a| a.n_heads), a.n_heads),
            ),
            (
                k("attention.head_count_kv"),
                count(&|s| s.attn.map_or(0, |a| a.n_kv_heads), a.n_kv_heads),
            ),
            (k("attention.key_length"), Value::U32(a.head_dim as u32)),
            (k("rope.dimension_count"), Value::U32(a.head_dim as u32)),
        ]);
    }
    if let Some(t) = tokenizer {
        meta.extend(t.gguf_metadata());
    }
    let tensor = |name: &str, data: &[f32], shape: &[usize]| -> Result<(String, QTensor)> {
        let ty = dtype.ggml();
        let matrix = shape.len() == 2 && shape[1].is_multiple_of(ty.block_size());
        let ty = if matrix { ty } else { GgmlDType::F32 };
        let t = candle_core::Tensor::from_slice(data, shape, &Device::Cpu)
            .and_then(|t| QTensor::quantize(&t, ty))
            .map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))?;
        Ok((name.to_string(), t))
    };
    let h = c.hidden;
    let mut tensors = vec![
        tensor(
            &format!("{}.weight", llama::EMBED.gguf),
            &model.embed.dense_weight(),
            &[c.vocab_size, h],
        )?,
        tensor(
            &format!("{}.weight", llama::FINAL_NORM.gguf),
            &model.final_norm,
            &[h],
        )?,
    ];
    if let Some(head) = &model.lm_head {
        tensors.push(tensor(
            &format!("{}.weight", llama::LM_HEAD.gguf),
            &head.dense_weight(),
            &[c.vocab_size, h],
        )?);
    }
    for (i, l) in model.layers.iter().enumerate() {
        let p = |t: TensorName| format!("blk.{i}.{}.weight", t.gguf);
        // A missing sublayer's norm is not written: llama.cpp refuses a file with tensors it
        // does not create.
        if l.attn.is_some() {
            tensors.push(tensor(&p(llama::ATTN_NORM), &l.attn_norm, &[h])?);
        }
        if l.mlp.is_some() {
            tensors.push(tensor(&p(llama::MLP_NORM), &l.mlp_norm, &[h])?);
        }
        let lin = |name: TensorName, x: &Linear, rows: Option<Vec<f32>>| {
            let dense = x.dense_weight();
            let w = rows.as_deref().unwrap_or(&dense);
            tensor(&p(name), w, &[x.out_features, x.in_features])
        };
        if let Some(
            a @ Attention {
                kv: KvSource::Own { k, v },
                ..
            },
        ) = &l.attn
        {
            let s = a.shape;
            let q = permuted_rows(&a.q.dense_weight(), h, s.n_heads, s.head_dim, true);
            let kk = permuted_rows(&k.dense_weight(), h, s.n_kv_heads, s.head_dim, true);
            tensors.push(lin(llama::Q, &a.q, Some(q))?);
            tensors.push(lin(llama::K, k, Some(kk))?);
            tensors.push(lin(llama::V, v, None)?);
            tensors.push(lin(llama::O, &a.o, None)?);
        }
        if let Some(m) = &l.mlp {
            tensors.push(lin(llama::GATE, &m.gate, None)?);
            tensors.push(lin(llama::UP, &m.up, None)?);
            tensors.push(lin(llama::DOWN, &m.down, None)?);
        }
    }
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs)
        .map_err(|e| Error::format(path, e))?;
    use std::io::Write;
    w.flush().map_err(|e| Error::io(path, e))
}

/// Loads a model and its tokenizer description from a GGUF file.
pub fn load(path: &Path) -> Result<(Model, GgufFile)> {
    let mut f = GgufFile::open(path)?;
    let model = f.load_model()?;
    Ok((model, f))
}
