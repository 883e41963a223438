//! Thread control. Both rayon (our kernels, faer) spin-wait briefly when idle, which on a loaded
//! 2-core machine can cost 30x in decode speed (see the stack notes), so the count is explicit:
//! set once per process, default = available cores.

mod team;

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

/// [`set_threads`] for a whole program, from its `main` before any other thread exists (it
/// writes an environment variable, which is only sound while no other thread reads them): also
/// sizes candle's own pool, which runs its element-wise CPU ops (a training graph's adds and
/// gradient sums) and is sized when first used by `CANDLE_NUM_THREADS`, else by the physical
/// cores. Without it a `--threads 1` training run still ran those ops on two threads, and
/// beside another job the spin-wait for the second thread was ~5 % of its profile.
pub fn set_process_threads(n: usize) {
    std::env::set_var("CANDLE_NUM_THREADS", n.max(1).to_string());
    set_threads(n);
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

/// Runs `f` on every item, split between the worker threads. For short, frequent parallel
/// sections (decode's matrix-vector products): they run on [`team`]'s helpers, which spin
/// between jobs, and on rayon only when another thread holds the team.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let n = threads();
    if n == 1 || items.len() <= 1 {
        items.iter_mut().for_each(f);
        return;
    }
    let base = Items(items.as_mut_ptr());
    // SAFETY: the team hands out each index once, so each item is borrowed by one thread, and
    // `run` returns only after every index was processed.
    let each = |i: usize| f(unsafe { &mut *base.at(i) });
    if !team::run(n - 1, items.len(), &each) {
        use rayon::prelude::*;
        items.par_iter_mut().for_each(&f);
    }
}

/// The items' base pointer, shared by the threads that process distinct items.
struct Items<T>(*mut T);
// SAFETY: only used to reach distinct items from distinct threads (see `for_each_mut`).
unsafe impl<T: Send> Send for Items<T> {}
unsafe impl<T: Send> Sync for Items<T> {}

impl<T> Items<T> {
    /// Accessor so closures capture the whole (Sync) wrapper, not its raw field.
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

#[cfg(test)]
mod tests {
    /// Every item is visited exactly once, on the team (also back to back, and with a
    /// panicking item re-raised on the caller).
    #[test]
    fn for_each_mut_visits_every_item_once() {
        super::set_threads(2);
        for round in 0..200 {
            let mut v: Vec<usize> = vec![0; 1 + round % 37];
            super::for_each_mut(&mut v, |x| *x += 1);
            assert!(v.iter().all(|x| *x == 1), "round {round}");
        }
        let caught = std::panic::catch_unwind(|| {
            let mut v = vec![0u8; 8];
            super::for_each_mut(&mut v, |x| {
                *x += 1;
                assert!(*x < 1, "item panics");
            });
        });
        assert!(caught.is_err());
        let mut v = vec![1u32; 9];
        super::for_each_mut(&mut v, |x| *x *= 3);
        assert_eq!(v, vec![3; 9]);
    }
}
