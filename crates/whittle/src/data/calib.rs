//! Calibration windows: `n` slices of `seq_len` tokens at seeded random starts, drawn exactly as
//! the GPTQ/SparseGPT reference scripts draw them (`random.seed(seed)`, then
//! `random.randint(0, N − seq_len − 1)` per window), so whittle calibrates on the very windows the
//! reference figures used.

use crate::{Error, Result};

/// Python's `random.Random` for the calls above: MT19937 seeded by `init_by_array`, `randint` by
/// rejection sampling on `getrandbits(bit_length(n))`.
pub struct PyRandom {
    mt: [u32; 624],
    index: usize,
}

impl PyRandom {
    /// `random.seed(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        let mut key: Vec<u32> = Vec::new();
        let mut s = seed;
        loop {
            key.push(s as u32);
            s >>= 32;
            if s == 0 {
                break;
            }
        }
        let mut r = PyRandom {
            mt: [0; 624],
            index: 624,
        };
        r.init_genrand(19_650_218);
        let (n, mut i, mut j) = (624usize, 1usize, 0usize);
        for _ in 0..n.max(key.len()) {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= n {
                r.mt[0] = r.mt[n - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..n - 1 {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= n {
                r.mt[0] = r.mt[n - 1];
                i = 1;
            }
        }
        r.mt[0] = 0x8000_0000;
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..624 {
            let prev = self.mt[i - 1] ^ (self.mt[i - 1] >> 30);
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev).wrapping_add(i as u32);
        }
    }

    /// The next 32-bit output of MT19937.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.randint(lo, hi)` (inclusive), for ranges below 2³².
    pub fn randint(&mut self, lo: u64, hi: u64) -> u64 {
        let n = hi - lo + 1;
        let k = 64 - n.leading_zeros();
        assert!(k <= 32, "ranges of 2^32 or more are not needed here");
        loop {
            let r = (self.next_u32() >> (32 - k)) as u64;
            if r < n {
                return lo + r;
            }
        }
    }
}

/// `n` windows of `seq_len` tokens from `ids` at GPTQ-style random starts.
pub fn calibration_windows(
    ids: &[u32],
    n: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<&[u32]>> {
    if n == 0 || seq_len == 0 {
        return Err(Error::Invalid(
            "calibration needs at least one window of one token".into(),
        ));
    }
    if ids.len() < seq_len + 2 {
        return Err(Error::Invalid(format!(
            "calibration text has {} tokens, fewer than one window of {seq_len} needs",
            ids.len()
        )));
    }
    let mut rng = PyRandom::new(seed);
    let last = (ids.len() - seq_len - 1) as u64;
    Ok((0..n)
        .map(|_| {
            let s = rng.randint(0, last) as usize;
            &ids[s..s + seq_len]
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11 for the same calls.
    #[test]
    fn matches_cpython_random() {
        let mut r = PyRandom::new(0);
        let got: Vec<u64> = (0..8).map(|_| r.randint(0, 268_271 - 2048 - 1)).collect();
        assert_eq!(
            got,
            [201979, 220500, 21225, 135746, 254766, 212302, 159023, 249874]
        );
        let mut r = PyRandom::new(12345);
        let got: Vec<u64> = (0..5).map(|_| r.randint(0, 1000)).collect();
        assert_eq!(got, [426, 750, 10, 839, 845]);
        assert_eq!(r.next_u32(), 3_448_207_591);
    }

    #[test]
    fn windows_and_errors() {
        let ids: Vec<u32> = (0..100).collect();
        let w = calibration_windows(&ids, 3, 10, 0).unwrap();
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|w| w.len() == 10 && w[9] == w[0] + 9));
        assert!(calibration_windows(&ids, 3, 99, 0).is_err());
        assert!(calibration_windows(&ids, 0, 10, 0).is_err());
    }
}
