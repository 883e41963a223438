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
