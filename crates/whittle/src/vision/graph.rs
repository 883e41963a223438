//! Runs the ONNX graph of a frozen teacher on candle tensors, operator by operator, for the
//! operators convolutional teachers use (convolutions, pooling, folded batch norm, the
//! shape arithmetic exporters emit around them). A teacher is never trained, so executing its
//! graph as exported (rather than re-deriving its architecture from anonymous tensors) is the
//! faithful choice; the ViTs, which are trained, have their own forward ([`super::vit`]).
//!
//! Semantics follow the ONNX operator specification (opset ≤ 17): numpy broadcasting, negative
//! axes, `Slice` clamping with negative steps, `Pad`/`Conv`/`MaxPool` with asymmetric pads.
//! An operator or attribute outside what is written here is an error naming the node.

use crate::io::onnx::{Attribute, Constant, Data, Node, OnnxModel};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The operators [`Graph`] executes.
pub const OPERATORS: &[&str] = &[
    "Add",
    "Cast",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Gather",
    "Identity",
    "MatMul",
    "MaxPool",
    "Mul",
    "Pad",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Slice",
    "Softmax",
    "Sub",
    "Transpose",
    "Unsqueeze",
];

/// An ONNX graph ready to run: its nodes and its initializers as tensors.
pub struct Graph {
    onnx: OnnxModel,
    weights: HashMap<String, Tensor>,
    /// For each value, the index of the last node that reads it (freed after that node).
    last_use: HashMap<String, usize>,
}

fn tensor_of(c: &Constant) -> Result<Tensor> {
    let dims = c.dims.clone();
    Ok(match &c.data {
        Data::F32(v) => Tensor::from_vec(v.clone(), dims, &Device::Cpu)?,
        Data::I64(v) => Tensor::from_vec(v.clone(), dims, &Device::Cpu)?,
    })
}

impl Graph {
    /// Reads an ONNX file whose operators are all in [`OPERATORS`], with convolutions' affine
    /// chains and cancelling transposes folded away ([`super::fold`]).
    pub fn load(path: &Path) -> Result<Self> {
        let mut onnx = OnnxModel::read(path)?;
        onnx.check_operators("whittle's ONNX executor", OPERATORS)?;
        let mut weights = HashMap::new();
        for (name, _) in onnx.initializer_dims() {
            weights.insert(name.to_string(), tensor_of(&onnx.constant(name)?)?);
        }
        super::fold::fold(&mut onnx.nodes, &mut weights)?;
        let mut last_use = HashMap::new();
        for (i, node) in onnx.nodes.iter().enumerate() {
            for input in &node.inputs {
                last_use.insert(input.clone(), i);
            }
        }
        Ok(Graph {
            onnx,
            weights,
            last_use,
        })
    }

    /// The initializers (the weights), by name.
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// Runs the nodes in order from the given inputs until `output` is computed, and returns it.
    pub fn run(&self, inputs: &[(&str, Tensor)], output: &str) -> Result<Tensor> {
        let mut values: HashMap<&str, Tensor> =
            inputs.iter().map(|(n, t)| (*n, t.clone())).collect();
        for (i, node) in self.onnx.nodes.iter().enumerate() {
            let args = node
                .inputs
                .iter()
                .map(|name| {
                    if name.is_empty() {
                        return Ok(None);
                    }
                    values
                        .get(name.as_str())
                        .or_else(|| self.weights.get(name))
                        .cloned()
                        .map(Some)
                        .ok_or_else(|| format!("input '{name}' is not computed before it"))
                })
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(|e| self.node_error(node, e))?;
            let outs = apply(node, &args).map_err(|e| self.node_error(node, e.to_string()))?;
            for (name, t) in node.outputs.iter().zip(outs) {
                if name == output {
                    return Ok(t);
                }
                values.insert(name.as_str(), t);
            }
            for name in &node.inputs {
                if self.last_use.get(name) == Some(&i) {
                    values.remove(name.as_str());
                }
            }
        }
        Err(Error::format(
            &self.onnx.path,
            format!("no node computes '{output}'"),
        ))
    }

    fn node_error(&self, node: &Node, msg: String) -> Error {
        Error::format(
            &self.onnx.path,
            format!("node '{}' ({}): {msg}", node.name, node.op_type),
        )
    }
}

pub(super) type OpResult = std::result::Result<Vec<Tensor>, String>;

