//! `--distributed` under a real MPI (Open MPI's `mpirun`, loopback, on this one machine): two
//! ranks distil the default model like one process with the same batch, rank 0 alone writes
//! the files, and a rank killed mid-run ends the job with MPI's message while the last
//! checkpoint stays whole and resumes in a single process; two ranks splitting the calibration
//! windows make one process's SparseGPT masks and GPTQ codes. Built only with `--features mpi`.
#![cfg(feature = "mpi")]

mod common;

use common::{ok, shared};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

/// `mpirun -n N --bind-to none whittle --threads 1 ARGS --distributed` (one thread per rank:
/// the machine has two cores), allowed as root (CI runs as root).
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &n.to_string(), "--bind-to", "none", "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_whittle"))
        .args(["--threads", "1"])
        .args(args)
        .arg("--distributed")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp");
    c
}

/// A `distill --loss ce` run of the default model on a slice of WikiText-2, most of it frozen
/// (small checkpoints), validating every step.
fn args<'a>(gguf: &'a str, valid: &'a str, tokens: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "--student",
        gguf,
        "--loss",
        "ce",
        "--data",
        valid,
        "--valid",
        valid,
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--accum",
        "2",
        "--tokens",
        tokens,
        "--eval-tokens",
        "256",
        "--eval-every",
        "1",
        "--ckpt-every",
        "1",
        "--warmup",
        "1",
        "--freeze",
        "embed,layers.*.mlp.*",
        "--out",
        out,
    ]
}

/// (loss, validation perplexity) of each step in the run's checkpoint.
fn curve(dir: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join("checkpoint/state.json")).unwrap();
    let state: Value = serde_json::from_str(&text).unwrap();
    let rows = state["log"].as_array().unwrap();
    rows.iter()
        .map(|r| (r["loss"].as_f64().unwrap(), r["val_ppl"].as_f64().unwrap()))
        .collect()
}

fn assert_close(a: &[(f64, f64)], b: &[(f64, f64)]) {
    assert_eq!(a.len(), b.len());
    for ((la, va), (lb, vb)) in a.iter().zip(b) {
        assert!((la - lb).abs() <= 1e-5 * lb.abs(), "{a:?} vs {b:?}");
        assert!((va - vb).abs() <= 1e-5 * vb, "{a:?} vs {b:?}");
    }
}

#[test]
fn two_ranks_distil_like_one_process_and_a_killed_rank_leaves_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let gguf = ok(&["fetch"]).trim().to_string();
    let valid = shared("wikitext2-valid.txt");
    // 3 steps of 2 micro-batches: one process, then one micro-batch on each of two ranks.
    let (one, two) = (p("one"), p("two"));
    ok(&args(&gguf, &valid, "768", &one));
    let out = mpirun(2, &args(&gguf, &valid, "768", &two))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("distributed: MPI"), "{stderr}");
    // Rank 0 alone reports and writes.
    assert_eq!(
        stdout.matches("validation perplexity").count(),
        1,
        "{stdout}"
    );
    assert!(Path::new(&two).join("model/config.json").is_file());
    assert_close(&curve(Path::new(&two)), &curve(Path::new(&one)));

    // 6 steps on two ranks; rank 1 is killed once step 2 is checkpointed.
    let (whole, cut) = (p("whole"), p("cut"));
    ok(&args(&gguf, &valid, "1536", &whole));
    let job = mpirun(2, &args(&gguf, &valid, "1536", &cut))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = Path::new(&cut).join("checkpoint/state.json");
    let step = || -> u64 {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while step() < 2 {
        assert!(t0.elapsed().as_secs() < 600, "no checkpoint of step 2");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let victim = rank_pid(1, &cut).expect("rank 1 runs");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("signal 9"), "{stderr}");
    // The checkpoint is whole and continues in one process, as the uninterrupted run went.
    let saved = step();
    assert!((2..6).contains(&saved), "step {saved}");
    ok(&args(&gguf, &valid, "1536", &cut));
    assert_close(&curve(Path::new(&cut)), &curve(Path::new(&whole)));
}

#[test]
fn two_ranks_calibrate_sparsegpt_and_gptq_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let valid = shared("wikitext2-valid.txt");
    for (verb, method, extra) in [
        ("sparsify", "sparsegpt", ["--pattern", "2:4"]),
        ("quantize", "gptq", ["--bits", "4"]),
    ] {
        let (one, two) = (p(&format!("{method}-1")), p(&format!("{method}-2")));
        let args = |out: &str| -> Vec<String> {
            let mut a: Vec<String> = [verb, "--method", method, "--calib", &valid]
                .iter()
                .chain(&["--calib-samples", "6", "--calib-len", "128", "--out", out])
                .map(|s| s.to_string())
                .collect();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let a1 = args(&one);
        ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
        let a2 = args(&two);
        let out = mpirun(2, &a2.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let weights = |d: &str| -> Vec<f32> {
            let m = whittle::io::resolve::load_model(Path::new(d)).unwrap();
            m.layers
                .iter()
                .flat_map(|l| l.linears())
                .flat_map(|(_, _, lin)| lin.dense_weight().into_owned())
                .collect()
        };
        let (w1, w2) = (weights(&one), weights(&two));
        assert_eq!(w1.len(), w2.len());
        let masks = w1
            .iter()
            .zip(&w2)
            .filter(|(a, b)| (**a == 0.0) != (**b == 0.0))
            .count();
        let values = w1.iter().zip(&w2).filter(|(a, b)| a != b).count();
        eprintln!(
            "{method}: {masks} mask entries and {values} weights of {} differ",
            w1.len()
        );
        // Measured: none (the sums differ only in order, f64).
        assert!(masks * 10_000 <= w1.len() && values * 1000 <= w1.len());
    }
}

/// Rank 1 given a data file it cannot read (an MPMD launch: other arguments per rank): its
/// error ends the whole job, named with the rank, instead of leaving rank 0 waiting.
#[test]
fn a_rank_that_cannot_read_its_data_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").to_str().unwrap().to_string();
    let gguf = ok(&["fetch"]).trim().to_string();
    let valid = shared("wikitext2-valid.txt");
    let missing = dir.path().join("missing.txt").to_str().unwrap().to_string();
    let exe = env!("CARGO_BIN_EXE_whittle");
    let rank = |data: &str| -> Vec<String> {
        let mut a = vec![
            "-n".to_string(),
            "1".into(),
            exe.into(),
            "--threads".into(),
            "1".into(),
        ];
        a.extend(args(&gguf, data, "768", &out).iter().map(|s| s.to_string()));
        a.push("--distributed".into());
        a
    };
    let mut cmd = Command::new("mpirun");
    cmd.args(["--bind-to", "none", "--oversubscribe"])
        .args(rank(&valid))
        .arg(":")
        .args(rank(&missing))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("error on rank 1 of 2"), "{stderr}");
    assert!(stderr.contains("missing.txt"), "{stderr}");
}

/// The process id of rank `rank` of the job writing into `out` (its environment names the rank).
fn rank_pid(rank: usize, out: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let has =
            |hay: &[u8], needle: &str| hay.split(|b| *b == 0).any(|part| part == needle.as_bytes());
        if has(&cmdline, out)
            && !String::from_utf8_lossy(&cmdline).starts_with("mpirun")
            && has(&environ, &format!("OMPI_COMM_WORLD_RANK={rank}"))
        {
            return Some(pid);
        }
    }
    None
}
