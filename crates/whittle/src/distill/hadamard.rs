//! Hadamard matrices (±1 entries, `H Hᵀ = n I`) of the orders feature distillation meets. PHI-S
//! rotates a teacher's principal components by a normalised Hadamard matrix so that every
//! channel ends with the same variance; that needs one of exactly the feature width, and model
//! widths are rarely powers of two (SmolLM2: 576 = 16 × 36, 960 = 16 × 60).
//!
//! Constructions: Sylvester's doubling for powers of two, Paley's first construction (order
//! q + 1 for a prime q ≡ 3 mod 4, from the quadratic characters mod q), Paley's second (order
//! 2(q + 1) for a prime q ≡ 1 mod 4), and Kronecker products of those. Orders that need a prime
//! power that is not a prime (finite-field arithmetic), or other constructions, are an error
//! naming the order.

use crate::{Error, Result};

/// A Hadamard matrix of order `n` (row-major, entries ±1).
pub fn hadamard(n: usize) -> Result<Vec<f64>> {
    if n == 0 {
        return Err(Error::Invalid("Hadamard matrix of order 0".into()));
    }
    let twos = n.trailing_zeros() as usize;
    // Split n = 2^a · m with m built by Paley (or 1); try the odd-heavy splits first.
    for a in 0..=twos {
        let m = n >> a;
        let core = if m == 1 { Some(vec![1.0]) } else { paley(m) };
        if let Some(core) = core {
            return Ok(kron(&sylvester(a), 1 << a, &core, m));
        }
    }
    Err(Error::Invalid(format!(
        "no Hadamard matrix of order {n} from Sylvester × Paley (prime q) constructions; \
         Hadamard matrices exist only for orders 1, 2 and multiples of 4"
    )))
}

/// Sylvester's matrix of order `2^k`.
fn sylvester(k: usize) -> Vec<f64> {
    let mut h = vec![1.0];
    for _ in 0..k {
        h = kron(
            &[1.0, 1.0, 1.0, -1.0],
            2,
            &h,
            (h.len() as f64).sqrt() as usize,
        );
    }
    h
}

/// Kronecker product of the `p × p` matrix `a` and the `q × q` matrix `b`.
fn kron(a: &[f64], p: usize, b: &[f64], q: usize) -> Vec<f64> {
    let n = p * q;
    let mut out = vec![0.0; n * n];
    for (i, row) in out.chunks_exact_mut(n).enumerate() {
        let (ai, bi) = (i / q, i % q);
        for (j, v) in row.iter_mut().enumerate() {
            *v = a[ai * p + j / q] * b[bi * q + j % q];
        }
    }
    out
}

fn is_prime(q: usize) -> bool {
    q >= 2
        && (2..)
            .take_while(|d| d * d <= q)
            .all(|d| !q.is_multiple_of(d))
}

/// The quadratic character mod the prime `q`, as a table: `χ(x)` is 0 for x = 0, 1 for a
/// nonzero square, −1 otherwise.
fn characters(q: usize) -> Vec<f64> {
    let mut chi = vec![-1.0; q];
    chi[0] = 0.0;
    for y in 1..q {
        chi[y * y % q] = 1.0;
    }
    chi
}

/// A Paley matrix of order `m`, when `m − 1` or `m / 2 − 1` is a suitable prime.
fn paley(m: usize) -> Option<Vec<f64>> {
    if m >= 4 && is_prime(m - 1) && (m - 1) % 4 == 3 {
        return Some(paley1(m - 1));
    }
    if m >= 4 && m.is_multiple_of(2) && is_prime(m / 2 - 1) && (m / 2 - 1) % 4 == 1 {
        return Some(paley2(m / 2 - 1));
    }
    None
}

/// The `(q + 1)`-order conference-style core `[[0, 1ᵀ], [±1, Q]]` with the Jacobsthal matrix
/// `Q[i][j] = χ(j − i)`; `skew` picks −1 (q ≡ 3 mod 4) or +1 (q ≡ 1 mod 4) down the first column.
fn core(q: usize, skew: bool) -> Vec<f64> {
    let n = q + 1;
    let mut c = vec![0.0; n * n];
    for j in 1..n {
        c[j] = 1.0;
        c[j * n] = if skew { -1.0 } else { 1.0 };
    }
    let chi = characters(q);
    for i in 0..q {
        for j in 0..q {
            c[(i + 1) * n + j + 1] = chi[(j + q - i) % q];
        }
    }
    c
}

/// Paley I: `H = I + S` with the skew core `S`, order `q + 1` (q ≡ 3 mod 4).
fn paley1(q: usize) -> Vec<f64> {
    let n = q + 1;
    let mut h = core(q, true);
    for i in 0..n {
        h[i * n + i] += 1.0;
    }
    h
}

/// Paley II: the symmetric core `C` (q ≡ 1 mod 4) with each 0 replaced by `[[1, −1], [−1, −1]]`
/// and each ±1 by `±[[1, 1], [1, −1]]`, order `2(q + 1)`.
fn paley2(q: usize) -> Vec<f64> {
    let c = core(q, false);
    let (k, n) = (q + 1, 2 * (q + 1));
    let mut h = vec![0.0; n * n];
    for i in 0..k {
        for j in 0..k {
            let block = if c[i * k + j] == 0.0 {
                [1.0, -1.0, -1.0, -1.0]
            } else {
                let s = c[i * k + j];
                [s, s, s, -s]
            };
            for (b, v) in block.iter().enumerate() {
                h[(2 * i + b / 2) * n + 2 * j + b % 2] = *v;
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `H Hᵀ = n I`, entries ±1.
    fn assert_hadamard(h: &[f64], n: usize) {
        assert_eq!(h.len(), n * n);
        assert!(
            h.iter().all(|v| v.abs() == 1.0),
            "order {n}: entries not ±1"
        );
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                let want = if i == j { n as f64 } else { 0.0 };
                assert_eq!(dot, want, "order {n}: rows {i}, {j}");
            }
        }
    }

    #[test]
    fn every_construction_is_hadamard() {
        // Sylvester 1..64; Paley I 12, 20, 60 (q = 11, 19, 59); Paley II 36 (q = 17);
        // Kronecker products, SmolLM2's widths 576 = 16 × 36 and 960 = 16 × 60.
        for n in [1, 2, 4, 8, 64, 12, 20, 60, 36, 24, 72, 576, 960] {
            assert_hadamard(&hadamard(n).unwrap(), n);
        }
    }

    #[test]
    fn impossible_orders_are_errors() {
        for n in [0, 3, 6, 10] {
            assert!(hadamard(n).is_err(), "{n}");
        }
    }
}
