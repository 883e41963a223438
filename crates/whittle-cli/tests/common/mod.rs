//! Running the `whittle` binary from integration tests.
#![allow(dead_code)]

use std::process::Command;

/// Runs `whittle ARGS`: (success, stdout, stderr).
pub fn whittle(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `whittle ARGS`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let (success, out, err) = whittle(args);
    assert!(success, "{args:?}: {err}");
    out
}

/// Runs `whittle ARGS`, which must fail; its stderr.
pub fn fails(args: &[&str]) -> String {
    let (success, _, err) = whittle(args);
    assert!(!success, "{args:?} should fail");
    err
}

/// A file of the shared reference material.
pub fn shared(f: &str) -> String {
    format!(
        "{}/../../../shared/reference/{f}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs `whittle ARGS`, which must fail with a message containing `needle` and no panic.
pub fn fails_cleanly(args: &[&str], needle: &str) {
    let (success, out, err) = whittle(args);
    assert!(!success, "{args:?} should fail: {out}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}
