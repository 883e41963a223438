//! Kill-safety: `convert`, `quantize --out`, `compress --recipe` and `train` are killed with
//! SIGKILL at seeded random moments of their run. Afterwards the output path is either absent or
//! complete and loadable, never a half-written model that looks complete; and a killed training
//! run, resumed by the same command, ends with the same losses as one that was never
//! interrupted. Uses the real model cache (the default model is fetched by `.ci/run`).

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whittle"))
}

/// Runs `args` to the end; its wall time.
fn run(args: &[String]) -> Duration {
    let t = Instant::now();
    let o = exe().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed()
}

/// Starts `args` and kills it with SIGKILL after `after` (if it is still running).
fn kill_after(args: &[String], after: Duration) {
    let mut child = exe()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}

/// Seeded moments spread over a run of `total`.
fn moments(total: Duration, n: usize, seed: u64) -> Vec<Duration> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| total.mul_f64(rng.random_range(0.02..1.0)))
        .collect()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The output is absent, or loads as a complete model.
fn absent_or_complete(out: &Path, what: &str, at: Duration) {
    if out.exists() {
        whittle::io::resolve::load_model(out)
            .unwrap_or_else(|e| panic!("{what} killed at {at:?} left a broken {out:?}: {e}"));
    }
}

/// One-shot writers: each killed at 4 moments of its own uninterrupted duration.
#[test]
fn killed_writers_leave_nothing_or_a_complete_model() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[[stage]]\nkind = \"quantize\"\nmethod = \"rtn\"\nbits = 4\ngroup_size = 32\n",
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap().to_string();
    type Job = (&'static str, &'static str, fn(&str, &str) -> Vec<String>);
    let jobs: [Job; 3] = [
        ("convert", "x.gguf", |out, _| {
            args(&["convert", "--dtype", "q8_0", "--out", out])
        }),
        ("quantize", "q", |out, _| {
            args(&[
                "quantize",
                "--method",
                "rtn",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--out",
                out,
            ])
        }),
        ("compress", "c", |out, recipe| {
            args(&["compress", "--recipe", recipe, "--out", out])
        }),
    ];
    for (k, (what, name, make)) in jobs.iter().enumerate() {
        let full: PathBuf = dir.path().join(format!("full-{name}"));
        let total = run(&make(full.to_str().unwrap(), &recipe));
        absent_or_complete(&full, what, total);
        assert!(full.exists());
        // Every kill writes to the same name, so each run also meets its predecessors' leftovers.
        let out = dir.path().join(format!("k-{name}"));
        for at in moments(total, 4, k as u64) {
            kill_after(&make(out.to_str().unwrap(), &recipe), at);
            absent_or_complete(&out, what, at);
            remove(&out);
        }
        // Temporaries are hidden (`.NAME.partial-PID-N`), and the next complete write to the
        // same name clears those of killed processes.
        run(&make(out.to_str().unwrap(), &recipe));
        let prefix = format!(".k-{name}.partial-");
        let stale: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(stale.is_empty(), "{what}: {stale:?}");
    }
}

fn remove(p: &Path) {
    if p.is_dir() {
        std::fs::remove_dir_all(p).unwrap();
    } else if p.exists() {
        std::fs::remove_file(p).unwrap();
    }
}

/// The training log's (step, loss) pairs.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("checkpoint/state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_killed_training_run_resumes_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!(
        "{}/../../../shared/data/gutenberg",
        env!("CARGO_MANIFEST_DIR")
    );
    let train = |out: &Path| {
        args(&[
            "--threads",
            "1",
            "train",
            "--arch",
            "llama",
            "--size",
            "tiny",
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "8",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--warmup",
            "1",
            "--eval-every",
            "0",
            "--eval-tokens",
            "256",
            "--ckpt-every",
            "1",
        ])
    };
    let full = dir.path().join("full");
    let total = run(&train(&full));
    let want = losses(&full);
    assert_eq!(want.len(), 8);
    for (i, at) in moments(total, 3, 99).into_iter().enumerate() {
        let out = dir.path().join(format!("run{i}"));
        kill_after(&train(&out), at);
        if out.join("checkpoint").exists() {
            // Whatever the moment, the checkpoint on disk is a complete one.
            assert!(losses(&out).len() <= 8);
        }
        run(&train(&out));
        let got = losses(&out);
        assert_eq!(got.len(), want.len(), "killed at {at:?}");
        for ((s1, l1), (s2, l2)) in got.iter().zip(&want) {
            assert_eq!(s1, s2);
            assert!(
                (l1 - l2).abs() <= 1e-5 * l2.abs(),
                "killed at {at:?}: step {s1} loss {l1} vs {l2} uninterrupted"
            );
        }
    }
}
