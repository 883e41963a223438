//! A whittle run on the default model writes its provenance, and it survives a conversion:
//! quantize (RTN, no calibration) with a short perplexity check → HF folder with a model card
//! and recipe → GGUF → `inspect` shows the licence, the base model, the run and the figure.
//! Uses the real model cache (the default model is fetched by `.ci/run`).

use std::process::Command;

fn whittle(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_quantized_model_says_what_it_is_after_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("rtn4");
    let eval = format!(
        "{}/../../../shared/reference/wikitext2-test.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    whittle(&[
        "quantize",
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--targets",
        "down_proj",
        "--eval",
        &eval,
        "--eval-seq-len",
        "256",
        "--eval-max-tokens",
        "512",
        "--out",
        hf.to_str().unwrap(),
    ]);
    let card = std::fs::read_to_string(hf.join("README.md")).unwrap();
    assert!(card.contains("license: apache-2.0"), "{card}");
    assert!(
        card.contains("base_model: HuggingFaceTB/SmolLM2-135M-Instruct"),
        "{card}"
    );
    assert!(card.contains("type: ppl"), "{card}");
    let recipe = std::fs::read_to_string(hf.join("recipe.toml")).unwrap();
    assert!(recipe.contains("kind = \"quantize\""), "{recipe}");
    assert!(recipe.contains("group_size = 32"), "{recipe}");

    let gguf = dir.path().join("rtn4.gguf");
    whittle(&[
        "convert",
        "--model",
        hf.to_str().unwrap(),
        "--dtype",
        "q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    let shown = whittle(&["inspect", "--model", gguf.to_str().unwrap()]);
    for needle in [
        "licence apache-2.0",
        "base model HuggingFaceTB/SmolLM2-135M-Instruct",
        "run 1: quantize rtn int4 g32",
        "figure     wikitext2-test ppl = ",
    ] {
        assert!(shown.contains(needle), "{needle}: {shown}");
    }
}
