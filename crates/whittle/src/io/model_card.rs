//! [`Provenance`] in an HF folder. Written: `README.md` (a Hugging Face model card: YAML header
//! with `license`, `base_model`, `language`, `library_name`, `tags` and the `model-index`
//! results of the figures measured during the run; then the recipe and a table of figures),
//! `whittle.json` (the full provenance, typed, which whittle reads back), `recipe.toml` (the
//! latest run's recipe) and `generation_config.json` (the source's, verbatim, or one naming the
//! BOS/EOS tokens). Read: `whittle.json` when present, else what an HF source folder says about
//! itself (its model card's header, `config.json`'s `_name_or_path`, `generation_config.json`),
//! mapped to the `general.*` keys llama.cpp's converter would write.

use crate::model::provenance::{MetaValue, Number, Provenance};
use crate::{Error, Model, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const PROVENANCE_FILE: &str = "whittle.json";
const GENERATION_CONFIG: &str = "generation_config.json";

/// The provenance of an HF folder (nothing found is not an error: provenance never stops a model
/// from loading, but a `whittle.json` that does not parse is reported).
pub fn read(dir: &Path) -> Result<Provenance> {
    let own = dir.join(PROVENANCE_FILE);
    if own.is_file() {
        let text = std::fs::read_to_string(&own).map_err(|e| Error::io(&own, e))?;
        return serde_json::from_str(&text).map_err(|e| Error::format(&own, e));
    }
    let mut p = Provenance::default();
    let text = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    if let Some(card) = text("README.md") {
        let header = front_matter(&card)
            .and_then(|h| serde_norway::from_str::<Value>(h).ok())
            .unwrap_or(Value::Null);
        general_from_card(&header, &mut p);
    }
    let name = text("config.json")
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|c| c["_name_or_path"].as_str().map(String::from))
        .filter(|s| !s.is_empty())
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(n) = name {
        p.general
            .entry("general.name".into())
            .or_insert(MetaValue::Text(n));
    }
    if let Some(g) = text(GENERATION_CONFIG) {
        p.hf_files.insert(GENERATION_CONFIG.into(), g);
    }
    Ok(p)
}

/// The YAML between a leading `---` line and the next one.
fn front_matter(card: &str) -> Option<&str> {
    let rest = card.strip_prefix("---")?.trim_start_matches(['\r', '\n']);
    let end = rest.find("\n---")?;
    Some(&rest[..end])
}

/// Card fields → `general.*` as llama.cpp's `gguf-py` metadata reader maps them.
fn general_from_card(card: &Value, p: &mut Provenance) {
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    let list = |v: Vec<String>| MetaValue::List(v.into_iter().map(MetaValue::Text).collect());
    let g = &mut p.general;
    if let Some(l) = card["license"].as_str() {
        g.insert("general.license".into(), MetaValue::Text(l.into()));
    }
    for (field, key) in [("language", "general.languages"), ("tags", "general.tags")] {
        let v = strings(&card[field]);
        if !v.is_empty() {
            g.insert(key.into(), list(v));
        }
    }
    if let Some(n) = card["model_name"].as_str() {
        g.insert("general.name".into(), MetaValue::Text(n.into()));
    }
    let bases = strings(&card["base_model"]);
    if !bases.is_empty() {
        g.insert(
            "general.base_model.count".into(),
            MetaValue::Number(Number::U32(bases.len() as u32)),
        );
    }
    for (i, id) in bases.iter().enumerate() {
        let (org, name) = id.split_once('/').unwrap_or(("", id));
        let k = |s: &str| format!("general.base_model.{i}.{s}");
        g.insert(k("name"), MetaValue::Text(name.into()));
        if !org.is_empty() {
            g.insert(k("organization"), MetaValue::Text(org.into()));
        }
        g.insert(
            k("repo_url"),
            MetaValue::Text(format!("https://huggingface.co/{id}")),
        );
    }
}

