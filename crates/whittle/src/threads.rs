//! Thread control. Both rayon (our kernels, faer) spin-wait briefly when idle, which on a loaded
//! 2-core machine can cost 30x in decode speed (see the stack notes), so the count is explicit:
//! set once per process, default = available cores.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

thread_local! {
    /// Set while this thread runs one item of an item-parallel loop ([`one_thread`]).
    static ONE_THREAD: Cell<bool> = const { Cell::new(false) };
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// Sets the number of worker threads for every parallel kernel. Call once, before any work: the
/// pool is built on first use with the count set then.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
    // Parallel loops issued outside [`install`] (e.g. per-row quantization) run on rayon's
    // global pool: give it the same count. Only the first call can size it; later calls (tests)
    // leave it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global();
}

/// Runs `f` on a worker of whittle's thread pool, so that every parallel section inside it
/// (rayon iterators, faer GEMMs) runs on that pool. A decode step opens ~120 sections; issued
/// from a thread outside the pool, each would also put the caller to sleep and wake it again,
/// while a worker simply takes part in the work.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if threads() == 1 {
        return f();
    }
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .thread_name(|i| format!("whittle-{i}"))
            .build()
            .expect("cannot start worker threads")
    })
    .install(f)
}

/// Runs `f` with every kernel it calls on this thread alone. For loops over independent items
/// of similar size (calibration windows): a thread per item scales better than splitting each
/// item's GEMMs, norms and attention between threads, which synchronises at every kernel.
pub fn one_thread<R>(f: impl FnOnce() -> R) -> R {
    let before = ONE_THREAD.with(|c| c.replace(true));
    let r = f();
    ONE_THREAD.with(|c| c.set(before));
    r
}

/// Worker threads in use: the explicit setting, else the available cores (1 inside
/// [`one_thread`]).
pub fn threads() -> usize {
    if ONE_THREAD.with(|c| c.get()) {
        return 1;
    }
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
