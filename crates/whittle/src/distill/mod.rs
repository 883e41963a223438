//! Distillation: teacher-feature standardisation (PHI-S and its baselines) and the Hadamard
//! matrices it needs, feature heads (normaliser + learned projection per distilled layer) and
//! the layer map for students with fewer layers, their fidelity in the teacher's space, the
//! sparse teacher (top-k logits) and its memory-mapped cache, and the up-front tokenizer check.
//! The objectives are values of `train::objective`; the engine that trains any model with them
//! is `train::trainer`.

pub mod cache;
pub mod features;
pub mod fidelity;
pub mod hadamard;
pub mod heads;
pub mod normalizer;
pub mod topk;

use crate::io::tokenizer::Tokenizer;
use crate::{Error, Result};

/// FNV-1a of every token string in id order: two tokenizers with the same hash read text the
/// same way (what a teacher cache records of its tokenizer).
pub fn tokenizer_hash(tok: &Tokenizer) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for id in 0..tok.vocab_size() as u32 {
        let s = tok.id_to_token(id).unwrap_or_default();
        for b in s.bytes().chain([0xff]) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Fails unless the teacher and the student read text the same way: logit distillation compares
/// distributions over token ids, which means nothing if an id names different text in each.
/// Checked up front (every id's token string), so a mismatch is an error before any training.
pub fn check_same_tokenizer(teacher: &Tokenizer, student: &Tokenizer) -> Result<()> {
    let (nt, ns) = (teacher.vocab_size(), student.vocab_size());
    if nt != ns {
        return Err(Error::Invalid(format!(
            "teacher and student tokenizers differ: {nt} tokens against {ns}; distillation \
             needs the same tokenizer"
        )));
    }
    for id in 0..nt as u32 {
        let (a, b) = (teacher.id_to_token(id), student.id_to_token(id));
        if a != b {
            return Err(Error::Invalid(format!(
                "teacher and student tokenizers differ at id {id}: {a:?} against {b:?}; \
                 distillation needs the same tokenizer"
            )));
        }
    }
    Ok(())
}
