//! Shared fixtures for integration tests: a tiny random Llama and a byte-level tokenizer for it.
#![allow(dead_code)]

use whittle::io::tokenizer::TokenizerSpec;
use whittle::model::{random::random_model, AttnShape, LayerShape, Logits, ModelConfig};
use whittle::Model;

pub const VOCAB: usize = 260;

pub fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        arch: whittle::model::Arch::Llama,
        vocab_size: VOCAB,
        hidden: 32,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        context_length: 64,
        tie_embeddings: tied,
        bos_token_id: Some(256),
        eos_token_id: Some(257),
        memory_tokens: 0,
        window_rule: Default::default(),
        kv_cache: Default::default(),
    }
}

pub fn uniform_shapes(n: usize) -> Vec<LayerShape> {
    vec![
        LayerShape {
            attn: Some(AttnShape::new(4, 2, 8)),
            ssm: None,
            mlp: Some(48),
        };
        n
    ]
}

pub fn tiny_model(seed: u64) -> Model {
    random_model(tiny_config(true), &uniform_shapes(3), seed).unwrap()
}

/// GPT-2's byte → printable character map (what byte-level BPE vocabularies are written in).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        } else {
            chars[b as usize] = char::from_u32(b).unwrap();
        }
    }
    chars
}

/// A byte-level tokenizer: one token per byte, ids 256.. are control tokens.
pub fn tiny_tokenizer_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.extend(["<s>", "</s>", "<|im_start|>", "<|im_end|>"].map(String::from));
    TokenizerSpec {
        tokens,
        merges: vec![],
        special: vec![256, 257, 258, 259],
        split_digits: true,
        chat_template: Some(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
        ),
        bos: Some(256),
        eos: Some(257),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The shared read-only material: `../shared` from the project root, or `$WHITTLE_SHARED`.
pub fn shared() -> std::path::PathBuf {
    std::env::var_os("WHITTLE_SHARED").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
        std::path::PathBuf::from,
    )
}

pub fn reference(name: &str) -> std::path::PathBuf {
    shared().join("reference").join(name)
}

/// The default model (fetched on first use) and its tokenizer, freshly loaded.
pub fn load_default() -> whittle::io::resolve::Loaded {
    let path = whittle::io::fetch::default_model().expect("fetch the default model");
    whittle::io::resolve::load(&path).expect("load the default model")
}

/// Token ids of `wikitext2-{split}.txt`.
pub fn split_ids(tok: &whittle::io::tokenizer::Tokenizer, split: &str) -> Vec<u32> {
    let text =
        whittle::data::text::read_text(&reference(&format!("wikitext2-{split}.txt"))).unwrap();
    tok.encode(&text).unwrap()
}

/// A tiny random Mamba model (SSM-only mixers; `mlp` adds an MLP to each of the `layers`).
pub fn tiny_mamba(layers: usize, inner: usize, mlp: Option<usize>, seed: u64) -> Model {
    use whittle::model::{Arch, SsmShape};
    let config = ModelConfig {
        arch: Arch::Mamba,
        ..tiny_config(true)
    };
    let ssm = SsmShape {
        inner,
        d_state: 8,
        d_conv: 4,
        dt_rank: 3,
    };
    let shape = LayerShape {
        attn: None,
        ssm: Some(ssm),
        mlp,
    };
    random_model(config, &vec![shape; layers], seed).unwrap()
}

/// The Hymba parity fixture's folder and its model.
pub fn hymba_fixture() -> std::path::PathBuf {
    shared().join("fixtures/hymba-tiny")
}

pub fn hymba_tiny() -> Model {
    whittle::io::safetensors::load(&hymba_fixture()).unwrap()
}

/// Token ids in [0, 200) from a seeded LCG: training and held-out text for tiny models.
pub fn stream(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 200) as u32
        })
        .collect()
}

/// Mean KL(teacher ‖ student) over positions of held-out windows (inference forward, f64).
pub fn kl(t: &Model, s: &Model) -> f64 {
    let v = t.config.vocab_size;
    let ids = stream(64, 99);
    let (a, b) = (
        t.forward(&ids, None, Logits::All, None).unwrap(),
        s.forward(&ids, None, Logits::All, None).unwrap(),
    );
    let soft = |z: &[f32]| {
        let m = z.iter().fold(f64::MIN, |a, b| a.max(*b as f64));
        let e: Vec<f64> = z.iter().map(|x| (*x as f64 - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|x| x / sum).collect::<Vec<_>>()
    };
    a.chunks(v)
        .zip(b.chunks(v))
        .map(|(x, y)| {
            let (p, q) = (soft(x), soft(y));
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>()
        })
        .sum::<f64>()
        / 64.0
}

/// Training and validation token streams for tiny-model training runs.
pub fn token_data() -> whittle::train::trainer::TokenData {
    whittle::train::trainer::TokenData {
        train: stream(3000, 1),
        valid: stream(400, 2),
    }
}
