//! Group-quantized weight storage: unsigned `bits`-bit codes (2–8) with one (scale, min) per
//! `group` inputs (the last group of a row may be shorter), `w = fma(scale, q, min)` (see [`crate::kernels::qdot`]). GGUF's Q4_0/Q4_1/Q8_0 map onto
//! it exactly, so a GGUF model keeps its file's blocks in memory and decodes from them.

use crate::kernels::qdot::{block_bytes, dequant_row_at, QRow, QRows, BLOCK};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub bits: u8,
    pub group: usize,
    /// `out` rows of `in·bits/8` bytes, in 32-weight blocks.
    pub data: Vec<u8>,
    /// `out × in/group`, row-major.
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
    /// `Some(z)` when every min is `−z·scale` with `z = 2^(bits−1)` (symmetric grids: GGUF's
    /// Q4_0 and Q8_0, `--sym`): decode then reads no mins (4 of Q8_0's 40 bytes a block).
    zero: Option<f32>,
}

impl Packed {
    /// Checks that the parts describe an `out × inp` matrix.
    pub fn new(
        name: &str,
        (out, inp): (usize, usize),
        bits: u8,
        group: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
        mins: Vec<f32>,
    ) -> Result<Self> {
        let bad = |m: String| Err(Error::Invalid(format!("packed weight '{name}': {m}")));
        if !(2..=8).contains(&bits) {
            return bad(format!("{bits}-bit codes are not supported (2 to 8)"));
        }
        if group == 0 || !group.is_multiple_of(BLOCK) || !inp.is_multiple_of(BLOCK) {
            return bad(format!(
                "group size {group} and input width {inp} must be multiples of {BLOCK}"
            ));
        }
        let groups = out * inp.div_ceil(group);
        if data.len() != out * inp / BLOCK * block_bytes(bits)
            || scales.len() != groups
            || mins.len() != groups
        {
            return bad(format!(
                "{} bytes, {} scales, {} mins do not fit {out}×{inp} at {bits} bits, group {group}",
                data.len(),
                scales.len(),
                mins.len()
            ));
        }
        let z = (1u32 << (bits - 1)) as f32;
        let symmetric = scales.iter().zip(&mins).all(|(s, m)| *m == -(s * z));
        Ok(Packed {
            bits,
            group,
            data,
            scales,
            mins,
            zero: symmetric.then_some(z),
        })
    }

    /// Row `r` of a matrix `inp` wide.
    pub fn row(&self, r: usize, inp: usize) -> QRow<'_> {
        self.rows(inp).row(r)
    }

    /// The rows of a matrix `inp` wide.
    pub fn rows(&self, inp: usize) -> QRows<'_> {
        QRows::new(
            self.bits,
            self.group,
            self.zero,
            (&self.data, &self.scales, &self.mins),
            inp,
        )
    }

    /// The code of 0 when the grid is symmetric (every min is `−zero·scale`).
    pub fn zero(&self) -> Option<f32> {
        self.zero
    }

    /// Writes the f32 matrix (`out × inp`) into `w`, rows in parallel at the calling thread's
    /// level: the quantizers read back each whole matrix they wrote (prefill expands 64 rows
    /// at a time inside its product instead, `kernels::matmul::matmul_t_expanding`).
    pub fn dequantize_into(&self, inp: usize, w: &mut [f32]) {
        use rayon::prelude::*;
        let level = crate::kernels::simd::level();
        crate::threads::install(|| {
            w.par_chunks_exact_mut(inp)
                .enumerate()
                .with_min_len(64)
                .for_each(|(r, dst)| dequant_row_at(level, self.row(r, inp), dst))
        });
    }

    /// Bytes of codes, scales and mins.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.mins.len())
    }
}
