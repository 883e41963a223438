//! A teacher's outputs computed once and reused by every student run: training windows and, per
//! position, the teacher's top-k logits and the log-sum-exp of the rest ([`TopK`]), memory-mapped.
//!
//! Folder layout (written whole through a temporary folder, so an interrupted run leaves no cache
//! that looks complete):
//! - `meta.json`: [`CacheMeta`] — the teacher's fingerprint, the tokenizer's and the data's
//!   hashes, the window length, the number of windows, `k`, the vocabulary;
//! - `tokens.bin`: `windows × (seq_len + 1)` token ids, u32 little-endian (inputs and the next
//!   token of each position);
//! - `topk.bin`: per position, `k` ids (u32), `k` logits (f16) and the rest's log-sum-exp (f32):
//!   `6k + 4` bytes, 388 at k = 64.
//!
//! The windows are stored in a shuffled order, so a student reading them in sequence sees the
//! corpus in random order and equal token budgets see equal data.

use super::topk::TopK;
use crate::model::fingerprint::Fingerprint;
use crate::model::Logits;
use crate::{Error, Model, Result};
use half::f16;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub version: u32,
    pub teacher: Fingerprint,
    /// [`super::tokenizer_hash`] of the teacher's tokenizer.
    pub tokenizer: String,
    /// FNV-1a of the windows' token ids (in stored order).
    pub data: String,
    pub seq_len: usize,
    pub windows: usize,
    pub k: usize,
    pub vocab: usize,
}

impl CacheMeta {
    fn row_bytes(&self) -> usize {
        6 * self.k + 4
    }
}

