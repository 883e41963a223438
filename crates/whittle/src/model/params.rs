//! Every trainable tensor of a model by name, for code that optimises weights (training,
//! distillation): it copies them into its own tensors and writes them back, so the model stays
//! the one representation.

use super::linear::Linear;
use super::{Layer, Model};
use std::borrow::Cow;

/// One parameter as the visitor sees it. A linear's weight is handed over as the layer, so that
/// a reader can look at a packed (quantized) weight without expanding the model's copy — a
/// frozen quantized base stays packed while its adapters train.
pub enum Param<'a> {
    Values(&'a mut Vec<f32>),
    Weight(&'a mut Linear),
}

impl<'a> Param<'a> {
    /// The values as f32 (packed weights are expanded into a new buffer; the model is unchanged).
    pub fn read(&self) -> Cow<'_, [f32]> {
        match self {
            Param::Values(v) => Cow::Borrowed(v.as_slice()),
            Param::Weight(l) => l.dense_weight(),
        }
    }

    /// The values for rewriting (a packed weight becomes dense f32 first).
    pub fn into_values(self) -> &'a mut Vec<f32> {
        match self {
            Param::Values(v) => v,
            Param::Weight(l) => l.dense_weight_mut(),
        }
    }
}

/// Receives `(name, shape, parameter)` of one parameter.
pub type ParamVisitor<'a> = dyn FnMut(&str, &[usize], Param<'_>) + 'a;

impl Model {
    /// Calls `f(name, shape, param)` for every parameter, in a fixed order. Names: `embed`,
    /// `memory`, `final_norm`, `lm_head`, and per layer `layers.{i}.` followed by `attn_norm`,
    /// `mlp_norm`, `fusion.{0,1}`, an SSM tensor (`mamba.conv1d.weight`, `mamba.A_log.0`, ...),
    /// a linear's name (see [`Layer::linears`]), its low-rank adapter's `NAME.adapter.a`
    /// `[rank, in]` and `NAME.adapter.b` `[out, rank]`, or an emulated update's
    /// (`emulated.mixer.0`, `emulated.mlp.bias`, ...).
    pub fn visit_parameters(&mut self, f: &mut ParamVisitor) {
        let (h, m) = (self.config.hidden, self.config.memory_tokens);
        visit_linear("embed", &mut self.embed, f);
        if m > 0 {
            f("memory", &[m, h], Param::Values(&mut self.memory));
        }
        f("final_norm", &[h], Param::Values(&mut self.final_norm));
        if let Some(head) = &mut self.lm_head {
            visit_linear("lm_head", head, f);
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            visit_layer(i, layer, f);
        }
    }
}

/// A linear's weight, then its adapter's two factors.
fn visit_linear(name: &str, lin: &mut Linear, f: &mut ParamVisitor) {
    let (out, inp) = (lin.out_features, lin.in_features);
    f(name, &[out, inp], Param::Weight(lin));
    if let Some(a) = &mut lin.adapter {
        let r = a.rank;
        f(
            &format!("{name}.adapter.a"),
            &[r, inp],
            Param::Values(&mut a.a),
        );
        f(
            &format!("{name}.adapter.b"),
            &[out, r],
            Param::Values(&mut a.b),
        );
    }
}

fn visit_layer(i: usize, l: &mut Layer, f: &mut ParamVisitor) {
    let p = |s: &str| format!("layers.{i}.{s}");
    let h = l.attn_norm.len();
    f(&p("attn_norm"), &[h], Param::Values(&mut l.attn_norm));
    f(&p("mlp_norm"), &[h], Param::Values(&mut l.mlp_norm));
    if let Some(fusion) = &mut l.fusion {
        for (k, w) in fusion.iter_mut().enumerate() {
            let e = w.len();
            f(&p(&format!("fusion.{k}")), &[e], Param::Values(w));
        }
    }
    if let Some(m) = &mut l.ssm {
        let sh = m.shape;
        let (e, n, k) = (sh.inner, sh.d_state, sh.d_conv);
        f(
            &p("mamba.conv1d.weight"),
            &[e, k],
            Param::Values(&mut m.conv_weight),
        );
        f(
            &p("mamba.conv1d.bias"),
            &[e],
            Param::Values(&mut m.conv_bias),
        );
        f(
            &p("mamba.dt_proj.0.bias"),
            &[e],
            Param::Values(&mut m.dt_bias),
        );
        f(&p("mamba.A_log.0"), &[e, n], Param::Values(&mut m.a_log));
        f(&p("mamba.D.0"), &[e], Param::Values(&mut m.d));
        if let Some([dt, b, c]) = &mut m.inner_norms {
            f(&p("mamba.dt_layernorm"), &[sh.dt_rank], Param::Values(dt));
            f(&p("mamba.B_layernorm"), &[n], Param::Values(b));
            f(&p("mamba.C_layernorm"), &[n], Param::Values(c));
        }
    }
    for (name, _, lin) in l.linears_mut() {
        visit_linear(&p(name), lin, f);
    }
    for (name, e) in l.emulated.named_mut() {
        for (k, lin) in e.maps.iter_mut().enumerate() {
            visit_linear(&p(&format!("emulated.{name}.{k}")), lin, f);
        }
        f(
            &p(&format!("emulated.{name}.bias")),
            &[h],
            Param::Values(&mut e.bias),
        );
    }
}
