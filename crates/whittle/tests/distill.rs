//! Distillation's up-front checks on real tokenizers: the default model against itself, and
//! against a tokenizer that differs in one token or in size.

mod common;

use whittle::distill::check_same_tokenizer;
use whittle::io::tokenizer::Tokenizer;

#[test]
fn teacher_and_student_must_share_the_tokenizer() {
    let real = common::load_default().tokenizer;
    let same = Tokenizer::from_spec(&real.spec().unwrap()).unwrap();
    check_same_tokenizer(&real, &same).unwrap();
    let tiny = Tokenizer::from_spec(&common::tiny_tokenizer_spec()).unwrap();
    let err = check_same_tokenizer(&real, &tiny).unwrap_err().to_string();
    assert!(err.contains("49152 tokens against 260"), "{err}");
    // A control token renamed (no merge uses it, so the tokenizer still builds).
    let mut spec = real.spec().unwrap();
    let id = real.token_to_id("<|im_end|>").unwrap() as usize;
    spec.tokens[id] = "<|renamed|>".into();
    let other = Tokenizer::from_spec(&spec).unwrap();
    let err = check_same_tokenizer(&real, &other).unwrap_err().to_string();
    assert!(
        err.contains(&format!("at id {id}")) && err.contains("<|renamed|>"),
        "{err}"
    );
}
