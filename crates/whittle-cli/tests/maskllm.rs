//! `sparsify --method maskllm` on the default model with a small data slice: the prior's own
//! mask (`--tokens 0`), a run stopped by its time budget and resumed by the same command, the
//! learned mask file applied again by `--method mask`, and bad settings refused.

mod common;

use common::{fails, ok, shared};

/// Two linears only, so that the logits and their checkpoint stay small (a whole-model run
/// holds 159 M logits; that is measured in benches/, not here).
const TARGETS: &str = "layers.0.mlp.down_proj,layers.3.self_attn.q_proj";

#[test]
fn learned_masks_on_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let valid = shared("wikitext2-valid.txt");
    let run = |out: &str, tokens: &str, extra: &[&str]| {
        let mut args = vec![
            "sparsify",
            "--method",
            "maskllm",
            "--pattern",
            "2:4",
            "--prior",
            "magnitude",
            "--targets",
            TARGETS,
            "--data",
            &valid,
            "--valid",
            &valid,
            "--seq-len",
            "64",
            "--batch",
            "1",
            "--accum",
            "1",
            "--tokens",
            tokens,
            "--eval-every",
            "1",
            "--eval-tokens",
            "128",
            "--lr",
            "1e-3",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    // The prior's own mask: exactly magnitude 2:4 on the two linears.
    let prior = p("prior");
    let out = run(&prior, "0", &[]);
    assert!(
        out.contains("tokens trained") && out.contains("2:4"),
        "{out}"
    );
    let summary = |d: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{d}/summary.json")).unwrap())
            .unwrap()
    };
    assert_eq!(summary(&prior)["pattern"], "2:4");
    // Stopped at once by its budget (the seeded logits are checkpointed), then resumed.
    let learned = p("learned");
    run(&learned, "192", &["--max-minutes", "0"]);
    assert!(!std::path::Path::new(&format!("{learned}/mask.safetensors")).exists());
    let start: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{learned}/start.json")).unwrap())
            .unwrap();
    assert!(start["val_ppl"].as_f64().unwrap() > 1.0);
    run(&learned, "192", &[]);
    let s = summary(&learned);
    assert_eq!(s["last"]["step"], 3);
    assert!(s["last"]["val_ppl"].as_f64().unwrap() > 1.0);
    let parts = s["last"]["parts"].to_string();
    assert!(parts.contains("mask_l2"), "{parts}");
    // The curve starts at the seeded mask and is drawn against a reference line.
    let svg = p("curve.svg");
    ok(&[
        "plot",
        "--run",
        &learned,
        "--reference",
        "SparseGPT 2:4=85.3",
        "--out",
        &svg,
    ]);
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("SparseGPT 2:4"));
    let err = fails(&[
        "plot",
        "--run",
        &learned,
        "--reference",
        "x=-1",
        "--out",
        &svg,
    ]);
    assert!(err.contains("positive"), "{err}");
    // The mask file applies to the model again, as a one-shot stage.
    let again = p("again");
    let out = ok(&[
        "sparsify",
        "--method",
        "mask",
        "--mask",
        &format!("{learned}/mask.safetensors"),
        "--out",
        &again,
    ]);
    assert!(out.contains("applied the 2:4 mask of 2 linears"), "{out}");
    // A finished run is not overwritten; impossible settings fail before any work.
    let err = fails(&[
        "sparsify", "--method", "maskllm", "--tokens", "0", "--out", &learned,
    ]);
    assert!(err.contains("already holds a finished run"), "{err}");
    for (flag, value, says) in [
        ("--pattern", "5:4", "N:M"),
        ("--pattern", "50%", "N:M"),
        ("--tau", "4:0", "must be positive"),
        (
            "--prior",
            "/nonexistent.safetensors",
            "not a one-shot method or mask file",
        ),
    ] {
        let err = fails(&[
            "sparsify",
            "--method",
            "maskllm",
            "--tokens",
            "0",
            flag,
            value,
            "--targets",
            TARGETS,
            "--out",
            &p("bad"),
        ]);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
    let err = fails(&["sparsify", "--method", "maskllm", "--out", &p("bad")]);
    assert!(err.contains("--tokens"), "{err}");
    let err = fails(&["sparsify", "--method", "mask", "--out", &p("bad")]);
    assert!(err.contains("--mask FILE"), "{err}");
}
