//! A bounded walk over a GGUF header before candle parses it. GGUF files come from strangers;
//! every length, count, dimension and offset in one is checked here against the bytes that are
//! really there, so that a corrupt or hostile header ends in a clear error instead of a panic
//! (candle divides by `general.alignment`, which may be 0), an allocation the file cannot
//! justify, or tensors that overlap or reach past the end. Nothing is allocated beyond one key
//! or string at a time, each bounded by the file's size.

use crate::{Error, Result};
use candle_core::quantized::GgmlDType;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Deepest array nesting accepted (llama.cpp writes depth 1; candle stops at 64).
const MAX_DEPTH: usize = 8;
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// The ggml types candle reads, by their GGUF number.
fn ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Walker<'a> {
    r: BufReader<File>,
    pos: u64,
    size: u64,
    path: &'a Path,
    /// GGUF v1 writes lengths as u32, v2/v3 as u64.
    wide: bool,
}

impl Walker<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("not a valid GGUF file: {msg}"))
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if self.pos + N as u64 > self.size {
            return Err(self.err(format!(
                "{what} at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.size
            )));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn len(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// Skips `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.size);
        let Some(end) = end else {
            return Err(self.err(format!(
                "{what} of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.size
            )));
        };
        // Relative seeks keep BufReader's buffer: a tokenizer's 100 k strings cost no syscalls.
        self.r
            .seek_relative(n as i64)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos = end;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        if n > self.size - self.pos {
            return Err(self.err(format!(
                "{what} claims {n} bytes, {} remain in the file",
                self.size - self.pos
            )));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        String::from_utf8(v).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }

    /// Walks one value of GGUF type `t`; returns it when it is an integer candle would take as
    /// `general.alignment`.
    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<Option<u64>> {
        let fixed = |n: u64| Some(n);
        let size = match t {
            0 | 1 | 7 => fixed(1),
            2 | 3 => fixed(2),
            4..=6 => fixed(4),
            10..=12 => fixed(8),
            8 => None,
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!("'{key}': arrays nested deeper than {MAX_DEPTH}")));
                }
                let inner = self.u32(key)?;
                let n = self.len(key)?;
                // Each element takes at least one byte (a string at least its length field).
                if n > self.size - self.pos {
                    return Err(self.err(format!(
                        "'{key}': array of {n} elements in {} remaining bytes",
                        self.size - self.pos
                    )));
                }
                for _ in 0..n {
                    self.value(inner, key, depth + 1)?;
                }
                return Ok(None);
            }
            _ => return Err(self.err(format!("'{key}': unknown value type {t}"))),
        };
        match size {
            Some(n) => {
                if self.pos + n > self.size {
                    return Err(self.err(format!("'{key}': value runs past the end of the file")));
                }
                let mut b = [0u8; 8];
                self.r
                    .read_exact(&mut b[..n as usize])
                    .map_err(|e| Error::io(self.path, e))?;
                self.pos += n;
                let negative = b[n as usize - 1] & 0x80 != 0;
                // The integers candle takes `general.alignment` from: u8/u16/u32 and
                // non-negative i8/i16/i32.
                Ok(match t {
                    0 | 2 | 4 => Some(u64::from_le_bytes(b)),
                    1 | 3 | 5 if !negative => Some(u64::from_le_bytes(b)),
                    _ => None,
                })
            }
            None => {
                let n = self.len(key)?;
                self.skip(n, &format!("'{key}': string"))?;
                Ok(None)
            }
        }
    }
}

/// Checks the header and tensor table of the GGUF file at `path` (see the module comment).
pub fn check(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Walker {
        r: BufReader::new(file),
        pos: 0,
        size,
        path,
        wide: true,
    };
    if &w.bytes::<4>("magic")? != b"GGUF" {
        return Err(w.err("it does not start with 'GGUF'"));
    }
    let version = w.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(w.err(format!("version {version} (whittle reads 1 to 3)")));
    }
    w.wide = version > 1;
    let tensors = w.len("tensor count")?;
    let kvs = w.len("metadata count")?;
    // A key-value pair takes at least 13 bytes, a tensor entry at least 24.
    if kvs
        .saturating_mul(13)
        .saturating_add(tensors.saturating_mul(24))
        > size
    {
        return Err(w.err(format!(
            "the header claims {tensors} tensors and {kvs} metadata entries, more than {size} bytes hold"
        )));
    }
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = std::collections::HashSet::new();
    for _ in 0..kvs {
        let key = w.string("metadata key")?;
        let t = w.u32(&key)?;
        let v = w.value(t, &key, 0)?;
        if key == "general.alignment" {
            alignment = v.unwrap_or(DEFAULT_ALIGNMENT);
            if !alignment.is_power_of_two() {
                return Err(w.err(format!(
                    "'general.alignment' is {alignment}, not a power of two"
                )));
            }
        }
        if !keys.insert(key.clone()) {
            return Err(w.err(format!("metadata key '{key}' appears twice")));
        }
    }
    let mut ranges = Vec::new();
    let mut names = std::collections::HashSet::new();
    for _ in 0..tensors {
        let name = w.string("tensor name")?;
        let dims = w.u32(&name)?;
        if dims > MAX_DIMS {
            return Err(w.err(format!(
                "tensor '{name}': {dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = w.len(&name)?;
            elems = elems
                .checked_mul(d)
                .ok_or_else(|| w.err(format!("tensor '{name}': element count overflows")))?;
        }
        let t = w.u32(&name)?;
        let ty =
            ggml_type(t).ok_or_else(|| w.err(format!("tensor '{name}': unknown ggml type {t}")))?;
        let offset = w.u64(&name)?;
        let block = ty.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(w.err(format!(
                "tensor '{name}': {elems} elements are not whole {ty:?} blocks of {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(ty.type_size() as u64)
            .ok_or_else(|| w.err(format!("tensor '{name}': byte size overflows")))?;
        if !names.insert(name.clone()) {
            return Err(w.err(format!("tensor '{name}' appears twice")));
        }
        ranges.push((offset, bytes, name));
    }
    let data_start = w.pos.div_ceil(alignment) * alignment;
    ranges.sort();
    let mut end_of_previous = 0u64;
    for (offset, bytes, name) in ranges {
        let end = offset
            .checked_add(bytes)
            .and_then(|e| e.checked_add(data_start));
        if end.is_none_or(|e| e > size) {
            return Err(w.err(format!(
                "tensor '{name}' ({bytes} bytes at data offset {offset}) reaches past the end of the file ({size} bytes)"
            )));
        }
        if offset < end_of_previous {
            return Err(w.err(format!("tensor '{name}' overlaps the tensor before it")));
        }
        end_of_previous = offset + bytes;
    }
    Ok(())
}
