//! [`Provenance`] as GGUF metadata. The source's `general.*` keys are read and written verbatim,
//! with their GGUF types; on export the keys that describe the file itself are set the way
//! llama.cpp's own converter sets them (`general.file_type`, `general.quantization_version`,
//! `general.size_label`), and whittle's additions live under `whittle.*`:
//!
//! | key | value |
//! |---|---|
//! | `whittle.version` | the whittle version that wrote the file |
//! | `whittle.base_model` | the model the chain started from |
//! | `whittle.recipe` | array of TOML recipes, one per run, oldest first |
//! | `whittle.eval.<task>.<metric>` | f64 figure; `….stderr` (f64) and `….setting` (string) beside it |
//! | `whittle.eval.order` | the figures' `<task>.<metric>` names in the order they were measured |

use super::gguf::GgufType;
use crate::model::provenance::{Figure, MetaValue, Number, Provenance};
use crate::Model;
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;

const EVAL: &str = "whittle.eval.";
/// The figures' `<task>.<metric>` names in their order.
const ORDER: &str = "whittle.eval.order";

/// llama.cpp's `llama_ftype` of a file whose matrices are stored as `dtype` (gguf-py's
/// `LlamaFileType`: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q4_1 3, MOSTLY_Q8_0 7,
/// MOSTLY_BF16 32).
pub fn file_type(dtype: GgufType) -> u32 {
    match dtype {
        GgufType::F32 => 0,
        GgufType::F16 => 1,
        GgufType::Q4_0 => 2,
        GgufType::Q4_1 => 3,
        GgufType::Q8_0 => 7,
        GgufType::BF16 => 32,
    }
}

/// ggml's `GGML_QNT_VERSION`, which llama.cpp's converter writes into every file.
const QUANTIZATION_VERSION: u32 = 2;

fn to_meta(v: &Value) -> MetaValue {
    let n = MetaValue::Number;
    match v {
        Value::U8(x) => n(Number::U8(*x)),
        Value::I8(x) => n(Number::I8(*x)),
        Value::U16(x) => n(Number::U16(*x)),
        Value::I16(x) => n(Number::I16(*x)),
        Value::U32(x) => n(Number::U32(*x)),
        Value::I32(x) => n(Number::I32(*x)),
        Value::U64(x) => n(Number::U64(*x)),
        Value::I64(x) => n(Number::I64(*x)),
        Value::F32(x) => n(Number::F32(*x)),
        Value::F64(x) => n(Number::F64(*x)),
        Value::Bool(b) => MetaValue::Flag(*b),
        Value::String(s) => MetaValue::Text(s.clone()),
        Value::Array(a) => MetaValue::List(a.iter().map(to_meta).collect()),
    }
}

fn to_value(v: &MetaValue) -> Value {
    match v {
        MetaValue::Text(s) => Value::String(s.clone()),
        MetaValue::Flag(b) => Value::Bool(*b),
        MetaValue::List(a) => Value::Array(a.iter().map(to_value).collect()),
        MetaValue::Number(n) => match *n {
            Number::U8(x) => Value::U8(x),
            Number::I8(x) => Value::I8(x),
            Number::U16(x) => Value::U16(x),
            Number::I16(x) => Value::I16(x),
            Number::U32(x) => Value::U32(x),
            Number::I32(x) => Value::I32(x),
            Number::U64(x) => Value::U64(x),
            Number::I64(x) => Value::I64(x),
            Number::F32(x) => Value::F32(x),
            Number::F64(x) => Value::F64(x),
        },
    }
}

fn number(v: &Value) -> Option<f64> {
    v.to_f64().ok().or_else(|| v.to_f32().ok().map(f64::from))
}

