//! Adapters as a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`),
//! so PEFT and vLLM users can load whittle's compensation on top of the compressed base.
//! Keys: `base_model.model.model.layers.{i}.{module}.lora_A.weight` (`r × in`) and `lora_B`
//! (`out × r`); `lora_alpha = r`, so PEFT's scale `alpha / r` is 1 and the output is
//! `W x + B A x` exactly as whittle computes it.

use crate::{Error, Model, Result};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub fn save(model: &Model, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut modules = BTreeSet::new();
    let mut rank = None;
    for (i, l) in model.layers.iter().enumerate() {
        for (name, _, lin) in l.linears() {
            let Some(a) = &lin.adapter else { continue };
            if *rank.get_or_insert(a.rank) != a.rank {
                return Err(Error::Invalid(
                    "PEFT export needs one rank for all adapters (use rank_pattern-free export)"
                        .into(),
                ));
            }
            modules.insert(name.rsplit('.').next().unwrap_or(name).to_string());
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
    let Some(rank) = rank else {
        return Err(Error::Invalid("the model has no adapters to export".into()));
    };
    for (name, data, shape) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        tensors.push((name.clone(), view));
    }
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
        "target_modules": modules, "base_model_name_or_path": null,
        "inference_mode": true, "init_lora_weights": true,
    });
    let tmp = super::temp_sibling(dir);
    let write = || -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let cfg = tmp.join("adapter_config.json");
        std::fs::write(
            &cfg,
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| Error::io(&cfg, e))?;
        let st = tmp.join("adapter_model.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(tensors, Some(meta), &st)
            .map_err(|e| Error::format(&st, e))?;
        if dir.exists() {
            return Err(Error::Invalid(format!("{} already exists", dir.display())));
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}
