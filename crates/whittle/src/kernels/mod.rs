//! Numeric kernels of the forward pass, on plain row-major `f32` slices. Each is tested against a
//! naive loop in its own module. They are written by hand (rather than as candle ops) because the
//! forward pass is the speed target of the project: every kernel works in place on reused buffers
//! and the GEMMs go straight to faer.

/// Defines `fn $name` that runs its body compiled for AVX-512 or AVX2+FMA when the CPU has them.
/// The binary targets baseline x86-64 (so one build runs everywhere), but the elementwise loops
/// of the forward pass (exp in softmax and SiLU) only keep up with the GEMMs when vectorised wide.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    return unsafe { v512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    return unsafe { v256($($arg),*) };
                }
            }
            body($($arg),*)
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

pub mod activation;
pub mod amx;
pub mod attention;
pub mod dot;
pub mod exp;
pub mod matmul;
pub mod norm;
pub mod qdot;
pub mod rope;
pub mod ssm;
