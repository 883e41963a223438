//! A disk that fills up while a training run checkpoints: the run stops with an error that
//! names the file and the cause, the previous checkpoint stays whole (no partial files beside
//! it), and once there is room the same command resumes from that checkpoint to the end.
//!
//! The full disk is a small tmpfs mounted over a temporary folder, which needs root (CI runs as
//! root); elsewhere the test says that it skipped.
#![cfg(target_os = "linux")]

mod common;

use common::{ok, shared, whittle};
use std::path::Path;
use std::process::Command;

/// A tmpfs of `bytes` mounted on `at`, unmounted when dropped.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(at: &'a Path, bytes: u64) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(Tmpfs(at))
    }

    fn resize(&self, bytes: u64) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_while_checkpointing_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    ok(&[
        "init",
        "--arch",
        "llama",
        "--size",
        "tiny",
        "--out",
        &p("init"),
    ]);
    let valid = shared("wikitext2-valid.txt");
    let args = |out: &str| -> Vec<String> {
        [
            "--threads",
            "1",
            "distill",
            "--student",
            &p("init"),
            "--data",
            &valid,
            "--valid",
            &valid,
            "--loss",
            "ce",
            "--seq-len",
            "64",
            "--batch",
            "2",
            "--tokens",
            "384",
            "--eval-tokens",
            "128",
            "--ckpt-every",
            "1",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |out: &str| {
        let a = args(out);
        whittle(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // The checkpoint's size: the trained values (a checkpoint at step 0, before AdamW has
    // moments) times three once the moments are in it.
    let mut probe = args(&p("probe"));
    probe.extend(["--max-minutes".into(), "0".into()]);
    ok(&probe.iter().map(String::as_str).collect::<Vec<_>>());
    let values = std::fs::metadata(p("probe/checkpoint/params.safetensors"))
        .unwrap()
        .len();
    let checkpoint = 3 * values;
    // Room for one checkpoint but not for its replacement beside it (written whole, then
    // renamed over the old one).
    let fs = dir.path().join("fs");
    let Some(disk) = Tmpfs::mount(&fs, checkpoint * 3 / 2) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let out = fs.join("run");
    let out_s = out.to_str().unwrap();
    let (success, _, err) = run(out_s);
    assert!(!success, "{err}");
    assert!(
        err.contains("checkpoint/params.safetensors: No space left on device"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 1, "the first checkpoint, intact");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["checkpoint"], "no partial files: {left:?}");
    // Room again: the same command continues from step 1 and finishes.
    disk.resize(checkpoint * 4);
    let (success, _, err) = run(out_s);
    assert!(success, "{err}");
    assert!(err.contains("resuming at step 1 of 3"), "{err}");
    assert!(out.join("summary.json").is_file() && out.join("model").is_dir());
}
