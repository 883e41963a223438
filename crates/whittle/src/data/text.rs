//! Reading evaluation and calibration text, and cutting token windows from it.

use crate::{Error, Result};
use std::path::Path;

/// Reads a UTF-8 text file; an empty file is an error (a perplexity over nothing is meaningless).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::format(path, format!("not UTF-8 text: {e}")))?;
    if text.trim().is_empty() {
        return Err(Error::format(path, "the file is empty"));
    }
    Ok(text)
}

/// Non-overlapping windows of `seq_len` tokens from the start; the short tail is dropped, and
/// `max_tokens` (if given) keeps the first ⌊max_tokens / seq_len⌋ windows.
pub fn windows(ids: &[u32], seq_len: usize, max_tokens: Option<usize>) -> Result<Vec<&[u32]>> {
    if seq_len < 2 {
        return Err(Error::Invalid(format!(
            "sequence length {seq_len} must be at least 2"
        )));
    }
    let mut n = ids.len() / seq_len;
    if let Some(m) = max_tokens {
        n = n.min(m / seq_len);
    }
    if n == 0 {
        return Err(Error::Invalid(format!(
            "no full window: {} tokens (cap {}) for windows of {seq_len}",
            ids.len(),
            max_tokens.map_or("none".to_string(), |m| m.to_string())
        )));
    }
    Ok(ids.chunks_exact(seq_len).take(n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_tail_and_respect_cap() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 3, None).unwrap();
        assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
        assert_eq!(windows(&ids, 3, Some(7)).unwrap().len(), 2);
        assert!(windows(&ids, 11, None).is_err());
        assert!(windows(&ids, 3, Some(2)).is_err());
        assert!(windows(&ids, 1, None).is_err());
    }
}
