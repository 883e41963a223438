//! GGUF loading: metadata → [`ModelConfig`], tensors dequantized to f32 (candle's reader does the
//! block formats), tokenizer and chat template from `tokenizer.ggml.*`. Per-layer widths are read
//! off tensor shapes, not metadata, so pruned models load like dense ones.

use super::tokenizer::TokenizerSpec;
use crate::model::{Arch, Attention, AttnShape, Layer, Linear, Mlp, Model, ModelConfig};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An opened GGUF file: parsed header, tensors still on disk.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
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
        let arch = Arch::parse(&arch_name)?;
        let a = |k: &str| format!("{arch_name}.{k}");
        let vocab_size = match self.uint(&a("vocab_size"))? {
            Some(v) => v,
            None => self
                .shape("token_embd.weight")
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
            tie_embeddings: !self.has_tensor("output.weight"),
            bos_token_id: self.uint("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_id: self.uint("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
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
        let arch = config.arch.name();
        let n_layers = self.req_uint(&format!("{arch}.block_count"))?;
        let n_heads = self.req_uint(&format!("{arch}.attention.head_count"))?;
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
        let (embed, es) = self.tensor_f32("token_embd.weight")?;
        self.expect("token_embd.weight", &es, &[config.vocab_size, h])?;
        let (final_norm, ns) = self.tensor_f32("output_norm.weight")?;
        self.expect("output_norm.weight", &ns, &[h])?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(self.linear("output.weight", config.vocab_size, h)?)
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let attn = if self.has_tensor(&p("attn_q")) {
                let rows = |n: &str| self.shape(n).map_or(0, |s| s[0]);
                let shape = AttnShape {
                    n_heads: rows(&p("attn_q")) / head_dim,
                    n_kv_heads: rows(&p("attn_k")) / head_dim,
                    head_dim,
                };
                let mut q = self.linear(&p("attn_q"), shape.q_dim(), h)?;
                let mut k = self.linear(&p("attn_k"), shape.kv_dim(), h)?;
                unpermute_rows(&mut q, shape.n_heads, head_dim);
                unpermute_rows(&mut k, shape.n_kv_heads, head_dim);
                Some(Attention {
                    shape,
                    q,
                    k,
                    v: self.linear(&p("attn_v"), shape.kv_dim(), h)?,
                    o: self.linear(&p("attn_output"), h, shape.q_dim())?,
                })
            } else {
                None
            };
            let mlp = if self.has_tensor(&p("ffn_gate")) {
                let w = self.shape(&p("ffn_gate")).map_or(0, |s| s[0]);
                Some(Mlp {
                    gate: self.linear(&p("ffn_gate"), w, h)?,
                    up: self.linear(&p("ffn_up"), w, h)?,
                    down: self.linear(&p("ffn_down"), h, w)?,
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
                attn_norm: norm(self, &p("attn_norm"))?,
                attn,
                mlp_norm: norm(self, &p("ffn_norm"))?,
                mlp,
            });
        }
        Model::new(config, embed, layers, final_norm, lm_head)
            .map_err(|e| Error::format(&self.path, e))
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

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        if !self.has_tensor(name) {
            return Err(self.err(format!("tensor '{name}' missing")));
        }
        let (w, shape) = self.tensor_f32(name)?;
        self.expect(name, &shape, &[out, inp])?;
        Linear::dense(name, w, out, inp)
    }
}

/// GGUF (llama.cpp's converter) stores Q/K rows of each head interleaved for the "NORM" RoPE:
/// row `2i + j` of a head holds what HF stores at row `j·d/2 + i`. Undo it so that the forward
/// pass uses half-split RoPE for every file format.
fn unpermute_rows(lin: &mut Linear, n_heads: usize, head_dim: usize) {
    let inp = lin.in_features;
    let crate::model::Weight::Dense(w) = &mut lin.weight;
    let src = w.clone();
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * head_dim + 2 * i + j;
                let to = h * head_dim + j * half + i;
                w[to * inp..(to + 1) * inp].copy_from_slice(&src[from * inp..(from + 1) * inp]);
            }
        }
    }
}

/// Loads a model and its tokenizer description from a GGUF file.
pub fn load(path: &Path) -> Result<(Model, GgufFile)> {
    let mut f = GgufFile::open(path)?;
    let model = f.load_model()?;
    Ok((model, f))
}
