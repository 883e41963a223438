//! Where a model came from and what whittle did to it. People publish what whittle makes, so an
//! exported model must still say what it is: the source's `general.*` metadata (name, licence,
//! organisation, languages, …) travels from load to export untouched, and whittle adds the model
//! the chain started from, the recipe of every run that changed the weights, and the figures
//! measured on the result. `io::gguf` writes it as GGUF keys, `io::safetensors` as a model card
//! plus `whittle.json`; both read it back, and `whittle inspect` prints it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One metadata value with its GGUF type kept, so a key read as `u32` is written as `u32`
/// (llama.cpp rejects a key of the wrong type). Strings, flags and lists are written plainly in
/// JSON; numbers carry their type: `{"u32": 3}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetaValue {
    Text(String),
    Flag(bool),
    List(Vec<MetaValue>),
    Number(Number),
}

/// A GGUF number with its storage type.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Number {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl MetaValue {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            MetaValue::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The strings of a list of strings (e.g. `general.languages`).
    pub fn texts(&self) -> Vec<String> {
        match self {
            MetaValue::List(v) => v
                .iter()
                .filter_map(|x| x.as_text())
                .map(String::from)
                .collect(),
            MetaValue::Text(s) => vec![s.clone()],
            _ => Vec::new(),
        }
    }
}

impl std::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaValue::Text(s) => write!(f, "{s}"),
            MetaValue::Flag(b) => write!(f, "{b}"),
            MetaValue::List(v) => {
                let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", items.join(", "))
            }
            MetaValue::Number(n) => match *n {
                Number::U8(x) => write!(f, "{x}"),
                Number::I8(x) => write!(f, "{x}"),
                Number::U16(x) => write!(f, "{x}"),
                Number::I16(x) => write!(f, "{x}"),
                Number::U32(x) => write!(f, "{x}"),
                Number::I32(x) => write!(f, "{x}"),
                Number::U64(x) => write!(f, "{x}"),
                Number::I64(x) => write!(f, "{x}"),
                Number::F32(x) => write!(f, "{x}"),
                Number::F64(x) => write!(f, "{x}"),
            },
        }
    }
}

/// One evaluation figure measured on the model as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// What was evaluated: a task name (`hellaswag`) or a text file's name for perplexity.
    pub task: String,
    /// `ppl`, `acc`, `acc_norm`, …
    pub metric: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<f64>,
    /// How it was measured, in words (`2048-token windows, 4 windows`, `5-shot, full split`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub setting: String,
}

/// The provenance carried by every [`crate::Model`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The source's `general.*` keys, verbatim (from GGUF metadata, or an HF model card and
    /// config). Export rewrites only the keys that describe the new file itself.
    #[serde(default)]
    pub general: BTreeMap<String, MetaValue>,
    /// The model the chain of whittle runs started from: a hub id where one is known
    /// (`HuggingFaceTB/SmolLM2-135M-Instruct`), else the source file's name. Kept through later
    /// runs, so a model quantized after pruning still names the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The recipe (TOML) of each whittle run that changed the weights, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipes: Vec<String>,
    /// Figures measured on this model by the run that wrote it (figures of earlier runs
    /// described other weights and are dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<Figure>,
    /// Files of an HF source kept verbatim on HF export (`generation_config.json`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hf_files: BTreeMap<String, String>,
}

impl Provenance {
    /// A `general.*` string value.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.general.get(key).and_then(MetaValue::as_text)
    }

    /// Names the source the chain starts from unless an earlier run already did.
    pub fn set_source(&mut self, identity: impl Into<String>) {
        if self.base_model.is_none() {
            self.base_model = Some(identity.into());
        }
    }

    /// Records a whittle run: its recipe is appended, its figures replace the old ones.
    pub fn record_run(&mut self, recipe_toml: String, figures: Vec<Figure>) {
        self.recipes.push(recipe_toml);
        self.figures = figures;
    }

    /// The model's display name: `general.name`, else the base model.
    pub fn name(&self) -> Option<&str> {
        self.text("general.name").or(self.base_model.as_deref())
    }

    /// The licence identifier (`apache-2.0`), when the source declared one.
    pub fn license(&self) -> Option<&str> {
        self.text("general.license")
    }

    /// Languages the source declared (`general.languages`).
    pub fn languages(&self) -> Vec<String> {
        self.general
            .get("general.languages")
            .map(MetaValue::texts)
            .unwrap_or_default()
    }
}

/// llama.cpp's size label (`135M`, `1.7B`): the parameter count scaled to K/M/B/T with at least
/// two significant digits, as `gguf-py`'s `model_weight_count_rounded_notation` writes it.
pub fn size_label(params: usize) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round() as u64)
        .trim_start_matches('0')
        .len();
    let decimals = 2usize.saturating_sub(digits);
    format!("{scaled:.decimals$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels_match_gguf_py() {
        // Values computed with gguf-py's model_weight_count_rounded_notation.
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_711_376_384), "1.7B");
        assert_eq!(size_label(90_200_000), "90M");
        assert_eq!(size_label(7_241_732_096), "7.2B");
        assert_eq!(size_label(500_000), "500K");
        assert_eq!(size_label(4_500_000), "4.5M");
    }

    #[test]
    fn typed_values_survive_json() {
        let mut p = Provenance::default();
        p.general.insert(
            "general.file_type".into(),
            MetaValue::Number(Number::U32(3)),
        );
        p.general.insert(
            "general.languages".into(),
            MetaValue::List(vec![MetaValue::Text("en".into())]),
        );
        p.general
            .insert("general.name".into(), MetaValue::Text("x".into()));
        p.record_run("[[stage]]\n".into(), vec![]);
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains("{\"u32\":3}"), "{text}");
        let back: Provenance = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.languages(), vec!["en".to_string()]);
    }

    #[test]
    fn base_model_is_the_first_source() {
        let mut p = Provenance::default();
        p.set_source("org/original");
        p.set_source("pruned.gguf");
        assert_eq!(p.base_model.as_deref(), Some("org/original"));
    }
}
