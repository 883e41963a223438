//! Bad files and settings give clear errors naming the file and the problem, never panics.

mod common;

use common::*;
use std::path::Path;
use whittle::io::{gguf, resolve, safetensors, tokenizer::Tokenizer};
use whittle::model::{random::random_model, Linear, Weight};

fn err_text(r: Result<resolve::Loaded, whittle::Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn saved_gguf(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("m.gguf");
    gguf::save(
        &tiny_model(1),
        Some(&tiny_tokenizer_spec()),
        gguf::GgufType::F32,
        &path,
    )
    .unwrap();
    path
}

#[test]
fn truncated_and_corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let good = saved_gguf(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    for cut in [0, 3, 100, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err_text(resolve::load(&p));
        assert!(e.contains(&format!("cut{cut}.gguf")), "{e}");
    }
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"NOPE");
    let p = dir.path().join("magic.gguf");
    std::fs::write(&p, &bad).unwrap();
    assert!(err_text(resolve::load(&p)).contains("not a valid GGUF"));
}

#[test]
fn unknown_architecture_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let tok = Tokenizer::from_spec(&tiny_tokenizer_spec()).unwrap();
    safetensors::save(&tiny_model(1), Some(&tok), false, &out).unwrap();
    let cfg_path = out.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("LlamaForCausalLM", "MysteryForCausalLM"),
    )
    .unwrap();
    assert!(err_text(resolve::load(&out)).contains("unsupported architecture 'MysteryForCausalLM'"));
    std::fs::write(&cfg_path, &cfg).unwrap();
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    assert!(err_text(resolve::load(&out)).contains("tokenizer.json missing"));
    let e = resolve::ModelSpec::parse(Some("/no/such/model.gguf"))
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/model.gguf"));
    assert!(resolve::ModelSpec::parse(Some("hf:just-a-name")).is_err());
}

#[test]
fn hub_spec_parses_with_and_without_revision() {
    use resolve::ModelSpec;
    assert_eq!(
        ModelSpec::parse(Some("hf:HuggingFaceTB/SmolLM2-135M@v1.0")).unwrap(),
        ModelSpec::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M".into(),
            revision: "v1.0".into()
        }
    );
    assert_eq!(
        ModelSpec::parse(Some("hf:a/b")).unwrap(),
        ModelSpec::Hub {
            repo: "a/b".into(),
            revision: "main".into()
        }
    );
    for bad in ["hf:", "hf:a/b/c", "hf:a/b@", "hf:a b/c"] {
        assert!(ModelSpec::parse(Some(bad)).is_err(), "{bad}");
    }
    assert_eq!(ModelSpec::parse(None).unwrap(), ModelSpec::Default);
}

#[test]
fn truncated_safetensors_and_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    safetensors::save(&tiny_model(1), None, false, &out).unwrap();
    let st = out.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    let e = safetensors::load(&out).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&st, &bytes).unwrap();
    // A config that disagrees with the tensors.
    let cfg_path = out.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 40"),
    )
    .unwrap();
    let e = safetensors::load(&out).err().unwrap().to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("expected shape"),
        "{e}"
    );
}

#[test]
fn nan_in_weights_is_named() {
    let m = tiny_model(1);
    let dir = tempfile::tempdir().unwrap();
    let mut layers = m.layers;
    let Weight::Dense(w) = layers[1].mlp.as_mut().unwrap().up.weight_mut() else {
        panic!("random models are dense")
    };
    w[3] = f32::NAN;
    // The model constructor itself refuses it ...
    let e = whittle::Model::new(
        m.config.clone(),
        m.embed.clone(),
        layers,
        m.final_norm.clone(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("layers.1.mlp.up_proj") && e.contains("non-finite"),
        "{e}"
    );
    // ... and so does loading a file that holds one.
    let mut m2 = random_model(tiny_config(false), &uniform_shapes(1), 2).unwrap();
    let head = m2.lm_head.as_mut().unwrap();
    let Weight::Dense(w) = head.weight_mut() else {
        panic!("random models are dense")
    };
    w[0] = f32::INFINITY;
    // Linear::dense does not check values (compression methods build many); Model::new does.
    assert!(Linear::dense("x", vec![f32::NAN], 1, 1).is_ok());
    let st = dir.path().join("st");
    safetensors::save(&m2, None, false, &st).unwrap();
    let e = safetensors::load(&st).err().unwrap().to_string();
    assert!(e.contains("lm_head") && e.contains("non-finite"), "{e}");
}

#[test]
fn empty_data_and_too_long_windows() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let e = whittle::data::text::read_text(&empty)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let m = tiny_model(1);
    let ids: Vec<u32> = (0..300).map(|i| i % 250).collect();
    let e = whittle::eval::perplexity::perplexity(&m, &ids, 128, None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the model's context length"), "{e}");
    let r = whittle::eval::perplexity::perplexity(&m, &ids, 64, Some(200), &mut |_, _| {}).unwrap();
    assert_eq!((r.windows, r.predicted_tokens), (3, 189));
    assert!(r.ppl.is_finite() && r.ppl > 1.0);
}
