//! A learned (or one-shot) N:M mask as a file: per linear, the index of the chosen candidate of
//! every group (`u8 [rows, cols / m]`, safetensors, the pattern in the metadata). A quarter of a
//! byte per weight for 2:4; applying it to a model zeroes the inputs each group drops. The
//! paper's transfer experiments apply a mask learned on one model to a fine-tuned descendant,
//! so applying checks the architecture and shapes, not the weights.

use super::Candidates;
use crate::model::Model;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// The format tag written into every mask file.
const FORMAT: &str = "whittle-nm-mask-1";

#[derive(Debug, Clone, PartialEq)]
pub struct LearnedMask {
    pub n: usize,
    pub m: usize,
    /// `(linear name, rows, cols, candidate index per group)`, in the model's order.
    pub linears: Vec<(String, usize, usize, Vec<u8>)>,
    /// The architecture the mask was made for (`llama`, ...).
    pub arch: String,
}

impl LearnedMask {
    /// The candidate sets of this mask's pattern.
    pub fn candidates(&self) -> Result<Candidates> {
        Candidates::new(self.n, self.m)
    }

    /// The mask a model's zeros describe, for the linears in `names` (each group read as the
    /// candidate keeping most of its nonzero inputs): how a one-shot mask becomes a prior.
    pub fn from_zeros(model: &Model, c: &Candidates, names: &[(String, usize, usize)]) -> Self {
        let mut linears = Vec::with_capacity(names.len());
        for (i, layer) in model.layers.iter().enumerate() {
            for (name, _, lin) in layer.linears() {
                let full = format!("layers.{i}.{name}");
                let Some((_, rows, cols)) = names.iter().find(|(n, _, _)| *n == full) else {
                    continue;
                };
                let w = lin.dense_weight();
                let idx = w
                    .chunks_exact(c.m)
                    .map(|g| {
                        let kept = g
                            .iter()
                            .enumerate()
                            .filter(|(_, v)| **v != 0.0)
                            .fold(0u32, |s, (j, _)| s | 1 << j);
                        c.nearest(kept) as u8
                    })
                    .collect();
                linears.push((full, *rows, *cols, idx));
            }
        }
        LearnedMask {
            n: c.n,
            m: c.m,
            linears,
            arch: model.config.arch.name().into(),
        }
    }

    /// Zeroes in `model` every input the mask drops (the kept weights are left as they are).
    pub fn apply(&self, model: &mut Model) -> Result<()> {
        self.check(model)?;
        let c = self.candidates()?;
        let mut by_name: HashMap<&str, &[u8]> = self
            .linears
            .iter()
            .map(|(n, _, _, idx)| (n.as_str(), idx.as_slice()))
            .collect();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            for (name, _, lin) in layer.linears_mut() {
                let Some(idx) = by_name.remove(format!("layers.{i}.{name}").as_str()) else {
                    continue;
                };
                let w = lin.dense_weight_mut();
                for (g, &k) in w.chunks_exact_mut(c.m).zip(idx) {
                    for (j, v) in g.iter_mut().enumerate() {
                        if !c.keeps(k as usize, j) {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails unless every linear of the mask exists in `model` with the same shape.
    pub fn check(&self, model: &Model) -> Result<()> {
        let arch = model.config.arch.name();
        if arch != self.arch {
            return Err(Error::Invalid(format!(
                "the mask was made for a {} model, this one is {arch}",
                self.arch
            )));
        }
        let c = self.candidates()?;
        let shapes: HashMap<String, (usize, usize)> = model
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.linears().into_iter().map(move |(name, _, lin)| {
                    (
                        format!("layers.{i}.{name}"),
                        (lin.out_features, lin.in_features),
                    )
                })
            })
            .collect();
        for (name, rows, cols, idx) in &self.linears {
            match shapes.get(name) {
                None => {
                    return Err(Error::Invalid(format!(
                        "the mask covers {name}, which this model does not have"
                    )))
                }
                Some(&s) if s != (*rows, *cols) => {
                    return Err(Error::Invalid(format!(
                        "the mask of {name} is for {rows} × {cols}, the model's is {} × {}",
                        s.0, s.1
                    )))
                }
                _ => {}
            }
            if idx.len() * self.m != rows * cols || idx.iter().any(|&k| k as usize >= c.len()) {
                return Err(Error::Invalid(format!(
                    "the mask of {name} does not hold one of {} candidates per group of {}",
                    c.len(),
                    self.m
                )));
            }
        }
        Ok(())
    }

    /// Writes the mask to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let views: Vec<(String, TensorView)> = self
            .linears
            .iter()
            .map(|(name, rows, cols, idx)| {
                TensorView::new(Dtype::U8, vec![*rows, cols / self.m], idx)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Invalid(format!("mask of {name}: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("pattern".to_string(), format!("{}:{}", self.n, self.m)),
            ("arch".to_string(), self.arch.clone()),
            (
                "order".to_string(),
                self.linears
                    .iter()
                    .map(|l| l.0.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "layout".to_string(),
                "per linear: u8 [rows, cols / M], the index of the kept candidate of each group \
                 of M inputs; candidates are the M-bit sets with N bits, in increasing order, \
                 bit j = input j kept"
                    .to_string(),
            ),
        ]);
        crate::io::atomic::write_file(path, |tmp| {
            safetensors::serialize_to_file(views, Some(meta), tmp)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
        })
    }

    /// Reads a mask [`Self::save`] wrote.
    pub fn load(path: &Path) -> Result<Self> {
        use safetensors::SafeTensors;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(path, e))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(Error::format(path, "not a whittle N:M mask file"));
        }
        let pattern = super::super::Pattern::parse(meta.get("pattern").map_or("", |s| s))
            .map_err(|e| Error::format(path, e))?;
        let super::super::Pattern::NM { n, m } = pattern else {
            return Err(Error::format(path, "the mask's pattern is not N:M"));
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(path, e))?;
        let mut linears = Vec::new();
        for (name, view) in st.tensors() {
            let s = view.shape();
            if view.dtype() != safetensors::Dtype::U8 || s.len() != 2 {
                return Err(Error::format(path, format!("{name}: not a u8 matrix")));
            }
            linears.push((name, s[0], s[1] * m, view.data().to_vec()));
        }
        // The model's order, as written (safetensors keeps tensors sorted by name).
        let order: Vec<&str> = meta.get("order").map_or(vec![], |o| o.split(',').collect());
        linears.sort_by_key(|(n, ..)| order.iter().position(|o| o == n));
        Ok(LearnedMask {
            n,
            m,
            linears,
            arch: meta.get("arch").cloned().unwrap_or_default(),
        })
    }
}
