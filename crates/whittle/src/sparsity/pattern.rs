//! Sparsity patterns: N:M (N weights kept in every M consecutive inputs of a row, the layout
//! sparse tensor cores accelerate) or unstructured (a fraction of each row pruned).

use crate::{Error, Result};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Keep `n` of every `m` consecutive inputs.
    NM { n: usize, m: usize },
    /// Prune this fraction of every output row.
    Unstructured { ratio: f64 },
}

impl Pattern {
    /// `"2:4"`, `"4:8"`, `"N:M"`, or `"50%"`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("sparsity pattern '{s}': expected N:M or P%"));
        if let Some(p) = s.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..100.0).contains(&pct) {
                return Err(Error::Invalid(format!(
                    "sparsity {pct}% must be at least 0 and below 100"
                )));
            }
            return Ok(Pattern::Unstructured { ratio: pct / 100.0 });
        }
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m): (usize, usize) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if m == 0 || n > m {
            return Err(Error::Invalid(format!(
                "N:M pattern {n}:{m}: N (weights kept) must be at most M, and M positive"
            )));
        }
        Ok(Pattern::NM { n, m })
    }

    /// Fails if the pattern cannot tile rows of `cols` inputs.
    pub fn check(&self, name: &str, cols: usize) -> Result<()> {
        match *self {
            Pattern::NM { m, .. } if !cols.is_multiple_of(m) => Err(Error::Invalid(format!(
                "{name}: {cols} inputs are not a multiple of the N:M group size {m}"
            ))),
            _ => Ok(()),
        }
    }

    /// Fraction of weights set to zero.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::NM { n, m } => 1.0 - n as f64 / m as f64,
            Pattern::Unstructured { ratio } => ratio,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
            Pattern::Unstructured { ratio } => write!(f, "{}%", ratio * 100.0),
        }
    }
}

/// Marks (true = prune) the `m − n` lowest scores of each group of `m` in `scores` (a row
/// segment whose length is a multiple of `m`). Ties: the lower index is pruned first.
pub fn nm_prune_mask(scores: &[f32], n: usize, m: usize, mask: &mut [bool]) {
    // For the usual small groups, an element's rank (how many in its group come before it)
    // decides without sorting: m² branch-free comparisons beat a sort with a closure (2:4 on
    // SmolLM2's 106 M weights: most of magnitude pruning's time was that sort).
    if m <= 16 {
        for (s, mk) in scores.chunks_exact(m).zip(mask.chunks_exact_mut(m)) {
            for (i, prune) in mk.iter_mut().enumerate() {
                let before = (0..m)
                    .filter(|&j| s[j].total_cmp(&s[i]).then(j.cmp(&i)).is_lt())
                    .count();
                *prune = before < m - n;
            }
        }
        return;
    }
    let mut idx: Vec<usize> = Vec::with_capacity(m);
    for (s, mk) in scores.chunks_exact(m).zip(mask.chunks_exact_mut(m)) {
        idx.clear();
        idx.extend(0..m);
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
        mk.fill(false);
        for &i in &idx[..m - n] {
            mk[i] = true;
        }
    }
}

/// Marks the `⌊len·ratio⌋` lowest scores of a row. Ties: the lower index first.
pub fn row_prune_mask(scores: &[f32], ratio: f64, mask: &mut [bool]) {
    let k = (scores.len() as f64 * ratio) as usize;
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    mask.fill(false);
    for &i in &idx[..k] {
        mask[i] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        assert_eq!(Pattern::parse("2:4").unwrap(), Pattern::NM { n: 2, m: 4 });
        assert_eq!(
            Pattern::parse("50%").unwrap(),
            Pattern::Unstructured { ratio: 0.5 }
        );
        for bad in ["5:4", "2:0", "x:4", "100%", "-1%", "24"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Pattern::NM { n: 2, m: 4 }.check("w", 6).is_err());
        assert_eq!(Pattern::parse("4:8").unwrap().sparsity(), 0.5);
    }

    #[test]
    fn masks_prune_lowest_with_stable_ties() {
        let s = [3.0, 1.0, 1.0, 2.0, 0.0, 5.0, 4.0, 0.0];
        let mut m = [false; 8];
        nm_prune_mask(&s, 2, 4, &mut m);
        assert_eq!(m, [false, true, true, false, true, false, false, true]);
        row_prune_mask(&s, 0.5, &mut m);
        assert_eq!(m, [false, true, true, false, true, false, false, true]);
        row_prune_mask(&s, 0.3, &mut m);
        assert_eq!(m.iter().filter(|x| **x).count(), 2);
        assert!(m[4] && m[7]);
    }

    /// Every group keeps exactly its n highest scores (ties: the higher index kept), for group
    /// sizes on both sides of the rank-counting cut-off, against a plain sort.
    #[test]
    fn nm_masks_keep_exactly_the_n_highest() {
        let mut r = 7u32;
        for (n, m) in [(2, 4), (1, 4), (4, 8), (3, 16), (8, 32), (1, 1)] {
            // Few distinct values, so that ties are common.
            let s: Vec<f32> = (0..m * 50)
                .map(|_| {
                    r = r.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (r >> 28) as f32
                })
                .collect();
            let mut mask = vec![false; s.len()];
            nm_prune_mask(&s, n, m, &mut mask);
            for (g, mk) in s.chunks(m).zip(mask.chunks(m)) {
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &b| g[a].total_cmp(&g[b]).then(a.cmp(&b)));
                let want: Vec<bool> = (0..m).map(|i| idx[..m - n].contains(&i)).collect();
                assert_eq!(mk, &want[..], "{n}:{m} {g:?}");
            }
        }
    }
}
