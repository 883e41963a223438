//! Load-time rewrites of an exported teacher graph that onnxruntime also makes: per-channel
//! affine chains after a convolution (its bias, then batch norm's `Sub`/`Mul`/`Add`, often
//! behind an NCHW → NHWC transpose and no-op casts) are folded into the convolution's weight and
//! bias, and a transpose whose inverse follows after element-wise ops (`Relu`, no-op casts) is
//! dropped with it. Open-NSFW's export keeps all of them: 4 broadcast passes and 2 strided
//! copies per convolution, most of its forward time before the rewrite.
//!
//! Only values with one reader are rewritten, and every name a kept node writes stays, so a
//! caller that asks for a value by name gets it unless it lay inside a folded chain.

use crate::io::onnx::{Attribute, Node};
use crate::Result;
use candle_core::{Device, Tensor};
use std::collections::{HashMap, HashSet};

/// A cast to f32 (ONNX type 1): a no-op on the float activations it sits between.
fn is_float_cast(n: &Node) -> bool {
    n.op_type == "Cast" && matches!(n.attribute("to"), Some(Attribute::Int(1)))
}

fn perm_of(n: &Node) -> Option<Vec<usize>> {
    match n.attribute("perm") {
        Some(Attribute::Ints(p)) => p.iter().map(|&a| usize::try_from(a).ok()).collect(),
        _ => None,
    }
}

/// Which nodes read each value.
fn readers(nodes: &[Node]) -> HashMap<String, Vec<usize>> {
    let mut r: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for input in n.inputs.iter().filter(|s| !s.is_empty()) {
            r.entry(input.clone()).or_default().push(i);
        }
    }
    r
}

/// The one node reading `value`, if exactly one does.
fn only_reader(readers: &HashMap<String, Vec<usize>>, value: &str) -> Option<usize> {
    match readers.get(value).map(Vec::as_slice) {
        Some([i]) => Some(*i),
        _ => None,
    }
}

/// A constant's values when it varies only along `axis` of a rank-4 activation, with `c`
/// entries (shape `[1, 1, 1, c]`-like, or `[c]` when `axis` is the last).
fn per_channel(t: &Tensor, axis: usize, c: usize) -> Option<Vec<f32>> {
    let dims = t.dims();
    let fits = match dims.len() {
        4 => dims
            .iter()
            .enumerate()
            .all(|(a, &d)| d == if a == axis { c } else { 1 }),
        1 => axis == 3 && dims[0] == c,
        _ => false,
    };
    if !fits {
        return None;
    }
    t.flatten_all().ok()?.to_vec1::<f32>().ok()
}

