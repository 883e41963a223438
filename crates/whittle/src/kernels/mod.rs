//! Numeric kernels of the forward pass, on plain row-major `f32` slices. Each is tested against a
//! naive loop in its own module. They are written by hand (rather than as candle ops) because the
//! forward pass is the speed target of the project: every kernel works in place on reused buffers
//! and the GEMMs go straight to faer.

/// Defines `fn $name` whose body runs compiled for the level [`simd::level`] gives: for
/// AVX-512 or AVX2+FMA where that is the level, else as portable code. The binary targets the
/// baseline of its architecture (so one build runs everywhere), but the elementwise loops of the
/// forward pass (exp in softmax and SiLU) only keep up with the GEMMs when vectorised wide.
///
/// The body is generic over `const FMA: bool` (true where the level has fused multiply-add):
/// it passes it on to [`simd::madd`] and [`exp::exp_approx`], so that the portable x86 body
/// never calls libm's software `fmaf` for a `mul_add`.
///
/// `fn name, name_at(...)` also defines `name_at(level, ...)`, which runs at a level the caller
/// resolved once (e.g. on the thread that hands rows to workers, so a forced level reaches them);
/// `fn _, name_at(...)` defines that one alone.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn _, $at:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        simd_dispatch!(@at $(#[$m])* $vis $at($($arg: $ty),*) $(-> $ret)? $body);
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            simd_dispatch!(@at at($($arg: $ty),*) $(-> $ret)? $body);
            at($crate::kernels::simd::level(), $($arg),*)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident, $at:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $at($crate::kernels::simd::level(), $($arg),*)
        }
        simd_dispatch!(@at $(#[$m])* $vis $at($($arg: $ty),*) $(-> $ret)? $body);
    };
    (@at $(#[$m:meta])* $vis:vis $at:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline]
        $vis fn $at(level: $crate::kernels::simd::Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            match level {
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::simd::Level::Avx512 | $crate::kernels::simd::Level::Amx => {
                    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                    unsafe fn v512($($arg: $ty),*) $(-> $ret)? { body::<true>($($arg),*) }
                    // SAFETY: a level is only ever one the CPU runs (`simd::Level::runs_here`).
                    unsafe { v512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::simd::Level::Avx2 => {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v256($($arg: $ty),*) $(-> $ret)? { body::<true>($($arg),*) }
                    // SAFETY: as above.
                    unsafe { v256($($arg),*) }
                }
                _ => body::<{ cfg!(target_arch = "aarch64") }>($($arg),*),
            }
        }
    };
}

/// Grows `buf` to at least `n` elements and returns its first `n`. Scratch buffers reused
/// between products of different sizes are never shrunk, so a product after a smaller one does
/// not pay a zero-fill of the difference (`Vec::resize`'s memset was 2 % of prefill 512).
pub(crate) fn scratch<T: Clone + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// Rows per task when the row-wise kernels (RMSNorm, SwiGLU, RoPE, residual adds) run in
/// parallel. They are ~5 % of prefill's CPU time; on one thread while the other waited, they
/// were ~9 % of its wall time with 2 threads.
const ROWS_PER_TASK: usize = 64;

/// Runs `f(first_row, x_rows, y_rows)` over blocks of rows of `y` (rows `yw` wide) and the same
/// rows of `x` (`xw` wide; `xw = 0`: no `x`), in parallel when there are more rows than one
/// block and several threads; otherwise once over everything.
pub(crate) fn for_row_blocks(
    x: &[f32],
    xw: usize,
    y: &mut [f32],
    yw: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync + Send,
) {
    use rayon::prelude::*;
    let rows = y.len() / yw.max(1);
    if rows <= ROWS_PER_TASK || crate::threads::threads() == 1 {
        return f(0, x, y);
    }
    let step = ROWS_PER_TASK * xw;
    let x_of = |b: usize| &x[(b * step).min(x.len())..((b + 1) * step).min(x.len())];
    y.par_chunks_mut(ROWS_PER_TASK * yw)
        .enumerate()
        .for_each(|(b, ys)| f(b * ROWS_PER_TASK, x_of(b), ys));
}

pub mod activation;
pub mod amx;
pub mod attention;
pub mod dot;
pub mod exp;
pub mod f16;
pub mod gumbel;
pub mod matmul;
pub mod matmul_small;
pub mod norm;
pub mod qdot;
pub mod qdot_i16;
pub mod rope;
pub mod simd;
pub mod sparse24;
pub mod sparse24_int;
pub mod ssm;

#[cfg(test)]
mod tests {
    /// Each block of rows gets the same rows of both operands and the index of its first row,
    /// in parallel (150 rows: three blocks) as on one thread.
    #[test]
    fn row_blocks_see_matching_rows() {
        let (rows, xw, yw) = (150, 3, 2);
        let x: Vec<f32> = (0..rows * xw).map(|i| i as f32).collect();
        let mut y = vec![f32::NAN; rows * yw];
        super::for_row_blocks(&x, xw, &mut y, yw, |r0, x, y| {
            let pairs = x.chunks_exact(xw).zip(y.chunks_exact_mut(yw));
            for (i, (xr, yr)) in pairs.enumerate() {
                yr[0] = xr[0];
                yr[1] = (r0 + i) as f32;
            }
        });
        for (r, yr) in y.chunks_exact(yw).enumerate() {
            assert_eq!(yr, [(r * xw) as f32, r as f32]);
        }
    }
}
