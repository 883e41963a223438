//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · weight`, row by row.

/// Normalises each row of `x` (width `weight.len()`) into `y`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), y.len());
    super::for_row_blocks(x, d, y, d, |_, x, y| norm_rows(x, weight, eps, y));
}

fn norm_rows(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let d = weight.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        // f64 accumulation: the mean of squares of hidden states with outliers of ~1e3 loses digits
        // in f32, and this is a tiny fraction of the layer's work.
        let ms = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for ((o, v), w) in yr.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 4.0, 0.0, -1.0, 2.0];
        let w = [0.5f32, 1.0, 2.0, -1.0];
        let mut y = [0f32; 8];
        rms_norm(&x, &w, 1e-5, &mut y);
        for r in 0..2 {
            let row = &x[r * 4..r * 4 + 4];
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            for i in 0..4 {
                let want = row[i] / (ms + 1e-5).sqrt() * w[i];
                assert!((y[r * 4 + i] - want).abs() < 1e-6);
            }
        }
    }
}
