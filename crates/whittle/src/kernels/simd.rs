//! The one place where kernels learn which instruction set to use.
//!
//! Why one place: a kernel that checks CPU features on its own can silently take a slow fallback
//! on CPUs the developer never ran (a Q4 dot product with only an AVX-512 path fell back to a
//! libm `fmaf` per weight on AVX2 machines: 0.9 tok/s). Every kernel asks [`level`] instead, the
//! level can be forced from outside (`WHITTLE_SIMD=scalar|avx2|avx512|amx` on x86-64,
//! `scalar|neon` on AArch64), and the tests run every kernel at every level the CPU has
//! ([`Level::supported`]), so each path is exercised on the machine that builds it.
//!
//! Levels, lowest first. `scalar`: portable Rust built for the baseline target (SSE2 on x86-64;
//! loops are written to auto-vectorise, with separate multiply and add so that no `mul_add`
//! becomes a libm call). `avx2`: AVX2 + FMA (Haswell, every AMD Zen). `avx512`: AVX-512 F + BW
//! (Skylake-X and later Xeons, Zen 4/5). `amx`: `avx512` plus the AMX-BF16 tile unit granted by
//! the OS (Sapphire Rapids and later). `neon`: AArch64's Advanced SIMD (every AArch64 CPU).

use crate::{Error, Result};
use std::cell::Cell;
use std::sync::OnceLock;

/// An instruction-set level, ordered from the most portable to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Scalar,
    Neon,
    Avx2,
    Avx512,
    Amx,
}

/// Every level by name, for parsing and error messages.
const ALL: [Level; 5] = [
    Level::Scalar,
    Level::Neon,
    Level::Avx2,
    Level::Avx512,
    Level::Amx,
];

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
        }
    }

    /// Whether this CPU (and OS, for AMX's tile state) runs code of this level.
    pub fn runs_here(self) -> bool {
        match self {
            Level::Scalar => true,
            Level::Neon => cfg!(target_arch = "aarch64"),
            Level::Avx2 => x86::avx2(),
            Level::Avx512 => x86::avx512(),
            Level::Amx => x86::avx512() && super::amx::os_grants_tiles(),
        }
    }

    /// The levels this CPU runs, lowest first: what the tests iterate over.
    pub fn supported() -> Vec<Level> {
        ALL.into_iter().filter(|l| l.runs_here()).collect()
    }

    /// The widest level this CPU runs.
    pub fn detected() -> Level {
        *Level::supported().last().expect("scalar always runs")
    }

    /// Parses a level name and checks that this CPU runs it.
    pub fn parse(name: &str) -> Result<Level> {
        let names = || ALL.map(Level::name).join(", ");
        let level = ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                Error::Invalid(format!("unknown SIMD level '{name}' (known: {})", names()))
            })?;
        if !level.runs_here() {
            let here = Level::supported()
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>();
            return Err(Error::Invalid(format!(
                "SIMD level '{}' is not available on this CPU (it runs: {})",
                level.name(),
                here.join(", ")
            )));
        }
        Ok(level)
    }

    /// Whether kernels of this level may use fused multiply-add instructions. Everything above
    /// x86's baseline has FMA, and so does every AArch64 CPU; baseline x86-64 does not, where a
    /// `mul_add` is a call into libm.
    pub const fn has_fma(self) -> bool {
        !matches!(self, Level::Scalar) || cfg!(target_arch = "aarch64")
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `a·b + c`, fused where the level has FMA (`FMA` comes from `simd_dispatch!`), two operations
/// otherwise: on baseline x86-64, `f32::mul_add` is a call to libm's software `fmaf`.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The environment variable that forces a level.
pub const ENV: &str = "WHITTLE_SIMD";

static PROCESS: OnceLock<Level> = OnceLock::new();

thread_local! {
    /// A level forced on this thread alone ([`with_level`]).
    static FORCED: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The process's level from `WHITTLE_SIMD` (or the CPU's widest), checked. Programs call this
/// first so that a bad setting is a clear error before any work; later calls return the same.
pub fn init() -> Result<Level> {
    if let Some(l) = PROCESS.get() {
        return Ok(*l);
    }
    let level = match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => {
            Level::parse(&v).map_err(|e| Error::Invalid(format!("{ENV}={v}: {e}")))?
        }
        _ => Level::detected(),
    };
    Ok(*PROCESS.get_or_init(|| level))
}

/// The level kernels run at on this thread: the one forced by [`with_level`], else the
/// process's. A library user who never called [`init`] with a bad `WHITTLE_SIMD` gets a panic
/// that says what is wrong (a kernel has no error channel).
pub fn level() -> Level {
    FORCED.with(Cell::get).unwrap_or_else(|| match init() {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    })
}

/// Runs `f` with the kernels it calls on this thread at `level` (tests and benchmarks force
/// each level this way, side by side in one process). Parallel kernels hand the work to
/// worker threads, which keep the process level: force one thread too
/// ([`crate::threads::one_thread`]) where that matters.
///
/// Panics if the CPU does not run `level`: running its instructions would crash.
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    assert!(level.runs_here(), "SIMD level {level} does not run here");
    let before = FORCED.with(|c| c.replace(Some(level)));
    let r = f();
    FORCED.with(|c| c.set(before));
    r
}

/// Runs `f(level)` at every level this CPU runs, each forced on this thread with one worker
/// thread (so parallel kernels stay on it too): how the tests check every path of a kernel on
/// the machine that builds it.
pub fn for_each_level(mut f: impl FnMut(Level)) {
    for l in Level::supported() {
        with_level(l, || crate::threads::one_thread(|| f(l)));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    pub fn avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    pub fn avx512() -> bool {
        avx2()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub fn avx2() -> bool {
        false
    }
    pub fn avx512() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_refuse_what_the_cpu_lacks() {
        assert_eq!(Level::parse("scalar").unwrap(), Level::Scalar);
        assert!(Level::parse("sse9")
            .unwrap_err()
            .to_string()
            .contains("known"));
        for l in ALL {
            assert_eq!(Level::parse(l.name()).is_ok(), l.runs_here(), "{l}");
        }
        let here = Level::supported();
        assert_eq!(here[0], Level::Scalar);
        assert!(here.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn forcing_a_level_is_scoped_to_the_call() {
        let outer = level();
        with_level(Level::Scalar, || {
            assert_eq!(level(), Level::Scalar);
            let top = Level::detected();
            with_level(top, || assert_eq!(level(), top));
            assert_eq!(level(), Level::Scalar);
        });
        assert_eq!(level(), outer);
    }
}
