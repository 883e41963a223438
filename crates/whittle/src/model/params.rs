//! Every trainable tensor of a model by name, for code that optimises weights (training,
//! distillation): it copies them into its own tensors and writes them back, so the model stays
//! the one representation.

use super::{Layer, Model};

/// Receives `(name, shape, values)` of one parameter.
pub type ParamVisitor<'a> = dyn FnMut(&str, &[usize], &mut Vec<f32>) + 'a;

impl Model {
    /// Calls `f(name, shape, values)` for every parameter, in a fixed order. Packed linears are
    /// expanded to f32 first (training updates dense values). Names: `embed`, `memory`,
    /// `final_norm`, `lm_head`, and per layer `layers.{i}.` followed by `attn_norm`, `mlp_norm`,
    /// `fusion.{0,1}`, an SSM tensor (`mamba.conv1d.weight`, `mamba.A_log.0`, ...), a linear's
    /// name (see [`Layer::linears`]) or an emulated update's (`emulated.mixer.0`,
    /// `emulated.mlp.bias`, ...).
    pub fn visit_parameters(&mut self, f: &mut ParamVisitor) {
        let (h, m) = (self.config.hidden, self.config.memory_tokens);
        let (vocab, width) = (self.embed.out_features, self.embed.in_features);
        f("embed", &[vocab, width], self.embed.dense_weight_mut());
        if m > 0 {
            f("memory", &[m, h], &mut self.memory);
        }
        f("final_norm", &[h], &mut self.final_norm);
        if let Some(head) = &mut self.lm_head {
            let shape = [head.out_features, head.in_features];
            f("lm_head", &shape, head.dense_weight_mut());
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            visit_layer(i, layer, f);
        }
    }
}

fn visit_layer(i: usize, l: &mut Layer, f: &mut ParamVisitor) {
    let p = |s: &str| format!("layers.{i}.{s}");
    let h = l.attn_norm.len();
    f(&p("attn_norm"), &[h], &mut l.attn_norm);
    f(&p("mlp_norm"), &[h], &mut l.mlp_norm);
    if let Some(fusion) = &mut l.fusion {
        for (k, w) in fusion.iter_mut().enumerate() {
            let e = w.len();
            f(&p(&format!("fusion.{k}")), &[e], w);
        }
    }
    if let Some(m) = &mut l.ssm {
        let sh = m.shape;
        let (e, n, k) = (sh.inner, sh.d_state, sh.d_conv);
        f(&p("mamba.conv1d.weight"), &[e, k], &mut m.conv_weight);
        f(&p("mamba.conv1d.bias"), &[e], &mut m.conv_bias);
        f(&p("mamba.dt_proj.0.bias"), &[e], &mut m.dt_bias);
        f(&p("mamba.A_log.0"), &[e, n], &mut m.a_log);
        f(&p("mamba.D.0"), &[e], &mut m.d);
        if let Some([dt, b, c]) = &mut m.inner_norms {
            f(&p("mamba.dt_layernorm"), &[sh.dt_rank], dt);
            f(&p("mamba.B_layernorm"), &[n], b);
            f(&p("mamba.C_layernorm"), &[n], c);
        }
    }
    for (name, _, lin) in l.linears_mut() {
        let shape = [lin.out_features, lin.in_features];
        f(&p(name), &shape, lin.dense_weight_mut());
    }
    for (name, e) in l.emulated.named_mut() {
        for (k, lin) in e.maps.iter_mut().enumerate() {
            let shape = [lin.out_features, lin.in_features];
            f(
                &p(&format!("emulated.{name}.{k}")),
                &shape,
                lin.dense_weight_mut(),
            );
        }
        f(&p(&format!("emulated.{name}.bias")), &[h], &mut e.bias);
    }
}
