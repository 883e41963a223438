//! A Mamba-1 selective-SSM branch: the SSM heads of a Hymba layer, or the whole mixer of a Mamba
//! layer. Its input projections (`x` and the gate `z`) read the layer's normalised input like the
//! attention projections do, so the layer runs them in one shared pass; this module takes it from
//! there: causal conv → SiLU → `x_proj` → (RMSNorm'd) Δ, B, C → selective scan → gate.

use super::config::SsmShape;
use super::{Linear, Site};
use crate::kernels::activation::softplus_bias_in_place;
use crate::kernels::exp::neg_exp;
use crate::kernels::norm::rms_norm;
use crate::kernels::ssm::{causal_conv_silu, selective_scan, ScanInputs};
use crate::{Error, Result};

#[derive(Clone)]
pub struct Ssm {
    pub shape: SsmShape,
    /// `x` input projection `[E, hidden]`.
    pub in_x: Linear,
    /// Gate input projection `[E, hidden]`.
    pub in_z: Linear,
    /// Depthwise causal conv, `[E, K]` (tap `K−1` reads the current step).
    pub conv_weight: Vec<f32>,
    pub conv_bias: Vec<f32>,
    /// `[R + 2N, E]`: produces Δ (low rank), B and C from the conv output.
    pub x_proj: Linear,
    /// RMSNorm weights of Δ, B and C (Hymba's `mamba_inner_layernorms`); `None` in plain Mamba.
    pub inner_norms: Option<[Vec<f32>; 3]>,
    /// `[E, R]`; its bias goes inside the softplus.
    pub dt_proj: Linear,
    pub dt_bias: Vec<f32>,
    /// `[E, N]`; the state matrix is `A = −exp(A_log)`.
    pub a_log: Vec<f32>,
    /// Skip connection `[E]`.
    pub d: Vec<f32>,
    /// Output projection `[hidden, E]` of an SSM-only layer. In a hybrid layer the attention's
    /// output projection maps the fused branches instead, and this is `None`.
    pub out: Option<Linear>,
}

/// What an SSM branch carries from one call to the next: the last `K−1` conv inputs and the
/// recurrent state `[E, N]`. Its size does not depend on the sequence length.
#[derive(Clone)]
pub struct SsmState {
    pub conv: Vec<f32>,
    pub h: Vec<f32>,
}

impl SsmState {
    pub fn new(shape: SsmShape) -> Self {
        SsmState {
            conv: vec![0.0; (shape.d_conv - 1) * shape.inner],
            h: vec![0.0; shape.inner * shape.d_state],
        }
    }

    pub fn bytes(&self) -> usize {
        (self.conv.len() + self.h.len()) * 4
    }
}

impl Ssm {
    /// Checks every tensor's shape against `shape` and `hidden`, and that all are finite.
    pub fn validate(&self, layer: usize, hidden: usize) -> Result<()> {
        let SsmShape {
            inner: e,
            d_state: n,
            d_conv: k,
            dt_rank: r,
        } = self.shape;
        let name = |p: &str| format!("layers.{layer}.mamba.{p}");
        let lin = |p: &str, l: &Linear, out: usize, inp: usize| {
            if (l.out_features, l.in_features) != (out, inp) {
                return Err(Error::Shape {
                    name: name(p),
                    expected: vec![out, inp],
                    found: vec![l.out_features, l.in_features],
                });
            }
            l.check_finite(&name(p))
        };
        lin("in_proj.x", &self.in_x, e, hidden)?;
        lin("in_proj.z", &self.in_z, e, hidden)?;
        lin("x_proj.0", &self.x_proj, r + 2 * n, e)?;
        lin("dt_proj.0", &self.dt_proj, e, r)?;
        if let Some(o) = &self.out {
            lin("out_proj", o, hidden, e)?;
        }
        let mut vecs = vec![
            ("conv1d.weight", &self.conv_weight, e * k),
            ("conv1d.bias", &self.conv_bias, e),
            ("dt_proj.0.bias", &self.dt_bias, e),
            ("A_log.0", &self.a_log, e * n),
            ("D.0", &self.d, e),
        ];
        if let Some([dt, b, c]) = &self.inner_norms {
            vecs.extend([
                ("dt_layernorm", dt, r),
                ("B_layernorm", b, n),
                ("C_layernorm", c, n),
            ]);
        }
        for (p, v, len) in vecs {
            if v.len() != len {
                return Err(Error::Shape {
                    name: name(p),
                    expected: vec![len],
                    found: vec![v.len()],
                });
            }
            crate::error::check_finite(&name(p), v)?;
        }
        Ok(())
    }

    /// The branch over `t` steps: `xs` and `z` are the input projections (`[t, E]` each; `xs` is
    /// overwritten with the conv output), `state` is advanced, and `y` (`[t, E]`) receives the
    /// gated scan output. `observe` sees the inputs of `x_proj` and `dt_proj`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        xs: &[f32],
        z: &[f32],
        t: usize,
        state: &mut SsmState,
        eps: f32,
        observe: &mut dyn FnMut(Site, &[f32]),
        y: &mut [f32],
    ) {
        let SsmShape {
            inner: e,
            d_state: n,
            dt_rank: r,
            ..
        } = self.shape;
        let mut xc = vec![0f32; t * e];
        causal_conv_silu(
            xs,
            &self.conv_weight,
            &self.conv_bias,
            &mut state.conv,
            e,
            &mut xc,
        );
        observe(Site::SsmConv, &xc);
        let w = r + 2 * n;
        let mut proj = vec![0f32; t * w];
        self.x_proj.forward(&xc, t, &mut proj);
        // Split rows of [Δ_r | B | C] into three row-major matrices, normalising each.
        let mut parts = [vec![0f32; t * r], vec![0f32; t * n], vec![0f32; t * n]];
        let offsets = [0, r, r + n];
        for (i, part) in parts.iter_mut().enumerate() {
            let width = part.len() / t.max(1);
            for (s, row) in part.chunks_exact_mut(width).enumerate() {
                row.copy_from_slice(&proj[s * w + offsets[i]..s * w + offsets[i] + width]);
            }
            if let Some(norms) = &self.inner_norms {
                let raw = part.clone();
                rms_norm(&raw, &norms[i], eps, part);
            }
        }
        let [dt_r, b, c] = parts;
        observe(Site::SsmDt, &dt_r);
        let mut delta = vec![0f32; t * e];
        self.dt_proj.forward(&dt_r, t, &mut delta);
        for row in delta.chunks_exact_mut(e) {
            softplus_bias_in_place(row, &self.dt_bias);
        }
        let mut a = vec![0f32; self.a_log.len()];
        neg_exp(&self.a_log, &mut a);
        let inputs = ScanInputs {
            x: &xc,
            delta: &delta,
            b: &b,
            c: &c,
            z,
            a: &a,
            d: &self.d,
            channels: e,
            d_state: n,
        };
        selective_scan(&inputs, &mut state.h, y);
    }

    pub fn linears(&self) -> [&Linear; 4] {
        [&self.in_x, &self.in_z, &self.x_proj, &self.dt_proj]
    }

    /// Parameters outside the linears (conv, Δ bias, A, D, inner norms).
    pub fn extra_params(&self) -> usize {
        self.conv_weight.len()
            + self.conv_bias.len()
            + self.dt_bias.len()
            + self.a_log.len()
            + self.d.len()
            + self
                .inner_norms
                .as_ref()
                .map_or(0, |n| n.iter().map(Vec::len).sum())
    }
}
