//! The binary's behaviour on bad input: a clear message naming the problem, exit code 1, and
//! never a panic.

use std::process::Command;

fn whittle(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(args)
        .env(
            "WHITTLE_HOME",
            std::env::temp_dir().join("whittle-cli-test-home"),
        )
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let junk_s = junk.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", "--model", "/no/such.gguf"], "/no/such.gguf"),
        (vec!["inspect", "--model", junk_s], "junk.gguf"),
        (
            vec![
                "eval",
                "ppl",
                "--model",
                junk_s,
                "--data",
                empty.to_str().unwrap(),
            ],
            "empty",
        ),
        (
            vec!["generate", "--model", "hf:bad", "--prompt", "x"],
            "hf:org/name",
        ),
        (
            vec![
                "eval",
                "tasks",
                "--model",
                junk_s,
                "--tasks",
                "piqa,hellaswag2",
            ],
            "unknown task 'hellaswag2' (known: hellaswag, piqa, winogrande",
        ),
        (
            vec![
                "eval",
                "tasks",
                "--model",
                junk_s,
                "--tasks",
                "piqa",
                "--task-data",
                "/no/data",
            ],
            "/no/data",
        ),
        (
            vec![
                "generate", "--model", junk_s, "--prompt", "x", "--top-p", "0",
            ],
            "top-p",
        ),
    ];
    for (args, needle) in cases {
        let (code, _, err) = whittle(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Each error names the file (and the line, for text formats) and says the problem once.
#[test]
fn errors_name_the_file_and_the_problem_once() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = whittle(&["inspect", "--model", "/nonexistent"]);
    assert_eq!(code, 1);
    assert_eq!(err.matches("o such file").count(), 1, "{err}");
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[[stages]]\nkind = \"sparsify\"\n").unwrap();
    let out = dir.path().join("o");
    let (code, _, err) = whittle(&[
        "compress",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("r.toml") && err.contains("line 1"), "{err}");
    assert!(err.contains("unknown field `stages`"), "{err}");
    // Outputs into a folder that does not exist name the path the user gave.
    let model = whittle::io::fetch::default_model().unwrap();
    let missing = dir.path().join("missing/x.gguf");
    let (code, _, err) = whittle(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!err.contains("partial"), "{err}");
    // An empty prompt generates from the BOS token, as other runners do.
    let (code, out, err) = whittle(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "",
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 prompt tokens"), "{out} {err}");
}

#[test]
fn fetch_without_python_says_what_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .arg("fetch")
        .env("WHITTLE_HOME", home.path())
        .env("WHITTLE_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("needs Python 3 with pip") && !err.contains("panicked"),
        "{err}"
    );
    // Nothing half-written is left in the cache.
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
}

fn shared(rel: &str) -> String {
    format!("{}/../../../shared/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn hybrid_checkpoint_inspects_and_benches_without_a_tokenizer() {
    let hymba = shared("fixtures/hymba-tiny");
    // 3 global layers × (2·16 + 2·32) values per position, 4 bytes each, or 2 in an f16 cache,
    // which decodes (rings, shared K/V, meta tokens) from its own rows.
    for (cache, bytes) in [("f32", "1152"), ("f16", "576")] {
        let run = |args: &[&str]| whittle(&[&["--kv-cache", cache], args].concat());
        let (code, out, err) = run(&["inspect", "--model", &hymba]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("KV shared 2←1, 5←4, 6←4"), "{out}");
        assert!(out.contains(&format!("{bytes} bytes/token")), "{out}");
        let bench = ["bench", "--model", &hymba, "--contexts", "64,512"];
        let (code, out, err) = run(&[&bench[..], &["--steps", "4", "--reps", "1"]].concat());
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("decode tok/s") && out.contains("512"), "{out}");
    }
    let (code, out, err) = whittle(&["bench", "--scan", "--reps", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("speed-up"), "{out}");
}

/// Uses the default model's tokenizer, so it runs with the real cache (not the test home).
#[test]
fn train_stops_on_its_time_budget_resumes_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let data = shared("data/gutenberg");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--arch",
            "hymba",
            "--size",
            "tiny",
            "--data",
            &data,
            "--out",
            out_s,
            "--steps",
            "3",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--warmup",
            "1",
            "--eval-every",
            "2",
            "--eval-tokens",
            "256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |a: Vec<String>| {
        let o = Command::new(env!("CARGO_BIN_EXE_whittle"))
            .args(&a)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = run(args(&["--max-minutes", "0"]));
    assert!(err.contains("time budget spent at step 0"), "{err}");
    assert!(!out.join("summary.json").exists());
    let err = run(args(&[]));
    assert!(err.contains("resuming at step 0"), "{err}");
    // Finished: the checkpoint keeps its log (for plot) but not its tensors, and the same
    // command again finds the run done instead of training it anew.
    assert!(err.contains("dropped the checkpoint's tensors"), "{err}");
    assert!(out.join("checkpoint/state.json").is_file());
    assert!(!out.join("checkpoint/params.safetensors").exists());
    let err = run(args(&[]));
    assert!(err.contains("holds this run, finished"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 3);
    assert!(summary["val_ppl"].as_f64().unwrap().is_finite());
    // The trained Hymba is a folder that loads again.
    let model = out.join("model");
    let (code, inspect, err) = whittle(&["inspect", "--model", model.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(inspect.contains("hymba"), "{inspect}");
    let svg = dir.path().join("curves.svg");
    let (code, _, err) = whittle(&["plot", "--run", out_s, "--out", svg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

/// `WHITTLE_SIMD` that names no level, or one this CPU cannot run, stops the program before any
/// work with a message that lists what would work (exit 2), never with an illegal instruction.
#[test]
fn unknown_or_unavailable_simd_level_is_a_clear_error() {
    let run = |level: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
            .args(["bench", "--levels"])
            .env("WHITTLE_SIMD", level)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run("sse9");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown SIMD level 'sse9'") && err.contains("scalar"),
        "{err}"
    );
    // Every level this CPU runs is accepted; the others (at least one: `neon` on x86, the x86
    // levels on ARM) are refused by name.
    let (code, here, _) = run("scalar");
    assert_eq!(code, 0);
    for level in ["scalar", "neon", "avx2", "avx512", "amx"] {
        let (code, _, err) = run(level);
        if here.split_whitespace().any(|l| l == level) {
            assert_eq!(code, 0, "{level}: {err}");
        } else {
            assert_eq!(code, 2, "{level}");
            assert!(err.contains("not available on this CPU"), "{level}: {err}");
        }
    }
}
