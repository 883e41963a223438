//! A trained parameter's gradient, summed over a step's micro-batches outside candle's gradient
//! store, and the optimiser's in-place update of a variable.
//!
//! Why: the trainer copied every gradient out of candle's store (`to_vec1`) into a sum of its
//! own, and AdamW copied every variable out and set it back: four passes over the 134.5 M
//! parameters per step beside the products, each into fresh memory. A linear whose weight has a
//! sink writes `dW` straight into it (the first micro-batch replaces, later ones add in the
//! GEMM itself), the few gradients that still come through candle's store (embedding rows,
//! norms) are added once, and AdamW updates each variable where candle stores it.

use crate::kernels::activation::add_in_place;
use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};
use faer::Accum;
use std::cell::RefCell;
use std::sync::Mutex;

/// One parameter's gradient sum for the current step; see the module doc. The sum is handed to
/// the optimiser and freed with the step: kept for the next one, it would hold a model-sized
/// buffer through every forward pass (+0.5 GB of peak memory at micro-batch 1 × 8).
#[derive(Default)]
pub struct GradSink(Mutex<Option<Vec<f32>>>);

impl GradSink {
    /// Adds a gradient of `len` values that `write(dst, acc)` computes into `dst`, replacing
    /// its contents (`Accum::Replace`: the step's first) or adding to them.
    pub fn accumulate(&self, len: usize, write: impl FnOnce(&mut [f32], Accum)) {
        let mut sum = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match sum.as_mut() {
            Some(s) if s.len() == len => write(s, Accum::Add),
            _ => {
                let mut s = vec![0.0; len];
                write(&mut s, Accum::Replace);
                *sum = Some(s);
            }
        }
    }

    /// Adds a gradient given as values (one that came through candle's store).
    pub fn add_values(&self, g: Vec<f32>) {
        let mut sum = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match sum.as_mut() {
            Some(s) if s.len() == g.len() => {
                crate::threads::install(|| add_in_place(s, &g, 1 << 12))
            }
            _ => *sum = Some(g),
        }
    }

    /// This step's sum, if any gradient arrived (the sink is empty afterwards).
    pub fn take(&self) -> Option<Vec<f32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor where they are stored (candle's
/// in-place op), instead of copying them out and setting them back.
pub fn update_in_place(t: &Tensor, f: impl FnMut(&mut [f32])) -> Result<()> {
    t.inplace_op1(&InPlace(RefCell::new(f)))
}

struct InPlace<F>(RefCell<F>);

impl<F: FnMut(&mut [f32])> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "update-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (CpuStorage::F32(v), Some((lo, hi))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("in-place update of a non-contiguous or non-f32 tensor");
        };
        (self.0.borrow_mut())(&mut v[lo..hi]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_replace_then_add() {
        let sink = GradSink::default();
        assert!(sink.take().is_none());
        let write = |v: f32| {
            move |d: &mut [f32], acc: Accum| match acc {
                Accum::Replace => d.fill(v),
                Accum::Add => d.iter_mut().for_each(|d| *d += v),
            }
        };
        sink.accumulate(3, write(1.0));
        sink.accumulate(3, write(2.0));
        sink.add_values(vec![0.5, 0.25, 0.0]);
        assert_eq!(sink.take().unwrap(), [3.5, 3.25, 3.0]);
        assert!(sink.take().is_none(), "a taken sum is gone");
        sink.accumulate(3, write(7.0));
        assert_eq!(sink.take().unwrap(), [7.0; 3]);
        // A sum that starts from candle's store.
        sink.add_values(vec![1.0, 2.0]);
        sink.accumulate(2, write(1.0));
        assert_eq!(sink.take().unwrap(), [2.0, 3.0]);
    }

    #[test]
    fn updates_a_variable_where_it_is_stored() {
        let v =
            candle_core::Var::from_vec(vec![1f32, 2.0, 3.0], 3, &candle_core::Device::Cpu).unwrap();
        update_in_place(v.as_tensor(), |x| x.iter_mut().for_each(|x| *x *= 2.0)).unwrap();
        assert_eq!(v.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
    }
}
