//! Distillation building blocks. So far: teacher-feature standardisation (PHI-S and its
//! baselines) and the Hadamard matrices it needs, feature losses and the layer map for students
//! with fewer layers, and the up-front tokenizer check; the objectives (logit KD) are in
//! `train::objective`, and the engine that trains a loaded model with them comes with issue 17.

pub mod features;
pub mod hadamard;
pub mod normalizer;
pub mod topk;

use crate::io::tokenizer::Tokenizer;
use crate::{Error, Result};

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
