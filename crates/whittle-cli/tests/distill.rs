//! `teacher-cache` → `distill` on the default model with a small data slice: a cached and a
//! live teacher, feature distillation with PHI-S heads, the student written and readable, and
//! bad settings refused with clear errors.

mod common;

/// Frozen in these runs, so that each checkpoint is a few hundred MB rather than 1.6 GB (the
/// whole model trains in the library's tests and in benches/).
const FROZEN: &str = "embed,layers.*.mlp.*";
use common::{fails, ok, shared};

#[test]
fn cached_and_live_distillation_on_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let gguf = ok(&["fetch"]).trim().to_string();
    let valid = shared("wikitext2-valid.txt");
    let cache = p("cache");
    let out = ok(&[
        "teacher-cache",
        "--data",
        &valid,
        "--seq-len",
        "64",
        "--tokens",
        "256",
        "--top-k",
        "8",
        "--out",
        &cache,
    ]);
    assert!(
        out.contains("cached 4 windows of 64 tokens, top-8 logits"),
        "{out}"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("cache/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["k"], 8);
    let sized = |seq: &'static str| {
        [
            "--student",
            &gguf,
            "--data",
            &valid,
            "--valid",
            &valid,
            "--seq-len",
            seq,
            "--batch",
            "2",
            "--tokens",
            "256",
            "--eval-tokens",
            "128",
            "--freeze",
            FROZEN,
        ]
    };
    let small = sized("64");
    // The default model distilled into itself from its cache: the KL starts at ~0 (also with
    // bf16x3 products, which this run takes where the CPU has AMX).
    let run = p("cached");
    let mut args = vec![
        "distill",
        "--teacher-cache",
        &cache,
        "--matmul-precision",
        "bf16x3",
        "--loss",
        "kd",
        "--tasks",
        "piqa",
        "--limit",
        "4",
        "--out",
        &run,
    ];
    args.extend(small);
    let out = ok(&args);
    assert!(out.contains("validation perplexity"), "{out}");
    // The student's downstream score, printed and in the summary.
    assert!(out.contains("piqa") && out.contains("acc_norm"), "{out}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("cached/summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["tasks"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    assert_eq!(summary["config"]["precision"], "bf16x3");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("cached/checkpoint/state.json")).unwrap())
            .unwrap();
    let first = state["log"][0]["parts"][0][1].as_f64().unwrap();
    assert!(
        first < 0.05,
        "KL of the model to its own cached top-8: {first}"
    );
    let ppl = ok(&[
        "eval",
        "ppl",
        "--model",
        &p("cached/model"),
        "--data",
        &valid,
        "--seq-len",
        "64",
        "--max-tokens",
        "128",
    ]);
    assert!(ppl.contains("PPL"), "{ppl}");

    // Live teacher, logit + feature distillation with PHI-S heads.
    let live = p("live");
    let mut args = vec![
        "distill",
        "--loss",
        "kd:T=2+ce:0.5",
        "--features",
        "3,10:phis",
        "--head-windows",
        "2",
        "--out",
        &live,
    ];
    args.extend(small);
    ok(&args);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("live/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 2);
    assert!(std::path::Path::new(&p("live/feature_heads.safetensors")).is_file());
    // Each head measured on the validation windows, in the teacher's space: the student is the
    // teacher after two small steps, so its heads reproduce the teacher's features closely.
    let heads = summary["features"].as_array().expect("feature report");
    let pairs: Vec<(u64, u64)> = heads
        .iter()
        .map(|h| {
            (
                h["student"].as_u64().unwrap(),
                h["teacher"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(pairs, [(3, 3), (10, 10)], "{summary}");
    for h in heads {
        let (cos, nmse) = (h["cosine"].as_f64().unwrap(), h["nmse"].as_f64().unwrap());
        assert!(cos > 0.9 && nmse < 0.1, "{h}");
    }

    // Minitron's teacher correction: a CE fine-tune of the teacher first, its own resumable run.
    let corrected = p("corrected");
    let mut args = vec![
        "distill",
        "--loss",
        "kd",
        "--teacher-correction",
        "128",
        "--out",
        &corrected,
    ];
    args.extend(small);
    ok(&args);
    let teacher_log: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p("corrected/teacher-correction/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(teacher_log["config"]["objective"], "ce");
    assert!(std::path::Path::new(&p("corrected/model")).is_dir());
    // Finished: neither checkpoint keeps its tensors, and the same command again has nothing
    // to do (it neither corrects the teacher nor trains the student anew).
    for run in ["corrected", "corrected/teacher-correction"] {
        let tensors = format!("{run}/checkpoint/params.safetensors");
        assert!(!std::path::Path::new(&p(&tensors)).exists(), "{tensors}");
    }
    let (success, _, err) = common::whittle(&args);
    assert!(success && err.contains("holds this run, finished"), "{err}");
    assert!(!err.contains("teacher correction:"), "{err}");
    let mut args = vec![
        "distill",
        "--teacher-cache",
        &cache,
        "--teacher-correction",
        "128",
    ];
    args.extend(["--out", &corrected]);
    args.extend(small);
    assert!(fails(&args).contains("stale"));

    // Bad settings.
    let (bad1, bad2, bad3, bad4) = (p("bad1"), p("bad2"), p("bad3"), p("bad4"));
    let mut args = vec!["distill", "--teacher-cache", &cache, "--out", &bad1];
    args.extend(sized("32"));
    assert!(fails(&args).contains("--seq-len 64"));
    let mut args = vec!["distill", "--features", "40:phis", "--out", &bad2];
    args.extend(small);
    assert!(fails(&args).contains("out of range"));
    let mut args = vec!["distill", "--loss", "kd:T=0", "--out", &bad3];
    args.extend(small);
    assert!(fails(&args).contains("not a positive number"));
    let mut args = vec!["distill", "--adapters-only", "--out", &bad4];
    args.extend(small);
    assert!(fails(&args).contains("no low-rank adapters"));
}
