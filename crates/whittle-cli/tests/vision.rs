//! `whittle vision eval` on real teachers and Fashion-MNIST (a small slice), and its refusals.

use std::process::Command;

fn whittle(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn eval_reports_knn_accuracy_of_both_teachers() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    let (code, out, err) = whittle(&[
        "vision",
        "eval",
        "--teachers",
        "dinov2,open_nsfw",
        "--train-images",
        "300",
        "--test-images",
        "100",
        "--size",
        "56",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, dim) in rows.iter().zip([384, 1024]) {
        assert_eq!(row["dim"], dim);
        // Ten classes: chance is 0.1.
        let acc = row["knn_accuracy"].as_f64().unwrap();
        assert!(acc > 0.4, "{row}");
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
        let (code, out, err) = whittle(&args);
        assert_eq!(code, 1, "{args:?}: {out}\n{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