/// Folds the affine chain after convolution `ci` into it; returns the nodes it made redundant.
fn fold_conv(
    nodes: &mut [Node],
    weights: &mut HashMap<String, Tensor>,
    readers: &HashMap<String, Vec<usize>>,
    ci: usize,
) -> Result<Vec<usize>> {
    let conv = &nodes[ci];
    let Some(w) = conv.inputs.get(1).and_then(|n| weights.get(n)).cloned() else {
        return Ok(Vec::new());
    };
    if w.rank() != 4 {
        return Ok(Vec::new());
    }
    let name = conv.name.clone();
    // A malformed node (no input or output) is left for the executor to report.
    let (Some(x), Some(out)) = (conv.inputs.first().cloned(), conv.outputs.first().cloned()) else {
        return Ok(Vec::new());
    };
    let c = w.dims()[0];
    let bias = match conv.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(b) => match weights
            .get(b)
            .and_then(|t| t.flatten_all().ok()?.to_vec1::<f32>().ok())
        {
            Some(v) if v.len() == c => v,
            // A computed or ill-shaped bias: not folded (the executor reports what is wrong).
            _ => return Ok(Vec::new()),
        },
        None => vec![0.0; c],
    };
    // Walk the single-reader chain: at most one transpose first, no-op casts, then per-channel
    // Add / Sub / Mul by constants.
    let (mut cur, mut axis, mut transpose) = (out, 1, None);
    let (mut scale, mut shift) = (vec![1f32; c], vec![0f32; c]);
    let (mut chain, mut folded_to) = (Vec::new(), None::<(String, usize)>);
    while let Some(i) = only_reader(readers, &cur) {
        let n = &nodes[i];
        let Some(next) = n.outputs.first().cloned() else {
            break;
        };
        if n.inputs.first() != Some(&cur) {
            break;
        }
        match n.op_type.as_str() {
            "Transpose" if transpose.is_none() && chain.is_empty() => {
                let Some(p) = perm_of(n).filter(|p| p.len() == 4) else {
                    break;
                };
                axis = p.iter().position(|&a| a == 1).unwrap_or(1);
                transpose = Some(i);
            }
            _ if is_float_cast(n) => chain.push(i),
            op @ ("Add" | "Sub" | "Mul") => {
                let Some(v) = n
                    .inputs
                    .get(1)
                    .and_then(|k| weights.get(k))
                    .and_then(|t| per_channel(t, axis, c))
                else {
                    break;
                };
                for ch in 0..c {
                    match op {
                        "Add" => shift[ch] += v[ch],
                        "Sub" => shift[ch] -= v[ch],
                        _ => {
                            scale[ch] *= v[ch];
                            shift[ch] *= v[ch];
                        }
                    }
                }
                chain.push(i);
                folded_to = Some((next.clone(), chain.len()));
            }
            _ => break,
        }
        cur = next;
    }
    let Some((last, len)) = folded_to else {
        return Ok(Vec::new());
    };
    chain.truncate(len);
    // y = s ⊙ (W x + b) + t = (s ⊙ W) x + (s ⊙ b + t), per output channel.
    let s = Tensor::from_vec(scale.clone(), (c, 1, 1, 1), &Device::Cpu)?;
    let new_w = w.broadcast_mul(&s)?;
    let new_b: Vec<f32> = (0..c).map(|ch| bias[ch] * scale[ch] + shift[ch]).collect();
    let (wn, bn) = (format!("{name}.folded_w"), format!("{name}.folded_b"));
    weights.insert(wn.clone(), new_w);
    weights.insert(bn.clone(), Tensor::from_vec(new_b, c, &Device::Cpu)?);
    let conv = &mut nodes[ci];
    conv.inputs = vec![x, wn, bn];
    match transpose {
        // The transpose now reads the folded convolution and writes the chain's last value.
        Some(t) => nodes[t].outputs = vec![last],
        None => conv.outputs = vec![last],
    }
    Ok(chain)
}

/// Drops transpose `ti` and its inverse when only element-wise unary nodes (`Relu`, no-op
/// casts) lie between them, each with one reader; returns the dropped transposes.
fn cancel_transposes(
    nodes: &mut [Node],
    readers: &HashMap<String, Vec<usize>>,
    ti: usize,
) -> Vec<usize> {
    let t = &nodes[ti];
    let (Some(p), Some(input), Some(mut cur)) = (
        perm_of(t),
        t.inputs.first().cloned(),
        t.outputs.first().cloned(),
    ) else {
        return Vec::new();
    };
    let mut between = Vec::new();
    while let Some(i) = only_reader(readers, &cur) {
        let n = &nodes[i];
        let Some(next) = n.outputs.first().cloned() else {
            return Vec::new();
        };
        if n.op_type == "Relu" || is_float_cast(n) {
            between.push(i);
            cur = next;
            continue;
        }
        let inverse = n.op_type == "Transpose"
            && perm_of(n).is_some_and(|q| q.len() == p.len() && (0..p.len()).all(|a| p[q[a]] == a));
        if !inverse || between.is_empty() {
            return Vec::new();
        }
        // The unary chain reads the first transpose's input and writes the second's output.
        nodes[between[0]].inputs[0] = input;
        let last = *between.last().expect("not empty");
        nodes[last].outputs = vec![next];
        return vec![ti, i];
    }
    Vec::new()
}

