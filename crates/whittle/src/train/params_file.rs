//! The trained tensors and their AdamW moments in one safetensors file (`param/NAME`,
//! `m/NAME`, `v/NAME`): what a checkpoint stores so that a resumed run continues exactly. Any
//! trainer (language models, vision students) writes and reads it here.

use super::optim::Moments;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Writes the variables `names` of `vars` and their moments (where present) to `path`.
pub fn save(
    path: &Path,
    names: &[String],
    vars: &HashMap<String, Var>,
    moments: &HashMap<String, Moments>,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        let var = vars
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("no trained variable '{name}'")))?;
        tensors.insert(format!("param/{name}"), var.as_tensor().clone());
        if let Some(m) = moments.get(name) {
            let shape = var.dims().to_vec();
            tensors.insert(
                format!("m/{name}"),
                Tensor::from_slice(&m.m, shape.clone(), &Device::Cpu)?,
            );
            tensors.insert(
                format!("v/{name}"),
                Tensor::from_slice(&m.v, shape, &Device::Cpu)?,
            );
        }
    }
    // A full disk or another write error names the file (candle's error would not).
    candle_core::safetensors::save(&tensors, path).map_err(|e| match e {
        candle_core::Error::SafeTensor(safetensors::SafeTensorError::IoError(cause))
        | candle_core::Error::Io(cause) => Error::io(path, cause),
        e => Error::format(path, e),
    })
}

/// Sets `vars` (every one of `names`, shapes checked) and `moments` from the file `path`.
pub fn load(
    path: &Path,
    names: &[String],
    vars: &HashMap<String, Var>,
    moments: &mut HashMap<String, Moments>,
) -> Result<()> {
    let saved =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::format(path, e))?;
    for name in names {
        let var = vars
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("no trained variable '{name}'")))?;
        let p = saved
            .get(&format!("param/{name}"))
            .ok_or_else(|| Error::format(path, format!("parameter {name} missing")))?;
        if p.dims() != var.dims() {
            return Err(Error::format(
                path,
                format!(
                    "parameter {name}: shape {:?}, model has {:?}",
                    p.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(p)?;
        if let (Some(m), Some(v)) = (
            saved.get(&format!("m/{name}")),
            saved.get(&format!("v/{name}")),
        ) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                return Err(Error::format(
                    path,
                    format!("optimizer moments of {name} do not match its shape"),
                ));
            }
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
            };
            moments.insert(
                name.clone(),
                Moments {
                    m: flat(m)?,
                    v: flat(v)?,
                },
            );
        }
    }
    Ok(())
}
