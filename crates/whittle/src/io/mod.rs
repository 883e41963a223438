//! Reading and writing models: GGUF, HF safetensors layout, tokenizers, and model resolution
//! (file, folder, `hf:` id, or the default model fetched on first use).

pub mod fetch;
pub mod gguf;
pub mod hub;
pub mod hymba;
pub mod peft;
pub mod resolve;
pub mod safetensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};

/// A hidden sibling of `path` to write into before renaming onto `path`: same folder, so the
/// rename is atomic; named by process id and a per-process counter, so concurrent writers (other
/// processes, other threads) never share one.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}-{n}", std::process::id()))
}
