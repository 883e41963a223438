//! GPTQ (Frantar et al., 2022), as the reference `fasterquant`: the OBS column walk where each
//! column is rounded to its group's grid and the rounding error is pushed onto the later columns.
//! Group parameters are computed from the error-updated weights when the walk reaches a group's
//! first column. With act-order, columns are walked by decreasing Hessian diagonal; the group
//! parameters are then fixed up front on the original consecutive groups ("static groups"), so
//! the packed layout stays the plain contiguous one.

use super::{code, decode, exact_zero_scale, group_params, pack, QuantConfig};
use crate::calib::hessian::inverse_hessian;
use crate::calib::obs::{obs_walk, ColumnRule, WalkView};
use crate::model::Packed;
use crate::sparsity::sparsegpt::zero_dead;
use crate::Result;

struct QuantRule {
    cfg: QuantConfig,
    rows: usize,
    group: usize,
    /// Per row (scale, zero) of the group being walked (dynamic groups), or of every group of
    /// every row in original column order (static groups: `rows × groups`).
    params: Vec<(f32, f32)>,
    /// With act-order: original column of each walked position.
    perm: Option<Vec<usize>>,
    groups_per_row: usize,
    /// Dynamic groups: (scale, zero) of every row and group, filled as the walk goes.
    collected: Vec<(f32, f32)>,
    /// Walked positions that were exact zeros (a sparsity mask to keep), `rows × cols`.
    mask: Option<Vec<bool>>,
    cols: usize,
}

impl QuantRule {
    #[inline]
    fn param(&self, row: usize, j: usize) -> (f32, f32) {
        match &self.perm {
            Some(p) => self.params[row * self.groups_per_row + p[j] / self.group],
            None => self.params[row],
        }
    }
}

impl ColumnRule for QuantRule {
    fn prepare(&mut self, w: &WalkView, j: usize, _block_end: usize, _d: &[f32]) {
        if self.perm.is_some() || !j.is_multiple_of(self.group) {
            return;
        }
        let end = (j + self.group).min(w.cols());
        self.params.clear();
        let mut vals = Vec::with_capacity(end - j);
        for r in 0..self.rows {
            vals.clear();
            vals.extend((j..end).map(|c| w.get(r, c)));
            let (mut s, z) = group_params(&vals, self.cfg);
            if self.mask.is_some() {
                s = exact_zero_scale(s);
            }
            let p = (s, z);
            self.params.push(p);
            self.collected[r * self.groups_per_row + j / self.group] = p;
        }
    }

    fn apply_column(&self, j: usize, col: &[f32], out: &mut [f32]) {
        quantize_column(self, j, col, out);
    }
}

simd_dispatch! {
    /// [`QuantRule::apply_column`] at the SIMD level: [`decode`] is then what the packed matmul
    /// of that level computes (a fused multiply-add where it has FMA), and never a library call
    /// per weight (`fmaf` was 10 % of a GPTQ run).
    fn quantize_column(rule: &QuantRule, j: usize, col: &[f32], out: &mut [f32]) {
        let maxq = rule.cfg.maxq();
        for (r, (o, x)) in out.iter_mut().zip(col).enumerate() {
            *o = if rule.mask.as_ref().is_some_and(|m| m[r * rule.cols + j]) {
                0.0
            } else {
                let (s, z) = rule.param(r, j);
                decode::<FMA>(code(*x, s, z, maxq), s, z)
            };
        }
    }
}

