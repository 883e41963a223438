//! The training engine on tiny random models: logit distillation moves a student toward its
//! teacher (live or from a top-k cache), feature distillation with each normaliser lowers its
//! loss, adapters-only training touches only adapters, 2:4 stays 2:4, runs resume exactly, and
//! bad settings are clear errors.

mod common;

use whittle::distill::cache::{self, TeacherCache};
use whittle::model::{random::random_model, Logits};
use whittle::train::groups::Groups;
use whittle::train::optim::AdamWConfig;
use whittle::train::trainer::{Start, Teacher, TrainConfig, Trainer};
use whittle::Model;

fn config(objective: &str, steps: u64) -> TrainConfig {
    TrainConfig {
        preset: None,
        steps,
        batch: 2,
        seq_len: 16,
        accum: 2,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup: 2,
        clip: 1.0,
        adamw: AdamWConfig::default(),
        eval_every: 0,
        eval_tokens: 64,
        ckpt_every: 0,
        seed: 3,
        bf16: false,
        precision: Default::default(),
        objective: objective.into(),
        groups: Groups::default(),
        head_windows: 4,
        maskllm: None,
    }
}

/// A random model with an untied head: a tied random model predicts its input token (the
/// embedding's self-product dominates), and so does every other one, leaving nothing to learn.
fn teacher() -> Model {
    let mut m = random_model(common::tiny_config(false), &common::uniform_shapes(3), 7).unwrap();
    m.final_norm.iter_mut().for_each(|v| *v *= 2.0);
    m
}

/// A shallower student: two of the teacher's three blocks' shapes, other weights.
fn student() -> Model {
    random_model(common::tiny_config(false), &common::uniform_shapes(2), 21).unwrap()
}

fn train(config: TrainConfig, student: Model, teacher: Teacher) -> Trainer {
    let d = common::token_data();
    let mut t = Trainer::new(config, Start::Model(Box::new(student)), teacher, &d).unwrap();
    t.run(&d, None, None, None, &mut |_| {}).unwrap();
    t
}

#[test]
fn logit_distillation_moves_the_student_toward_the_teacher() {
    let before = common::kl(&teacher(), &student());
    for objective in ["kd", "kd:T=2+ce:0.5", "rkl", "jsd:beta=0.5"] {
        let t = train(
            config(objective, 80),
            student(),
            Teacher::Live(Box::new(teacher())),
        );
        let after = common::kl(&teacher(), &t.model);
        // Plain KD closes most of the gap; the mixtures share the budget with other goals.
        let bound = if objective == "kd" { 0.5 } else { 0.8 };
        assert!(
            after < bound * before,
            "{objective}: KL to the teacher {before} -> {after}"
        );
    }
    // Cross-entropy on data unrelated to the teacher does not approach it as closely.
    let ce = train(config("ce", 30), student(), Teacher::None);
    let kd = train(
        config("kd", 30),
        student(),
        Teacher::Live(Box::new(teacher())),
    );
    assert!(common::kl(&teacher(), &kd.model) < common::kl(&teacher(), &ce.model));
}

