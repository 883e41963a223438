//! One error type for the library. Every variant names what went wrong *and where* (file, tensor,
//! setting), because users meet these errors at the end of long runs and must act on them alone.

use std::path::PathBuf;

/// Library result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message and deliberately not a `source()`: error chains
    /// (`{:#}`) would print it a second time.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file exists but its contents are not what its format promises (truncated, corrupt).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A model whose architecture whittle does not implement.
    #[error("unsupported architecture '{0}' (whittle runs: llama, hymba, mamba)")]
    UnknownArchitecture(String),
    /// A tensor whose shape disagrees with the model configuration.
    #[error("tensor '{name}': expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// NaN or ±Inf where finite numbers are required.
    #[error("tensor '{name}' contains {count} non-finite values (NaN or Inf)")]
    NonFinite { name: String, count: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A setting that cannot be honoured (sequence too long, empty data, ...).
    #[error("{0}")]
    Invalid(String),
    /// Fetching a model failed (pip missing, offline, checksum mismatch, ...).
    #[error("fetch: {0}")]
    Fetch(String),
    /// A tensor operation of the training graph failed (not a `source()`, for the reason given
    /// at [`Error::Io`]).
    #[error("training: {0}")]
    Train(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Train(e)
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

/// Fails with [`Error::NonFinite`] if `data` holds NaN or Inf.
pub fn check_finite(name: &str, data: &[f32]) -> Result<()> {
    let count = data.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(Error::NonFinite {
            name: name.to_string(),
            count,
        });
    }
    Ok(())
}
