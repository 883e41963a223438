//! SparseGPT (Frantar & Alistarh, 2023), as the reference `fasterprune`: the OBS column walk
//! where, at every M-th column, the N:M mask of the next M columns is chosen on the saliency
//! `w² / [H⁻¹]_jj²` of the already-updated weights (for unstructured sparsity: one threshold per
//! block of columns), and each pruned weight's error is pushed onto the later columns.

use super::pattern::{nm_prune_mask, row_prune_mask, Pattern};
use crate::calib::hessian::inverse_hessian;
use crate::calib::obs::{obs_walk, ColumnRule, WalkView};
use crate::Result;

struct PruneRule {
    pattern: Pattern,
    rows: usize,
    /// Prune flags of the current selection window (`rows × width`), starting at column `start`.
    mask: Vec<bool>,
    start: usize,
    width: usize,
}

impl ColumnRule for PruneRule {
    fn prepare(&mut self, w: &WalkView, j: usize, block_end: usize, d: &[f32]) {
        let sal = |r: usize, c: usize| {
            let v = w.get(r, c);
            v * v / (d[c] * d[c])
        };
        match self.pattern {
            Pattern::NM { n, m } if j.is_multiple_of(m) => {
                self.start = j;
                self.width = m;
                self.mask.resize(self.rows * m, false);
                let mut s = vec![0f32; m];
                for r in 0..self.rows {
                    for (k, sk) in s.iter_mut().enumerate() {
                        *sk = sal(r, j + k);
                    }
                    nm_prune_mask(&s, n, m, &mut self.mask[r * m..(r + 1) * m]);
                }
            }
            Pattern::Unstructured { ratio } if j == self.start + self.width || self.width == 0 => {
                // A new block: one threshold over all its saliencies (the reference's choice).
                // Exactly ⌊count·ratio⌋ lowest (the original's `<= threshold` prunes one more
                // and every tie).
                let width = block_end - j;
                let all: Vec<f32> = (0..self.rows)
                    .flat_map(|r| (j..block_end).map(move |c| (r, c)))
                    .map(|(r, c)| sal(r, c))
                    .collect();
                self.mask = vec![false; all.len()];
                row_prune_mask(&all, ratio, &mut self.mask);
                self.start = j;
                self.width = width;
            }
            _ => {}
        }
    }

    fn apply_column(&self, j: usize, col: &[f32], out: &mut [f32]) {
        for (r, (o, x)) in out.iter_mut().zip(col).enumerate() {
            let pruned = self.mask[r * self.width + (j - self.start)];
            *o = if pruned { 0.0 } else { *x };
        }
    }
}

/// Prunes `w` (`rows × cols`) with input covariance `xtx`. Returns the dampening used.
pub fn sparsegpt(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    xtx: &[f64],
    pattern: Pattern,
    block: usize,
    damp: f64,
) -> Result<f64> {
    let f = inverse_hessian(xtx, cols, damp)?;
    zero_dead(w, cols, &f.dead);
    let u: Vec<f32> = f.upper.iter().map(|v| *v as f32).collect();
    let mut rule = PruneRule {
        pattern,
        rows,
        mask: Vec::new(),
        start: 0,
        width: 0,
    };
    obs_walk(w, rows, cols, &u, block, &mut rule);
    Ok(f.damp)
}

/// Zeroes the weights of inputs that never fire (their Hessian row is zero).
pub(crate) fn zero_dead(w: &mut [f32], cols: usize, dead: &[bool]) {
    if dead.iter().any(|d| *d) {
        for row in w.chunks_exact_mut(cols) {
            for (v, d) in row.iter_mut().zip(dead) {
                if *d {
                    *v = 0.0;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::calib::obs::reference::{damped_inverse, naive_obs};

    /// Anisotropic inputs: column scales spread over two orders of magnitude, correlated.
    pub(crate) fn layer(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let n = 64;
        let mut x = vec![0f64; n * cols];
        for t in 0..n {
            let common: f64 = rng.random_range(-1.0..1.0);
            for c in 0..cols {
                let scale = 10f64.powf(c as f64 / cols as f64 * 2.0 - 1.0);
                x[t * cols + c] = scale * (rng.random_range(-1.0..1.0) + 0.5 * common);
            }
        }
        let mut h = vec![0f64; cols * cols];
        for t in 0..n {
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += x[t * cols + a] * x[t * cols + b];
                }
            }
        }
        (w, h)
    }

    #[test]
    fn nm_matches_naive_obs_and_masks_are_exact() {
        let (rows, cols) = (16, 16);
        let (w0, h) = layer(rows, cols, 1);
        for (n, m, block) in [(2, 4, 16), (2, 4, 8), (1, 4, 4), (4, 8, 16)] {
            let mut w = w0.clone();
            sparsegpt(&mut w, rows, cols, &h, Pattern::NM { n, m }, block, 0.01).unwrap();
            let hinv = damped_inverse(&h, cols, 0.01);
            for r in 0..rows {
                let mut pruned: Vec<usize> = Vec::new();
                let want = naive_obs(&w0[r * cols..(r + 1) * cols], &hinv, |row, j, pivots| {
                    // The group's mask is chosen when the walk reaches the group's start.
                    if j % m == 0 {
                        let mut s: Vec<(f64, usize)> = (j..j + m)
                            .map(|k| (row[k] * row[k] / pivots[k], k))
                            .collect();
                        s.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                        pruned = s[..m - n].iter().map(|&(_, k)| k).collect();
                    }
                    pruned.contains(&j)
                });
                for c in 0..cols {
                    let got = w[r * cols + c] as f64;
                    assert!(
                        (got - want[c]).abs() < 1e-3 * (1.0 + want[c].abs()),
                        "{n}:{m} r{r} c{c}: {got} vs {}",
                        want[c]
                    );
                }
                for g in w[r * cols..(r + 1) * cols].chunks_exact(m) {
                    assert_eq!(g.iter().filter(|v| **v != 0.0).count(), n, "{n}:{m}");
                }
            }
        }
    }

    #[test]
    fn unstructured_prunes_the_requested_fraction() {
        let (rows, cols) = (16, 32);
        let (mut w, h) = layer(rows, cols, 2);
        sparsegpt(
            &mut w,
            rows,
            cols,
            &h,
            Pattern::Unstructured { ratio: 0.5 },
            16,
            0.01,
        )
        .unwrap();
        let zeros = w.iter().filter(|v| **v == 0.0).count();
        assert_eq!(zeros, rows * cols / 2);
    }
}
