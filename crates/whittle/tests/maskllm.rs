//! MaskLLM on tiny random models: learned 2:4 masks beat the one-shot prior they start from,
//! the written mask is exactly 2:4 on the frozen (or trained) weights, runs resume exactly, and
//! mask files round-trip and refuse models they do not fit.

mod common;

use whittle::model::random::random_model;
use whittle::sparsity::maskllm::{self, LearnedMask, MaskLlmConfig};
use whittle::sparsity::SparsityMethod;
use whittle::train::groups::{Groups, KeepZeros};
use whittle::train::optim::AdamWConfig;
use whittle::train::trainer::{Start, Teacher, TrainConfig, Trainer};
use whittle::Model;

/// The dense model the masks are learned on (and the distillation teacher).
fn dense() -> Model {
    let mut m = random_model(common::tiny_config(false), &common::uniform_shapes(2), 7).unwrap();
    m.final_norm.iter_mut().for_each(|v| *v *= 2.0);
    m
}

/// Weights frozen, logits at 10× a learning rate suited to the tiny model.
fn config(steps: u64, update_weights: bool) -> TrainConfig {
    TrainConfig {
        preset: None,
        steps,
        batch: 2,
        seq_len: 16,
        accum: 2,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup: 2,
        clip: 1.0,
        adamw: AdamWConfig::default(),
        eval_every: 0,
        eval_tokens: 64,
        ckpt_every: 0,
        seed: 5,
        bf16: false,
        precision: Default::default(),
        objective: "kd".into(),
        groups: Groups {
            freeze: if update_weights {
                vec![]
            } else {
                vec!["*".into()]
            },
            lr_scale: vec![("*.mask_logits".into(), 10.0)],
            keep_zeros: KeepZeros::Off,
            ..Default::default()
        },
        head_windows: 0,
        maskllm: Some(MaskLlmConfig::default()),
    }
}

fn magnitude_prior(m: &Model) -> LearnedMask {
    maskllm::one_shot_prior(
        m,
        &MaskLlmConfig::default(),
        SparsityMethod::Magnitude,
        &[],
        &mut |_, _| {},
    )
    .unwrap()
}

fn masked(m: &Model, mask: &LearnedMask) -> Model {
    let mut m = m.clone();
    mask.apply(&mut m).unwrap();
    m
}

/// Every group of four inputs of every linear keeps exactly two nonzero weights.
fn exactly_two_four(m: &Model) -> bool {
    m.layers
        .iter()
        .flat_map(|l| l.linears())
        .all(|(_, _, lin)| {
            lin.dense_weight()
                .chunks(4)
                .all(|g| g.iter().filter(|v| **v != 0.0).count() == 2)
        })
}

fn learn(steps: u64, update_weights: bool) -> Trainer {
    let d = common::token_data();
    let mut t = Trainer::new(
        config(steps, update_weights),
        Start::Model(Box::new(dense())),
        Teacher::Live(Box::new(dense())),
        &d,
    )
    .unwrap();
    t.set_prior(&magnitude_prior(&dense()), 3.0).unwrap();
    t.run(&d, None, None, None, &mut |_| {}).unwrap();
    t
}

#[test]
fn learned_masks_beat_their_magnitude_prior_on_frozen_weights() {
    let prior = magnitude_prior(&dense());
    let one_shot = common::kl(&dense(), &masked(&dense(), &prior));
    let t = learn(60, false);
    let mask = t.learned_mask().unwrap().unwrap();
    let learned = masked(&dense(), &mask);
    let after = common::kl(&dense(), &learned);
    assert!(
        after < 0.8 * one_shot,
        "KL to dense: magnitude {one_shot}, MaskLLM {after}"
    );
    assert!(exactly_two_four(&learned));
    // The weights stayed the dense ones; the log carries the regulariser's ‖W ⊙ M‖².
    assert_eq!(t.model.fingerprint(), dense().fingerprint());
    let l2 = &t.log[0].parts.last().unwrap();
    assert!(l2.0 == "mask_l2" && l2.1 > 0.0, "{l2:?}");
    // Most groups moved away from the prior.
    let changed: usize = mask
        .linears
        .iter()
        .zip(&prior.linears)
        .map(|(a, b)| a.3.iter().zip(&b.3).filter(|(x, y)| x != y).count())
        .sum();
    assert!(changed > 0);
}

