//! RMSNorm (`y = x / sqrt(mean(x²) + eps) · weight`, the LM's) and LayerNorm
//! (`y = (x − mean x) / sqrt(var x + eps) · weight + bias`, the ViT's), row by row.

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

/// LayerNorm of each row of `x` (width `weight.len()`) into `y`; the variance is the biased
/// one, as PyTorch's and ONNX's.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, y: &mut [f32]) {
    let d = weight.len();
    assert_eq!(bias.len(), d);
    assert_eq!(x.len(), y.len());
    super::for_row_blocks(x, d, y, d, |_, x, y| {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, inv) = moments(xr, eps);
            let inv = inv as f32;
            // The mean as an f32 plus its remainder: `v − hi` is exact for values near the
            // mean (Sterbenz), so a row offset by 3000 keeps its small deviations' digits.
            let hi = mean as f32;
            let lo = (mean - hi as f64) as f32;
            for (((o, v), w), b) in yr.iter_mut().zip(xr).zip(weight).zip(bias) {
                *o = ((v - hi) - lo) * inv * w + b;
            }
        }
    });
}

/// A row's mean and `1 / sqrt(var + eps)`, in f64 over two passes: a one-pass `E[x²] − E[x]²`
/// cancels badly on the ViT's residual stream, whose rows carry a large common offset.
pub fn moments(x: &[f32], eps: f32) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
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

    /// Against the definition in f64, on rows with a large common offset (where a one-pass
    /// variance in f32 loses every digit), on one thread and on two (the row split).
    #[test]
    fn layer_norm_matches_definition() {
        let d = 24;
        let rows = 150;
        let x: Vec<f32> = (0..rows * d)
            .map(|i| 3000.0 + ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / d as f32).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 / 10.0 - 1.0).collect();
        for threads in [1, 2] {
            crate::threads::set_threads(threads);
            let mut y = vec![f32::NAN; rows * d];
            layer_norm(&x, &w, &b, 1e-6, &mut y);
            for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact(d)) {
                let mean = xr.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
                let var = xr.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                for i in 0..d {
                    let want =
                        (xr[i] as f64 - mean) / (var + 1e-6).sqrt() * w[i] as f64 + b[i] as f64;
                    assert!(
                        (yr[i] as f64 - want).abs() < 1e-4,
                        "{threads} threads: {} vs {want}",
                        yr[i]
                    );
                }
            }
        }
    }
}
