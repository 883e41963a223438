//! Thread control. Both rayon (our kernels, faer) spin-wait briefly when idle, which on a loaded
//! 2-core machine can cost 30x in decode speed (see the stack notes), so the count is explicit:
//! set once per process, default = available cores.

use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of worker threads for every parallel kernel. Call once, before any work; later
/// calls only change the degree used by GEMMs (rayon's global pool can be built only once).
pub fn set_threads(n: usize) {
    let n = n.max(1);
    THREADS.store(n, Ordering::Relaxed);
    // An error only means the pool was already built (by an earlier call or by a test harness).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// Worker threads in use: the explicit setting, else the available cores.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// faer parallelism for one large GEMM issued from the calling thread.
pub(crate) fn gemm_par() -> faer::Par {
    match threads() {
        1 => faer::Par::Seq,
        n => faer::Par::rayon(n),
    }
}