#[test]
fn feature_distillation_lowers_its_loss_with_every_normaliser() {
    for norm in ["none", "global", "per-channel", "pca", "zca", "phis"] {
        let objective = format!("feat:layers=0/1,norm={norm}");
        let mut t = train(
            config(&objective, 20),
            student(),
            Teacher::Live(Box::new(teacher())),
        );
        let feat = |row: usize| t.log[row].parts[0].1;
        assert_eq!(t.log[0].parts[0].0, "feat");
        assert!(
            feat(19) < 0.8 * feat(0),
            "{norm}: feature loss {} -> {}",
            feat(0),
            feat(19)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.safetensors");
        assert!(t.save_heads(&path).unwrap());
        let saved = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        assert_eq!(saved["head.1.norm.forward"].dims(), &[32, 32]);
        assert_eq!(saved["head.0.proj.weight"].dims(), &[32, 32]);
        // Every normaliser's heads can be measured in the teacher's space (the exact case is
        // `the_feature_report_of_the_teacher_itself_is_exact`; 64 rows of random features
        // give no held-out bound).
        let report = t.feature_report(&common::token_data()).unwrap();
        assert_eq!(report.len(), 2);
        for r in &report {
            assert!(
                r.loss > 0.0 && r.nmse.is_finite() && r.cosine.abs() <= 1.0,
                "{norm}: {r:?}"
            );
        }
    }
    // A narrower student (hidden 24): the heads project its features to the teacher's width.
    let mut narrow = common::tiny_config(false);
    narrow.hidden = 24;
    let s = random_model(narrow, &common::uniform_shapes(2), 5).unwrap();
    let t = train(
        config("feat:layers=0/1,norm=phis", 20),
        s,
        Teacher::Live(Box::new(teacher())),
    );
    let feat = |row: usize| t.log[row].parts[0].1;
    assert!(
        feat(19) < 0.8 * feat(0),
        "narrow: {} -> {}",
        feat(0),
        feat(19)
    );
}

/// A student that is its teacher: the least-squares heads reproduce the teacher's features, so
/// the report's fidelity is exact before any step, in the normaliser's space and mapped back.
#[test]
fn the_feature_report_of_the_teacher_itself_is_exact() {
    let d = common::token_data();
    for norm in ["none", "phis"] {
        let objective = format!("feat:layers=0/2,norm={norm}");
        let mut t = Trainer::new(
            config(&objective, 1),
            Start::Model(Box::new(teacher())),
            Teacher::Live(Box::new(teacher())),
            &d,
        )
        .unwrap();
        let report = t.feature_report(&d).unwrap();
        assert_eq!(
            report
                .iter()
                .map(|r| (r.student, r.teacher))
                .collect::<Vec<_>>(),
            [(0, 0), (2, 2)]
        );
        for r in &report {
            assert!(r.cosine > 0.9999 && r.nmse < 1e-4, "{norm}: {r:?}");
            assert!(r.loss < 1e-3, "{norm}: {r:?}");
        }
    }
}

#[test]
fn adapters_only_training_changes_only_the_adapters() {
    let mut s = teacher();
    s.layers.pop();
    for layer in &mut s.layers {
        for (_, _, lin) in layer.linears_mut() {
            let (o, i) = (lin.out_features, lin.in_features);
            lin.adapter = Some(whittle::model::LowRank {
                rank: 2,
                a: (0..2 * i).map(|k| ((k % 7) as f32 - 3.0) * 0.01).collect(),
                b: vec![0.0; o * 2],
            });
        }
    }
    let before = s.clone();
    let mut c = config("kd", 20);
    c.groups.adapters_only = true;
    let t = train(c, s, Teacher::Live(Box::new(teacher())));
    let (mut changed, mut kept) = (0, 0);
    for (l0, l1) in before.layers.iter().zip(&t.model.layers) {
        assert_eq!(l0.attn_norm, l1.attn_norm);
        for ((_, _, a), (_, _, b)) in l0.linears().into_iter().zip(l1.linears()) {
            assert_eq!(a.weight(), b.weight(), "a frozen weight changed");
            if a.adapter != b.adapter {
                changed += 1;
            } else {
                kept += 1;
            }
        }
    }
    assert!(
        changed > 0 && kept == 0,
        "{changed} adapters changed, {kept} did not"
    );
    assert_eq!(before.embed.weight(), t.model.embed.weight());
    assert_eq!(
        before.lm_head.as_ref().unwrap().weight(),
        t.model.lm_head.as_ref().unwrap().weight()
    );
    assert!(common::kl(&teacher(), &t.model) < common::kl(&teacher(), &before));
    // No adapters: nothing to train is an error, not a silent no-op.
    let mut c = config("kd", 2);
    c.groups.adapters_only = true;
    let err = Trainer::new(
        c,
        Start::Model(Box::new(student())),
        Teacher::Live(Box::new(teacher())),
        &common::token_data(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("no low-rank adapters"), "{err}");
}

#[test]
fn a_two_four_student_stays_two_four() {
    let mut s = student();
    // Zero the two smallest of every group of four (a 2:4 mask).
    for layer in &mut s.layers {
        for (_, _, lin) in layer.linears_mut() {
            for g in lin.dense_weight_mut().chunks_mut(4) {
                let mut order = [0usize, 1, 2, 3];
                order.sort_by(|a, b| g[*a].abs().total_cmp(&g[*b].abs()));
                g[order[0]] = 0.0;
                g[order[1]] = 0.0;
            }
        }
    }
    let zeros = |m: &Model| -> Vec<Vec<bool>> {
        m.layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|(_, _, lin)| lin.dense_weight().iter().map(|v| *v == 0.0).collect())
            .collect()
    };
    let before = zeros(&s);
    let t = train(
        config("kd", 15),
        s.clone(),
        Teacher::Live(Box::new(teacher())),
    );
    assert_eq!(zeros(&t.model), before, "the 2:4 pattern changed");
    assert!(common::kl(&teacher(), &t.model) < common::kl(&teacher(), &s));
    // Without the mask the zeros fill in.
    let mut c = config("kd", 15);
    c.groups.keep_zeros = whittle::train::groups::KeepZeros::Off;
    let free = train(c, s, Teacher::Live(Box::new(teacher())));
    assert_ne!(zeros(&free.model), before);
}

#[test]
fn a_cached_teacher_trains_like_the_live_one_and_checks_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    let ids = common::stream(3000, 1);
    let windows = cache::shuffled_windows(&ids, 16, 40, 0).unwrap();
    let meta = cache::write(
        &path,
        &teacher(),
        "tok".into(),
        &windows,
        16,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((meta.windows, meta.seq_len, meta.k), (40, 16, 16));
    let c = TeacherCache::open(&path).unwrap();
    // Stored rows are the teacher's top-k (logits to f16 precision).
    let w = c.tokens(3);
    assert_eq!(w, windows[3]);
    let logits = teacher()
        .forward(&w[..16], None, Logits::All, None)
        .unwrap();
    let want = whittle::distill::topk::TopK::from_logits(&logits, common::VOCAB, 16).unwrap();
    let mut got = c.empty_topk();
    c.extend_topk(3, &mut got);
    assert_eq!(got.ids, want.ids);
    let scale = want.logits.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(common::max_abs_diff(&got.logits, &want.logits) <= scale / 1024.0);
    assert!(common::max_abs_diff(&got.rest, &want.rest) < 1e-5);
    c.check(Some(&teacher()), &student(), "tok").unwrap();
    assert!(c.check(Some(&student()), &student(), "tok").is_err());
    assert!(c.check(None, &student(), "other").is_err());

    let before = common::kl(&teacher(), &student());
    let t = train(config("kd", 80), student(), Teacher::Cached(Box::new(c)));
    let after = common::kl(&teacher(), &t.model);
    // 40 cached windows, seen again and again: less general than the live teacher's stream.
    assert!(after < 0.75 * before, "cached KD: {before} -> {after}");

    // Wrong window length, reverse KL from top-k, and a truncated file are errors.
    let open = || Teacher::Cached(Box::new(TeacherCache::open(&path).unwrap()));
    let new = |c: TrainConfig| {
        Trainer::new(
            c,
            Start::Model(Box::new(student())),
            open(),
            &common::token_data(),
        )
    };
    let mut c32 = config("kd", 2);
    c32.seq_len = 32;
    assert!(new(c32).err().unwrap().to_string().contains("--seq-len 16"));
    assert!(new(config("rkl", 2)).is_err());
    let f = path.join("topk.bin");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    assert!(TeacherCache::open(&path)
        .err()
        .unwrap()
        .to_string()
        .contains("truncated"));
}

#[test]
fn a_resumed_distillation_equals_an_uninterrupted_one() {
    let d = common::token_data();
    let objective = "kd:T=2+ce:0.5+feat:layers=1,norm=phis";
    let start = || Start::Model(Box::new(student()));
    let live = || Teacher::Live(Box::new(teacher()));
    let mut whole = Trainer::new(config(objective, 6), start(), live(), &d).unwrap();
    whole.run(&d, None, None, None, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(config(objective, 6), start(), live(), &d).unwrap();
    first
        .run(&d, Some(dir.path()), Some(3), None, &mut |_| {})
        .unwrap();
    drop(first);
    let mut rest = Trainer::resume(dir.path(), start(), live(), &d).unwrap();
    assert_eq!(rest.step, 3);
    rest.run(&d, Some(dir.path()), None, None, &mut |_| {})
        .unwrap();
    let key = |t: &Trainer| -> Vec<u64> { t.log.iter().map(|r| r.loss.to_bits()).collect() };
    assert_eq!(key(&whole), key(&rest));
    // Another student cannot continue this run.
    let other = Start::Model(Box::new(teacher()));
    let err = Trainer::resume(dir.path(), other, live(), &d)
        .err()
        .unwrap();
    assert!(err.to_string().contains("checkpoint"), "{err}");
}

#[test]
fn bad_settings_are_clear_errors() {
    let d = common::token_data();
    let new = |c: TrainConfig, t: Teacher| {
        Trainer::new(c, Start::Model(Box::new(student())), t, &d)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let live = || Teacher::Live(Box::new(teacher()));
    assert!(new(config("kd", 2), Teacher::None).contains("needs a teacher"));
    assert!(new(config("feat:layers=5", 2), live()).contains("out of range"));
    let mut big = common::tiny_config(true);
    big.vocab_size = 300;
    let other = random_model(big, &common::uniform_shapes(1), 1).unwrap();
    assert!(new(config("kd", 2), Teacher::Live(Box::new(other))).contains("vocabularies differ"));
    // A diverging run stops with the step named and no update made.
    let mut c = config("kd", 5);
    c.lr = 1e30;
    c.clip = 0.0;
    c.warmup = 0;
    let mut t = Trainer::new(c, Start::Model(Box::new(student())), live(), &d).unwrap();
    let err = t.run(&d, None, None, None, &mut |_| {}).err().unwrap();
    assert!(err.to_string().contains("loss became"), "{err}");
}

#[test]
fn a_runs_settings_round_trip_through_provenance_toml() {
    let mut c = config("kd:T=2+ce:0.5", 7);
    c.groups.adapters_only = true;
    c.groups.lr_scale = vec![("embed".into(), 0.5)];
    let text = c.to_toml().unwrap();
    assert_eq!(TrainConfig::from_toml(&text).unwrap(), c);
    let lines = whittle::recipe::Recipe::describe_toml(&text);
    assert_eq!(
        lines,
        vec!["train kd:T=2+ce:0.5, 7 steps of 2 × 16 (accum 2), lr 0.01, adapters only"]
    );
}
