//! Rotary position embedding, half-split ("rotate_half", HF/NeoX) convention: dimension `i` of a
//! head is rotated together with dimension `i + head_dim/2`. GGUF files store Q/K rows permuted
//! for the interleaved convention; the GGUF loader undoes that so one convention serves all files.

/// Positions kept in the table; later ones are computed per row, so a header that claims a
/// context of billions of tokens costs nothing until such positions are used.
const TABLE_POSITIONS: usize = 1 << 15;

/// Precomputed cos/sin per position, `[positions, head_dim/2]`, for the first
/// [`TABLE_POSITIONS`] positions.
#[derive(Clone)]
pub struct RopeTable {
    half: usize,
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, positions: usize) -> Self {
        let half = head_dim / 2;
        // Same rounding as the reference: frequencies in f32, angle in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let kept = positions.min(TABLE_POSITIONS);
        let mut cos = Vec::with_capacity(kept * half);
        let mut sin = Vec::with_capacity(kept * half);
        for p in 0..kept {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable {
            half,
            inv_freq,
            cos,
            sin,
            positions,
        }
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Rotates every head of every row of `x` (`rows × n_heads·head_dim`, row stride `stride`);
    /// row `r` sits at position `start + r`.
    pub fn apply(&self, x: &mut [f32], rows: usize, stride: usize, n_heads: usize, start: usize) {
        let x = &mut x[..rows * stride];
        super::for_row_blocks(&[], 0, x, stride, |r0, _, x| {
            self.apply_rows(x, stride, n_heads, start + r0)
        });
    }

    fn apply_rows(&self, x: &mut [f32], stride: usize, n_heads: usize, start: usize) {
        let (h, d) = (self.half, 2 * self.half);
        // Allocated only for positions past the table.
        let (mut far_cos, mut far_sin) = (Vec::new(), Vec::new());
        for r in 0..x.len() / stride {
            let p = start + r;
            let (c, s) = if p < TABLE_POSITIONS {
                (&self.cos[p * h..(p + 1) * h], &self.sin[p * h..(p + 1) * h])
            } else {
                far_cos.resize(h, 0.0);
                far_sin.resize(h, 0.0);
                for (i, f) in self.inv_freq.iter().enumerate() {
                    let angle = p as f32 * f;
                    (far_cos[i], far_sin[i]) = (angle.cos(), angle.sin());
                }
                (&far_cos[..], &far_sin[..])
            };
            for head in 0..n_heads {
                let v = &mut x[r * stride + head * d..r * stride + (head + 1) * d];
                let (a, b) = v.split_at_mut(h);
                for i in 0..h {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_pairs_by_position_angle() {
        let (d, theta) = (8usize, 10000.0f32);
        let t = RopeTable::new(d, theta, 6);
        let x: Vec<f32> = (0..2 * 2 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        t.apply(&mut y, 2, 2 * d, 2, 3);
        for r in 0..2 {
            let pos = (3 + r) as f64;
            for head in 0..2 {
                let base = r * 2 * d + head * d;
                for i in 0..d / 2 {
                    let ang = pos / (theta as f64).powf(2.0 * i as f64 / d as f64);
                    let (x1, x2) = (x[base + i] as f64, x[base + i + d / 2] as f64);
                    let want1 = x1 * ang.cos() - x2 * ang.sin();
                    let want2 = x2 * ang.cos() + x1 * ang.sin();
                    assert!((y[base + i] as f64 - want1).abs() < 1e-5);
                    assert!((y[base + i + d / 2] as f64 - want2).abs() < 1e-5);
                }
            }
        }
        // Past the table, positions are computed the same way.
        let far = RopeTable::new(d, theta, TABLE_POSITIONS + 10);
        let (mut a, mut b) = (x.clone(), x.clone());
        let p = TABLE_POSITIONS - 1;
        far.apply(&mut a, 2, 2 * d, 2, p);
        for (i, f) in far.inv_freq.iter().enumerate() {
            let angle = (p + 1) as f32 * f;
            let (c, s) = (angle.cos(), angle.sin());
            let (x1, x2) = (x[2 * d + i], x[2 * d + i + d / 2]);
            b[2 * d + i] = x1 * c - x2 * s;
            b[2 * d + i + d / 2] = x2 * c + x1 * s;
        }
        assert_eq!(&a[2 * d..3 * d], &b[2 * d..3 * d]);
        // Position 0 is the identity.
        let mut z = x.clone();
        t.apply(&mut z, 1, 2 * d, 2, 0);
        assert_eq!(&z[..2 * d], &x[..2 * d]);
    }
}
