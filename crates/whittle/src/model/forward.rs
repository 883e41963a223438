//! The forward pass. One code path serves prefill (many tokens), cached decode (one token) and
//! calibration (an [`Observer`] sees the input of every linear).

use super::kv_cache::KvCache;
use super::{Layer, Linear, Model};
use crate::kernels::{activation::swiglu_in_place, attention::causal_attention, norm::rms_norm};
use crate::{Error, Result};

/// Which logits a forward pass computes. Generation needs only the last row; the output head is
/// a fifth of the model's FLOPs, so skipping it for the other rows matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// Where a linear's input is observed. Linears that read the same input share a site
/// (q/k/v read `AttnIn`, gate/up read `MlpIn`), so calibration keeps one statistic for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// Input of q_proj, k_proj, v_proj.
    AttnIn,
    /// Input of o_proj.
    AttnOut,
    /// Input of gate_proj, up_proj.
    MlpIn,
    /// Input of down_proj.
    MlpDown,
}

/// Receives the input rows (`rows × width`, row-major) of every linear during a forward pass.
pub trait Observer: Send {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], rows: usize);
}

/// Buffers reused across layers within one forward pass.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    delta: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

impl Model {
    /// Runs `tokens` (positions `cache.len()..`, or `0..` without a cache) and returns logits
    /// (`rows × vocab`). With a cache, the new keys/values are appended to it.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        logits: Logits,
        observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<f32>> {
        crate::threads::install(|| {
            let x = self.hidden_states(tokens, cache, observer)?;
            let rows = match logits {
                Logits::All => tokens.len(),
                Logits::Last => 1,
            };
            Ok(self.logits(&x[(tokens.len() - rows) * self.config.hidden..]))
        })
    }

    /// Residual stream after the last layer (before the final norm), `t × hidden`.
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        mut cache: Option<&mut KvCache>,
        mut observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<f32>> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::Invalid("forward pass over zero tokens".into()));
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start + t > self.config.context_length {
            return Err(Error::Invalid(format!(
                "{} positions exceed the model's context length {}",
                start + t,
                self.config.context_length
            )));
        }
        if let Some(c) = &cache {
            c.check_room(t)?;
        }
        let mut x = self.embed_tokens(tokens)?;
        let mut scratch = Scratch::default();
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().and_then(|c| c.layers[i].as_mut());
            self.layer_forward(
                i,
                layer,
                &mut x,
                t,
                start,
                lc,
                &mut scratch,
                observer.as_mut().map(|o| &mut **o as &mut dyn Observer),
            );
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(x)
    }

    /// Final norm and output head over residual rows (`rows × hidden` → `rows × vocab`).
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let h = self.config.hidden;
        let rows = hidden.len() / h;
        let mut normed = vec![0f32; rows * h];
        rms_norm(hidden, &self.final_norm, self.config.rms_eps, &mut normed);
        let mut out = vec![0f32; rows * self.config.vocab_size];
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .forward(&normed, rows, &mut out);
        out
    }

    /// Embedding rows of `tokens`; fails on an id outside the vocabulary.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden;
        let mut x = vec![0f32; tokens.len() * h];
        for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            if id as usize >= self.config.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {id} outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            self.embed.row_into(id as usize, row);
        }
        Ok(x)
    }

    /// Runs layer `index` over `x` (`t × hidden`, one sequence at positions `0..t`) in place,
    /// showing every linear's input to `observer`: the step of sequential calibration.
    pub fn run_layer(
        &self,
        index: usize,
        x: &mut [f32],
        t: usize,
        observer: Option<&mut dyn Observer>,
    ) -> Result<()> {
        let layer = self
            .layers
            .get(index)
            .ok_or_else(|| Error::Invalid(format!("no layer {index}")))?;
        if x.len() != t * self.config.hidden || t > self.config.context_length {
            return Err(Error::Invalid(format!(
                "layer input of {} values is not {t} positions of width {}",
                x.len(),
                self.config.hidden
            )));
        }
        let mut scratch = Scratch::default();
        self.layer_forward(index, layer, x, t, 0, None, &mut scratch, observer);
        Ok(())
    }

    /// One block over `x` (`t × hidden`, positions `start..start+t`), updating `x` in place.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &mut [f32],
        t: usize,
        start: usize,
        cache: Option<&mut super::kv_cache::LayerCache>,
        s: &mut Scratch,
        mut observer: Option<&mut dyn Observer>,
    ) {
        let (h, eps) = (self.config.hidden, self.config.rms_eps);
        let mut observe = |site, buf: &[f32]| {
            if let Some(o) = observer.as_deref_mut() {
                o.observe(index, site, buf, t);
            }
        };
        if let Some(a) = &layer.attn {
            let sh = a.shape;
            let normed = sized(&mut s.normed, t * h);
            rms_norm(x, &layer.attn_norm, eps, normed);
            observe(Site::AttnIn, normed);
            let (q, k, v) = (
                sized(&mut s.q, t * sh.q_dim()),
                sized(&mut s.k, t * sh.kv_dim()),
                sized(&mut s.v, t * sh.kv_dim()),
            );
            Linear::forward_shared_input(&[&a.q, &a.k, &a.v], normed, t, &mut [q, k, v]);
            let (q, k, v) = (&mut s.q[..], &mut s.k[..], &s.v[..]);
            self.rope.apply(q, t, sh.q_dim(), sh.n_heads, start);
            self.rope.apply(k, t, sh.kv_dim(), sh.n_kv_heads, start);
            let attn = sized(&mut s.attn, t * sh.q_dim());
            match cache {
                Some(c) => {
                    let (kh, vh) = c.append(start, k, v);
                    causal_attention(q, kh, vh, t, start + t, sh, attn);
                }
                None => causal_attention(q, k, v, t, t, sh, attn),
            }
            observe(Site::AttnOut, attn);
            let delta = sized(&mut s.delta, t * h);
            a.o.forward(attn, t, delta);
            x.iter_mut().zip(delta.iter()).for_each(|(x, d)| *x += d);
        }
        if let Some(m) = &layer.mlp {
            let w = m.gate.out_features;
            let normed = sized(&mut s.normed, t * h);
            rms_norm(x, &layer.mlp_norm, eps, normed);
            observe(Site::MlpIn, normed);
            let (gate, up) = (sized(&mut s.gate, t * w), sized(&mut s.up, t * w));
            Linear::forward_shared_input(&[&m.gate, &m.up], normed, t, &mut [gate, up]);
            let (gate, up) = (&mut s.gate[..], &s.up[..]);
            swiglu_in_place(gate, up);
            observe(Site::MlpDown, gate);
            let delta = sized(&mut s.delta, t * h);
            m.down.forward(gate, t, delta);
            x.iter_mut().zip(delta.iter()).for_each(|(x, d)| *x += d);
        }
    }
}