/// FNV-1a of token ids.
pub fn hash_ids(ids: &[u32]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in ids {
        for b in v.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// An opened cache.
pub struct TeacherCache {
    pub meta: CacheMeta,
    pub dir: PathBuf,
    tokens: memmap2::Mmap,
    topk: memmap2::Mmap,
}

/// `n` non-overlapping windows of `seq_len + 1` tokens from `ids`, in an order shuffled by `seed`
/// (Fisher–Yates on SplitMix64).
pub fn shuffled_windows(ids: &[u32], seq_len: usize, n: usize, seed: u64) -> Result<Vec<&[u32]>> {
    let all: Vec<&[u32]> = ids.chunks_exact(seq_len + 1).collect();
    if all.len() < n || n == 0 {
        return Err(Error::Invalid(format!(
            "{} tokens make {} windows of {}; {n} were asked for",
            ids.len(),
            all.len(),
            seq_len + 1
        )));
    }
    let mut order: Vec<usize> = (0..all.len()).collect();
    let mut s = seed;
    for i in (1..order.len()).rev() {
        let z = crate::train::mix(s);
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        order.swap(i, (z % (i as u64 + 1)) as usize);
    }
    Ok(order[..n].iter().map(|&i| all[i]).collect())
}

/// Runs `teacher` over `windows` (each `seq_len + 1` tokens) and writes the cache folder `dir`;
/// `progress(done, total)` after each window. Refuses an existing `dir`.
pub fn write(
    dir: &Path,
    teacher: &Model,
    tokenizer: String,
    windows: &[&[u32]],
    k: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CacheMeta> {
    let seq_len = windows.first().map_or(0, |w| w.len()).saturating_sub(1);
    if seq_len == 0 || windows.iter().any(|w| w.len() != seq_len + 1) {
        return Err(Error::Invalid(
            "teacher cache: windows must all have the same length ≥ 2".into(),
        ));
    }
    let vocab = teacher.config.vocab_size;
    if k == 0 || k > vocab {
        return Err(Error::Invalid(format!(
            "teacher cache: --top-k {k} must lie in 1..={vocab} (the vocabulary)"
        )));
    }
    let flat: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
    let meta = CacheMeta {
        version: VERSION,
        teacher: teacher.fingerprint(),
        tokenizer,
        data: hash_ids(&flat),
        seq_len,
        windows: windows.len(),
        k,
        vocab,
    };
    crate::io::atomic::write_dir(dir, crate::io::atomic::Existing::Refuse, |tmp| {
        let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tokens = tmp.join("tokens.bin");
        std::fs::write(&tokens, bytes).map_err(|e| Error::io(&tokens, e))?;
        let path = tmp.join("topk.bin");
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = std::io::BufWriter::new(file);
        let mut row = Vec::with_capacity(meta.row_bytes());
        for (i, w) in windows.iter().enumerate() {
            let logits = teacher.forward(&w[..seq_len], None, Logits::All, None)?;
            let top = TopK::from_logits(&logits, vocab, k)?;
            for r in 0..seq_len {
                row.clear();
                let ids = &top.ids[r * k..(r + 1) * k];
                row.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
                let vals = &top.logits[r * k..(r + 1) * k];
                row.extend(vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()));
                row.extend(top.rest[r].to_le_bytes());
                out.write_all(&row).map_err(|e| Error::io(&path, e))?;
            }
            progress(i + 1, windows.len());
        }
        out.flush().map_err(|e| Error::io(&path, e))?;
        let mj = tmp.join("meta.json");
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
        std::fs::write(&mj, text).map_err(|e| Error::io(&mj, e))
    })?;
    Ok(meta)
}

impl TeacherCache {
    /// Opens the cache in `dir`, checking that its files have the sizes its metadata says.
    pub fn open(dir: &Path) -> Result<Self> {
        let mj = dir.join("meta.json");
        let text = std::fs::read_to_string(&mj).map_err(|e| Error::io(&mj, e))?;
        let meta: CacheMeta = serde_json::from_str(&text).map_err(|e| Error::format(&mj, e))?;
        if meta.version != VERSION {
            return Err(Error::format(
                &mj,
                format!(
                    "cache version {} (this whittle reads {VERSION})",
                    meta.version
                ),
            ));
        }
        let map = |name: &str, want: usize| -> Result<memmap2::Mmap> {
            let p = dir.join(name);
            let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: the cache is read-only input; a file changed under the map is the same
            // hazard as any mmapped model file, and the sizes are checked below.
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?;
            if m.len() != want {
                return Err(Error::format(
                    &p,
                    format!(
                        "{} bytes, the cache's metadata needs {want} (truncated or foreign file)",
                        m.len()
                    ),
                ));
            }
            Ok(m)
        };
        let positions = meta.windows * meta.seq_len;
        let tokens = map("tokens.bin", 4 * meta.windows * (meta.seq_len + 1))?;
        let topk = map("topk.bin", positions * meta.row_bytes())?;
        Ok(TeacherCache {
            meta,
            dir: dir.to_path_buf(),
            tokens,
            topk,
        })
    }

    /// The `seq_len + 1` tokens of window `i` (modulo the window count: a run longer than the
    /// cache starts over).
    pub fn tokens(&self, i: usize) -> Vec<u32> {
        let w = self.meta.seq_len + 1;
        let at = (i % self.meta.windows) * w * 4;
        self.tokens[at..at + 4 * w]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Appends window `i`'s teacher rows to `out` (a [`TopK`] of this cache's `k` and vocabulary).
    pub fn extend_topk(&self, i: usize, out: &mut TopK) {
        let (k, t, rb) = (self.meta.k, self.meta.seq_len, self.meta.row_bytes());
        let start = (i % self.meta.windows) * t * rb;
        for row in self.topk[start..start + t * rb].chunks_exact(rb) {
            let (ids, rest) = row.split_at(4 * k);
            let (vals, lse) = rest.split_at(2 * k);
            out.ids.extend(
                ids.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            out.logits.extend(
                vals.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            );
            out.rest
                .push(f32::from_le_bytes([lse[0], lse[1], lse[2], lse[3]]));
        }
    }

    /// An empty [`TopK`] to fill with [`Self::extend_topk`].
    pub fn empty_topk(&self) -> TopK {
        TopK {
            k: self.meta.k,
            vocab: self.meta.vocab,
            ids: Vec::new(),
            logits: Vec::new(),
            rest: Vec::new(),
        }
    }

    /// Fails unless the cache was written by `teacher` (when given) and for a student that
    /// reads text with the tokenizer of hash `tokenizer` and has the same vocabulary size.
    pub fn check(&self, teacher: Option<&Model>, student: &Model, tokenizer: &str) -> Result<()> {
        let what = format!("the teacher cache in {}", self.dir.display());
        if let Some(t) = teacher {
            self.meta.teacher.check(t, &what)?;
        }
        if self.meta.tokenizer != tokenizer || self.meta.vocab != student.config.vocab_size {
            return Err(Error::Invalid(format!(
                "{what} was written with another tokenizer or vocabulary ({} tokens, the \
                 student has {}); distillation needs the same tokenizer",
                self.meta.vocab, student.config.vocab_size
            )));
        }
        Ok(())
    }
}