#[test]
fn weights_may_train_with_their_masks() {
    let t = learn(30, true);
    assert_ne!(t.model.fingerprint(), dense().fingerprint());
    let out = masked(&t.model, &t.learned_mask().unwrap().unwrap());
    assert!(exactly_two_four(&out));
    assert!(
        common::kl(&dense(), &out)
            < common::kl(&dense(), &masked(&dense(), &magnitude_prior(&dense())))
    );
}

#[test]
fn a_resumed_mask_run_equals_an_uninterrupted_one() {
    let d = common::token_data();
    let start = || Start::Model(Box::new(dense()));
    let live = || Teacher::Live(Box::new(dense()));
    let prior = magnitude_prior(&dense());
    let mut whole = Trainer::new(config(6, false), start(), live(), &d).unwrap();
    whole.set_prior(&prior, 3.0).unwrap();
    whole.run(&d, None, None, None, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(config(6, false), start(), live(), &d).unwrap();
    first.set_prior(&prior, 3.0).unwrap();
    first
        .run(&d, Some(dir.path()), Some(3), None, &mut |_| {})
        .unwrap();
    drop(first);
    let mut rest = Trainer::resume(dir.path(), start(), live(), &d).unwrap();
    rest.run(&d, Some(dir.path()), None, None, &mut |_| {})
        .unwrap();
    let key = |t: &Trainer| -> Vec<u64> { t.log.iter().map(|r| r.loss.to_bits()).collect() };
    assert_eq!(key(&whole), key(&rest));
    assert_eq!(whole.learned_mask().unwrap(), rest.learned_mask().unwrap());
}

/// Two ranks (threads as ranks), one micro-batch each, learn the masks one process learns with
/// both micro-batches: the same losses to the bit (the sums run in the same order) and the same
/// masks; rank 1's own prior is replaced by rank 0's state when it joins.
#[test]
fn two_ranks_learn_the_masks_of_one_process() {
    use whittle::dist::{local::LocalGroup, Collective};
    let d = common::token_data();
    let one = learn(6, false);
    let key = |t: &Trainer| -> Vec<u64> { t.log.iter().map(|r| r.loss.to_bits()).collect() };
    let runs = LocalGroup::run_ranks(2, |comm| {
        let start = Start::Model(Box::new(dense()));
        let mut t = Trainer::new(
            config(6, false),
            start,
            Teacher::Live(Box::new(dense())),
            &d,
        )
        .unwrap();
        if comm.rank() == 0 {
            t.set_prior(&magnitude_prior(&dense()), 3.0).unwrap();
        }
        t.join(comm.handle(), &d).unwrap();
        t.run(&d, None, None, None, &mut |_| {}).unwrap();
        (key(&t), t.learned_mask().unwrap())
    });
    for (losses, mask) in runs {
        assert_eq!(losses, key(&one));
        assert_eq!(mask, one.learned_mask().unwrap());
    }
}

#[test]
fn mask_files_round_trip_and_refuse_other_models() {
    let mask = magnitude_prior(&dense());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mask.safetensors");
    mask.save(&path).unwrap();
    let back = LearnedMask::load(&path).unwrap();
    assert_eq!(back, mask);
    // Applying the file equals magnitude 2:4 pruning itself.
    let mut pruned = dense();
    whittle::sparsity::sparsify_model(
        &mut pruned,
        &[],
        SparsityMethod::Magnitude,
        whittle::sparsity::Pattern::NM { n: 2, m: 4 },
        &[],
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(masked(&dense(), &back).fingerprint(), pruned.fingerprint());
    // Another width: a clear error naming the linear.
    let mut shapes = common::uniform_shapes(2);
    shapes[1].mlp = Some(64);
    let mut other = random_model(common::tiny_config(false), &shapes, 1).unwrap();
    let err = back.apply(&mut other).unwrap_err().to_string();
    assert!(err.contains("layers.1.mlp"), "{err}");
    // Not a mask file; a truncated one.
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(LearnedMask::load(&path).is_err());
    let prior = |p: &str| {
        Trainer::new(
            TrainConfig {
                maskllm: Some(MaskLlmConfig {
                    pattern: p.into(),
                    ..Default::default()
                }),
                ..config(2, false)
            },
            Start::Model(Box::new(dense())),
            Teacher::Live(Box::new(dense())),
            &common::token_data(),
        )
    };
    for bad in ["4:4", "50%", "2:16", "3:5"] {
        assert!(prior(bad).is_err(), "{bad}");
    }
}
