//! Kill-safe writing, for every file and folder whittle writes (models, adapters, checkpoints,
//! reports, caches). The content goes to a hidden sibling (`.NAME.partial-PID-N`, same folder,
//! so the final rename is atomic) and is renamed onto the name the user gave only when complete:
//! an interrupted or killed run leaves either nothing or the previous complete version under
//! that name, never a half-written model that looks complete. Errors name the path the user
//! gave, not the temporary one.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A hidden sibling of `path` to write into before renaming onto `path`: named by process id and
/// a per-process counter, so concurrent writers (other processes, other threads) never share one.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}-{n}", std::process::id()))
}

/// Removes temporaries of `path` left by killed processes (`.NAME.partial-PID-N` whose PID no
/// longer runs). Only where `/proc` tells which processes run; elsewhere they stay (hidden).
fn clear_stale(path: &Path, parent: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let pid = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                remove(&e.path());
            }
        }
    }
}

/// The folder `path` will be written into; an error naming `path` when it does not exist
/// (callers that write at the end of a long run check it first).
pub fn parent_of(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: the folder {} does not exist (create it first)",
            path.display(),
            parent.display()
        )));
    }
    Ok(parent)
}

/// `e` with paths inside the temporary `tmp` renamed to the matching path under `path`.
fn named_for_user(e: Error, tmp: &Path, path: &Path) -> Error {
    let rename = |p: PathBuf| match p.strip_prefix(tmp) {
        Ok(rest) if rest.as_os_str().is_empty() => path.to_path_buf(),
        Ok(rest) => path.join(rest),
        Err(_) => p,
    };
    match e {
        Error::Io { path: p, cause } => Error::Io {
            path: rename(p),
            cause,
        },
        Error::Format { path: p, msg } => Error::Format {
            path: rename(p),
            msg,
        },
        other => other,
    }
}

fn remove(tmp: &Path) {
    let _ = if tmp.is_dir() {
        std::fs::remove_dir_all(tmp)
    } else {
        std::fs::remove_file(tmp)
    };
}

/// Writes the file `path`: `write` fills the temporary path it is given, which is then renamed
/// onto `path` (replacing an older file of that name only at that moment).
pub fn write_file<T>(path: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    clear_stale(path, &parent_of(path)?);
    if path.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is a folder; name a file to write",
            path.display()
        )));
    }
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|v| {
        std::fs::rename(&tmp, path)
            .map(|_| v)
            .map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        remove(&tmp);
    }
    result.map_err(|e| named_for_user(e, &tmp, path))
}

/// Writes `bytes` to the file `path`.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// What to do when the folder to write already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse before any work: outputs never overwrite what the user has.
    Refuse,
    /// Replace it at the moment of the rename (checkpoints: the newest complete one wins).
    Replace,
}

/// Writes the folder `dir`: `write` fills the temporary folder it is given (already created),
/// which is then renamed onto `dir`.
pub fn write_dir<T>(
    dir: &Path,
    existing: Existing,
    write: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    clear_stale(dir, &parent_of(dir)?);
    if existing == Existing::Refuse && dir.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; choose a new output folder",
            dir.display()
        )));
    }
    let tmp = temp_sibling(dir);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(dir, e))?;
    let result = write(&tmp).and_then(|v| {
        let old = temp_sibling(dir);
        if dir.exists() {
            if existing == Existing::Refuse {
                return Err(Error::Invalid(format!(
                    "{} appeared while writing it; the new version is not written",
                    dir.display()
                )));
            }
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        remove(&old);
        Ok(v)
    });
    if result.is_err() {
        remove(&tmp);
    }
    result.map_err(|e| named_for_user(e, &tmp, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_nothing_and_names_the_users_path() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("model.gguf");
        let err = write_file(&path, |tmp| -> Result<()> {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::format(tmp, "tensor 'x': bad"))
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: tensor 'x': bad", path.display())
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_folder_is_named_as_given() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("missing/x.gguf");
        let err = write_bytes(&path, b"x").unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(
            err.contains("does not exist") && !err.contains("partial"),
            "{err}"
        );
    }

    #[test]
    fn folders_are_refused_or_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("out");
        let fill = |text: &'static str| {
            move |tmp: &Path| {
                std::fs::write(tmp.join("a.txt"), text).map_err(|e| Error::io(tmp.join("a.txt"), e))
            }
        };
        write_dir(&dir, Existing::Refuse, fill("one")).unwrap();
        let err = write_dir(&dir, Existing::Refuse, fill("two")).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        write_dir(&dir, Existing::Replace, fill("three")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "three");
        let err = write_dir(&dir, Existing::Replace, |tmp| -> Result<()> {
            Err(Error::io(
                tmp.join("b.bin"),
                std::io::ErrorKind::StorageFull.into(),
            ))
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&dir.join("b.bin").display().to_string()),
            "{err}"
        );
        // The complete older version is still there, and no temporary is left.
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "three");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
