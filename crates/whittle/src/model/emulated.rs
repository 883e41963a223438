//! Emulated updates: what stands in for a removed sublayer or block. A pre-norm residual unit
//! adds `f(x)` to the residual stream `x`; when the unit is removed, a cheap affine map fitted to
//! `f` on calibration data (`x + f(x) ≈ x + B·A·x + b`, "A deeper look at depth pruning of LLMs")
//! recovers much of what the unit did at a fraction of its cost. The map reads the raw residual
//! stream (no norm), so it needs no weights of the removed unit.

use super::Linear;
use crate::error::check_finite;
use crate::kernels::activation::add_in_place;
use crate::{Error, Result};

/// `x += maps(x) + bias`, with `maps` applied in order: none (a constant bias, the mean update),
/// one `hidden × hidden` linear, or a rank-`r` pair `[A: r × hidden, B: hidden × r]`.
#[derive(Debug, Clone)]
pub struct Emulation {
    pub maps: Vec<Linear>,
    pub bias: Vec<f32>,
}

/// The stand-ins of one layer: for its mixer (or, when the whole block was removed, for the
/// block: fitted on the block's input and output) and for its MLP. Each is present only where the
/// unit it replaces is absent.
#[derive(Debug, Clone, Default)]
pub struct Emulated {
    pub mixer: Option<Emulation>,
    pub mlp: Option<Emulation>,
}

impl Emulation {
    /// Adds the emulated update to `x` (`rows × hidden`) in place.
    pub fn apply(&self, x: &mut [f32], rows: usize) {
        let h = self.bias.len();
        // The maps' output; the first map reads `x` itself.
        let mut mapped: Option<Vec<f32>> = None;
        for m in &self.maps {
            let mut next = vec![0f32; rows * m.out_features];
            m.forward(mapped.as_deref().unwrap_or(x), rows, &mut next);
            mapped = Some(next);
        }
        if let Some(update) = mapped {
            add_in_place(x, &update, h);
        }
        for row in x.chunks_exact_mut(h) {
            add_in_place(row, &self.bias, h);
        }
    }

    /// Rank of the map: 0 for a bias alone, `hidden` for a full linear.
    pub fn rank(&self) -> usize {
        match self.maps.as_slice() {
            [] => 0,
            [m, ..] => m.out_features,
        }
    }

    pub fn n_params(&self) -> usize {
        self.bias.len() + self.maps.iter().map(Linear::n_params).sum::<usize>()
    }

    /// Checks that the maps chain `hidden → … → hidden` and that every value is finite.
    pub fn validate(&self, name: &str, hidden: usize) -> Result<()> {
        if self.bias.len() != hidden || self.maps.len() > 2 {
            return Err(Error::Invalid(format!(
                "{name}: an emulated update has a bias of width {hidden} and at most two maps \
                 (found a bias of {} and {} maps)",
                self.bias.len(),
                self.maps.len()
            )));
        }
        check_finite(&format!("{name}.bias"), &self.bias)?;
        let mut width = hidden;
        for (k, m) in self.maps.iter().enumerate() {
            if m.in_features != width {
                return Err(Error::Shape {
                    name: format!("{name}.{k}"),
                    expected: vec![m.out_features, width],
                    found: vec![m.out_features, m.in_features],
                });
            }
            m.check_finite(&format!("{name}.{k}"))?;
            width = m.out_features;
        }
        if width != hidden {
            return Err(Error::Invalid(format!(
                "{name}: the maps end at width {width}, not the hidden width {hidden}"
            )));
        }
        Ok(())
    }
}

impl Emulated {
    /// `[("mixer", …), ("mlp", …)]`, the present ones, for writers and visitors.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, &Emulation)> {
        [("mixer", &self.mixer), ("mlp", &self.mlp)]
            .into_iter()
            .filter_map(|(n, e)| e.as_ref().map(|e| (n, e)))
    }

    /// [`Emulated::named`], mutable.
    pub fn named_mut(&mut self) -> impl Iterator<Item = (&'static str, &mut Emulation)> {
        [("mixer", &mut self.mixer), ("mlp", &mut self.mlp)]
            .into_iter()
            .filter_map(|(n, e)| e.as_mut().map(|e| (n, e)))
    }

    pub fn is_empty(&self) -> bool {
        self.mixer.is_none() && self.mlp.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_bias_full_and_low_rank_maps_like_a_loop() {
        let h = 3;
        let x: Vec<f32> = vec![1.0, -2.0, 0.5, 0.0, 3.0, 1.0];
        let bias = vec![0.1, 0.2, -0.3];
        let a = Linear::dense("a", vec![1.0, 0.0, 2.0], 1, h).unwrap();
        let b = Linear::dense("b", vec![1.0, -1.0, 0.5], h, 1).unwrap();
        let full: Vec<f32> = (0..9).map(|i| i as f32 * 0.1).collect();
        let w = Linear::dense("w", full.clone(), h, h).unwrap();
        for maps in [vec![], vec![w], vec![a, b]] {
            let e = Emulation {
                maps: maps.clone(),
                bias: bias.clone(),
            };
            e.validate("t", h).unwrap();
            let mut got = x.clone();
            e.apply(&mut got, 2);
            for r in 0..2 {
                let xr = &x[r * h..][..h];
                for o in 0..h {
                    let f = match maps.len() {
                        0 => 0.0,
                        1 => (0..h).map(|i| full[o * h + i] * xr[i]).sum(),
                        _ => [1.0, -1.0, 0.5][o] * (xr[0] + 2.0 * xr[2]),
                    };
                    let want = xr[o] + f + bias[o];
                    assert!((got[r * h + o] - want).abs() < 1e-6, "{maps:?}");
                }
            }
        }
        let bad = Emulation {
            maps: vec![Linear::dense("a", vec![0.0; 6], 2, h).unwrap()],
            bias: bias.clone(),
        };
        assert!(bad.validate("t", h).is_err());
    }
}
