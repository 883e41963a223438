//! Weight quantization: round-to-nearest and GPTQ, 2–8 bits, symmetric or asymmetric, per group
//! of consecutive inputs (any multiple of 32; the last group of a row may be shorter) or per
//! output channel. Results are stored packed ([`Packed`]), never as f32.

pub mod gptq;
pub mod stage;

use crate::kernels::qdot::{block_bytes, pack_block, BLOCK};
use crate::model::Packed;
use crate::{Error, Result};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QuantConfig {
    pub bits: u8,
    /// Inputs per (scale, zero) group; 0 = one group per output channel (the whole row).
    pub group: usize,
    pub sym: bool,
}

impl QuantConfig {
    /// Fails on settings the packed format cannot hold.
    pub fn check(&self, name: &str, cols: usize) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::Invalid(format!(
                "{} bits: supported are 2 to 8",
                self.bits
            )));
        }
        if !cols.is_multiple_of(BLOCK) {
            return Err(Error::Invalid(format!(
                "{name}: {cols} inputs are not a multiple of {BLOCK}, the packing block"
            )));
        }
        if self.group != 0 && !self.group.is_multiple_of(BLOCK) {
            return Err(Error::Invalid(format!(
                "group size {} must be a multiple of {BLOCK} (or 0 for per-channel)",
                self.group
            )));
        }
        Ok(())
    }

    /// The group size for rows of `cols` inputs.
    pub fn group_for(&self, cols: usize) -> usize {
        if self.group == 0 {
            cols
        } else {
            self.group
        }
    }

    pub fn maxq(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
}

/// Scale and zero point of one group (GPTQ's `Quantizer`): the range always includes 0;
/// asymmetric maps `[min, max]` onto `0..=maxq`; symmetric uses `±max|x|` with the zero point in
/// the middle. An all-zero group gets the range `[-1, 1]`.
pub fn group_params(x: &[f32], cfg: QuantConfig) -> (f32, f32) {
    let maxq = cfg.maxq();
    let mut lo = x.iter().cloned().fold(0f32, f32::min);
    let mut hi = x.iter().cloned().fold(0f32, f32::max);
    if cfg.sym {
        hi = hi.max(-lo);
        if lo < 0.0 {
            lo = -hi;
        }
    }
    if lo == 0.0 && hi == 0.0 {
        lo = -1.0;
        hi = 1.0;
    }
    let scale = (hi - lo) / maxq;
    let zero = if cfg.sym {
        ((maxq + 1.0) / 2.0).floor()
    } else {
        round_even(-lo / scale)
    };
    (scale, zero)
}

/// `v.round_ties_even()` without a library call: the binary targets baseline x86-64, which has
/// no rounding instruction, so the standard method calls `rintf` (30 % of RTN's time measured).
/// Adding and subtracting 1.5·2²³ rounds to an integer, ties to even, in the default rounding
/// mode; values with |v| ≥ 2²² are integers already. (Only a sign of zero can differ: −0.3
/// gives +0, which no caller distinguishes.)
#[inline]
pub fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        (v + MAGIC) - MAGIC
    } else {
        v
    }
}

/// `scale` rounded to 16 significant bits, so that `scale · zero` (zero ≤ 255) is exact in f32
/// and a zero weight decodes to exactly 0 (`fma(s, z, −s·z) = 0`). Used when the weight is
/// sparse, so that quantization keeps its mask (changes the grid by < 1e-5 relative).
pub fn exact_zero_scale(s: f32) -> f32 {
    f32::from_bits((s.to_bits() + 0x80) & !0xff)
}

/// Whether `w` carries a sparsity mask whose zeros quantization must keep: at least 1/8 of its
/// entries exactly zero. Dense weights have a few exact zeros by coincidence (SmolLM2's weights,
/// dequantized from Q4_1 blocks, do); treating those as a mask rounded every scale of the
/// matrix and moved RTN int4's perplexity off the reference (33.8478 vs 33.8704).
pub(crate) fn has_mask(w: &[f32]) -> bool {
    w.iter().filter(|v| **v == 0.0).count() * 8 >= w.len()
}

/// The code of `x`: `clamp(round(x / scale) + zero, 0, maxq)`, rounding half to even in f32 as
/// PyTorch does (so ties land where the reference puts them).
#[inline]
pub fn code(x: f32, scale: f32, zero: f32, maxq: f32) -> u8 {
    (round_even(x / scale) + zero).clamp(0.0, maxq) as u8
}