/// The provenance recorded in a GGUF file's metadata. Values of the wrong type in `whittle.*`
/// are ignored rather than fatal: provenance never stops a model from loading.
pub fn read(meta: &HashMap<String, Value>) -> Provenance {
    let mut p = Provenance::default();
    for (k, v) in meta {
        if k.starts_with("general.") {
            p.general.insert(k.clone(), to_meta(v));
        }
    }
    p.base_model = meta
        .get("whittle.base_model")
        .and_then(|v| v.to_string().ok().cloned());
    p.recipes = match meta.get("whittle.recipe") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.to_string().ok().cloned())
            .collect(),
        _ => Vec::new(),
    };
    // In the order they were written (`whittle.eval.order`), else by name.
    let mut keys: Vec<String> = match meta.get(ORDER) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.to_string().ok().map(|s| format!("{EVAL}{s}")))
            .collect(),
        _ => {
            let mut k: Vec<String> = meta
                .keys()
                .filter(|k| k.starts_with(EVAL))
                .cloned()
                .collect();
            k.sort();
            k
        }
    };
    keys.dedup();
    for k in &keys {
        if !meta.contains_key(k) || k == ORDER {
            continue;
        }
        let name = &k[EVAL.len()..];
        if name.ends_with(".stderr") || name.ends_with(".setting") {
            continue;
        }
        let (Some((task, metric)), Some(value)) =
            (name.rsplit_once('.'), number(&meta[k.as_str()]))
        else {
            continue;
        };
        p.figures.push(Figure {
            task: task.to_string(),
            metric: metric.to_string(),
            value,
            stderr: meta.get(&format!("{k}.stderr")).and_then(number),
            setting: meta
                .get(&format!("{k}.setting"))
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_default(),
        });
    }
    p
}

/// The `general.*` and `whittle.*` keys to write for `model` stored as `dtype`: the source's
/// `general.*` keys, then those that describe this file, then whittle's own.
pub fn write(model: &Model, dtype: GgufType) -> Vec<(String, Value)> {
    let p = &model.provenance;
    let mut general = p.general.clone();
    let set = |g: &mut std::collections::BTreeMap<String, MetaValue>, k: &str, v: MetaValue| {
        g.insert(k.to_string(), v);
    };
    set(
        &mut general,
        "general.architecture",
        MetaValue::Text(model.config.arch.name().into()),
    );
    if !general.contains_key("general.name") {
        let name = p
            .base_model
            .clone()
            .unwrap_or_else(|| "whittle export".into());
        set(&mut general, "general.name", MetaValue::Text(name));
    }
    set(
        &mut general,
        "general.file_type",
        MetaValue::Number(Number::U32(file_type(dtype))),
    );
    set(
        &mut general,
        "general.quantization_version",
        MetaValue::Number(Number::U32(QUANTIZATION_VERSION)),
    );
    set(
        &mut general,
        "general.size_label",
        MetaValue::Text(crate::model::provenance::size_label(model.n_params())),
    );
    let mut out: Vec<(String, Value)> = general
        .iter()
        .map(|(k, v)| (k.clone(), to_value(v)))
        .collect();
    out.push((
        "whittle.version".into(),
        Value::String(env!("CARGO_PKG_VERSION").into()),
    ));
    if let Some(b) = &p.base_model {
        out.push(("whittle.base_model".into(), Value::String(b.clone())));
    }
    if !p.recipes.is_empty() {
        let recipes = p.recipes.iter().map(|r| Value::String(r.clone())).collect();
        out.push(("whittle.recipe".into(), Value::Array(recipes)));
    }
    if !p.figures.is_empty() {
        let order = p
            .figures
            .iter()
            .map(|f| Value::String(format!("{}.{}", f.task, f.metric)))
            .collect();
        out.push((ORDER.into(), Value::Array(order)));
    }
    for f in &p.figures {
        let key = format!("{EVAL}{}.{}", f.task, f.metric);
        if let Some(s) = f.stderr {
            out.push((format!("{key}.stderr"), Value::F64(s)));
        }
        if !f.setting.is_empty() {
            out.push((format!("{key}.setting"), Value::String(f.setting.clone())));
        }
        out.push((key, Value::F64(f.value)));
    }
    out
}
