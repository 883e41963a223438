//! Distillation building blocks. So far: teacher-feature standardisation (PHI-S and its
//! baselines) and the Hadamard matrices it needs; the training engine that uses them comes with
//! issue 17.

pub mod hadamard;
pub mod normalizer;

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