/// The value a code stands for in the packed format: `fma(scale, q, −scale·zero)`, fused where
/// the SIMD level is (`FMA`), as the packed matmul of the same level expands it.
#[inline(always)]
pub fn decode<const FMA: bool>(q: u8, scale: f32, zero: f32) -> f32 {
    crate::kernels::simd::madd::<FMA>(scale, q as f32, -scale * zero)
}

/// Packs a rows × cols code matrix with per-row, per-group (scale, zero).
pub(crate) fn pack(
    name: &str,
    codes: &[u8],
    rows: usize,
    cols: usize,
    cfg: QuantConfig,
    scales: Vec<f32>,
    zeros: &[f32],
) -> Result<Packed> {
    let bb = block_bytes(cfg.bits);
    let mut data = vec![0u8; rows * cols / BLOCK * bb];
    for (b, chunk) in codes.chunks_exact(BLOCK).enumerate() {
        let q: &[u8; BLOCK] = chunk.try_into().expect("32 codes");
        pack_block(cfg.bits, q, &mut data[b * bb..(b + 1) * bb]);
    }
    let mins = scales.iter().zip(zeros).map(|(s, z)| -s * z).collect();
    Packed::new(
        name,
        (rows, cols),
        cfg.bits,
        cfg.group_for(cols),
        data,
        scales,
        mins,
    )
}

