//! Running one job as several processes (ranks), data-parallel: the collectives the training
//! loop and calibration need, behind a trait so that the library does not depend on any one
//! engine. Clusters bring their own (an MPI under Slurm or an MPIJob: the `whittle-mpi` crate
//! implements [`Collective`] on it); [`local`] runs ranks as threads of one process, which is
//! how the distributed code paths are tested without an MPI.
//!
//! Every rank runs the same program on the same model and data and takes part in every
//! collective in the same order: a rank that skipped one would block the others, so decisions
//! that could differ between ranks (a deadline on each rank's own clock) are agreed on through
//! a collective first.

pub mod local;

use crate::{Error, Result};
use std::sync::Arc;

/// Elements per message: MPI counts are `int`, and large messages are split (a 135M-parameter
/// gradient is one tensor of 28M floats, an 8B model's embedding 500M).
pub const MAX_MESSAGE: usize = 1 << 30;

/// Elements per gradient bucket: tens of MB, so that a bucket's reduction is long enough to
/// amortise a message's latency and short enough that memory for one extra copy stays small.
pub const BUCKET: usize = 8 << 20;

/// The collectives of a group of ranks. Implementations must be usable from the thread that
/// created them (calls are never concurrent).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place, every rank receiving the result; at most
    /// [`MAX_MESSAGE`] elements a call (see [`all_reduce`]).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Self::sum_f32`], for the f64 scalars of a step (loss, counts).
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's bytes to every rank (`buf` is resized on the others); at most [`MAX_MESSAGE`]
    /// bytes a call (see [`broadcast`]).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Ends every rank of the job after an error on this one (an MPI job whose rank returned
    /// an error would otherwise wait forever in the next collective).
    fn abort(&self, code: i32) -> !;
    /// What the group is, for logs (`"MPI, 4 ranks"`).
    fn describe(&self) -> String;
}

/// One process alone: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "1 process".into()
    }
}

/// The group of a process that was not started as one of several.
pub fn single() -> Arc<dyn Collective> {
    Arc::new(Single)
}

/// Sums `buf` over the ranks in messages of at most [`MAX_MESSAGE`] elements.
pub fn all_reduce(comm: &dyn Collective, buf: &mut [f32]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    buf.chunks_mut(MAX_MESSAGE)
        .try_for_each(|chunk| comm.sum_f32(chunk))
}

/// Rank 0's `buf` to every rank, in messages of at most [`MAX_MESSAGE`] bytes.
pub fn broadcast(comm: &dyn Collective, buf: &mut Vec<u8>) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut len = (buf.len() as u64).to_le_bytes().to_vec();
    comm.broadcast_bytes(&mut len)?;
    let len = u64::from_le_bytes(
        len.try_into()
            .map_err(|_| Error::Invalid("broadcast: rank 0 sent a malformed length".into()))?,
    ) as usize;
    buf.resize(len, 0);
    for start in (0..len).step_by(MAX_MESSAGE) {
        let range = start..(start + MAX_MESSAGE).min(len);
        let mut part = buf[range.clone()].to_vec();
        comm.broadcast_bytes(&mut part)?;
        buf[range].copy_from_slice(&part);
    }
    Ok(())
}

/// Rank 0's f32 values to every rank (`buf` keeps its length; it must be the same everywhere).
pub fn broadcast_f32(comm: &dyn Collective, buf: &mut [f32]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
    broadcast(comm, &mut bytes)?;
    if bytes.len() != 4 * buf.len() {
        return Err(Error::Invalid(format!(
            "broadcast: rank 0 holds {} values, rank {} {}",
            bytes.len() / 4,
            comm.rank(),
            buf.len()
        )));
    }
    for (v, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// Sums the gradients `grads` (in the order given, the same on every rank) over the ranks, in
/// buckets of about [`BUCKET`] elements: small tensors (norms, biases) travel together, large
/// ones in pieces. Returns the elements moved per rank.
pub fn all_reduce_buckets(comm: &dyn Collective, grads: &mut [&mut Vec<f32>]) -> Result<usize> {
    if comm.size() == 1 {
        return Ok(0);
    }
    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET);
    // (tensor, offset, len) of each piece in the bucket, to copy the sums back.
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    let mut moved = 0;
    let mut flush = |bucket: &mut Vec<f32>,
                     pieces: &mut Vec<(usize, usize, usize)>,
                     grads: &mut [&mut Vec<f32>]|
     -> Result<()> {
        all_reduce(comm, bucket)?;
        moved += bucket.len();
        let mut at = 0;
        for (t, off, len) in pieces.drain(..) {
            grads[t][off..off + len].copy_from_slice(&bucket[at..at + len]);
            at += len;
        }
        bucket.clear();
        Ok(())
    };
    for t in 0..grads.len() {
        let mut off = 0;
        while off < grads[t].len() {
            let len = (grads[t].len() - off).min(BUCKET - bucket.len());
            bucket.extend_from_slice(&grads[t][off..off + len]);
            pieces.push((t, off, len));
            off += len;
            if bucket.len() == BUCKET {
                flush(&mut bucket, &mut pieces, grads)?;
            }
        }
    }
    if !bucket.is_empty() {
        flush(&mut bucket, &mut pieces, grads)?;
    }
    Ok(moved)
}

/// Fails on every rank unless every rank holds the same value of each named part (the binary,
/// the settings, the model's fingerprint, the data): a job whose ranks loaded different things
/// would train on garbage without an error. The message names the parts and the ranks.
pub fn check_agreement(comm: &dyn Collective, parts: &[(&str, Vec<u8>)]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let (n, me) = (comm.size(), comm.rank());
    // differ[p * n + r] = 1 when rank r's part p is not rank 0's.
    let mut differ = vec![0f64; parts.len() * n];
    for (p, (_, value)) in parts.iter().enumerate() {
        let mut ours = digest(value);
        broadcast(comm, &mut ours)?;
        if ours != digest(value) {
            differ[p * n + me] = 1.0;
        }
    }
    comm.sum_f64(&mut differ)?;
    let bad: Vec<String> = parts
        .iter()
        .enumerate()
        .filter_map(|(p, (name, _))| {
            let ranks: Vec<String> = (0..n)
                .filter(|r| differ[p * n + r] > 0.0)
                .map(|r| r.to_string())
                .collect();
            (!ranks.is_empty()).then(|| format!("{name} (ranks {})", ranks.join(", ")))
        })
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "the ranks of this job disagree with rank 0 on: {}; every rank must run the same \
         binary with the same model, data and settings",
        bad.join("; ")
    )))
}

