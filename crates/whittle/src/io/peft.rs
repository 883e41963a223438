//! Adapters as a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`),
//! so PEFT and vLLM users can load whittle's compensation on top of the compressed base.
//! Keys: `base_model.model.model.layers.{i}.{module}.lora_A.weight` (`r × in`) and `lora_B`
//! (`out × r`); `lora_alpha = r`, so PEFT's scale `alpha / r` is 1 and the output is
//! `W x + B A x` exactly as whittle computes it. Adapters of different ranks (ranks from a
//! parameter budget) use `rank_pattern`/`alpha_pattern` with exact module paths, and
//! `target_modules` lists exactly the adapted modules.

use crate::{Error, Model, Result};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub fn save(model: &Model, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut modules: BTreeMap<String, usize> = BTreeMap::new();
    for (i, l) in model.layers.iter().enumerate() {
        for (name, _, lin) in l.linears() {
            let Some(a) = &lin.adapter else { continue };
            modules.insert(format!("model.layers.{i}.{name}"), a.rank);
            let p = format!("base_model.model.model.layers.{i}.{name}");
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            bytes.push((
                format!("{p}.lora_A.weight"),
                le(&a.a),
                vec![a.rank, lin.in_features],
            ));
            bytes.push((
                format!("{p}.lora_B.weight"),
                le(&a.b),
                vec![lin.out_features, a.rank],
            ));
        }
    }
    // The most common rank is `r`; the others go to the patterns.
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in modules.values() {
        *counts.entry(*r).or_default() += 1;
    }
    let Some((&rank, _)) = counts
        .iter()
        .max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r)))
    else {
        return Err(Error::Invalid("the model has no adapters to export".into()));
    };
    let pattern: BTreeMap<&String, &usize> = modules.iter().filter(|(_, r)| **r != rank).collect();
    for (name, data, shape) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        tensors.push((name.clone(), view));
    }
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "rank_pattern": pattern, "alpha_pattern": pattern,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
        "target_modules": modules.keys().collect::<Vec<_>>(), "base_model_name_or_path": null,
        "inference_mode": true, "init_lora_weights": true,
    });
    super::atomic::write_dir(dir, super::atomic::Existing::Refuse, |tmp| {
        let cfg = tmp.join("adapter_config.json");
        std::fs::write(
            &cfg,
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&cfg, e))?;
        let st = tmp.join("adapter_model.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(tensors, Some(meta), &st).map_err(|e| Error::format(&st, e))
    })
}
