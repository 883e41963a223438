//! The training loop: it learns, a resumed run is identical to an uninterrupted one, and the
//! study's presets have matched sizes.

use whittle::model::Arch;
use whittle::train::optim::AdamWConfig;
use whittle::train::presets::{Preset, Size};
use whittle::train::trainer::{Start, Teacher, TokenData, TrainConfig, Trainer};

const VOCAB: usize = 48;
const START: Start = Start::Preset { vocab: VOCAB };

/// A learnable stream: each token mostly follows from the previous one.
fn stream(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    let mut v = vec![1u32, 2];
    while v.len() < n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = v.len();
        let next = if (s >> 60) == 0 {
            (s >> 33) as u32 % VOCAB as u32
        } else {
            (v[k - 1] * 5 + 1) % VOCAB as u32
        };
        v.push(next);
    }
    v
}

fn config(arch: Arch, steps: u64) -> TrainConfig {
    TrainConfig {
        preset: Some(Preset {
            arch,
            size: Size::Tiny,
            meta_tokens: true,
            kv_sharing: true,
        }),
        steps,
        batch: 2,
        seq_len: 24,
        accum: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 3,
        clip: 1.0,
        adamw: AdamWConfig::default(),
        eval_every: 3,
        eval_tokens: 96,
        ckpt_every: 0,
        seed: 7,
        bf16: false,
        precision: Default::default(),
        objective: "ce".into(),
        groups: Default::default(),
        head_windows: 0,
        maskllm: None,
    }
}

fn data() -> TokenData {
    TokenData {
        train: stream(4000, 1),
        valid: stream(600, 2),
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let data = data();
    for arch in [Arch::Hymba, Arch::Llama, Arch::Mamba] {
        let mut whole = Trainer::new(config(arch, 6), START, Teacher::None, &data).unwrap();
        whole.run(&data, None, None, None, &mut |_| {}).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(config(arch, 6), START, Teacher::None, &data).unwrap();
        first
            .run(&data, Some(dir.path()), Some(3), None, &mut |_| {})
            .unwrap();
        assert_eq!(first.step, 3);
        drop(first);
        let mut rest = Trainer::resume(dir.path(), START, Teacher::None, &data).unwrap();
        assert_eq!(rest.step, 3);
        rest.run(&data, Some(dir.path()), None, None, &mut |_| {})
            .unwrap();

        let key = |t: &Trainer| -> Vec<(u64, u64, Option<u64>)> {
            t.log
                .iter()
                .map(|r| (r.step, r.loss.to_bits(), r.val_ppl.map(f64::to_bits)))
                .collect()
        };
        assert_eq!(
            key(&whole),
            key(&rest),
            "{arch:?}: losses differ after resuming"
        );
        let ids: Vec<u32> = data.valid[..20].to_vec();
        let l = |t: &Trainer| {
            t.model
                .forward(&ids, None, whittle::model::Logits::All, None)
                .unwrap()
        };
        assert_eq!(l(&whole), l(&rest), "{arch:?}: final weights differ");
    }
}

#[test]
fn training_reduces_validation_perplexity() {
    let data = data();
    let mut cfg = config(Arch::Llama, 60);
    cfg.eval_every = 60;
    cfg.lr = 1e-2;
    let mut t = Trainer::new(cfg, START, Teacher::None, &data).unwrap();
    let before = t.validate(&data).unwrap();
    t.run(&data, None, None, None, &mut |_| {}).unwrap();
    let after = t.log.last().unwrap().val_ppl.unwrap();
    assert!(
        after < 0.6 * before,
        "validation perplexity {before} -> {after}"
    );
}

#[test]
fn study_presets_have_matched_non_embedding_sizes() {
    let counts: Vec<(Arch, usize)> = [Arch::Llama, Arch::Mamba, Arch::Hymba]
        .into_iter()
        .map(|arch| {
            let p = Preset {
                arch,
                size: Size::Small,
                meta_tokens: true,
                kv_sharing: true,
            };
            let m = p.build(1000, 512, 0).unwrap();
            (arch, m.n_params() - m.embed.n_params())
        })
        .collect();
    let max = counts.iter().map(|c| c.1).max().unwrap() as f64;
    let min = counts.iter().map(|c| c.1).min().unwrap() as f64;
    assert!(max / min < 1.1, "{counts:?}");
}

#[test]
fn bf16_matmuls_train_too() {
    let data = data();
    let mut cfg = config(Arch::Hymba, 30);
    cfg.bf16 = true;
    cfg.lr = 1e-2;
    cfg.eval_every = 30;
    let mut t = Trainer::new(cfg, START, Teacher::None, &data).unwrap();
    let before = t.validate(&data).unwrap();
    t.run(&data, None, None, None, &mut |_| {}).unwrap();
    let after = t.log.last().unwrap().val_ppl.unwrap();
    assert!(
        after < 0.8 * before,
        "bf16: validation perplexity {before} -> {after}"
    );
}
