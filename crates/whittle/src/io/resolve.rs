//! What `--model` may name: a GGUF file, an HF-layout folder, `hf:org/name[@rev]`, or nothing
//! (the default model, fetched on first use). Resolution turns each into local files; loading
//! returns the one model representation plus the tokenizer.

use super::{fetch, gguf, safetensors, tokenizer::Tokenizer};
use crate::{Error, Model, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Default,
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSpec {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        let Some(s) = s else {
            return Ok(ModelSpec::Default);
        };
        if let Some(id) = s.strip_prefix("hf:") {
            let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
            let valid = |p: &str| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            let mut parts = repo.split('/');
            let ok = matches!((parts.next(), parts.next(), parts.next()),
                              (Some(o), Some(n), None) if valid(o) && valid(n));
            if !ok || revision.is_empty() {
                return Err(Error::Invalid(format!(
                    "'{s}': expected hf:org/name or hf:org/name@revision"
                )));
            }
            return Ok(ModelSpec::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        Ok(ModelSpec::Local(PathBuf::from(s)))
    }

    /// How exported models name this source as their base: the hub repository where one is
    /// known, else the file or folder name at `path`.
    pub fn identity(&self, path: &Path) -> String {
        match self {
            ModelSpec::Default => fetch::DEFAULT_MODEL.hub_repo.to_string(),
            ModelSpec::Hub { repo, .. } => repo.clone(),
            ModelSpec::Local(_) => path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }

    /// Local path of the model (file or folder), downloading it if needed.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            ModelSpec::Default => fetch::default_model(),
            ModelSpec::Local(p) if p.exists() => Ok(p.clone()),
            ModelSpec::Local(p) => Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            )),
            ModelSpec::Hub { repo, revision } => super::hub::download(repo, revision),
        }
    }
}

/// A loaded model with its tokenizer and where it came from.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

/// Loads a model file or folder and its tokenizer.
pub fn load(path: &Path) -> Result<Loaded> {
    let model = load_model(path)?;
    let tokenizer = load_tokenizer(path, &model)?;
    Ok(Loaded {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// Loads the model of a file or folder (no tokenizer needed: `inspect` and `bench` run on
/// checkpoints that ship none).
pub fn load_model(path: &Path) -> Result<Model> {
    let mut model = if path.is_dir() {
        safetensors::load(path)?
    } else {
        gguf::load(path)?.0
    };
    // A 2:4 model is stored with its zeros (what transformers loads); in memory its 2:4
    // matrices are packed where that decodes faster than the dense model.
    if crate::kernels::sparse24::packed_is_faster(crate::kernels::simd::level()) {
        model.pack_sparse24();
    }
    Ok(model)
}

/// The tokenizer of a model folder (`tokenizer.json`) or GGUF file (its metadata).
pub fn load_tokenizer(path: &Path, model: &Model) -> Result<Tokenizer> {
    if !path.is_dir() {
        return Tokenizer::from_spec(&gguf::GgufFile::open(path)?.tokenizer_spec()?);
    }
    let tok_path = path.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{}: tokenizer.json missing from the model folder",
            path.display()
        )));
    }
    let mut tokenizer = Tokenizer::from_file(&tok_path)?;
    tokenizer.bos = tokenizer.bos.or(model.config.bos_token_id);
    tokenizer.eos = tokenizer.eos.or(model.config.eos_token_id);
    Ok(tokenizer)
}

/// Names, storage types and shapes of the tensors in a model file or folder.
pub fn tensor_infos(path: &Path) -> Result<Vec<(String, String, Vec<usize>)>> {
    if path.is_dir() {
        safetensors::tensor_infos(path)
    } else {
        Ok(gguf::GgufFile::open(path)?.tensor_infos())
    }
}

/// Bytes on disk of a model file, or of every file in a model folder.
pub fn size_on_disk(path: &Path) -> Result<u64> {
    if !path.is_dir() {
        return Ok(std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let e = e.map_err(|e| Error::io(path, e))?;
        total += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
    }
    Ok(total)
}
