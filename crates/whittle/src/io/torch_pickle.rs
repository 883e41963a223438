//! PyTorch's legacy (pre-1.6, non-zip) `torch.save` files: five pickles in a row (magic
//! number, protocol version, system info, the object, the list of storage keys) followed by
//! each storage's raw data (an int64 element count, then the elements). The object is a state
//! dict whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
//! calls on persistent storage ids. A small pickle machine (the opcodes torch writes) reads it;
//! nothing is executed, and tensors are materialised by following their strides (exports in
//! channels-last order store views).

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// The legacy format's magic number (the first pickle), an 80-bit integer compared in its low
/// 64 bits (integers are read into i64).
const MAGIC: i64 = 0x1950a86a20f9469cfc6c_i128 as i64;

/// A pickled value, as far as state dicts need.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// `callable(*args)`, recorded rather than run.
    Call(Box<Value>, Vec<Value>),
    /// A persistent id (a storage reference).
    Persistent(Box<Value>),
    Mark,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let start = self.pos;
        while self.u8()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.bytes[start..self.pos - 1]).into_owned())
    }

    fn utf8(&mut self, n: usize) -> std::result::Result<String, String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// Runs one pickle to its STOP and returns its value.
    fn pickle(&mut self) -> std::result::Result<Value, String> {
        let mut stack: Vec<Value> = Vec::new();
        let mut memo: HashMap<u32, Value> = HashMap::new();
        let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| "stack underflow".to_string());
        let pop_mark = |stack: &mut Vec<Value>| -> std::result::Result<Vec<Value>, String> {
            let at = stack
                .iter()
                .rposition(|v| *v == Value::Mark)
                .ok_or("no mark")?;
            let items = stack.split_off(at + 1);
            stack.pop();
            Ok(items)
        };
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return pop(&mut stack),
                b'(' => stack.push(Value::Mark),
                b'}' => stack.push(Value::Dict(Vec::new())),
                b']' => stack.push(Value::List(Vec::new())),
                b')' => stack.push(Value::Tuple(Vec::new())),
                b'N' => stack.push(Value::None),
                0x88 => stack.push(Value::Bool(true)),
                0x89 => stack.push(Value::Bool(false)),
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = stack.split_off(stack.len() - n);
                    stack.push(Value::Tuple(items));
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
                }
                b'r' => {
                    let k = self.u32()?;
                    memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
                }
                0x94 => {
                    let k = memo.len() as u32;
                    memo.insert(k, stack.last().cloned().ok_or("empty stack")?);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    stack.push(memo.get(&k).cloned().ok_or(format!("memo {k} unset"))?);
                }
                b'K' => stack.push(Value::Int(self.u8()? as i64)),
                b'M' => {
                    let b = self.take(2)?;
                    stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                b'J' => stack.push(Value::Int(self.u32()? as i32 as i64)),
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, byte) in b.iter().enumerate().take(16) {
                        v |= (*byte as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    stack.push(Value::Int(v as i64));
                }
                b'G' => {
                    let b = self.take(8)?;
                    stack.push(Value::Float(f64::from_be_bytes(
                        b.try_into().expect("8 bytes"),
                    )));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    stack.push(Value::Str(self.utf8(n)?));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    stack.push(Value::Str(self.utf8(n)?));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'R' | 0x81 => {
                    let args = match pop(&mut stack)? {
                        Value::Tuple(a) => a,
                        other => vec![other],
                    };
                    let f = pop(&mut stack)?;
                    stack.push(Value::Call(Box::new(f), args));
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    stack.push(Value::Persistent(Box::new(pid)));
                }
                b'b' => {
                    // BUILD: object state; a state dict's OrderedDict gets none that matters.
                    pop(&mut stack)?;
                }
                b's' => {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    dict_of(stack.last_mut())?.push((k, v));
                }
                b'u' => {
                    let items = pop_mark(&mut stack)?;
                    let d = dict_of(stack.last_mut())?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = pop(&mut stack)?;
                    match stack.last_mut() {
                        Some(Value::List(l)) => l.push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack)?;
                    match stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not read",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

/// The dict on top of the stack (an OrderedDict is `Call(OrderedDict, ())`, its items kept in
/// the call's argument list).
fn dict_of(top: Option<&mut Value>) -> std::result::Result<&mut Vec<(Value, Value)>, String> {
    match top {
        Some(Value::Dict(d)) => Ok(d),
        Some(Value::Call(_, args)) => {
            if !matches!(args.last(), Some(Value::Dict(_))) {
                args.push(Value::Dict(Vec::new()));
            }
            match args.last_mut() {
                Some(Value::Dict(d)) => Ok(d),
                _ => unreachable!("just pushed"),
            }
        }
        _ => Err("SETITEM on a non-dict".into()),
    }
}

/// A float tensor of a state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Element sizes of the storage classes a state dict holds.
fn element_size(class: &str) -> Option<usize> {
    match class {
        "FloatStorage" | "IntStorage" => Some(4),
        "LongStorage" | "DoubleStorage" => Some(8),
        "HalfStorage" | "BFloat16Storage" => Some(2),
        "ByteStorage" | "CharStorage" | "BoolStorage" => Some(1),
        _ => None,
    }
}

/// Reads the float32 tensors of a legacy `torch.save` state dict, by name (other dtypes, such
/// as BatchNorm's `num_batches_tracked`, are skipped).
pub fn read_legacy_state_dict(path: &Path) -> Result<Vec<(String, StateTensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes)
        .map_err(|msg| Error::format(path, format!("not a readable legacy PyTorch file: {msg}")))
}

fn parse(bytes: &[u8]) -> std::result::Result<Vec<(String, StateTensor)>, String> {
    let mut r = Reader { bytes, pos: 0 };
    if r.pickle()? != Value::Int(MAGIC) {
        return Err("bad magic number (a zip-format or other file?)".into());
    }
    let _protocol = r.pickle()?;
    let _sys_info = r.pickle()?;
    let object = r.pickle()?;
    let keys = match r.pickle()? {
        Value::List(k) => k,
        _ => return Err("no storage key list".into()),
    };
    // Storage key → (class, element count) from the tensors' persistent ids; data in key order.
    struct Ref {
        key: String,
        class: String,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    }
    let items = match object {
        Value::Dict(d) => d,
        Value::Call(_, mut args) => match args.pop() {
            Some(Value::Dict(d)) => d,
            _ => Vec::new(),
        },
        _ => return Err("the object is not a state dict".into()),
    };
    let ints = |v: &Value| -> std::result::Result<Vec<usize>, String> {
        match v {
            Value::Tuple(t) => t
                .iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 => Ok(*i as usize),
                    _ => Err("bad size/stride".to_string()),
                })
                .collect(),
            _ => Err("size/stride is not a tuple".into()),
        }
    };
    let mut refs = Vec::new();
    let mut classes: HashMap<String, String> = HashMap::new();
    for (name, value) in items {
        let (Value::Str(name), Value::Call(f, args)) = (name, value) else {
            return Err("a state-dict entry is not name → tensor".into());
        };
        if !matches!(&*f, Value::Global(m, n) if m == "torch._utils" && n == "_rebuild_tensor_v2") {
            return Err(format!(
                "'{name}' is rebuilt by {f:?}, not _rebuild_tensor_v2"
            ));
        }
        let [Value::Persistent(pid), Value::Int(offset), size, stride, ..] = &args[..] else {
            return Err(format!("'{name}': unexpected tensor arguments"));
        };
        let Value::Tuple(pid) = &**pid else {
            return Err(format!("'{name}': storage id is not a tuple"));
        };
        let (Some(Value::Global(_, class)), Some(Value::Str(key))) = (pid.get(1), pid.get(2))
        else {
            return Err(format!("'{name}': unexpected storage id {pid:?}"));
        };
        classes.insert(key.clone(), class.clone());
        refs.push((
            name,
            Ref {
                key: key.clone(),
                class: class.clone(),
                offset: *offset as usize,
                shape: ints(size)?,
                stride: ints(stride)?,
            },
        ));
    }
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err("a storage key is not a string".into());
        };
        let class = classes
            .get(&key)
            .ok_or(format!("storage {key} is not used by any tensor"))?;
        let width = element_size(class).ok_or(format!("storage class {class}"))?;
        let b = r.take(8)?;
        let count = i64::from_le_bytes(b.try_into().expect("8 bytes"));
        let n = usize::try_from(count).map_err(|_| format!("storage {key}: {count} elements"))?;
        storages.insert(
            key,
            r.take(n.checked_mul(width).ok_or("storage size overflows")?)?,
        );
    }
    let mut out = Vec::new();
    for (name, t) in refs {
        if t.class != "FloatStorage" {
            continue;
        }
        let data = storages[&t.key];
        let count: usize = t.shape.iter().product();
        let mut values = Vec::with_capacity(count);
        for i in 0..count {
            // Row-major index i → element offset through the strides.
            let (mut rest, mut at) = (i, t.offset);
            for (d, s) in t.shape.iter().zip(&t.stride).rev() {
                at += (rest % d) * s;
                rest /= d;
            }
            let b = data
                .get(4 * at..4 * at + 4)
                .ok_or(format!("'{name}' reads past its storage"))?;
            values.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
        out.push((
            name,
            StateTensor {
                shape: t.shape,
                values,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-assembled legacy file: one 2 × 3 tensor stored transposed (strides 1, 2) and one
    /// LongStorage scalar that is skipped.
    fn file() -> Vec<u8> {
        let mut b = Vec::new();
        let magic = MAGIC.to_le_bytes();
        b.extend([0x80, 2, 0x8a, 10]);
        b.extend(&magic);
        b.extend([0x50, 0x19]); // the 80-bit magic's top two bytes
        b.push(b'.');
        b.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
        b.extend([0x80, 2, b'}', b'.']);
        // {"w": _rebuild_tensor_v2(pid("storage", FloatStorage, "k1", "cpu", 6), 0, (2, 3), (1, 2), False, {}), "n": ... LongStorage}
        b.extend([0x80, 2, b'}', b'(']);
        let tensor =
            |b: &mut Vec<u8>, name: &str, class: &str, key: &str, size: &[u8], stride: &[u8]| {
                b.push(0x8c);
                b.push(name.len() as u8);
                b.extend(name.as_bytes());
                b.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
                b.extend(b"(X\x07\x00\x00\x00storage");
                b.extend(format!("ctorch\n{class}\n").as_bytes());
                b.push(0x8c);
                b.push(key.len() as u8);
                b.extend(key.as_bytes());
                b.extend(b"X\x03\x00\x00\x00cpuK\x06tQK\x00(");
                for s in size {
                    b.extend([b'K', *s]);
                }
                b.extend(b"t(");
                for s in stride {
                    b.extend([b'K', *s]);
                }
                b.extend(b"t\x89}tR");
            };
        tensor(&mut b, "w", "FloatStorage", "k1", &[2, 3], &[1, 2]);
        tensor(&mut b, "n", "LongStorage", "k2", &[], &[]);
        b.extend([b'u', b'.']);
        b.extend([
            0x80, 2, b']', b'(', 0x8c, 2, b'k', b'1', 0x8c, 2, b'k', b'2', b'e', b'.',
        ]);
        b.extend(6i64.to_le_bytes());
        for v in [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0] {
            b.extend(v.to_le_bytes());
        }
        b.extend(6i64.to_le_bytes());
        b.extend([0u8; 48]);
        b
    }

    #[test]
    fn reads_strided_tensors_and_skips_other_dtypes() {
        let t = parse(&file()).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "w");
        assert_eq!(t[0].1.shape, vec![2, 3]);
        assert_eq!(t[0].1.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        let f = file();
        assert!(parse(&f[..f.len() - 10]).unwrap_err().contains("truncated"));
        assert!(parse(b"PK\x03\x04 zip").is_err());
        assert!(parse(&f[..40]).is_err());
    }
}
