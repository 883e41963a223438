//! Tokenizer: a HF `tokenizer.json` (loaded by the `tokenizers` crate), or one rebuilt from GGUF
//! metadata as the same JSON — byte-level BPE, with SmolLM2's digit split when the GGUF names its
//! pre-tokenizer `smollm` (llama.cpp does the same; a plain GPT-2 split differs where whitespace
//! precedes a digit). Also renders the chat template with minijinja.

use crate::{Error, Result};
use serde_json::json;
use std::path::Path;

/// What a GGUF file says about its tokenizer.
pub struct TokenizerSpec {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// Ids of control tokens (never split, skipped when decoding).
    pub special: Vec<u32>,
    /// Split every digit off before BPE (SmolLM2's `Digits(individual_digits)`).
    pub split_digits: bool,
    pub chat_template: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl TokenizerSpec {
    /// The equivalent HF `tokenizer.json` document.
    pub fn to_json(&self) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<_> = self
            .special
            .iter()
            .map(|&id| {
                json!({"id": id, "content": self.tokens[id as usize], "single_word": false,
                       "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let pre = if self.split_digits {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]})
        } else {
            byte_level.clone()
        };
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
            "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": self.merges}
        })
    }
}

impl TokenizerSpec {
    /// The `tokenizer.ggml.*` metadata that describes this tokenizer in a GGUF file.
    pub fn gguf_metadata(&self) -> Vec<(String, candle_core::quantized::gguf_file::Value)> {
        use candle_core::quantized::gguf_file::Value;
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let types = (0..self.tokens.len() as u32)
            .map(|i| Value::I32(if self.special.contains(&i) { 3 } else { 1 }))
            .collect();
        let mut m = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String(
                    if self.split_digits {
                        "smollm"
                    } else {
                        "default"
                    }
                    .into(),
                ),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&self.tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(&self.merges)),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ];
        if let Some(b) = self.bos {
            m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(e) = self.eos {
            m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
        if let Some(t) = &self.chat_template {
            m.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        m
    }
}

/// Deepest nesting accepted in `tokenizer.json`.
const MAX_JSON_DEPTH: usize = 32;

/// Nesting depth of a JSON value (a scalar is 0).
fn json_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    chat_template: Option<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl Tokenizer {
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self> {
        let json = spec.to_json().to_string();
        let mut t = Self::from_json(&json, spec.chat_template.clone())?;
        t.bos = spec.bos;
        t.eos = spec.eos;
        Ok(t)
    }

    fn from_json(json: &str, chat_template: Option<String>) -> Result<Self> {
        // Syntax and nesting are checked first: tokenizers 0.23 panics (`expect("Helper")` in
        // its decoder deserializer) on a syntax error inside the "decoder" object, or on one
        // nested deep enough to pass serde_json's limit once but not its own second pass (found
        // by tests/fuzz.rs). Real tokenizer files nest about five levels.
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::Tokenizer(format!("not valid JSON: {e}")))?;
        if json_depth(&v) > MAX_JSON_DEPTH {
            return Err(Error::Tokenizer(format!(
                "JSON nested deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| Error::Tokenizer(format!("cannot build tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            json: json.to_string(),
            chat_template,
            bos: None,
            eos: None,
        })
    }

    /// Loads `tokenizer.json`, with the chat template and BOS/EOS from a `tokenizer_config.json`
    /// next to it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut t = Self::from_json(&json, None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        if let Ok(cfg) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value =
                serde_json::from_str(&cfg).map_err(|e| Error::format(&cfg_path, e))?;
            t.chat_template = cfg["chat_template"].as_str().map(str::to_string);
            let id = |k: &str| cfg[k].as_str().and_then(|s| t.inner.token_to_id(s));
            t.bos = id("bos_token");
            t.eos = id("eos_token");
        }
        Ok(t)
    }

    /// The HF `tokenizer.json` text (for export).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The GGUF description of this tokenizer (byte-level BPE only).
    pub fn spec(&self) -> Result<TokenizerSpec> {
        let bad =
            |m: &str| Error::Tokenizer(format!("cannot describe the tokenizer for GGUF: {m}"));
        let v: serde_json::Value =
            serde_json::from_str(&self.json).map_err(|e| bad(&e.to_string()))?;
        let model = &v["model"];
        if model["type"] != "BPE" {
            return Err(bad("only BPE tokenizers can be written to GGUF"));
        }
        let mut by_id: Vec<(u32, String)> = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("no vocabulary"))?
            .iter()
            .filter_map(|(t, id)| id.as_u64().map(|id| (id as u32, t.clone())))
            .collect();
        let mut special = Vec::new();
        for a in v["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
                continue;
            };
            by_id.push((id as u32, t.to_string()));
            if a["special"].as_bool().unwrap_or(false) {
                special.push(id as u32);
            }
        }
        by_id.sort();
        by_id.dedup_by_key(|(id, _)| *id);
        if by_id.iter().enumerate().any(|(i, (id, _))| i as u32 != *id) {
            return Err(bad("token ids are not contiguous"));
        }
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| bad("no merges"))?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )),
                _ => Err(bad("unreadable merge")),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TokenizerSpec {
            tokens: by_id.into_iter().map(|(_, t)| t).collect(),
            merges,
            special,
            split_digits: v["pre_tokenizer"].to_string().contains("\"Digits\""),
            chat_template: self.chat_template.clone(),
            bos: self.bos,
            eos: self.eos,
        })
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`, without BOS/EOS; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template for one user message, ready for the assistant's reply.
    pub fn render_chat(&self, user: &str) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer("the model has no chat template; run without --chat".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, _> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let tok = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => vec![minijinja::context! { role => "user", content => user }],
                    add_generation_prompt => true,
                    bos_token => tok(self.bos),
                    eos_token => tok(self.eos),
                })
            })
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
