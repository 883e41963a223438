//! The two sequence kernels of a Mamba-1 SSM branch: the depthwise causal convolution and the
//! selective scan. Both keep their state outside (conv history, recurrent state), so one code path
//! serves a full forward pass, a prefill that fills a cache and one-token decode steps.
//!
//! The scan is the hot loop: `h ← exp(Δ·A) ⊙ h + Δ·x·B` for every (time step, channel) with a
//! `d_state`-wide state. Channels are independent, so the work is split into channel blocks
//! (one task each, run in parallel); within a block the time loop is sequential and the state of
//! [`CH_BLOCK`] channels stays in registers/L1, and the `d_state` lanes vectorise.

use super::exp::exp_approx;
use rayon::prelude::*;

/// Channels per scan task: 16 channels × 16 states is 1 KiB of state, and `t` rows of the
/// inputs are read 16 contiguous floats at a time.
const CH_BLOCK: usize = 16;
/// Below this many state updates (`t · channels · d_state`) the scan runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

#[inline(always)]
fn silu<const FMA: bool>(v: f32) -> f32 {
    v / (1.0 + exp_approx::<FMA>(-v))
}

simd_dispatch! {
    /// `y[t, c] = silu(bias[c] + Σ_k w[c, k] · x̃[t + k, c])` where `x̃` is `history` (`K−1` rows,
    /// the inputs before this call, zeros at the start of a sequence) followed by `x` (`t` rows).
    /// Afterwards `history` holds the last `K−1` rows of `x̃`, ready for the next call.
    pub fn causal_conv_silu(
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        history: &mut [f32],
        channels: usize,
        y: &mut [f32],
    ) {
        let k = weight.len() / channels;
        let t = x.len() / channels;
        assert_eq!(history.len(), (k - 1) * channels);
        assert_eq!(y.len(), x.len());
        // Row r of x̃: history for r < K−1, x afterwards.
        let row = |r: usize| -> &[f32] {
            if r < k - 1 {
                &history[r * channels..(r + 1) * channels]
            } else {
                &x[(r + 1 - k) * channels..(r + 2 - k) * channels]
            }
        };
        for i in 0..t {
            let out = &mut y[i * channels..(i + 1) * channels];
            out.copy_from_slice(bias);
            for j in 0..k {
                let src = row(i + j);
                for c in 0..channels {
                    out[c] += weight[c * k + j] * src[c];
                }
            }
            out.iter_mut().for_each(|v| *v = silu::<FMA>(*v));
        }
        // New history: the last K−1 rows of x̃ = [history; x].
        let total = k - 1 + t;
        let mut next = vec![0f32; history.len()];
        for (r, dst) in next.chunks_exact_mut(channels).enumerate() {
            dst.copy_from_slice(row(total - (k - 1) + r));
        }
        history.copy_from_slice(&next);
    }
}

/// Inputs of one selective scan over `t` steps and `channels` channels with `d_state` states each.
/// Row-major `[t, channels]` for `x`, `delta`, `z`; `[t, d_state]` for `b`, `c`; `[channels,
/// d_state]` for `a` (already `−exp(A_log)`); `[channels]` for `d`.
pub struct ScanInputs<'a> {
    pub x: &'a [f32],
    pub delta: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub z: &'a [f32],
    pub a: &'a [f32],
    pub d: &'a [f32],
    pub channels: usize,
    pub d_state: usize,
}

/// Owned scan inputs with deterministic, realistic values (Δ in [0.001, 0.2], A = −e^[0, 2.7],
/// bounded x, z, B, C): the shared workload of the scan's tests and `whittle bench --scan`.
pub struct ScanData {
    x: Vec<f32>,
    delta: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    z: Vec<f32>,
    a: Vec<f32>,
    d: Vec<f32>,
    channels: usize,
    d_state: usize,
}

impl ScanData {
    /// `t` steps of `channels` channels with `d_state` states each.
    pub fn synthetic(t: usize, channels: usize, d_state: usize) -> Self {
        let wave = |len: usize, m: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..len)
                .map(|i| lo + (hi - lo) * ((i * m % 97) as f32 / 96.0))
                .collect()
        };
        let (e, n) = (channels, d_state);
        ScanData {
            x: wave(t * e, 31, -2.0, 2.0),
            delta: wave(t * e, 17, 0.001, 0.2),
            z: wave(t * e, 13, -3.0, 3.0),
            b: wave(t * n, 7, -1.5, 1.5),
            c: wave(t * n, 11, -1.5, 1.5),
            a: wave(e * n, 5, 0.0, 2.7).iter().map(|v| -v.exp()).collect(),
            d: wave(e, 3, 0.5, 1.5),
            channels,
            d_state,
        }
    }

    pub fn inputs(&self) -> ScanInputs<'_> {
        ScanInputs {
            x: &self.x,
            delta: &self.delta,
            b: &self.b,
            c: &self.c,
            z: &self.z,
            a: &self.a,
            d: &self.d,
            channels: self.channels,
            d_state: self.d_state,
        }
    }
}