/// Writes the provenance files of `model` into the (temporary) export folder `dir`.
pub fn write(model: &Model, packed: bool, dir: &Path) -> Result<()> {
    let p = &model.provenance;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write("README.md", &card(model, packed)?)?;
    let json = serde_json::to_string_pretty(p).map_err(|e| Error::Invalid(e.to_string()))?;
    write(PROVENANCE_FILE, &json)?;
    if let Some(r) = p.recipes.last() {
        write("recipe.toml", r)?;
    }
    let generation = match p.hf_files.get(GENERATION_CONFIG) {
        Some(g) => g.clone(),
        None => {
            let c = &model.config;
            serde_json::to_string_pretty(&json!({
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}))
            .unwrap_or_default()
        }
    };
    write(GENERATION_CONFIG, &generation)
}

/// Tags for the card: whittle, then each run's stage kinds and methods.
fn tags(p: &Provenance) -> Vec<String> {
    let mut tags = vec!["whittle".to_string()];
    for r in &p.recipes {
        let Ok(v) = toml::from_str::<toml::Table>(r) else {
            continue;
        };
        let stages = v.get("stage").and_then(|s| s.as_array());
        for s in stages.into_iter().flatten() {
            for field in ["kind", "method"] {
                if let Some(t) = s.get(field).and_then(|x| x.as_str()) {
                    if !tags.iter().any(|x| x == t) {
                        tags.push(t.to_string());
                    }
                }
            }
        }
    }
    tags
}

/// The model card: YAML header, then a short description, the recipes and the figures.
pub fn card(model: &Model, packed: bool) -> Result<String> {
    let p = &model.provenance;
    let name = p.name().unwrap_or("whittle model").to_string();
    let mut header = serde_json::Map::new();
    if let Some(l) = p.license() {
        header.insert("license".into(), json!(l));
    }
    if let Some(b) = &p.base_model {
        header.insert("base_model".into(), json!(b));
    }
    let languages = p.languages();
    if !languages.is_empty() {
        header.insert("language".into(), json!(languages));
    }
    // A plain f32 folder loads in transformers; packed linears only in whittle.
    let library = if packed { "whittle" } else { "transformers" };
    header.insert("library_name".into(), json!(library));
    header.insert("tags".into(), json!(tags(p)));
    if !p.figures.is_empty() {
        let results: Vec<Value> = p
            .figures
            .iter()
            .map(|f| {
                json!({
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": f.task, "type": f.task},
                    "metrics": [{"type": f.metric, "value": f.value,
                                 "name": format!("{} {}", f.task, f.metric)}],
                })
            })
            .collect();
        header.insert(
            "model-index".into(),
            json!([{"name": name, "results": results}]),
        );
    }
    let yaml = serde_norway::to_string(&Value::Object(header))
        .map_err(|e| Error::Invalid(format!("model card header: {e}")))?;
    let mut body = format!("---\n{yaml}---\n\n# {name}\n\n");
    let params = model.n_params() as f64 / 1e6;
    let version = env!("CARGO_PKG_VERSION");
    body += &match &p.base_model {
        Some(b) => format!("Made with whittle {version} from `{b}`: {params:.1} M parameters.\n"),
        None => format!("Written by whittle {version}: {params:.1} M parameters.\n"),
    };
    for (i, r) in p.recipes.iter().enumerate() {
        body += &format!(
            "\n## Run {} recipe\n\n```toml\n{}\n```\n",
            i + 1,
            r.trim_end()
        );
    }
    if !p.figures.is_empty() {
        body += "\n## Evaluation (measured on this model by the run that wrote it)\n\n";
        body += "| task | metric | value | ± | setting |\n|---|---|---|---|---|\n";
        for f in &p.figures {
            let se = f.stderr.map_or(String::new(), |s| format!("{s:.4}"));
            body += &format!(
                "| {} | {} | {:.4} | {se} | {} |\n",
                f.task, f.metric, f.value, f.setting
            );
        }
    }
    Ok(body)
}
