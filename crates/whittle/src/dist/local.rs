//! Ranks as threads of one process, exchanging through shared memory: the distributed code
//! paths (sharding, bucketed sums, agreement checks, rank 0's checkpoints) run and are tested
//! without an MPI. Sums add the ranks' values in rank order, so that every rank gets the same
//! bits, as an MPI reduction does.

use super::Collective;
use crate::Result;
use std::sync::{Arc, Barrier, Mutex};

struct Shared {
    size: usize,
    barrier: Barrier,
    f32s: Mutex<Vec<Vec<f32>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
    bytes: Mutex<Vec<u8>>,
}

/// One rank of a group of threads.
#[derive(Clone)]
pub struct LocalGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl LocalGroup {
    /// The `size` ranks of a new group, to hand one to each thread.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            f32s: Mutex::new(vec![Vec::new(); size]),
            f64s: Mutex::new(vec![Vec::new(); size]),
            bytes: Mutex::new(Vec::new()),
        });
        (0..size)
            .map(|rank| LocalGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }

    /// Runs `f` on `size` threads, one rank each; returns their results in rank order.
    pub fn run_ranks<T: Send>(size: usize, f: impl Fn(&LocalGroup) -> T + Sync) -> Vec<T> {
        let ranks = LocalGroup::new(size);
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter().map(|r| s.spawn(|| f(r))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked"))
                .collect()
        })
    }

    /// This rank as a shared collective (what a trainer joins).
    pub fn handle(&self) -> Arc<dyn Collective> {
        Arc::new(self.clone())
    }

    /// Every rank's `buf` in its slot, then each rank sums the slots in rank order.
    fn sum<T: Copy + std::ops::Add<Output = T>>(&self, slots: &Mutex<Vec<Vec<T>>>, buf: &mut [T]) {
        slots.lock().expect("no rank panics holding it")[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = slots.lock().expect("no rank panics holding it");
            for (i, v) in buf.iter_mut().enumerate() {
                *v = all[1..].iter().fold(all[0][i], |acc, s| acc + s[i]);
            }
        }
        // Nobody writes the next values before everyone has read these.
        self.shared.barrier.wait();
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(&self.shared.f32s, buf);
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(&self.shared.f64s, buf);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            *self.shared.bytes.lock().expect("no rank panics holding it") = buf.clone();
        }
        self.shared.barrier.wait();
        if self.rank != 0 {
            *buf = self
                .shared
                .bytes
                .lock()
                .expect("no rank panics holding it")
                .clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the group (code {code})", self.rank)
    }
    fn describe(&self) -> String {
        format!("{} threads as ranks", self.shared.size)
    }
}