fn err<T>(msg: impl Into<String>) -> std::result::Result<T, String> {
    Err(msg.into())
}

fn ints(node: &Node, name: &str) -> Option<Vec<i64>> {
    match node.attribute(name) {
        Some(Attribute::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

fn int(node: &Node, name: &str, default: i64) -> i64 {
    match node.attribute(name) {
        Some(Attribute::Int(v)) => *v,
        _ => default,
    }
}

/// Values of a 1-D (or scalar) integer tensor.
fn int_values(t: &Tensor) -> std::result::Result<Vec<i64>, String> {
    let t = t.to_dtype(DType::I64).map_err(|e| e.to_string())?;
    t.flatten_all()
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(|e| e.to_string())
}

/// A possibly negative axis of a rank-`rank` tensor.
fn axis(a: i64, rank: usize) -> std::result::Result<usize, String> {
    let r = rank as i64;
    if a < -r || a >= r.max(1) {
        return err(format!("axis {a} out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

fn arg(args: &[Option<Tensor>], i: usize) -> std::result::Result<&Tensor, String> {
    args.get(i)
        .and_then(|a| a.as_ref())
        .ok_or_else(|| format!("input {i} is missing"))
}

pub(super) fn apply(node: &Node, args: &[Option<Tensor>]) -> OpResult {
    let c = |r: candle_core::Result<Tensor>| r.map(|t| vec![t]).map_err(|e| e.to_string());
    let x = || arg(args, 0);
    match node.op_type.as_str() {
        "Identity" => Ok(vec![x()?.clone()]),
        "Constant" => match node.attribute("value") {
            Some(Attribute::Tensor(t)) => tensor_of(t).map(|t| vec![t]).map_err(|e| e.to_string()),
            _ => err("only the 'value' form of Constant is supported"),
        },
        "Cast" => {
            let to = match int(node, "to", 0) {
                1 => DType::F32,
                6 | 7 => DType::I64,
                other => return err(format!("cast to ONNX type {other} is not supported")),
            };
            c(x()?.to_dtype(to))
        }
        "Shape" => {
            let dims: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let n = dims.len();
            c(Tensor::from_vec(dims, n, &Device::Cpu))
        }
        "Add" => c(x()?.broadcast_add(arg(args, 1)?)),
        "Sub" => c(x()?.broadcast_sub(arg(args, 1)?)),
        "Mul" => c(x()?.broadcast_mul(arg(args, 1)?)),
        "Div" => c(x()?.broadcast_div(arg(args, 1)?)),
        "Relu" => c(x()?.relu()),
        "MatMul" => c(x()?.broadcast_matmul(arg(args, 1)?)),
        "Softmax" => {
            let t = x()?;
            let a = axis(int(node, "axis", -1), t.rank())?;
            let e = t
                .broadcast_sub(&t.max_keepdim(a).map_err(|e| e.to_string())?)
                .and_then(|d| d.exp())
                .map_err(|e| e.to_string())?;
            c(e.sum_keepdim(a).and_then(|s| e.broadcast_div(&s)))
        }
        "Transpose" => {
            let t = x()?;
            let perm: Vec<usize> = match ints(node, "perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| axis(a, t.rank()))
                    .collect::<std::result::Result<_, _>>()?,
                None => (0..t.rank()).rev().collect(),
            };
            c(t.permute(perm))
        }
        "Concat" => {
            let parts: Vec<&Tensor> = args.iter().flatten().collect();
            let rank = parts.first().map_or(1, |t| t.rank());
            c(Tensor::cat(&parts, axis(int(node, "axis", 0), rank)?))
        }
        "Unsqueeze" => {
            let t = x()?;
            let mut axes = match args.get(1).and_then(|a| a.as_ref()) {
                Some(a) => int_values(a)?,
                None => ints(node, "axes").ok_or("no axes")?,
            };
            let out_rank = t.rank() + axes.len();
            for a in axes.iter_mut() {
                *a = axis(*a, out_rank)? as i64;
            }
            axes.sort_unstable();
            let mut t = t.clone();
            for a in axes {
                t = t.unsqueeze(a as usize).map_err(|e| e.to_string())?;
            }
            Ok(vec![t])
        }
        "Gather" => {
            let t = x()?;
            let a = axis(int(node, "axis", 0), t.rank())?;
            let idx = arg(args, 1)?;
            let n = t.dim(a).map_err(|e| e.to_string())? as i64;
            let list: Vec<u32> = int_values(idx)?
                .into_iter()
                .map(|i| {
                    let j = if i < 0 { i + n } else { i };
                    if (0..n).contains(&j) {
                        Ok(j as u32)
                    } else {
                        err(format!("index {i} out of range for a dimension of {n}"))
                    }
                })
                .collect::<std::result::Result<_, _>>()?;
            let len = list.len();
            let picked = Tensor::from_vec(list, len, &Device::Cpu)
                .and_then(|i| t.index_select(&i, a))
                .map_err(|e| e.to_string())?;
            // The indices' shape replaces the gathered axis.
            let mut dims = t.dims().to_vec();
            dims.splice(a..=a, idx.dims().iter().copied());
            c(picked.reshape(dims))
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = int_values(x()?)?
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            match node.attribute("value") {
                Some(Attribute::Tensor(Constant {
                    data: Data::I64(v), ..
                })) => c(Tensor::full(
                    v.first().copied().unwrap_or(0),
                    shape,
                    &Device::Cpu,
                )),
                Some(Attribute::Tensor(Constant {
                    data: Data::F32(v), ..
                })) => c(Tensor::full(
                    v.first().copied().unwrap_or(0.0),
                    shape,
                    &Device::Cpu,
                )),
                _ => c(Tensor::zeros(shape, DType::F32, &Device::Cpu)),
            }
        }
        "Reshape" => {
            let t = x()?;
            let spec = int_values(arg(args, 1)?)?;
            if int(node, "allowzero", 0) != 0 && spec.contains(&0) {
                return err("allowzero = 1 with a zero in the shape is not supported");
            }
            let mut dims: Vec<usize> = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                dims.push(match d {
                    0 => t.dim(i).map_err(|e| e.to_string())?,
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        1
                    }
                    d if d > 0 => d as usize,
                    d => return err(format!("shape entry {d}")),
                });
            }
            if let Some(i) = infer {
                let known: usize = dims.iter().product();
                if known == 0 || t.elem_count() % known != 0 {
                    return err(format!("cannot reshape {:?} to {spec:?}", t.dims()));
                }
                dims[i] = t.elem_count() / known;
            }
            c(t.reshape(dims))
        }
        "Slice" => slice(x()?, args),
        "Pad" => pad(node, x()?, args),
        "ReduceMean" => {
            let t = x()?;
            let mut axes: Vec<usize> = match ints(node, "axes") {
                Some(a) => a
                    .iter()
                    .map(|&a| axis(a, t.rank()))
                    .collect::<std::result::Result<_, _>>()?,
                None => (0..t.rank()).collect(),
            };
            axes.sort_unstable();
            let mut out = t.clone();
            for &a in axes.iter().rev() {
                out = if int(node, "keepdims", 1) != 0 {
                    out.mean_keepdim(a)
                } else {
                    out.mean(a)
                }
                .map_err(|e| e.to_string())?;
            }
            Ok(vec![out])
        }
        "Conv" => conv(
            node,
            x()?,
            arg(args, 1)?,
            args.get(2).and_then(|b| b.as_ref()),
        ),
        "MaxPool" => max_pool(node, x()?),
        other => err(format!("operator '{other}' is not executed by whittle")),
    }
}

/// `Slice(data, starts, ends, axes?, steps?)` with ONNX's clamping (negative steps included).
fn slice(t: &Tensor, args: &[Option<Tensor>]) -> OpResult {
    let starts = int_values(arg(args, 1)?)?;
    let ends = int_values(arg(args, 2)?)?;
    let axes = match args.get(3).and_then(|a| a.as_ref()) {
        Some(a) => int_values(a)?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match args.get(4).and_then(|a| a.as_ref()) {
        Some(s) => int_values(s)?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return err("starts, ends, axes and steps differ in length");
    }
    let mut out = t.clone();
    for i in 0..starts.len() {
        let a = axis(axes[i], t.rank())?;
        let n = t.dim(a).map_err(|e| e.to_string())? as i64;
        let step = steps[i];
        if step == 0 {
            return err("slice step 0");
        }
        let wrap = |v: i64| if v < 0 { v + n } else { v };
        let (mut s, mut e) = (wrap(starts[i]), wrap(ends[i]));
        if step > 0 {
            s = s.clamp(0, n);
            e = e.clamp(0, n);
        } else {
            s = s.clamp(0, n - 1);
            e = e.clamp(-1, n - 1);
        }
        let mut idx = Vec::new();
        let mut j = s;
        while (step > 0 && j < e) || (step < 0 && j > e) {
            idx.push(j as u32);
            j += step;
        }
        let len = idx.len();
        out = Tensor::from_vec(idx, len, &Device::Cpu)
            .and_then(|idx| out.index_select(&idx, a))
            .map_err(|e| e.to_string())?;
    }
    Ok(vec![out])
}

/// What padding fills with.
#[derive(Clone, Copy)]
enum Fill {
    Value(f32),
    /// Copies of the edge sample (`Pad` mode `edge`).
    Edge,
}

/// Pads (positive) or crops (negative) every axis by `pads` = [begins..., ends...].
fn pad_axes(t: &Tensor, pads: &[i64], fill: Fill) -> std::result::Result<Tensor, String> {
    let rank = t.rank();
    if pads.len() != 2 * rank {
        return err(format!("{} pads for rank {rank}", pads.len()));
    }
    let mut out = t.clone();
    for a in 0..rank {
        let (before, after) = (pads[a], pads[a + rank]);
        let run = || -> candle_core::Result<Tensor> {
            let mut x = out.clone();
            if before < 0 {
                let n = x.dim(a)?;
                x = x.narrow(a, (-before) as usize, n - (-before) as usize)?;
            }
            if after < 0 {
                let n = x.dim(a)?;
                x = x.narrow(a, 0, n - (-after) as usize)?;
            }
            let block = |count: i64, at_end: bool| -> candle_core::Result<Tensor> {
                let mut dims = x.dims().to_vec();
                dims[a] = count as usize;
                match fill {
                    Fill::Value(v) => Tensor::full(v, dims, &Device::Cpu)?.to_dtype(x.dtype()),
                    Fill::Edge => {
                        let edge = x.narrow(a, if at_end { x.dim(a)? - 1 } else { 0 }, 1)?;
                        edge.broadcast_as(dims)?.contiguous()
                    }
                }
            };
            let mut parts = Vec::new();
            if before > 0 {
                parts.push(block(before, false)?);
            }
            parts.push(x.clone());
            if after > 0 {
                parts.push(block(after, true)?);
            }
            Tensor::cat(&parts, a)
        };
        if before != 0 || after != 0 {
            out = run().map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

fn pad(node: &Node, t: &Tensor, args: &[Option<Tensor>]) -> OpResult {
    let edge = match node.attribute("mode") {
        None => false,
        Some(Attribute::Bytes(m)) if m == b"constant" => false,
        Some(Attribute::Bytes(m)) if m == b"edge" => true,
        Some(_) => return err("only constant and edge padding are supported"),
    };
    if args.get(3).is_some_and(|a| a.is_some()) {
        return err("the axes input of Pad is not supported");
    }
    let pads = int_values(arg(args, 1)?)?;
    let value = match args.get(2).and_then(|a| a.as_ref()) {
        Some(v) => v
            .to_dtype(DType::F32)
            .and_then(|v| v.flatten_all())
            .and_then(|v| v.to_vec1::<f32>())
            .map_err(|e| e.to_string())?
            .first()
            .copied()
            .unwrap_or(0.0),
        None => 0.0,
    };
    let fill = if edge { Fill::Edge } else { Fill::Value(value) };
    Ok(vec![pad_axes(t, &pads, fill)?])
}

/// The 2-D window attributes shared by Conv and MaxPool: (pads [t, l, b, r], strides, dilations).
fn window(node: &Node, x: &Tensor) -> std::result::Result<([i64; 4], usize, usize), String> {
    if x.rank() != 4 {
        return err(format!(
            "input of rank {} (2-D windows need NCHW)",
            x.rank()
        ));
    }
    match node.attribute("auto_pad") {
        None => {}
        Some(Attribute::Bytes(m)) if m == b"NOTSET" => {}
        Some(_) => return err("auto_pad other than NOTSET is not supported"),
    }
    let pads = ints(node, "pads").unwrap_or(vec![0; 4]);
    let strides = ints(node, "strides").unwrap_or(vec![1, 1]);
    let dil = ints(node, "dilations").unwrap_or(vec![1, 1]);
    if pads.len() != 4 || strides.len() != 2 || dil.len() != 2 {
        return err("only 2-D windows are supported");
    }
    if pads.iter().any(|&p| p < 0) || strides.iter().chain(&dil).any(|&v| v < 1) {
        return err(format!(
            "pads {pads:?} must be ≥ 0, strides {strides:?} and dilations {dil:?} ≥ 1"
        ));
    }
    if strides[0] != strides[1] || dil[0] != dil[1] {
        return err(format!(
            "strides {strides:?} / dilations {dil:?} differ between axes"
        ));
    }
    Ok((
        [pads[0], pads[1], pads[2], pads[3]],
        strides[0] as usize,
        dil[0] as usize,
    ))
}

fn conv(node: &Node, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> OpResult {
    let (pads, stride, dilation) = window(node, x)?;
    let groups = int(node, "group", 1) as usize;
    if groups == 1 {
        let pads = pads.map(|p| p as usize);
        let y = crate::threads::install(|| conv_gemm(x, w, b, pads, stride, dilation))
            .map_err(|e| e.to_string())?;
        return Ok(vec![y]);
    }
    let symmetric = pads.iter().all(|&p| p == pads[0]);
    let (x, padding) = if symmetric {
        (x.clone(), pads[0] as usize)
    } else {
        (
            pad_axes(
                x,
                &[0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
                Fill::Value(0.0),
            )?,
            0,
        )
    };
    let y = x
        .conv2d(w, padding, stride, dilation, groups)
        .map_err(|e| e.to_string())?;
    match b {
        Some(b) => Ok(vec![b
            .reshape((1, b.elem_count(), 1, 1))
            .and_then(|b| y.broadcast_add(&b))
            .map_err(|e| e.to_string())?]),
        None => Ok(vec![y]),
    }
}

/// An ungrouped 2-D convolution (NCHW semantics, zero padding `[top, left, bottom, right]` as
/// ONNX orders its pads) on whittle's GEMM, computed channels-last: each output pixel's receptive field gathered into a
/// row of `kh·kw·c` values (im2col; a 1 × 1 convolution at stride 1 multiplies the input as it
/// is), times the kernel as `[out, kh·kw·c]`, the bias added to each output row. The exported
/// graph feeds every convolution an NHWC tensor transposed to NCHW, which is read here in place,
/// and the result is returned as an NCHW view of NHWC values, so the transposes around it cost
/// no copies. candle's `conv2d` multiplies on the `gemm` crate's AVX2 micro-kernel on every x86
/// CPU (a fifth of Open-NSFW's forward).
fn conv_gemm(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    [top, left, bottom, right]: [usize; 4],
    stride: usize,
    dil: usize,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (b, c, h, wd) = x.dims4()?;
    let (oc, wc, kh, kw) = w.dims4()?;
    let reach = |padded: usize, k: usize| padded.checked_sub(dil * (k - 1) + 1);
    let (Some(ry), Some(rx)) = (reach(top + h + bottom, kh), reach(left + wd + right, kw)) else {
        candle_core::bail!("a {kh}×{kw} kernel does not fit a padded {h}×{wd} input");
    };
    if wc != c || stride == 0 {
        candle_core::bail!(
            "kernel {:?} for input {:?}, stride {stride}",
            w.dims(),
            x.dims()
        );
    }
    let (oh, ow) = (ry / stride + 1, rx / stride + 1);
    let bias = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    if let Some(n) = bias.as_ref().map(Vec::len).filter(|&n| n != oc) {
        candle_core::bail!("a bias of {n} values for {oc} output channels");
    }
    // Both channels-last; a view of contiguous NHWC values is not copied.
    let x = x.permute((0, 2, 3, 1))?.contiguous()?;
    let w = w.permute((0, 2, 3, 1))?.contiguous()?;
    let (xv, wv) = (crate::train::ops::view(&x)?, crate::train::ops::view(&w)?);
    let (xs, ws) = (xv.slice(), wv.slice());
    let k = kh * kw * c;
    let rows = b * oh * ow;
    let gathered;
    let cols: &[f32] = if kh == 1 && kw == 1 && stride == 1 && top + left + bottom + right == 0 {
        xs
    } else {
        let mut buf = vec![0f32; rows * k];
        // One task per output row of one image; taps outside the image stay 0.
        buf.par_chunks_mut(ow * k).enumerate().for_each(|(r, dst)| {
            let (img, oy) = (r / oh, r % oh);
            for (ox, row) in dst.chunks_exact_mut(k).enumerate() {
                for ky in 0..kh {
                    // Wraps below 0 to a huge index: out of the image, like one past the end.
                    let iy = (oy * stride + ky * dil).wrapping_sub(top);
                    for kx in 0..kw {
                        let ix = (ox * stride + kx * dil).wrapping_sub(left);
                        if iy < h && ix < wd {
                            row[(ky * kw + kx) * c..][..c]
                                .copy_from_slice(&xs[((img * h + iy) * wd + ix) * c..][..c]);
                        }
                    }
                }
            }
        });
        gathered = buf;
        &gathered
    };
    let mut y = vec![0f32; rows * oc];
    crate::kernels::matmul::matmul_t(cols, ws, rows, k, oc, &mut y);
    if let Some(bias) = &bias {
        y.par_chunks_mut(oc)
            .for_each(|r| r.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
    }
    Tensor::from_vec(y, (b, oh, ow, oc), x.device())?.permute((0, 3, 1, 2))
}

fn max_pool(node: &Node, x: &Tensor) -> OpResult {
    let (pads, stride, dilation) = window(node, x)?;
    let k = ints(node, "kernel_shape").ok_or("no kernel_shape")?;
    if k.len() != 2 || dilation != 1 || int(node, "ceil_mode", 0) != 0 {
        return err("only 2-D max pooling without dilation or ceil_mode is supported");
    }
    let x = pad_axes(
        x,
        &[0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
        Fill::Value(f32::NEG_INFINITY),
    )?;
    let y = x
        .max_pool2d_with_stride((k[0] as usize, k[1] as usize), (stride, stride))
        .map_err(|e| e.to_string())?;
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, attributes: Vec<(&str, Attribute)>) -> Node {
        Node {
            name: "n".into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: vec![],
            outputs: vec![],
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn ints_t(v: &[i64]) -> Option<Tensor> {
        Some(Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap())
    }

    fn run1(n: &Node, args: &[Option<Tensor>]) -> Tensor {
        apply(n, args).unwrap().remove(0)
    }

    fn m23() -> Tensor {
        Tensor::from_vec(
            (0..6).map(|v| v as f32).collect::<Vec<_>>(),
            (2, 3),
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn slice_clamps_and_steps_backwards() {
        let n = node("Slice", vec![]);
        // Columns 2, 1, 0 (end −10 clamps to −1: the whole axis reversed); rows from −1.
        let args = [
            Some(m23()),
            ints_t(&[-1, 5]),
            ints_t(&[i64::MAX, -10]),
            ints_t(&[0, 1]),
            ints_t(&[1, -1]),
        ];
        assert_eq!(
            run1(&n, &args).to_vec2::<f32>().unwrap(),
            vec![vec![5.0, 4.0, 3.0]]
        );
    }

    #[test]
    fn pad_constant_edge_and_crop() {
        let constant = node("Pad", vec![]);
        let args = [
            Some(m23()),
            ints_t(&[0, 1, 1, -1]),
            Some(Tensor::new(9f32, &Device::Cpu).unwrap()),
        ];
        assert_eq!(
            run1(&constant, &args).to_vec2::<f32>().unwrap(),
            vec![
                vec![9.0, 0.0, 1.0],
                vec![9.0, 3.0, 4.0],
                vec![9.0, 9.0, 9.0]
            ]
        );
        let edge = node("Pad", vec![("mode", Attribute::Bytes(b"edge".to_vec()))]);
        let args = [Some(m23()), ints_t(&[0, 2, 0, 1])];
        assert_eq!(
            run1(&edge, &args).to_vec2::<f32>().unwrap(),
            vec![
                vec![0.0, 0.0, 0.0, 1.0, 2.0, 2.0],
                vec![3.0, 3.0, 3.0, 4.0, 5.0, 5.0]
            ]
        );
    }

    #[test]
    fn gather_reshape_unsqueeze_shape_arithmetic() {
        let shape = run1(&node("Shape", vec![]), &[Some(m23())]);
        let scalar = Some(Tensor::new(-1i64, &Device::Cpu).unwrap());
        let last = run1(&node("Gather", vec![]), &[Some(shape), scalar]);
        assert_eq!((last.rank(), last.to_scalar::<i64>().unwrap()), (0, 3));
        let r = run1(
            &node("Reshape", vec![]),
            &[Some(m23()), ints_t(&[0, -1, 1])],
        );
        assert_eq!(r.dims(), &[2, 3, 1]);
        let u = run1(&node("Unsqueeze", vec![]), &[Some(m23()), ints_t(&[-1, 0])]);
        assert_eq!(u.dims(), &[1, 2, 3, 1]);
        let e = apply(&node("Reshape", vec![]), &[Some(m23()), ints_t(&[4, -1])]).unwrap_err();
        assert!(e.contains("cannot reshape"), "{e}");
    }

    /// Negative pads, zero strides and negative dilations are errors naming them, not
    /// wrapped into huge sizes.
    #[test]
    fn impossible_windows_are_errors() {
        for (name, v) in [
            ("pads", vec![0, -1, 0, 0]),
            ("strides", vec![0, 0]),
            ("dilations", vec![-2, -2]),
        ] {
            let conv = node("Conv", vec![(name, Attribute::Ints(v))]);
            let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
            let e = apply(&conv, &[Some(x), Some(w)]).unwrap_err();
            assert!(e.contains("must be ≥ 0"), "{name}: {e}");
        }
    }

    /// Asymmetric padding (taken inside the GEMM convolution's gather), stride 2, against the
    /// convolution sum written out.
    #[test]
    fn conv_with_asymmetric_pads_matches_the_direct_sum() {
        let (h, w, k) = (5usize, 6usize, 3usize);
        let x: Vec<f32> = (0..2 * h * w)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let wt: Vec<f32> = (0..3 * 2 * k * k)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let n = node(
            "Conv",
            vec![
                ("pads", Attribute::Ints(vec![1, 0, 2, 1])),
                ("strides", Attribute::Ints(vec![2, 2])),
            ],
        );
        let xt = Tensor::from_vec(x.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
        let wt_t = Tensor::from_vec(wt.clone(), (3, 2, k, k), &Device::Cpu).unwrap();
        let y = run1(&n, &[Some(xt), Some(wt_t)]);
        let (oh, ow) = ((h + 3 - k) / 2 + 1, (w + 1 - k) / 2 + 1);
        assert_eq!(y.dims(), &[1, 3, oh, ow]);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for o in 0..3 {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0f32;
                    for c in 0..2 {
                        for a in 0..k {
                            for b in 0..k {
                                let (yy, xx) = ((2 * i + a) as isize - 1, (2 * j + b) as isize);
                                if (0..h as isize).contains(&yy) && (0..w as isize).contains(&xx) {
                                    acc += wt[((o * 2 + c) * k + a) * k + b]
                                        * x[(c * h + yy as usize) * w + xx as usize];
                                }
                            }
                        }
                    }
                    let g = got[(o * oh + i) * ow + j];
                    assert!((g - acc).abs() < 1e-5, "{o},{i},{j}: {g} vs {acc}");
                }
            }
        }
    }

    /// The channels-last GEMM convolution against candle's `conv2d` (an independent
    /// implementation): two images given as an NHWC tensor transposed to NCHW (as the exported
    /// graph does), symmetric padding, strides, dilation, a bias, a 1 × 1 kernel.
    #[test]
    fn gemm_convolution_matches_candle() {
        let (b, c, h, w, oc) = (2, 5, 9, 7, 4);
        let f = |n: usize, m: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * m % 23) as f32 - 11.0) / 7.0).collect()
        };
        let nhwc = Tensor::from_vec(f(b * h * w * c, 7), (b, h, w, c), &Device::Cpu).unwrap();
        let x = nhwc.permute((0, 3, 1, 2)).unwrap();
        let bias = Tensor::from_vec(f(oc, 5), oc, &Device::Cpu).unwrap();
        for (k, pad, stride, dil) in [
            (3, 1, 1, 1),
            (3, 1, 2, 1),
            (3, 2, 1, 2),
            (1, 0, 1, 1),
            (1, 0, 2, 1),
        ] {
            let wt = Tensor::from_vec(f(oc * c * k * k, 3), (oc, c, k, k), &Device::Cpu).unwrap();
            let got = conv_gemm(&x, &wt, Some(&bias), [pad; 4], stride, dil).unwrap();
            let want = x
                .contiguous()
                .unwrap()
                .conv2d(&wt, pad, stride, dil, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, oc, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, t): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            let d = g
                .iter()
                .zip(&t)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-4,
                "k {k} pad {pad} stride {stride} dilation {dil}: differs by {d}"
            );
        }
    }
}
