//! A team of helper threads that spin briefly between jobs, for decode's many short parallel
//! sections.
//!
//! Why: a decode step of SmolLM2 runs ~120 matrix-vector products of 20–100 µs each. Through
//! rayon, each one wakes the sleeping worker with a futex and waits for it: with 2 threads
//! decode scaled 1.38x over 1 thread while llama.cpp, whose workers spin, scaled 1.86x (same
//! run, Q4_1, AVX2). Here the helpers spin for [`SPIN`] after each job, so the next product of
//! the same token finds them awake, and then park, so that an idle or busy machine does not lose
//! a core to spinning (the trap of the stack notes: a pool that only spins fell from 45 to 1.4
//! tok/s on a loaded machine).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// One job: `run(i)` for every `i < n`, indices claimed from `next` by whoever is free.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    /// The first panic of a helper, re-raised on the caller's thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            (self.run)(i);
        }
    }
}

struct Team {
    /// Bumped once per job; a helper works on a job when it sees a new value.
    generation: AtomicUsize,
    /// The current job, valid while the caller waits for every helper's ack.
    job: AtomicPtr<Job<'static>>,
    /// Per helper: the last generation it finished.
    acks: Vec<AtomicUsize>,
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// One job at a time; a caller that finds the team busy uses rayon instead.
    busy: AtomicBool,
}

static TEAM: OnceLock<&'static Team> = OnceLock::new();

fn team(helpers: usize) -> &'static Team {
    TEAM.get_or_init(|| {
        let team: &'static Team = Box::leak(Box::new(Team {
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            acks: (0..helpers).map(|_| AtomicUsize::new(0)).collect(),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
        }));
        for k in 0..helpers {
            std::thread::Builder::new()
                .name(format!("whittle-team-{k}"))
                .spawn(move || helper(team, k))
                .expect("cannot start a helper thread");
        }
        team
    })
}

fn helper(team: &'static Team, k: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while team.generation.load(SeqCst) == seen {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut guard = team.lock.lock().unwrap_or_else(|e| e.into_inner());
                team.parked.fetch_add(1, SeqCst);
                while team.generation.load(SeqCst) == seen {
                    guard = team.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                team.parked.fetch_sub(1, SeqCst);
            }
            std::hint::spin_loop();
        }
        seen = team.generation.load(SeqCst);
        // SAFETY: the caller published the job before bumping the generation and does not
        // return (ending the job's lifetime) until this helper acknowledges `seen` below.
        let job = unsafe { &*team.job.load(SeqCst) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job.work())) {
            let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(p);
        }
        team.acks[k].store(seen, SeqCst);
    }
}

/// Runs `run(i)` for `i < n` on the calling thread and `helpers` helper threads. Returns false
/// (running nothing) when another job holds the team: the caller then uses rayon.
pub(super) fn run(helpers: usize, n: usize, run: &(dyn Fn(usize) + Sync)) -> bool {
    let team = team(helpers);
    if team.acks.len() != helpers || team.busy.swap(true, SeqCst) {
        return false;
    }
    let job = Job {
        run,
        n,
        next: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    // SAFETY (lifetime erased): this function waits for every helper's ack of this generation
    // before `job` goes out of scope, and helpers only touch the job between the two.
    let ptr = &job as *const Job as *mut Job<'static>;
    team.job.store(ptr, SeqCst);
    let generation = team.generation.fetch_add(1, SeqCst) + 1;
    if team.parked.load(SeqCst) > 0 {
        let _guard = team.lock.lock().unwrap_or_else(|e| e.into_inner());
        team.wake.notify_all();
    }
    let mine = catch_unwind(AssertUnwindSafe(|| job.work()));
    for ack in &team.acks {
        while ack.load(SeqCst) != generation {
            std::hint::spin_loop();
        }
    }
    team.busy.store(false, SeqCst);
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(p);
    }
    true
}
