//! The differentiable forward pass used for training agrees with the inference forward pass on
//! every architecture, and its gradients agree with finite differences.

mod common;

use candle_core::{Device, Tensor};
use whittle::model::Logits;
use whittle::train::graph::{cross_entropy, forward, Trainable};
use whittle::Model;

/// The tiny Llama with rank-2 adapters on two linears and the head: the graph must add
/// `B A x` wherever inference does.
fn with_adapters(mut m: Model) -> Model {
    let mut seed = 11usize;
    let mut value = || {
        seed = seed * 1103515245 % 2147483648 + 12345;
        ((seed >> 8) % 1000) as f32 / 2000.0 - 0.25
    };
    let mut add = |l: &mut whittle::model::Linear| {
        let (o, i) = (l.out_features, l.in_features);
        l.adapter = Some(whittle::model::LowRank {
            rank: 2,
            a: (0..2 * i).map(|_| value()).collect(),
            b: (0..o * 2).map(|_| value()).collect(),
        });
    };
    for (name, _, lin) in m.layers[0].linears_mut() {
        if name == "self_attn.q_proj" || name == "mlp.down_proj" {
            add(lin);
        }
    }
    add(m.lm_head.get_or_insert_with(|| m.embed.clone()));
    m
}

fn ids(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + seed * 7 + 3) % vocab) as u32)
        .collect()
}

#[test]
fn graph_logits_equal_inference_logits() {
    for (name, mut m) in [
        ("llama", common::tiny_model(2)),
        ("hymba", common::hymba_tiny()),
        ("mamba", common::tiny_mamba(2, 32, Some(24), 5)),
        ("llama with adapters", with_adapters(common::tiny_model(2))),
    ] {
        let vocab = m.config.vocab_size;
        let (a, b) = (ids(21, vocab, 1), ids(21, vocab, 2));
        let p = Trainable::all(&mut m).unwrap();
        let batch =
            Tensor::from_vec([a.clone(), b.clone()].concat(), (2, 21), &Device::Cpu).unwrap();
        let got = forward(&m, &p, &batch).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [
            m.forward(&a, None, Logits::All, None).unwrap(),
            m.forward(&b, None, Logits::All, None).unwrap(),
        ]
        .concat();
        let d = common::max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: graph vs inference logits differ by {d}");
    }
}

/// Central differences of the loss along a few coordinates of every parameter tensor.
fn check_gradients(mut m: Model) {
    let vocab = m.config.vocab_size;
    let seq = ids(13, vocab, 3);
    let p = Trainable::all(&mut m).unwrap();
    let x = Tensor::from_vec(seq[..12].to_vec(), (1, 12), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(seq[1..].to_vec(), (1, 12), &Device::Cpu).unwrap();
    let loss = |p: &Trainable| cross_entropy(&forward(&m, p, &x).unwrap(), &y).unwrap();
    let grads = loss(&p).backward().unwrap();
    for name in &p.names {
        let var = &p.vars[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The largest-gradient coordinate and one fixed coordinate.
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for i in [big, base.len() / 3] {
            let h = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&p).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            at(0.0);
            let got = g[i] as f64;
            assert!(
                (got - fd).abs() < 5e-3 + 0.05 * fd.abs(),
                "{name}[{i}]: autograd {got} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_llama_and_mamba() {
    check_gradients(common::tiny_model(4));
    check_gradients(common::tiny_mamba(2, 32, Some(24), 5));
    check_gradients(with_adapters(common::tiny_model(3)));
}

#[test]
fn gradients_match_finite_differences_hymba() {
    check_gradients(common::hymba_tiny());
}
