//! `hf:org/name[@rev]`: downloads an HF-layout model (config, tokenizer, safetensors shards)
//! with the `hf-hub` crate into the standard Hugging Face cache (`$HF_HOME`, so files other tools
//! downloaded are reused; `HF_ENDPOINT` and the saved token apply), and returns the snapshot.

use crate::{Error, Result};
use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
use std::path::PathBuf;

pub fn download(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Fetch(format!(
            "hf:{repo_id}@{revision}: {what}: {e} (hub downloads need network access to \
             huggingface.co; set HF_ENDPOINT for a mirror)"
        ))
    };
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| fail("cannot start the hub client", &e))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| fail(&format!("downloading {f}"), &e))
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    // tokenizer_config.json carries the chat template; not every repository has it.
    let _ = repo.get("tokenizer_config.json");
    if repo.get("model.safetensors").is_err() {
        let index = get("model.safetensors.index.json")?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&index, e))?;
        let mut shards: Vec<&str> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            get(s)?;
        }
    }
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}
