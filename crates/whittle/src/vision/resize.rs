//! Bicubic resizing with the semantics of ONNX `Resize` (mode cubic, `half_pixel` coordinates,
//! `cubic_coeff_a` = −0.75, `exclude_outside` = 0) — which is also PyTorch's
//! `interpolate(mode="bicubic", align_corners=False)`. DINOv2 resizes its 37×37 grid of position
//! embeddings this way for every input size other than 518 px, so the teacher's features match
//! the reference only if the taps, weights and edge clamping are the same.

/// Keys' cubic convolution parameter used by PyTorch and ONNX.
pub const CUBIC_A: f32 = -0.75;

/// The four tap weights for a sample at fractional offset `t` ∈ [0, 1) past its left neighbour
/// (taps at −1, 0, +1, +2), written as ONNX Runtime writes them.
fn cubic_weights(t: f32) -> [f32; 4] {
    let a = CUBIC_A;
    let (t1, u, u1) = (t + 1.0, 1.0 - t, 2.0 - t);
    [
        ((a * t1 - 5.0 * a) * t1 + 8.0 * a) * t1 - 4.0 * a,
        ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
        ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0,
        ((a * u1 - 5.0 * a) * u1 + 8.0 * a) * u1 - 4.0 * a,
    ]
}

/// For each output position along an axis of `inp` → `out` samples: the first tap's index
/// (before clamping) and the four weights. Coordinates are computed in f32 from the f32 scale
/// `out / inp`, as ONNX Runtime does.
fn axis_taps(inp: usize, out: usize) -> Vec<(isize, [f32; 4])> {
    let scale = out as f32 / inp as f32;
    (0..out)
        .map(|o| {
            let x = (o as f32 + 0.5) / scale - 0.5;
            let left = x.floor();
            (left as isize - 1, cubic_weights(x - left))
        })
        .collect()
}

/// Resizes `planes` row-major `h × w` planes (`src.len() == planes·h·w`) to `oh × ow`. Taps
/// outside the plane read the nearest edge sample. The two axes are applied one after the other
/// (the 2-D kernel is their product).
pub fn resize_cubic(
    src: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    assert_eq!(src.len(), planes * h * w, "resize_cubic: source size");
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let (tx, ty) = (axis_taps(w, ow), axis_taps(h, oh));
    let mut rows = vec![0f32; planes * h * ow];
    for (src_row, dst_row) in src.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
        for (d, (first, wt)) in dst_row.iter_mut().zip(&tx) {
            *d = (0..4)
                .map(|k| wt[k] * src_row[clamp(first + k as isize, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; planes * oh * ow];
    for (plane, dst) in rows.chunks_exact(h * ow).zip(out.chunks_exact_mut(oh * ow)) {
        for (dst_row, (first, wt)) in dst.chunks_exact_mut(ow).zip(&ty) {
            for k in 0..4 {
                let src_row = &plane[clamp(first + k as isize, h) * ow..][..ow];
                for (d, s) in dst_row.iter_mut().zip(src_row) {
                    *d += wt[k] * s;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys' kernel as the textbook states it (piecewise in |x|), evaluated in f64.
    fn keys(x: f64) -> f64 {
        let (a, x) = (CUBIC_A as f64, x.abs());
        if x <= 1.0 {
            (a + 2.0) * x.powi(3) - (a + 3.0) * x * x + 1.0
        } else if x < 2.0 {
            a * x.powi(3) - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
        } else {
            0.0
        }
    }

    /// The 2-D convolution sum written directly: every source pixel within reach, weights from
    /// the piecewise kernel, clamped reads.
    fn naive(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
        let mut out = vec![0f32; oh * ow];
        for oy in 0..oh {
            let y = (oy as f64 + 0.5) * h as f64 / oh as f64 - 0.5;
            for ox in 0..ow {
                let x = (ox as f64 + 0.5) * w as f64 / ow as f64 - 0.5;
                let mut acc = 0f64;
                for iy in (y.floor() as isize - 1)..=(y.floor() as isize + 2) {
                    for ix in (x.floor() as isize - 1)..=(x.floor() as isize + 2) {
                        let sy = iy.clamp(0, h as isize - 1) as usize;
                        let sx = ix.clamp(0, w as isize - 1) as usize;
                        acc += keys(y - iy as f64) * keys(x - ix as f64) * src[sy * w + sx] as f64;
                    }
                }
                out[oy * ow + ox] = acc as f32;
            }
        }
        out
    }

    fn pattern(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect()
    }

    #[test]
    fn matches_the_direct_convolution_sum() {
        for &(h, w, oh, ow) in &[
            (37, 37, 16, 16),
            (5, 7, 11, 3),
            (16, 16, 37, 37),
            (1, 4, 2, 9),
        ] {
            let src = pattern(2 * h * w);
            let got = resize_cubic(&src, 2, h, w, oh, ow);
            for p in 0..2 {
                let want = naive(&src[p * h * w..][..h * w], h, w, oh, ow);
                for (g, e) in got[p * oh * ow..][..oh * ow].iter().zip(&want) {
                    assert!(
                        (g - e).abs() < 2e-5 * (1.0 + e.abs()),
                        "{h}x{w}→{oh}x{ow}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_size_is_identity_and_constants_stay_constant() {
        let src = pattern(6 * 9);
        assert_eq!(resize_cubic(&src, 1, 6, 9, 6, 9), src);
        // The four weights sum to one at every offset (edges included, by clamping).
        let flat = vec![2.5f32; 2 * 37 * 37];
        for v in resize_cubic(&flat, 2, 37, 37, 16, 23) {
            assert!((v - 2.5).abs() < 1e-5, "{v}");
        }
    }
}
