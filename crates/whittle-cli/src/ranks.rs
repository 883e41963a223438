//! `--distributed`: this process as one rank of an MPI job (`mpirun -n N --bind-to none whittle
//! ... --distributed`), for the commands that train (`train`, `distill`, `sparsify --method
//! maskllm`: each rank takes its share of every step's micro-batches) and the one-shot ones
//! (`sparsify`, `quantize`, `compensate`, `compress`, `prune`, `importance`: each rank takes its
//! share of the calibration windows). Rank 0 shows progress and writes every file.

use anyhow::{bail, Result};
use std::sync::{Arc, Mutex};
use whittle::dist::{self, Collective};
use whittle::train::trainer::{TokenData, Trainer};

static COMM: Mutex<Option<Arc<dyn Collective>>> = Mutex::new(None);

/// Joins the MPI job this process was started in.
pub fn init() -> Result<()> {
    #[cfg(feature = "mpi")]
    {
        let comm = whittle_mpi::init()?;
        if comm.rank() == 0 {
            eprintln!("distributed: {}", comm.describe());
        }
        // Ranks running different builds would disagree in ways no later check names.
        let exe = std::env::current_exe().and_then(std::fs::read)?;
        dist::check_agreement(&*comm, &[("whittle binary", dist::digest(&exe))])?;
        *COMM.lock().expect("not poisoned") = Some(comm);
        Ok(())
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "--distributed needs a whittle built with MPI: `cargo build --release --features mpi` \
         (with Debian's openmpi-bin libopenmpi-dev libclang-dev installed)"
    )
}

/// The job's ranks (this process alone without `--distributed`).
pub fn comm() -> Arc<dyn Collective> {
    COMM.lock()
        .expect("not poisoned")
        .clone()
        .unwrap_or_else(dist::single)
}

/// Whether this process shows progress and writes files (rank 0, or the only process).
pub fn is_root() -> bool {
    comm().rank() == 0
}

/// Makes `t` one rank of the job (see [`Trainer::join`]); nothing alone.
pub fn join(t: &mut Trainer, data: &TokenData) -> Result<()> {
    let comm = comm();
    if comm.size() > 1 {
        t.join(comm, data)?;
    }
    Ok(())
}

/// Fails unless `command` can run distributed.
pub fn check_supported(command: &str) -> Result<()> {
    match command {
        "train" | "distill" | "maskllm" | "sparsify" | "quantize" | "compensate" | "compress"
        | "prune" | "importance" => Ok(()),
        _ => bail!(
            "--distributed runs train, distill, sparsify, quantize, compensate, compress, prune \
             and importance; {command} runs in one process"
        ),
    }
}

/// Ends the job after an error on this rank: every rank stops (the others would wait in their
/// next collective forever); the last checkpoint stays as it was.
pub fn fail(e: &anyhow::Error) -> ! {
    let comm = comm();
    if comm.size() > 1 {
        eprintln!("error on rank {} of {}: {e:#}", comm.rank(), comm.size());
        comm.abort(1)
    }
    eprintln!("error: {e:#}");
    std::process::exit(1)
}

/// Finalises MPI (dropping the last handle) once the command is done.
pub fn finish() {
    COMM.lock().expect("not poisoned").take();
}
