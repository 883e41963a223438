//! whittle's [`Collective`] over MPI: `mpirun -n N --bind-to none whittle ... --distributed`
//! runs one rank per process (per machine, with its own threads). A separate crate so that the
//! library and the default binary build without an MPI installed.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::Arc;
use whittle::dist::Collective;
use whittle::{Error, Result};

/// `MPI_COMM_WORLD` of an initialised MPI; finalises MPI when dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    threading: mpi::Threading,
    // Dropped last: finalising MPI ends every communicator.
    _universe: Universe,
}

// SAFETY: whittle calls collectives from one thread at a time (the thread that drives the
// training loop; the trait's contract), and MPI is initialised with at least `Funneled`
// support, under which any one thread may make MPI calls. The handles themselves are plain
// integers or pointers into MPI's own state.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// Initialises MPI (once per process) and returns its world as whittle's collective.
pub fn init() -> Result<Arc<dyn Collective>> {
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
    if threading < mpi::Threading::Funneled {
        return Err(Error::Invalid(format!(
            "this MPI offers thread support {threading:?}; whittle's worker threads need Funneled"
        )));
    }
    Ok(Arc::new(Mpi {
        world: universe.world(),
        threading,
        _universe: universe,
    }))
}

impl Mpi {
    fn count(&self, n: usize) -> Result<()> {
        if n > whittle::dist::MAX_MESSAGE {
            return Err(Error::Invalid(format!(
                "one MPI message of {n} elements (at most {}): split it (whittle::dist::all_reduce)",
                whittle::dist::MAX_MESSAGE
            )));
        }
        Ok(())
    }

    /// Element-wise sum over the ranks, in place (MPI needs a separate send buffer).
    fn sum<T: Equivalence + Copy>(&self, buf: &mut [T]) -> Result<()> {
        self.count(buf.len())?;
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        self.count(buf.len())?;
        // The length first: the other ranks size their buffers from it.
        let mut len = buf.len() as u64;
        self.world.process_at_rank(0).broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        self.world.process_at_rank(0).broadcast_into(&mut buf[..]);
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn describe(&self) -> String {
        format!(
            "MPI ({}), {} ranks, thread support {:?}",
            mpi::environment::library_version()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or(""),
            self.size(),
            self.threading
        )
    }
}