/// Round-to-nearest quantization of `w` (`rows × cols`).
/// Exact zeros in `w` (a sparsity mask) stay exact zeros.
pub fn rtn(name: &str, w: &[f32], rows: usize, cols: usize, cfg: QuantConfig) -> Result<Packed> {
    cfg.check(name, cols)?;
    crate::error::check_finite(name, w)?;
    let sparse = has_mask(w);
    let g = cfg.group_for(cols);
    let groups = cols.div_ceil(g);
    let (mut scales, mut zeros) = (vec![0f32; rows * groups], vec![0f32; rows * groups]);
    let mut codes = vec![0u8; rows * cols];
    w.par_chunks_exact(cols)
        .zip(codes.par_chunks_exact_mut(cols))
        .zip(scales.par_chunks_exact_mut(groups))
        .zip(zeros.par_chunks_exact_mut(groups))
        .for_each(|(((row, crow), srow), zrow)| {
            let groups = row.chunks(g).zip(crow.chunks_mut(g));
            for (((x, c), s_out), z_out) in groups.zip(srow).zip(zrow) {
                let (mut s, z) = group_params(x, cfg);
                if sparse {
                    s = exact_zero_scale(s);
                }
                for (xi, ci) in x.iter().zip(c.iter_mut()) {
                    *ci = code(*xi, s, z, cfg.maxq());
                }
                (*s_out, *z_out) = (s, z);
            }
        });
    pack(name, &codes, rows, cols, cfg, scales, &zeros)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantMethod {
    Rtn,
    Gptq {
        block: usize,
        damp: f64,
        act_order: bool,
    },
}

impl QuantMethod {
    pub fn parse(name: &str, act_order: bool) -> Result<Self> {
        match name {
            "rtn" => Ok(QuantMethod::Rtn),
            "gptq" => Ok(QuantMethod::Gptq {
                block: 128,
                damp: 0.01,
                act_order,
            }),
            other => Err(Error::Invalid(format!(
                "unknown quantization method '{other}' (rtn, gptq)"
            ))),
        }
    }

    pub fn needs_calibration(&self) -> bool {
        matches!(self, QuantMethod::Gptq { .. })
    }
}

/// Quantizes the targeted linears of every layer, sequentially calibrated on `windows` (GPTQ
/// needs them; RTN uses them only to report the output error). Returns one report per linear.
pub fn quantize_model(
    model: &mut crate::Model,
    windows: &[&[u32]],
    method: QuantMethod,
    cfg: QuantConfig,
    targets: &[String],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<crate::calib::sequential::LinearReport>> {
    use crate::calib::sequential::compress_each_linear;
    use crate::calib::stats::InputStats;
    use crate::model::{Linear, Site};
    if method.needs_calibration() && windows.is_empty() {
        return Err(Error::Invalid("GPTQ needs calibration windows".into()));
    }
    compress_each_linear(
        model,
        windows,
        crate::calib::stats::Covariance::Full,
        targets,
        progress,
        &mut |_, _, _| {
            Ok(Box::new(
                move |name: &str, _: Site, lin: &mut Linear, st: Option<&InputStats>| {
                    let (rows, cols) = (lin.out_features, lin.in_features);
                    let w = lin.dense_weight().into_owned();
                    let (packed, damp) = match method {
                        QuantMethod::Rtn => (rtn(name, &w, rows, cols, cfg)?, None),
                        QuantMethod::Gptq {
                            block,
                            damp,
                            act_order,
                        } => {
                            let st = st.filter(|s| s.dim == cols).ok_or_else(|| {
                                Error::Invalid(format!("{name}: GPTQ needs calibration statistics"))
                            })?;
                            let (p, d) = gptq::gptq(
                                name, &w, rows, cols, &st.xtx, cfg, block, damp, act_order,
                            )?;
                            (p, Some(d))
                        }
                    };
                    lin.set_weight(crate::model::Weight::Packed(packed));
                    Ok(crate::calib::sequential::Outcome { damp, errors: None })
                },
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_even_equals_round_ties_even() {
        let ties = [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            254.5,
            4_194_303.5,
            -4_194_302.5,
        ];
        let big = [4_194_304.0f32, 8_388_609.0, -1e9, 3.0e38];
        let mut r = 12345u32;
        let random = (0..100_000).map(|_| {
            r = r.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (r as f32 / u32::MAX as f32 - 0.5) * 600.0
        });
        for v in ties.into_iter().chain(big).chain(random) {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        assert!(round_even(f32::NAN).is_nan());
    }

    #[test]
    fn sparse_weights_keep_exact_zeros() {
        let (rows, cols) = (4, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 4 < 2 {
                    0.0
                } else {
                    ((i * 37 % 101) as f32 - 40.0) / 33.0
                }
            })
            .collect();
        let p = rtn(
            "w",
            &w,
            rows,
            cols,
            QuantConfig {
                bits: 4,
                group: 32,
                sym: false,
            },
        )
        .unwrap();
        let mut d = vec![1f32; rows * cols];
        p.dequantize_into(cols, &mut d);
        for (a, b) in w.iter().zip(&d) {
            assert!(*a != 0.0 || *b == 0.0, "{a} -> {b}");
        }
    }

    #[test]
    fn rtn_matches_the_reference_formula() {
        let (rows, cols) = (3, 96);
        // No exact zeros: those switch on mask-keeping scales (tested separately).
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 40.5) / 33.0)
            .collect();
        for (bits, group, sym) in [
            (4u8, 64, false),
            (4, 32, true),
            (3, 0, false),
            (8, 32, false),
            (2, 64, true),
        ] {
            let cfg = QuantConfig { bits, group, sym };
            let p = rtn("w", &w, rows, cols, cfg).unwrap();
            let mut deq = vec![0f32; rows * cols];
            p.dequantize_into(cols, &mut deq);
            let g = cfg.group_for(cols);
            let maxq = cfg.maxq();
            for r in 0..rows {
                for g0 in (0..cols).step_by(g) {
                    let x = &w[r * cols + g0..r * cols + (g0 + g).min(cols)];
                    // Independent statement of the reference (GPTQ Quantizer, torch f32 ops).
                    let mut lo = x.iter().fold(0f32, |m, v| m.min(*v));
                    let mut hi = x.iter().fold(0f32, |m, v| m.max(*v));
                    if sym {
                        hi = hi.max(-lo);
                        if lo < 0.0 {
                            lo = -hi;
                        }
                    }
                    let s = (hi - lo) / maxq;
                    let z = if sym {
                        ((maxq + 1.0) / 2.0).floor()
                    } else {
                        (-lo / s).round_ties_even()
                    };
                    for (k, xv) in x.iter().enumerate() {
                        let q = ((*xv / s).round_ties_even() + z).clamp(0.0, maxq);
                        let want = (s * (q - z)) as f64;
                        let got = deq[r * cols + g0 + k] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{bits}b g{group} sym {sym}: r{r} g0 {g0} k{k} x {xv} s {s} z {z} q {q}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(rtn(
            "w",
            &w,
            rows,
            cols,
            QuantConfig {
                bits: 9,
                group: 32,
                sym: false
            }
        )
        .is_err());
        assert!(rtn(
            "w",
            &w,
            rows,
            cols,
            QuantConfig {
                bits: 4,
                group: 48,
                sym: false
            }
        )
        .is_err());
    }
}
