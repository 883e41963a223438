//! `importance` → `prune` on the default model with a small data slice: scores with Shapley
//! values, depth pruning by Shapley with emulated updates (kept in whittle's folder, refused by
//! GGUF export), and width + depth pruning to a plain Llama that converts to GGUF and runs.

mod common;
use common::{ok, whittle};

#[test]
fn importance_then_width_and_depth_pruning_on_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let shared = |f: &str| {
        format!(
            "{}/../../../shared/reference/{f}",
            env!("CARGO_MANIFEST_DIR")
        )
    };
    let (text, valid) = (shared("wikitext2-test.txt"), shared("wikitext2-valid.txt"));
    let small_calib = [
        "--calib",
        &valid,
        "--calib-samples",
        "2",
        "--calib-len",
        "128",
    ];
    let scores = p("scores.json");
    let mut args = vec!["importance", "--out", &scores];
    args.extend(small_calib);
    args.extend([
        "--shapley-samples",
        "2",
        "--shapley-tokens",
        "128",
        "--shapley-len",
        "64",
    ]);
    let out = ok(&args);
    assert!(out.contains("least important blocks by shapley"), "{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&scores).unwrap()).unwrap();
    assert_eq!(
        s["activation"]["width"]["channels"]
            .as_array()
            .unwrap()
            .len(),
        576
    );
    assert_eq!(
        s["shapley"]["leave_one_out"]["attn"]
            .as_array()
            .unwrap()
            .len(),
        30
    );

    let ppl_of = |m: &str| {
        let out = ok(&[
            "eval",
            "ppl",
            "--model",
            m,
            "--data",
            &text,
            "--seq-len",
            "128",
            "--max-tokens",
            "256",
        ]);
        out.lines()
            .last()
            .unwrap()
            .split_whitespace()
            .nth(4)
            .unwrap()
            .to_string()
    };
    // Two blocks by Shapley, two attention sublayers by angular distance, emulated.
    let (emulated, json) = (p("emulated"), p("emulated.json"));
    let mut args = vec![
        "prune",
        "--scores",
        &scores,
        "--drop-layers",
        "2",
        "--metric",
        "shapley",
        "--out",
        &emulated,
        "--json",
        &json,
        "--emulate",
        "lowrank:8",
    ];
    args.extend(small_calib);
    ok(&args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["details"]["removed"].as_array().unwrap().len(), 2);
    let cfg = std::fs::read_to_string(format!("{emulated}/config.json")).unwrap();
    assert!(cfg.contains("whittle_llama"), "{cfg}");
    let (success, _, err) = whittle(&["convert", "--model", &emulated, "--out", &p("e.gguf")]);
    assert!(ppl_of(&emulated).parse::<f64>().unwrap().is_finite());
    assert!(!success && err.contains("emulated update"), "{err}");

    // Width and depth together stay a plain Llama (384 channels: a multiple of the 6 heads, as
    // transformers wants): GGUF export, reload, same perplexity.
    let (plain, gguf) = (p("plain"), p("plain.gguf"));
    ok(&[
        "prune",
        "--scores",
        &scores,
        "--hidden",
        "384",
        "--ffn",
        "1024",
        "--heads-per-group",
        "2",
        "--layers",
        "12,13",
        "--out",
        &plain,
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{plain}/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(
        [
            &cfg["num_hidden_layers"],
            &cfg["hidden_size"],
            &cfg["intermediate_size"],
            &cfg["num_attention_heads"],
            &cfg["head_dim"]
        ],
        [28, 384, 1024, 6, 64]
    );
    ok(&["convert", "--model", &plain, "--out", &gguf]);
    assert_eq!(ppl_of(&plain), ppl_of(&gguf));

    // Attention sublayers removed without stand-ins: written as llama.cpp's per-layer `deci`.
    let (no_attn, deci) = (p("no-attn"), p("no-attn.gguf"));
    ok(&[
        "prune",
        "--scores",
        &scores,
        "--drop-attn",
        "3",
        "--out",
        &no_attn,
    ]);
    ok(&["convert", "--model", &no_attn, "--out", &deci]);
    assert_eq!(ppl_of(&no_attn), ppl_of(&deci));

    // Scores of another model, and pruning more than exists, are clear errors.
    let (success, _, err) = whittle(&[
        "prune",
        "--model",
        &plain,
        "--scores",
        &scores,
        "--ffn",
        "512",
        "--out",
        &p("x"),
    ]);
    assert!(!success && err.contains("belong to another model"), "{err}");
    let (success, _, err) = whittle(&[
        "prune",
        "--scores",
        &scores,
        "--drop-attn",
        "31",
        "--out",
        &p("y"),
    ]);
    assert!(!success && err.contains("cannot remove 31"), "{err}");
}

/// A Hymba model (`init --arch hymba`) is scored and narrowed (hidden channels, MLP neurons)
/// and written back as a Hymba folder that loads and evaluates; its query heads are refused.
#[test]
fn hymba_models_prune_in_width() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let valid = format!(
        "{}/../../../shared/reference/wikitext2-valid.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let (init, scores, pruned) = (p("init"), p("scores.json"), p("pruned"));
    ok(&["init", "--arch", "hymba", "--size", "tiny", "--out", &init]);
    let calib = [
        "--calib",
        &valid,
        "--calib-samples",
        "2",
        "--calib-len",
        "64",
    ];
    let mut args = vec!["importance", "--model", &init, "--out", &scores];
    args.extend(calib);
    ok(&args);
    let prune = |extra: &[&str], out: &str| {
        let mut a = vec!["prune", "--model", &init, "--scores", &scores, "--out", out];
        a.extend(extra);
        whittle(&a)
    };
    let (success, _, err) = prune(&["--hidden", "24", "--ffn", "8"], &pruned);
    assert!(success, "{err}");
    let cfg = std::fs::read_to_string(format!("{pruned}/config.json")).unwrap();
    assert!(
        cfg.contains("\"hidden_size\": 24") && cfg.contains("whittle_hymba"),
        "{cfg}"
    );
    let out = ok(&[
        "eval",
        "ppl",
        "--model",
        &pruned,
        "--data",
        &valid,
        "--seq-len",
        "64",
        "--max-tokens",
        "128",
    ]);
    let ppl: f64 = out
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    assert!(ppl.is_finite(), "{out}");
    let (success, _, err) = prune(&["--heads-per-group", "1"], &p("x"));
    assert!(!success && err.contains("SSM channels"), "{err}");
}
