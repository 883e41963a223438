//! Mutation fuzzing of every reader of files that come from strangers, on stable Rust: real seed
//! files are mutated with a seeded RNG (byte flips, truncation at structural boundaries, length
//! and count fields inflated to 2³²−1 / 2⁶³, safetensors offsets past the end or overlapping,
//! wrong dtypes and shapes, duplicated keys, deep nesting, huge strings), and every case must end
//! in `Ok` or a typed error: no panic, no abort, no hang, and no single allocation larger than
//! the input justifies (a global allocator below watches every request).
//!
//! Cases per format: `WHITTLE_FUZZ_CASES` (default 3000; `benches/fuzz.sh` runs 100,000);
//! `WHITTLE_FUZZ_FORMAT=name` runs one format. One case replays with
//! `WHITTLE_FUZZ_CASE=format:index`.

mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use whittle::io::gguf;

// ---------------------------------------------------------------------------------------------
// The allocation watch: while a case runs, any single request above `LIMIT` is recorded (and
// refused outright above 16 GiB, where it could only end in an abort).

struct Watch;

static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
const REFUSE: usize = 16 << 30;

/// Set when replaying one case: a violation then prints where it was requested.
static TRACE: AtomicBool = AtomicBool::new(false);

fn note(size: usize) -> bool {
    if size > LIMIT.load(Relaxed) {
        LARGEST.fetch_max(size, Relaxed);
        if TRACE.swap(false, Relaxed) {
            eprintln!(
                "allocation of {size} bytes:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
        }
    }
    if size > REFUSE {
        let case = CURRENT.try_lock().map(|c| c.clone()).unwrap_or_default();
        eprintln!("fuzz: case {case} requests {size} bytes at once; the process will abort");
    }
    size <= REFUSE
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if note(l.size()) {
            System.alloc(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if note(l.size()) {
            System.alloc_zeroed(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if note(new) {
            System.realloc(p, l, new)
        } else {
            std::ptr::null_mut()
        }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// Any single allocation over this is a finding, whatever the input: the readers' inputs here
/// are at most a few MB, so nothing they hold legitimately needs more.
const ALLOCATION_LIMIT: usize = 256 << 20;
/// A case running longer than this is a hang (the watchdog aborts with the case's name).
const CASE_SECONDS: u64 = 20;

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Values that break length, count and offset fields.
const INTERESTING: [u64; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 63,
];

/// How a file is mutated beyond byte-level changes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Binary,
    Json,
    Text,
    Safetensors,
}

/// Offsets where a little-endian u32/u64 holds a small positive number: lengths, counts,
/// dimensions and offsets in a binary header.
fn field_offsets(b: &[u8], header: usize) -> Vec<usize> {
    let end = header.min(b.len()).saturating_sub(8);
    (0..end)
        .filter(|&i| {
            let v = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            v > 0 && v < (b.len() as u64).max(1 << 16) * 4
        })
        .collect()
}

fn byte_mutation(rng: &mut SmallRng, b: &mut Vec<u8>, header: usize) {
    if b.is_empty() {
        b.push(rng.random());
        return;
    }
    let region = if rng.random_bool(0.7) {
        header.min(b.len())
    } else {
        b.len()
    };
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..=8) {
                let i = rng.random_range(0..region.max(1));
                b[i] = rng.random();
            }
        }
        1 => {
            // Truncation at a structural boundary (a field start) or anywhere.
            let fields = field_offsets(b, header);
            let at = if !fields.is_empty() && rng.random_bool(0.6) {
                fields[rng.random_range(0..fields.len())] + rng.random_range(0..4)
            } else {
                rng.random_range(0..b.len())
            };
            b.truncate(at.min(b.len()));
        }
        2 | 3 => {
            // Inflate a length/count/offset field.
            let fields = field_offsets(b, header);
            if fields.is_empty() {
                return;
            }
            let i = fields[rng.random_range(0..fields.len())];
            let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
            let v = if rng.random_bool(0.2) {
                v.wrapping_sub(1)
            } else {
                v
            };
            if rng.random_bool(0.5) {
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            } else {
                b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        }
        _ => {
            // Splice: repeat or drop a run of bytes.
            let i = rng.random_range(0..region.max(1));
            let n = rng.random_range(1..=64).min(b.len() - i);
            if rng.random_bool(0.5) {
                let run = b[i..i + n].to_vec();
                b.splice(i..i, run);
            } else {
                b.drain(i..i + n);
            }
        }
    }
}

/// A random node of a JSON value, for structure-aware changes.
fn random_node<'a>(rng: &mut SmallRng, v: &'a mut serde_json::Value) -> &'a mut serde_json::Value {
    let mut cur = v;
    loop {
        let n = match &*cur {
            serde_json::Value::Object(m) => m.len(),
            serde_json::Value::Array(a) => a.len(),
            _ => 0,
        };
        if n == 0 || rng.random_bool(0.3) {
            return cur;
        }
        let i = rng.random_range(0..n);
        cur = match cur {
            serde_json::Value::Object(m) => m.values_mut().nth(i).unwrap(),
            serde_json::Value::Array(a) => &mut a[i],
            _ => unreachable!(),
        };
    }
}

fn json_mutation(rng: &mut SmallRng, text: &[u8]) -> Vec<u8> {
    use serde_json::{json, Value};
    let Ok(mut v) = serde_json::from_slice::<Value>(text) else {
        return text.to_vec();
    };
    match rng.random_range(0..7) {
        0 => {
            let node = random_node(rng, &mut v);
            *node = match rng.random_range(0..8) {
                0 => json!(null),
                1 => json!(-1),
                2 => json!(1u64 << 63),
                3 => json!(u64::MAX),
                4 => json!(1e308),
                5 => json!("x"),
                6 => json!([]),
                _ => json!({}),
            };
        }
        1 => {
            // A huge string (1 MB) somewhere.
            let node = random_node(rng, &mut v);
            *node = Value::String("A".repeat(1 << 20));
        }
        2 => {
            // Deep nesting: 100,000 brackets around a node.
            let depth = 100_000;
            let inner = serde_json::to_string(random_node(rng, &mut v)).unwrap();
            let mut s = "[".repeat(depth);
            s += &inner;
            s += &"]".repeat(depth);
            return splice_json(&v, &inner, &s);
        }
        3 => {
            // A duplicated key: the first member of an object appears twice.
            let s = serde_json::to_string(&v).unwrap();
            if let Some(i) = s.find("{\"") {
                let member_end = s[i..].find(',').map(|e| i + e);
                if let Some(e) = member_end {
                    let member = s[i + 1..e].to_string();
                    return format!("{}{},{}", &s[..=i], member, &s[i + 1..]).into_bytes();
                }
            }
        }
        4 => {
            // A number node made huge, negative or fractional.
            let node = random_node(rng, &mut v);
            if node.is_number() {
                let k = [1u64 << 32, 1 << 40, 1 << 62][rng.random_range(0..3)];
                *node = json!(k);
            } else if node.is_string() {
                *node = json!(rng.random_range(-2i64..1 << 40));
            }
        }
        5 => {
            // Drop a member or element.
            if let Value::Object(m) = random_node(rng, &mut v) {
                if let Some(k) = m.keys().next().cloned() {
                    m.remove(&k);
                }
            }
        }
        _ => {
            // A long array in place of a node.
            let node = random_node(rng, &mut v);
            *node = Value::Array(vec![json!(1); 100_000]);
        }
    }
    serde_json::to_vec(&v).unwrap()
}

/// `v` serialised with the first occurrence of `inner` replaced by `with`.
fn splice_json(v: &serde_json::Value, inner: &str, with: &str) -> Vec<u8> {
    serde_json::to_string(v)
        .unwrap()
        .replacen(inner, with, 1)
        .into_bytes()
}

fn text_mutation(rng: &mut SmallRng, text: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(text).into_owned();
    let lines: Vec<&str> = s.lines().collect();
    if lines.is_empty() {
        return text.to_vec();
    }
    let i = rng.random_range(0..lines.len());
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match rng.random_range(0..5) {
        0 => out.insert(i, lines[i].to_string()), // duplicated key or table
        1 => out.truncate(i),                     // truncated at a line boundary
        2 => {
            // Numbers made huge or negative.
            let n =
                ["18446744073709551615", "-1", "4294967296", "1e400", "0"][rng.random_range(0..5)];
            out[i] = lines[i]
                .split(|c: char| c.is_ascii_digit())
                .collect::<Vec<_>>()
                .join(n);
        }
        3 => out.insert(
            i,
            format!("deep = {}1{}", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        _ => out.insert(i, format!("s = \"{}\"", "A".repeat(1 << 20))),
    }
    out.join("\n").into_bytes()
}

/// A safetensors file with its JSON header mutated: offsets past the end or overlapping,
/// wrong dtypes and shapes, then re-framed with a correct header length.
fn safetensors_mutation(rng: &mut SmallRng, b: &[u8]) -> Vec<u8> {
    use serde_json::{json, Value};
    if b.len() < 8 {
        return b.to_vec();
    }
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let Some(header) = b.get(8..8 + n) else {
        return b.to_vec();
    };
    let Ok(Value::Object(mut h)) = serde_json::from_slice::<Value>(header) else {
        return b.to_vec();
    };
    let data = &b[8 + n..];
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return b.to_vec();
    }
    let name = &names[rng.random_range(0..names.len())];
    let t = &mut h[name];
    match rng.random_range(0..5) {
        0 => t["data_offsets"] = json!([0, data.len() as u64 + rng.random_range(1..1u64 << 40)]),
        1 => {
            // Overlap another tensor's bytes.
            let other = &names[rng.random_range(0..names.len())];
            let offsets = h[other]["data_offsets"].clone();
            h[name]["data_offsets"] = offsets;
        }
        2 => {
            let d = [
                "U8", "F64", "I64", "BOOL", "F8_E4M3", "BOGUS", "F16", "BF16",
            ];
            t["dtype"] = json!(d[rng.random_range(0..d.len())]);
        }
        3 => {
            let s = [
                json!([1u64 << 40, 1u64 << 40]),
                json!([]),
                json!([0]),
                json!([3, 5, 7, 9, 11]),
            ];
            t["shape"] = s[rng.random_range(0..s.len())].clone();
        }
        _ => {
            h.insert(
                "__metadata__".into(),
                json!({"x.qweight": "{\"bits\": 99, \"group_size\": 0}"}),
            );
        }
    }
    let header = serde_json::to_vec(&Value::Object(h)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend_from_slice(data);
    out
}

fn mutate(rng: &mut SmallRng, seed: &[u8], kind: Kind, header: usize) -> Vec<u8> {
    let mut b = match kind {
        Kind::Json if rng.random_bool(0.6) => json_mutation(rng, seed),
        Kind::Text if rng.random_bool(0.6) => text_mutation(rng, seed),
        Kind::Safetensors if rng.random_bool(0.5) => safetensors_mutation(rng, seed),
        _ => seed.to_vec(),
    };
    // Stacked byte-level changes, sometimes none.
    for _ in 0..rng.random_range(0..=2) {
        byte_mutation(rng, &mut b, header);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Formats: seed files, the file a case replaces, and the reader it must not break.

type Reader = Box<dyn Fn(&Path) -> whittle::Result<()>>;

struct Format {
    name: &'static str,
    /// Folder holding the companion files; the mutated file is written into it.
    dir: PathBuf,
    file: &'static str,
    seeds: Vec<Vec<u8>>,
    kind: Kind,
    /// Bytes at the start of a seed that hold its structure (mutated more often).
    header: usize,
    read: Reader,
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A GGUF with the default model's real metadata (its tokenizer trimmed to 512 tokens and 256
/// merges to keep cases fast) and tensors of a tiny model.
fn real_header_gguf(work: &Path) -> Vec<u8> {
    use candle_core::quantized::gguf_file::{Content, Value};
    let path = whittle::io::fetch::default_model().unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let trim = |v: &Value, n: usize| match v {
        Value::Array(a) => Value::Array(a.iter().take(n).cloned().collect()),
        other => other.clone(),
    };
    let mut meta: Vec<(String, Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| {
            let v = match k.as_str() {
                "tokenizer.ggml.tokens" | "tokenizer.ggml.token_type" => trim(v, 512),
                "tokenizer.ggml.merges" => trim(v, 256),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    let tiny = work.join("tiny.gguf");
    whittle::io::gguf::save(&common::tiny_model(1), None, gguf::GgufType::Q8_0, &tiny).unwrap();
    let mut t = std::fs::File::open(&tiny).unwrap();
    let tc = Content::read(&mut t).unwrap();
    // The tiny tensors' shapes, so that the real metadata loads all the way.
    meta.retain(|(k, _)| !k.starts_with("llama."));
    meta.extend(
        tc.metadata
            .iter()
            .filter(|(k, _)| k.starts_with("llama."))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = tc
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                tc.tensor(&mut t, n, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut out, &m, &ts).unwrap();
    out.into_inner()
}

fn formats(work: &Path) -> Vec<Format> {
    let mut fs = Vec::new();
    let tok = whittle::io::tokenizer::Tokenizer::from_spec(&common::tiny_tokenizer_spec()).unwrap();

    // GGUF: tiny exports (every load path: packed Q8_0/Q4_1, f32, tokenizer metadata) and the
    // real model's metadata.
    let dir = work.join("gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seeds = Vec::new();
    for (i, dtype) in [
        gguf::GgufType::Q8_0,
        gguf::GgufType::Q4_1,
        gguf::GgufType::F32,
    ]
    .into_iter()
    .enumerate()
    {
        let p = work.join(format!("seed{i}.gguf"));
        let mut m = common::tiny_model(i as u64);
        m.provenance
            .record_run("[[stage]]\nkind = \"sparsify\"\n".into(), vec![]);
        gguf::save(&m, Some(&common::tiny_tokenizer_spec()), dtype, &p).unwrap();
        seeds.push(std::fs::read(&p).unwrap());
    }
    seeds.push(real_header_gguf(work));
    fs.push(Format {
        name: "gguf",
        dir,
        file: "model.gguf",
        seeds,
        kind: Kind::Binary,
        header: 16 << 10,
        read: Box::new(|d| {
            let (model, f) = gguf::load(&d.join("model.gguf"))?;
            let t = whittle::io::tokenizer::Tokenizer::from_spec(&f.tokenizer_spec()?)?;
            let ids = t.encode("Hello, world 123")?;
            let ids: Vec<u32> = ids
                .into_iter()
                .filter(|&i| (i as usize) < model.config.vocab_size)
                .collect();
            if !ids.is_empty() {
                let n = ids.len().min(8);
                model.forward(&ids[..n], None, whittle::model::Logits::Last, None)?;
            }
            Ok(())
        }),
    });

    // safetensors weights of an HF folder (Llama f32, Llama packed, Hymba fixture).
    let llama = work.join("st-llama");
    whittle::io::safetensors::save(&common::tiny_model(5), Some(&tok), false, &llama).unwrap();
    let packed = work.join("st-packed");
    let mut q = common::tiny_model(6);
    whittle::quant::quantize_model(
        &mut q,
        &[],
        whittle::quant::QuantMethod::parse("rtn", false).unwrap(),
        whittle::quant::QuantConfig {
            bits: 4,
            group: 32,
            sym: false,
        },
        // down_proj's 48 inputs are not whole blocks of 32.
        &["q_proj".into(), "gate_proj".into(), "up_proj".into()],
        &mut |_, _| {},
    )
    .unwrap();
    whittle::io::safetensors::save(&q, Some(&tok), true, &packed).unwrap();
    let hymba = common::hymba_fixture();
    let weights = [
        ("safetensors", &llama),
        ("safetensors-packed", &packed),
        ("safetensors-hymba", &hymba),
    ];
    for (name, src) in weights {
        let dir = work.join(name);
        copy_dir(src, &dir);
        fs.push(Format {
            name,
            seeds: vec![std::fs::read(dir.join("model.safetensors")).unwrap()],
            dir,
            file: "model.safetensors",
            kind: Kind::Safetensors,
            header: 4 << 10,
            read: Box::new(|d| whittle::io::safetensors::load(d).map(|_| ())),
        });
    }
    for (name, src) in [("config-llama", &llama), ("config-hymba", &hymba)] {
        let dir = work.join(name);
        copy_dir(src, &dir);
        fs.push(Format {
            name,
            seeds: vec![std::fs::read(dir.join("config.json")).unwrap()],
            dir,
            file: "config.json",
            kind: Kind::Json,
            header: 4 << 10,
            read: Box::new(|d| whittle::io::safetensors::load(d).map(|_| ())),
        });
    }

    // tokenizer.json (the tiny byte-level one) and provenance files.
    let dir = work.join("tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    fs.push(Format {
        name: "tokenizer.json",
        seeds: vec![tok.json().as_bytes().to_vec()],
        dir,
        file: "tokenizer.json",
        kind: Kind::Json,
        header: 4 << 10,
        read: Box::new(|d| {
            let t = whittle::io::tokenizer::Tokenizer::from_file(&d.join("tokenizer.json"))?;
            let ids = t.encode("Hello, world 123 <s>")?;
            t.decode(&ids).map(|_| ())
        }),
    });
    let dir = work.join("provenance");
    let mut m = common::tiny_model(7);
    m.provenance.set_source("org/base");
    m.provenance
        .record_run("[[stage]]\nkind = \"quantize\"\n".into(), vec![]);
    whittle::io::safetensors::save(&m, Some(&tok), false, &dir).unwrap();
    fs.push(Format {
        name: "whittle.json",
        seeds: vec![std::fs::read(dir.join("whittle.json")).unwrap()],
        dir: dir.clone(),
        file: "whittle.json",
        kind: Kind::Json,
        header: 4 << 10,
        read: Box::new(|d| whittle::io::model_card::read(d).map(|_| ())),
    });
    let card_dir = work.join("card");
    copy_dir(&dir, &card_dir);
    std::fs::remove_file(card_dir.join("whittle.json")).unwrap();
    fs.push(Format {
        name: "model card",
        seeds: vec![std::fs::read(dir.join("README.md")).unwrap()],
        dir: card_dir,
        file: "README.md",
        kind: Kind::Text,
        header: 4 << 10,
        read: Box::new(|d| whittle::io::model_card::read(d).map(|_| ())),
    });

    // Recipes.
    let dir = work.join("recipe");
    std::fs::create_dir_all(&dir).unwrap();
    let recipe = "[calib]\nsamples = 8\nlen = 64\n\n[[stage]]\nkind = \"sparsify\"\nmethod = \"sparsegpt\"\npattern = \"2:4\"\n\n[[stage]]\nkind = \"quantize\"\nmethod = \"gptq\"\nbits = 4\ngroup_size = 128\ntargets = [\"q_proj\"]\n\n[[stage]]\nkind = \"compensate\"\nmethod = \"eora\"\nrank = 64\n";
    fs.push(Format {
        name: "recipe",
        seeds: vec![recipe.as_bytes().to_vec()],
        dir,
        file: "recipe.toml",
        kind: Kind::Text,
        header: 4 << 10,
        read: Box::new(|d| whittle::recipe::Recipe::from_file(&d.join("recipe.toml")).map(|_| ())),
    });

    // Training checkpoints: state.json and the parameters with their optimizer moments.
    use whittle::train::trainer::{Start, Teacher, TokenData, Trainer};
    let start = || Start::Preset {
        vocab: common::VOCAB,
    };
    let mut t = Trainer::new(
        checkpoint_config(),
        start(),
        Teacher::None,
        &TokenData::default(),
    )
    .unwrap();
    for (name, file, kind) in [
        ("checkpoint state.json", "state.json", Kind::Json),
        ("checkpoint params", "params.safetensors", Kind::Safetensors),
    ] {
        let run = work.join(name.replace(' ', "-"));
        t.save(&run).unwrap();
        let dir = run.join("checkpoint");
        fs.push(Format {
            name,
            seeds: vec![std::fs::read(dir.join(file)).unwrap()],
            dir,
            file,
            kind,
            header: 4 << 10,
            read: Box::new(move |d| {
                let run = d.parent().unwrap();
                Trainer::resume(run, start(), Teacher::None, &TokenData::default()).map(|_| ())
            }),
        });
    }

    fs
}

fn checkpoint_config() -> whittle::train::trainer::TrainConfig {
    use whittle::train::{presets::Preset, presets::Size, trainer::TrainConfig};
    TrainConfig {
        preset: Some(Preset {
            arch: whittle::model::Arch::Llama,
            size: Size::Tiny,
            meta_tokens: false,
            kv_sharing: false,
        }),
        steps: 4,
        batch: 2,
        seq_len: 16,
        accum: 1,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup: 1,
        clip: 1.0,
        adamw: Default::default(),
        eval_every: 0,
        eval_tokens: 32,
        ckpt_every: 0,
        seed: 1,
        bf16: false,
        precision: Default::default(),
        objective: "ce".into(),
        groups: Default::default(),
        head_windows: 0,
        maskllm: None,
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

static CASE_START_MS: AtomicU64 = AtomicU64::new(0);
static RUNNING: AtomicBool = AtomicBool::new(false);
static CURRENT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

/// Aborts the process, naming the case, when one runs past [`CASE_SECONDS`].
fn watchdog(t0: Instant) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if RUNNING.load(Relaxed)
            && now_ms(t0).saturating_sub(CASE_START_MS.load(Relaxed)) > CASE_SECONDS * 1000
        {
            let case = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
            eprintln!("fuzz: case {case} ran past {CASE_SECONDS} s (a hang)");
            std::process::abort();
        }
    });
}

fn case_rng(format: &str, i: usize) -> SmallRng {
    let h = format.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    SmallRng::seed_from_u64(h ^ (i as u64).wrapping_mul(0x9e3779b97f4a7c15))
}

#[test]
fn readers_survive_mutated_files() {
    let cases: usize = std::env::var("WHITTLE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let only = std::env::var("WHITTLE_FUZZ_CASE").ok();
    let format_filter = std::env::var("WHITTLE_FUZZ_FORMAT").ok();
    TRACE.store(only.is_some(), Relaxed);
    let work = tempfile::tempdir().unwrap();
    // One worker thread: thread-local buffers (GEMM packing pages) are created by the warm-up
    // below, not counted against the first case that happens to run on a new thread.
    whittle::threads::set_threads(1);
    let formats = formats(work.path());
    for f in &formats {
        for (i, seed) in f.seeds.iter().enumerate() {
            write(&f.dir, f.file, seed);
            if let Err(e) = (f.read)(&f.dir) {
                panic!("{} seed {i} does not read unmutated: {e}", f.name);
            }
        }
    }
    let t0 = Instant::now();
    watchdog(t0);
    // Panics are findings, reported below; keep their default output off the log.
    if only.is_none() {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let mut findings: Vec<String> = Vec::new();
    for f in &formats {
        let (mut ok, mut errors) = (0usize, 0usize);
        let start = Instant::now();
        let range: Vec<usize> = match &only {
            Some(c) => match c.split_once(':') {
                Some((name, i)) if name == f.name => vec![i.parse().unwrap()],
                _ => continue,
            },
            None if format_filter.as_ref().is_some_and(|only| only != f.name) => continue,
            None => (0..cases).collect(),
        };
        for i in range {
            let mut rng = case_rng(f.name, i);
            let seed = &f.seeds[rng.random_range(0..f.seeds.len())];
            let bytes = mutate(&mut rng, seed, f.kind, f.header);
            write(&f.dir, f.file, &bytes);
            *CURRENT.lock().unwrap() = format!("{}:{i}", f.name);
            LARGEST.store(0, Relaxed);
            CASE_START_MS.store(now_ms(t0), Relaxed);
            RUNNING.store(true, Relaxed);
            LIMIT.store(ALLOCATION_LIMIT, Relaxed);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (f.read)(&f.dir)));
            LIMIT.store(usize::MAX, Relaxed);
            RUNNING.store(false, Relaxed);
            let largest = LARGEST.load(Relaxed);
            match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    errors += 1;
                    if only.is_some() {
                        eprintln!("{}:{i}: {e}", f.name);
                    }
                }
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    findings.push(format!("{}:{i}: panic: {msg}", f.name));
                }
            }
            if largest > 0 {
                findings.push(format!("{}:{i}: allocated {largest} bytes at once", f.name));
            }
        }
        eprintln!(
            "fuzz {:<22} {:>7} cases: {ok} read, {errors} rejected with an error, {:.1} s",
            f.name,
            ok + errors,
            start.elapsed().as_secs_f64()
        );
    }
    if only.is_none() {
        let _ = std::panic::take_hook();
    }
    assert!(
        findings.is_empty(),
        "{} findings (replay one with WHITTLE_FUZZ_CASE=format:index):\n{}",
        findings.len(),
        findings
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