thread_local! {
    static GROUP: std::cell::RefCell<Option<Arc<dyn Collective>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the one-shot calibration started on this thread spread over `comm`'s ranks
/// ([`crate::calib::sequential`] shards its windows and sums its statistics through it): the
/// methods, recipes and stages above it take no group argument and stay unchanged.
pub fn scoped<R>(comm: Arc<dyn Collective>, f: impl FnOnce() -> R) -> R {
    let before = GROUP.with(|g| g.replace(Some(comm)));
    let r = f();
    GROUP.with(|g| *g.borrow_mut() = before);
    r
}

/// The group set by [`scoped`] on this thread (this process alone otherwise).
pub fn current() -> Arc<dyn Collective> {
    GROUP.with(|g| g.borrow().clone()).unwrap_or_else(single)
}

/// Sums f64 values over the ranks in messages of at most [`MAX_MESSAGE`] elements.
pub fn all_reduce_f64(comm: &dyn Collective, buf: &mut [f64]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    buf.chunks_mut(MAX_MESSAGE)
        .try_for_each(|chunk| comm.sum_f64(chunk))
}

/// Fails on every rank when `error` is set on any: a rank whose pass failed must not leave the
/// others waiting in the next collective. Each rank returns its own error, or a pointer to the
/// rank that has one.
pub fn share_error(comm: &dyn Collective, error: &mut Option<Error>, what: &str) -> Result<()> {
    let mut failed = [error.is_some() as u8 as f64];
    comm.sum_f64(&mut failed)?;
    if failed[0] == 0.0 {
        return Ok(());
    }
    Err(error.take().unwrap_or_else(|| {
        Error::Invalid(format!("{what} failed on another rank (see its message)"))
    }))
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

/// The part of `0..total` items that `rank` of `size` takes: every `size`-th from `rank` on, so
/// that the union over ranks is every item once whatever the number of ranks.
pub fn shard(total: usize, rank: usize, size: usize) -> impl Iterator<Item = usize> {
    (rank..total).step_by(size.max(1))
}

#[cfg(test)]
mod tests {
    use super::local::LocalGroup;
    use super::*;

    /// Buckets of mixed sizes (small tensors batched, a large one split) sum to the exact
    /// per-element sums on every rank.
    #[test]
    fn bucketed_sums_match_elementwise_sums() {
        let sizes = [3usize, BUCKET + 5, 7, 2 * BUCKET, 1];
        let results = LocalGroup::run_ranks(3, |comm| {
            let r = comm.rank() as f32;
            let mut grads: Vec<Vec<f32>> = sizes
                .iter()
                .map(|&n| (0..n).map(|i| r + (i % 7) as f32).collect())
                .collect();
            let mut refs: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
            let moved = all_reduce_buckets(comm, &mut refs).unwrap();
            (grads, moved)
        });
        for (grads, moved) in results {
            assert_eq!(moved, sizes.iter().sum::<usize>());
            for g in grads {
                for (i, v) in g.iter().enumerate() {
                    assert_eq!(*v, 3.0 + 3.0 * (i % 7) as f32);
                }
            }
        }
    }

    #[test]
    fn broadcast_and_agreement() {
        let out = LocalGroup::run_ranks(3, |comm| {
            let mut buf = if comm.rank() == 0 {
                b"from rank 0".to_vec()
            } else {
                Vec::new()
            };
            broadcast(comm, &mut buf).unwrap();
            let same = check_agreement(comm, &[("model", b"m".to_vec())]);
            let data = if comm.rank() == 2 {
                b"x".to_vec()
            } else {
                b"y".to_vec()
            };
            let differs = check_agreement(comm, &[("model", b"m".to_vec()), ("data", data)]);
            (buf, same.is_ok(), differs.unwrap_err().to_string())
        });
        for (buf, same, err) in out {
            assert_eq!(buf, b"from rank 0");
            assert!(same);
            assert!(
                err.contains("data (ranks 2)") && !err.contains("model (ranks"),
                "{err}"
            );
        }
        // An error on rank 1 only is an error on every rank.
        let errs = LocalGroup::run_ranks(3, |comm| {
            let mut e = (comm.rank() == 1).then(|| Error::Invalid("NaN in rank 1".into()));
            share_error(comm, &mut e, "calibration")
                .unwrap_err()
                .to_string()
        });
        assert!(errs[1].contains("NaN in rank 1"), "{errs:?}");
        assert!(
            errs[0].contains("calibration failed on another rank"),
            "{errs:?}"
        );
        let parts: Vec<Vec<usize>> = (0..3).map(|r| shard(10, r, 3).collect()).collect();
        assert_eq!(parts, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
    }
}
