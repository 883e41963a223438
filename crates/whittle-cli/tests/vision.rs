//! `whittle vision eval` on real teachers and Fashion-MNIST (a small slice), and its refusals.

mod common;

use common::{fails_cleanly, whittle};

#[test]
fn eval_reports_knn_accuracy_of_both_teachers() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    let (success, out, err) = whittle(&[
        "vision",
        "eval",
        "--teachers",
        "dinov2,open_nsfw,effnet_lite0",
        "--train-images",
        "300",
        "--test-images",
        "100",
        "--size",
        "56",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(success, "{out}\n{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (row, dim) in rows.iter().zip([384, 1024, 1280]) {
        assert_eq!(row["dim"], dim);
        // Ten classes: chance is 0.1.
        for key in ["knn_accuracy", "probe_accuracy"] {
            let acc = row[key].as_f64().unwrap();
            assert!(acc > 0.4, "{key}: {row}");
        }
    }
    assert!(out.contains("open_nsfw"), "{out}");
}

#[test]
fn eval_refuses_bad_teachers_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.onnx");
    let real =
        std::fs::read(whittle::io::fetch::cached(&whittle::io::fetch::OPEN_NSFW).unwrap()).unwrap();
    std::fs::write(&cut, &real[..real.len() / 3]).unwrap();
    let spec = format!("open_nsfw={}", cut.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["vision", "eval", "--teachers", "clip"],
            "unknown teacher 'clip'",
        ),
        (
            vec![
                "vision",
                "eval",
                "--teachers",
                "open_nsfw",
                "--teacher-file",
                &spec,
            ],
            "cut.onnx",
        ),
        (
            vec![
                "vision",
                "eval",
                "--teachers",
                "dinov2",
                "--teacher-file",
                "dinov2",
            ],
            "NAME=PATH",
        ),
        (
            vec![
                "vision",
                "eval",
                "--teachers",
                "dinov2",
                "--train-images",
                "70000",
            ],
            "the split has",
        ),
        (
            vec![
                "vision",
                "eval",
                "--teachers",
                "dinov2",
                "--mnist",
                "/no/such/dir",
            ],
            "/no/such/dir",
        ),
    ];
    for (args, needle) in cases {
        fails_cleanly(&args, needle);
    }
}

/// A short distillation from both teachers: a bad PNG is skipped and counted, the time budget
/// stops the run with a checkpoint, the same command resumes it to the end, and the summary
/// holds the measures.
#[test]
fn distill_runs_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let pngs = dir.path().join("pngs");
    std::fs::create_dir_all(&pngs).unwrap();
    std::fs::write(pngs.join("broken.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let out = dir.path().join("run");
    let args = |minutes: &str| -> Vec<String> {
        [
            "vision",
            "distill",
            "--teachers",
            "dinov2,open_nsfw",
            "--images",
            pngs.to_str().unwrap(),
            "--mnist-train",
            "48",
            "--norm",
            "phis",
            "--dense",
            "--size",
            "32",
            "--steps",
            "6",
            "--batch",
            "8",
            "--ckpt-every",
            "2",
            "--eval-train",
            "64",
            "--eval-test",
            "32",
            "--max-minutes",
            minutes,
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| whittle(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (success, stdout, err) = run(args("0"));
    assert!(success, "{stdout}\n{err}");
    assert!(stdout.contains("time budget spent at step 0"), "{stdout}");
    assert!(err.contains("skipped 1 unreadable images"), "{err}");
    assert!(out.join("checkpoint/state.json").is_file());
    let (success, stdout, err) = run(args("60"));
    assert!(success, "{stdout}\n{err}");
    assert!(err.contains("resuming at step 0"), "{err}");
    // The images at the student's size came from the first run's cache, skips included.
    assert!(out.join("teachers/student-32.json").is_file());
    assert!(err.contains("skipped 1 unreadable images"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 6);
    assert!(summary["probe_accuracy"].as_f64().unwrap() >= 0.0);
    assert_eq!(summary["log"].as_array().unwrap().len(), 6);
    let names: Vec<&str> = summary["teachers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["teacher"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dinov2", "dinov2.dense", "open_nsfw"]);
    for t in summary["teachers"].as_array().unwrap() {
        assert!(
            t["loss"].as_f64().unwrap().is_finite() && t["cosine"].as_f64().unwrap() > -1.0,
            "{t}"
        );
    }
    // The teachers' features were cached by the first run and reused by the second.
    assert!(
        out.join("teachers/dinov2.json").is_file() && !err.contains("dinov2: 48 images"),
        "{err}"
    );
    // The per-target loss curves.
    let svg = dir.path().join("curves.svg");
    let (success, _, err) = whittle(&[
        "plot",
        "--run",
        out.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(success, "{err}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("dinov2.dense: log10 loss") && text.contains("open_nsfw"),
        "{}",
        &text[..200.min(text.len())]
    );
    // The finished run evaluated again: k-NN on more test images, fidelity on the first 32
    // only, whose teacher features are in the cache already.
    let mut again = args("60");
    let i = again.iter().position(|s| s == "--eval-test").unwrap();
    again[i + 1] = "64".into();
    again.extend(["--fidelity-images".to_string(), "32".to_string()]);
    let (success, stdout, err) = run(again);
    assert!(success, "{stdout}\n{err}");
    assert!(stdout.contains("64 / 64 images") && stdout.contains("first 32 test images"));
    assert!(!err.contains("dinov2 features"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["fidelity_images"], 32);
    // Settings that are not a run.
    for (flag, value, needle) in [
        ("--norm", "bogus", "unknown feature normaliser"),
        ("--size", "40", "size 40"),
    ] {
        let mut a = args("60");
        let i = a.iter().position(|s| s == flag).unwrap();
        a[i + 1] = value.into();
        let pos = a.iter().position(|s| s == "--out").unwrap();
        a[pos + 1] = dir.path().join("other").display().to_string();
        fails_cleanly(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needle);
    }
    let mut a = args("60");
    a.extend(["--fidelity-images".to_string(), "100".to_string()]);
    fails_cleanly(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "--fidelity-images must be between 1 and --eval-test (32)",
    );
}