/// Quantizes `w` (`rows × cols`) with input covariance `xtx`. Returns the packed weight and the
/// dampening used.
#[allow(clippy::too_many_arguments)]
pub fn gptq(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    xtx: &[f64],
    cfg: QuantConfig,
    block: usize,
    damp: f64,
    act_order: bool,
) -> Result<(Packed, f64)> {
    cfg.check(name, cols)?;
    crate::error::check_finite(name, w)?;
    let group = cfg.group_for(cols);
    let groups_per_row = cols.div_ceil(group);
    let mut w = w.to_vec();
    let dead: Vec<bool> = (0..cols).map(|j| xtx[j * cols + j] == 0.0).collect();
    zero_dead(&mut w, cols, &dead);
    // A sparse weight keeps its zeros: they are pinned during the walk and their scales made
    // exact (see `exact_zero_scale`).
    let sparse = super::has_mask(&w);
    let scale = |s: f32| if sparse { exact_zero_scale(s) } else { s };
    // Static groups from the original weights (act-order only).
    let static_params = |w: &[f32]| -> Vec<(f32, f32)> {
        w.chunks_exact(cols)
            .flat_map(|row| {
                row.chunks(group)
                    .map(|x| {
                        let (s, z) = group_params(x, cfg);
                        (scale(s), z)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (perm, mut walked, h) = if act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| {
            xtx[b * cols + b]
                .total_cmp(&xtx[a * cols + a])
                .then(a.cmp(&b))
        });
        let walked: Vec<f32> = w
            .chunks_exact(cols)
            .flat_map(|row| p.iter().map(move |&c| row[c]))
            .collect();
        let h: Vec<f64> = (0..cols * cols)
            .map(|k| xtx[p[k / cols] * cols + p[k % cols]])
            .collect();
        (Some(p), walked, h)
    } else {
        (None, w.clone(), xtx.to_vec())
    };
    let f = inverse_hessian(&h, cols, damp)?;
    let u: Vec<f32> = f.upper.iter().map(|v| *v as f32).collect();
    let mut rule = QuantRule {
        cfg,
        rows,
        group,
        params: if act_order {
            static_params(&w)
        } else {
            Vec::new()
        },
        perm: perm.clone(),
        groups_per_row,
        collected: vec![(0.0, 1.0); rows * groups_per_row],
        mask: sparse.then(|| walked.iter().map(|v| *v == 0.0).collect()),
        cols,
    };
    obs_walk(&mut walked, rows, cols, &u, block, &mut rule);
    let params = if act_order {
        rule.params
    } else {
        rule.collected
    };
    // Back to the original column order, then to codes under each group's parameters.
    let q: Vec<f32> = match &perm {
        Some(p) => {
            let mut q = vec![0f32; rows * cols];
            for (r, row) in walked.chunks_exact(cols).enumerate() {
                for (k, &c) in p.iter().enumerate() {
                    q[r * cols + c] = row[k];
                }
            }
            q
        }
        None => walked,
    };
    let mut codes = vec![0u8; rows * cols];
    for (i, (c, v)) in codes.iter_mut().zip(&q).enumerate() {
        let (s, z) = params[(i / cols) * groups_per_row + (i % cols) / group];
        *c = code(*v, s, z, cfg.maxq());
    }
    let (scales, zeros): (Vec<f32>, Vec<f32>) = params.into_iter().unzip();
    Ok((pack(name, &codes, rows, cols, cfg, scales, &zeros)?, f.damp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::obs::reference::{damped_inverse, naive_obs_with};

    #[test]
    fn matches_naive_obs_quantization() {
        let (rows, cols) = (8, 64);
        let (w, h) = crate::sparsity::sparsegpt::tests::layer(rows, cols, 3);
        let hinv = damped_inverse(&h, cols, 0.01);
        for (bits, group, sym, block) in
            [(4u8, 32, false, 16), (3, 64, true, 64), (4, 0, false, 32)]
        {
            let cfg = QuantConfig { bits, group, sym };
            let (p, _) = gptq("w", &w, rows, cols, &h, cfg, block, 0.01, false).unwrap();
            let mut got = vec![0f32; rows * cols];
            p.dequantize_into(cols, &mut got);
            let g = cfg.group_for(cols);
            for r in 0..rows {
                let mut sz = (1f32, 0f32);
                let want = naive_obs_with(&w[r * cols..(r + 1) * cols], &hinv, |row, j, _| {
                    if j % g == 0 {
                        let x: Vec<f32> = row[j..(j + g).min(cols)]
                            .iter()
                            .map(|v| *v as f32)
                            .collect();
                        sz = group_params(&x, cfg);
                    }
                    decode::<true>(code(row[j] as f32, sz.0, sz.1, cfg.maxq()), sz.0, sz.1) as f64
                });
                for c in 0..cols {
                    let gv = got[r * cols + c] as f64;
                    assert!(
                        (gv - want[c]).abs() < 1e-3 * (1.0 + want[c].abs()),
                        "{bits}b g{group}: r{r} c{c} {gv} vs {}",
                        want[c]
                    );
                }
            }
        }
    }

    #[test]
    fn sparse_mask_survives_gptq() {
        let (rows, cols) = (8, 64);
        let (mut w, h) = crate::sparsity::sparsegpt::tests::layer(rows, cols, 5);
        w.iter_mut().enumerate().for_each(|(i, v)| {
            if i % 4 < 2 {
                *v = 0.0
            }
        });
        for act_order in [false, true] {
            let cfg = QuantConfig {
                bits: 4,
                group: 32,
                sym: false,
            };
            let (p, _) = gptq("w", &w, rows, cols, &h, cfg, 16, 0.01, act_order).unwrap();
            let mut d = vec![1f32; rows * cols];
            p.dequantize_into(cols, &mut d);
            for (i, v) in d.iter().enumerate() {
                assert!(i % 4 >= 2 || *v == 0.0, "act_order {act_order}, {i}: {v}");
            }
            assert!(d.iter().filter(|v| **v != 0.0).count() > rows * cols / 3);
        }
    }

    #[test]
    fn gptq_beats_rtn_on_output_error_and_act_order_runs() {
        use crate::calib::stats::InputStats;
        let (rows, cols) = (16, 64);
        let (w, h) = crate::sparsity::sparsegpt::tests::layer(rows, cols, 4);
        let stats = InputStats::from_covariance(cols, h.clone(), 64);
        let cfg = QuantConfig {
            bits: 3,
            group: 32,
            sym: false,
        };
        let err = |p: &Packed| {
            let mut d = vec![0f32; rows * cols];
            p.dequantize_into(cols, &mut d);
            stats.relative_error(&w, &d, rows)
        };
        let rtn = err(&super::super::rtn("w", &w, rows, cols, cfg).unwrap());
        let g = err(&gptq("w", &w, rows, cols, &h, cfg, 32, 0.01, false)
            .unwrap()
            .0);
        let ga = err(&gptq("w", &w, rows, cols, &h, cfg, 32, 0.01, true)
            .unwrap()
            .0);
        assert!(g < rtn && ga < rtn, "gptq {g}, act-order {ga}, rtn {rtn}");
    }
}