/// Applies both rewrites to the whole graph (constants aliased through `Identity` first, so that
/// they are seen as constants); returns how many nodes it removed.
pub fn fold(nodes: &mut Vec<Node>, weights: &mut HashMap<String, Tensor>) -> Result<usize> {
    let before = nodes.len();
    let mut aliases = Vec::new();
    nodes.retain(|n| {
        let constant = match (n.op_type.as_str(), n.inputs.first(), n.outputs.first()) {
            ("Identity", Some(i), Some(o)) if weights.contains_key(i) => {
                Some((o.clone(), i.clone()))
            }
            _ => None,
        };
        let keep = constant.is_none();
        aliases.extend(constant);
        keep
    });
    for (alias, of) in aliases {
        let t = weights[&of].clone();
        weights.insert(alias, t);
    }
    let mut gone = HashSet::new();
    let r = readers(nodes);
    for ci in 0..nodes.len() {
        if nodes[ci].op_type == "Conv" {
            gone.extend(fold_conv(nodes, weights, &r, ci)?);
        }
    }
    drop_nodes(nodes, &gone);
    let mut gone = HashSet::new();
    let r = readers(nodes);
    for ti in 0..nodes.len() {
        if nodes[ti].op_type == "Transpose" && !gone.contains(&ti) {
            gone.extend(cancel_transposes(nodes, &r, ti));
        }
    }
    drop_nodes(nodes, &gone);
    Ok(before - nodes.len())
}

fn drop_nodes(nodes: &mut Vec<Node>, gone: &HashSet<usize>) {
    let mut i = 0;
    nodes.retain(|_| {
        i += 1;
        !gone.contains(&(i - 1))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], out: &str, attributes: Vec<(String, Attribute)>) -> Node {
        Node {
            name: out.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
            attributes,
        }
    }

    fn run(nodes: &[Node], weights: &HashMap<String, Tensor>, x: &Tensor) -> Vec<f32> {
        let mut values: HashMap<String, Tensor> = weights.clone();
        values.insert("x".into(), x.clone());
        for n in nodes {
            let args: Vec<Option<Tensor>> =
                n.inputs.iter().map(|i| values.get(i).cloned()).collect();
            let out = crate::vision::graph::apply(n, &args).unwrap();
            values.insert(n.outputs[0].clone(), out[0].clone());
        }
        values["y"].flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The exported shape of a conv + batch norm + ReLU (NHWC affine ops between transposes,
    /// no-op casts, a constant reached through `Identity`) folds to one convolution and a ReLU
    /// on NCHW, computing the same values.
    #[test]
    fn conv_affine_chain_and_transposes_fold_to_conv_relu() {
        let dev = &Device::Cpu;
        let c = 3;
        let w = Tensor::randn(0f32, 1.0, (c, 2, 3, 3), dev).unwrap();
        let per = |seed: f32| {
            let v: Vec<f32> = (0..c).map(|i| seed + 0.37 * i as f32).collect();
            Tensor::from_vec(v, (1, 1, 1, c), dev).unwrap()
        };
        let mut weights: HashMap<String, Tensor> = [
            ("w", w),
            ("b", per(0.1)),
            ("mu", per(-0.4)),
            ("s", per(0.8)),
            ("beta0", per(0.05)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let perm = |p: &[i64]| vec![("perm".to_string(), Attribute::Ints(p.to_vec()))];
        let cast = || vec![("to".to_string(), Attribute::Int(1))];
        let pads = vec![("pads".to_string(), Attribute::Ints(vec![1, 1, 1, 1]))];
        let nodes = vec![
            node("Identity", &["beta0"], "beta", vec![]),
            node("Conv", &["x", "w"], "conv", pads),
            node("Transpose", &["conv"], "nhwc", perm(&[0, 2, 3, 1])),
            node("Cast", &["nhwc"], "c0", cast()),
            node("Add", &["c0", "b"], "a0", vec![]),
            node("Sub", &["a0", "mu"], "s0", vec![]),
            node("Mul", &["s0", "s"], "m0", vec![]),
            node("Add", &["m0", "beta"], "a1", vec![]),
            node("Cast", &["a1"], "c1", cast()),
            node("Relu", &["c1"], "r", vec![]),
            node("Transpose", &["r"], "y", perm(&[0, 3, 1, 2])),
        ];
        let x = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), dev).unwrap();
        let mut with_identity = weights.clone();
        with_identity.insert("beta".into(), weights["beta0"].clone());
        let want = run(&nodes[1..], &with_identity, &x);
        let mut folded = nodes.clone();
        let removed = fold(&mut folded, &mut weights).unwrap();
        let ops: Vec<&str> = folded.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Cast", "Relu"], "removed {removed}");
        let got = run(&folded, &weights, &x);
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-5, "{worst}");
    }
}