/// Runs the scan from `state` (`[channels, d_state]`, updated in place) and writes
/// `y[s, ch] = (⟨h_s[ch], C_s⟩ + D[ch]·x[s, ch]) · silu(z[s, ch])`.
pub fn selective_scan(inp: &ScanInputs, state: &mut [f32], y: &mut [f32]) {
    let (e, n) = (inp.channels, inp.d_state);
    let t = inp.x.len() / e;
    assert_eq!(state.len(), e * n);
    assert_eq!(y.len(), t * e);
    assert!(inp.delta.len() == t * e && inp.z.len() == t * e);
    assert!(inp.b.len() == t * n && inp.c.len() == t * n && inp.a.len() == e * n);
    let blocks = e.div_ceil(CH_BLOCK);
    let run = |blk: usize, st: &mut [f32]| -> Vec<f32> {
        let c0 = blk * CH_BLOCK;
        let cw = (e - c0).min(CH_BLOCK);
        let mut out = vec![0f32; t * CH_BLOCK];
        scan_block(inp, c0, cw, st, &mut out);
        out
    };
    let parts: Vec<Vec<f32>> = if t * e * n < PARALLEL_MIN_WORK || crate::threads::threads() == 1 {
        state
            .chunks_mut(CH_BLOCK * n)
            .enumerate()
            .map(|(b, st)| run(b, st))
            .collect()
    } else {
        state
            .par_chunks_mut(CH_BLOCK * n)
            .enumerate()
            .map(|(b, st)| run(b, st))
            .collect()
    };
    debug_assert_eq!(parts.len(), blocks);
    for (blk, part) in parts.iter().enumerate() {
        let c0 = blk * CH_BLOCK;
        let cw = (e - c0).min(CH_BLOCK);
        for (s, src) in part.chunks_exact(CH_BLOCK).enumerate() {
            let dst = &mut y[s * e + c0..s * e + c0 + cw];
            if cw == CH_BLOCK {
                let full: &mut [f32; CH_BLOCK] = dst.try_into().expect("CH_BLOCK floats");
                *full = src.try_into().expect("CH_BLOCK floats");
            } else {
                dst.copy_from_slice(&src[..cw]);
            }
        }
    }
}

simd_dispatch! {
    /// The scan of channels `c0..c0+cw` (`cw ≤ CH_BLOCK`) over all steps; `out` is `[t, CH_BLOCK]`
    /// (lanes past `cw` are padding).
    /// The block's state is held transposed, `[d_state][CH_BLOCK]`, so every operation of a step
    /// is a vertical one over `CH_BLOCK` lanes (one AVX-512 register): no horizontal sums.
    fn scan_block(inp: &ScanInputs, c0: usize, cw: usize, state: &mut [f32], out: &mut [f32]) {
        const L: usize = CH_BLOCK;
        let (e, n) = (inp.channels, inp.d_state);
        let t = inp.x.len() / e;
        let mut h = vec![[0f32; L]; n];
        let mut a = vec![[0f32; L]; n];
        for j in 0..cw {
            for k in 0..n {
                h[k][j] = state[j * n + k];
                a[k][j] = inp.a[(c0 + j) * n + k];
            }
        }
        // Fixed-length loads for full blocks (a runtime-length copy is a memmove call per step).
        let lanes = |src: &[f32], s: usize| -> [f32; L] {
            let at = s * e + c0;
            match src.get(at..at + L) {
                Some(full) if cw == L => full.try_into().expect("L floats"),
                _ => {
                    let mut v = [0f32; L];
                    v[..cw].copy_from_slice(&src[at..at + cw]);
                    v
                }
            }
        };
        let mut d = [0f32; L];
        d[..cw].copy_from_slice(&inp.d[c0..c0 + cw]);
        for s in 0..t {
            // Padding lanes have Δ = 0: their state stays 0 and is never written back.
            let (dt, xv, z) = (lanes(inp.delta, s), lanes(inp.x, s), lanes(inp.z, s));
            let (bs, cs) = (&inp.b[s * n..(s + 1) * n], &inp.c[s * n..(s + 1) * n]);
            let mut dx = [0f32; L];
            let mut acc = [0f32; L];
            for l in 0..L {
                dx[l] = dt[l] * xv[l];
            }
            for k in 0..n {
                let (hk, ak, bk, ck) = (&mut h[k], &a[k], bs[k], cs[k]);
                for l in 0..L {
                    hk[l] = exp_approx::<FMA>(dt[l] * ak[l]) * hk[l] + dx[l] * bk;
                    acc[l] += hk[l] * ck;
                }
            }
            let mut y = [0f32; L];
            for l in 0..L {
                y[l] = (acc[l] + d[l] * xv[l]) * silu::<FMA>(z[l]);
            }
            out[s * L..(s + 1) * L].copy_from_slice(&y);
        }
        for j in 0..cw {
            for k in 0..n {
                state[j * n + k] = h[k][j];
            }
        }
    }
}

/// The textbook sequential loop (one channel, one state, one step at a time, `f32::exp`), kept as
/// the baseline `whittle bench` compares the blocked scan with.
pub fn selective_scan_naive(inp: &ScanInputs, state: &mut [f32], y: &mut [f32]) {
    let (e, n) = (inp.channels, inp.d_state);
    let t = inp.x.len() / e;
    for s in 0..t {
        for ch in 0..e {
            let (dt, xv) = (inp.delta[s * e + ch], inp.x[s * e + ch]);
            let mut acc = 0f32;
            for k in 0..n {
                let i = ch * n + k;
                state[i] = (dt * inp.a[i]).exp() * state[i] + dt * xv * inp.b[s * n + k];
                acc += state[i] * inp.c[s * n + k];
            }
            let z = inp.z[s * e + ch];
            y[s * e + ch] = (acc + inp.d[ch] * xv) * (z / (1.0 + (-z).exp()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, m: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * ((i * m % 97) as f32 / 96.0))
            .collect()
    }

    /// f64 transcription of the recurrence.
    fn reference(inp: &ScanInputs, state: &mut [f64]) -> Vec<f64> {
        let (e, n) = (inp.channels, inp.d_state);
        let t = inp.x.len() / e;
        let mut y = vec![0f64; t * e];
        for s in 0..t {
            for ch in 0..e {
                let dt = inp.delta[s * e + ch] as f64;
                let xv = inp.x[s * e + ch] as f64;
                let mut acc = 0.0;
                for k in 0..n {
                    let i = ch * n + k;
                    state[i] =
                        (dt * inp.a[i] as f64).exp() * state[i] + dt * xv * inp.b[s * n + k] as f64;
                    acc += state[i] * inp.c[s * n + k] as f64;
                }
                let z = inp.z[s * e + ch] as f64;
                y[s * e + ch] = (acc + inp.d[ch] as f64 * xv) * z / (1.0 + (-z).exp());
            }
        }
        y
    }

    #[test]
    fn scan_matches_f64_recurrence_and_resumes_from_state_at_every_level() {
        crate::kernels::simd::for_each_level(|level| {
            // 37 channels: two full blocks and a partial one; 300 steps cross the parallel threshold.
            let (t, e, n) = (300usize, 37usize, 16usize);
            let data = ScanData::synthetic(t, e, n);
            let inp = data.inputs();
            let (x, delta, z, b, c) = (inp.x, inp.delta, inp.z, inp.b, inp.c);
            let mut want_state = vec![0f64; e * n];
            let want = reference(&inp, &mut want_state);
            for scan in [selective_scan, selective_scan_naive] {
                let mut state = vec![0f32; e * n];
                let mut y = vec![f32::NAN; t * e];
                scan(&inp, &mut state, &mut y);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{level}: {a} vs {b}"
                    );
                }
                for (a, b) in state.iter().zip(&want_state) {
                    assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{level}");
                }
            }
            // Two halves with the state carried over equal one pass.
            let half = 120;
            let sub =
                |v: &[f32], w: usize, r: std::ops::Range<usize>| v[r.start * w..r.end * w].to_vec();
            let mut state = vec![0f32; e * n];
            let mut y = Vec::new();
            for r in [0..half, half..t] {
                let (xs, ds, zs) = (
                    sub(x, e, r.clone()),
                    sub(delta, e, r.clone()),
                    sub(z, e, r.clone()),
                );
                let (bs, cs) = (sub(b, n, r.clone()), sub(c, n, r.clone()));
                let part = ScanInputs {
                    x: &xs,
                    delta: &ds,
                    b: &bs,
                    c: &cs,
                    z: &zs,
                    ..inp
                };
                let mut yp = vec![0f32; r.len() * e];
                selective_scan(&part, &mut state, &mut yp);
                y.extend(yp);
            }
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{level}");
            }
        });
    }

    #[test]
    fn conv_matches_zero_padded_definition_and_carries_history_at_every_level() {
        crate::kernels::simd::for_each_level(|level| {
            let (t, e, k) = (9usize, 5usize, 4usize);
            let x = wave(t * e, 23, -1.0, 1.0);
            let w = wave(e * k, 19, -0.8, 0.8);
            let bias = wave(e, 3, -0.2, 0.2);
            let want: Vec<f64> = (0..t * e)
                .map(|i| {
                    let (s, c) = (i / e, i % e);
                    let mut acc = bias[c] as f64;
                    for j in 0..k {
                        // Tap j reads input s + j − (K−1), zero before the start.
                        if let Some(src) = (s + j).checked_sub(k - 1) {
                            acc += w[c * k + j] as f64 * x[src * e + c] as f64;
                        }
                    }
                    acc / (1.0 + (-acc).exp())
                })
                .collect();
            let mut hist = vec![0f32; (k - 1) * e];
            let mut y = vec![0f32; t * e];
            causal_conv_silu(&x, &w, &bias, &mut hist, e, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{level}");
            }
            // Step by step with the carried history gives the same rows.
            let mut hist = vec![0f32; (k - 1) * e];
            for s in 0..t {
                let mut row = vec![0f32; e];
                causal_conv_silu(&x[s * e..(s + 1) * e], &w, &bias, &mut hist, e, &mut row);
                for (a, b) in row.iter().zip(&want[s * e..(s + 1) * e]) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{level}");
                }
            }
        });
    }
}
