//! The forward pass. One code path serves prefill (many tokens), cached decode (one token) and
//! calibration (an [`Observer`] sees the input of every linear).

use super::kv_cache::{KvCache, KvView, LayerCache};
use super::ssm::SsmState;
use super::{Attention, KvSource, Layer, Linear, Model};
use crate::kernels::activation::{add_in_place, swiglu_in_place};
use crate::kernels::attention::{causal_attention, causal_attention_f16, Mask};
use crate::kernels::norm::rms_norm;
use crate::{Error, Result};

/// Which logits a forward pass computes. Generation needs only the last row; the output head is
/// a fifth of the model's FLOPs, so skipping it for the other rows matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// Where an activation is observed. Linears that read the same input share a site (q/k/v and the
/// SSM's x/z read `AttnIn`, gate/up read `MlpIn`), so calibration keeps one statistic for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The mixer's normalised input: input of q/k/v (and Hymba's SSM in-projections).
    AttnIn,
    /// Input of the mixer's output projection (o_proj; a hybrid layer's fused branches).
    AttnOut,
    /// Input of gate_proj, up_proj.
    MlpIn,
    /// Input of down_proj.
    MlpDown,
    /// Input of the SSM's x_proj (the conv output).
    SsmConv,
    /// Input of the SSM's dt_proj (the normalised low-rank Δ).
    SsmDt,
    /// Attention heads' output in a hybrid layer, before its branch norm (no linear reads it).
    AttnHeads,
    /// Gated SSM output in a hybrid layer, before its branch norm (no linear reads it).
    SsmGated,
    /// The residual stream entering the layer (depth importance compares it with the next two).
    BlockIn,
    /// The residual stream after the mixer's update, entering the MLP sublayer.
    Mixed,
    /// The residual stream leaving the layer. Not shown to an observer that does not need the
    /// layer's output (see [`Observer::needs_output`]).
    BlockOut,
}

impl Site {
    /// Whether a linear reads this site (calibration keeps statistics only for those).
    pub fn feeds_linear(self) -> bool {
        !matches!(
            self,
            Site::AttnHeads | Site::SsmGated | Site::BlockIn | Site::Mixed | Site::BlockOut
        )
    }
}

/// Receives the input rows (`rows × width`, row-major) of every linear during a forward pass.
pub trait Observer: Send {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], rows: usize);
    /// Whether the caller uses the layer's output. An observer that only collects input
    /// statistics says no, and the pass stops after the last input it sees (`down_proj`'s),
    /// leaving the layer's output unspecified: calibration saves a fifth of a layer's work.
    fn needs_output(&self) -> bool {
        true
    }
}

/// Buffers reused across layers within one forward pass.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    xs: Vec<f32>,
    z: Vec<f32>,
    attn: Vec<f32>,
    ssm: Vec<f32>,
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

    /// Residual stream after the last layer (before the final norm), `t × hidden`; meta-token
    /// rows are not returned.
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
        // A sliding-window cache holds only the last positions; new tokens after the prefill go
        // through it one at a time, as decode steps.
        if start > 0 && t > 1 && self.has_window() {
            let mut out = Vec::with_capacity(t * self.config.hidden);
            for tok in tokens {
                let obs = observer.as_mut().map(|o| &mut **o as &mut dyn Observer);
                out.extend(self.hidden_states(&[*tok], cache.as_deref_mut(), obs)?);
            }
            return Ok(out);
        }
        let prefix = if start == 0 {
            self.config.memory_tokens
        } else {
            0
        };
        let n = prefix + t;
        self.check_room(start, n, cache.as_deref())?;
        let mut x = self.memory[..prefix * self.config.hidden].to_vec();
        x.extend(self.embed_tokens(tokens)?);
        let mut spans = [Span {
            t: n,
            start,
            cache: cache.as_deref_mut().map(|c| &mut c.layers[..]),
        }];
        self.run_layers(&mut x, &mut spans, observer);
        if let Some(c) = cache {
            c.advance(n);
        }
        x.drain(..prefix * self.config.hidden);
        Ok(x)
    }

    /// Runs several sequences in one pass, each continuing its own cache: the continuations of
    /// a scored example after forks of one context cache. Norms, linears and the MLP take all
    /// their rows at once (a product of ~100 rows runs at twice the rate per row of four of
    /// ~25, and the weight is read once instead of four times); RoPE, attention, the SSM scan
    /// and the caches stay per sequence. Returns the sequences' residual rows (as
    /// [`Model::hidden_states`] would), concatenated in order. Models with sliding windows
    /// (token by token after a prefill) run the sequences one after another instead, and so
    /// do those with meta tokens or K/V shared between layers when a cache is empty (a full
    /// pass prepends the meta tokens and hands its K/V to later layers).
    pub fn hidden_states_many(&self, seqs: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<f32>> {
        let full_pass_extras =
            self.config.memory_tokens > 0 || (0..self.layers.len()).any(|i| self.kv_is_shared(i));
        if seqs.len() < 2
            || self.has_window()
            || (full_pass_extras && seqs.iter().any(|(_, c)| c.is_empty()))
        {
            let mut out = Vec::new();
            for (tokens, cache) in seqs.iter_mut() {
                out.extend(self.hidden_states(tokens, Some(&mut **cache), None)?);
            }
            return Ok(out);
        }
        let mut x = Vec::new();
        for (tokens, cache) in seqs.iter() {
            if tokens.is_empty() {
                return Err(Error::Invalid("forward pass over zero tokens".into()));
            }
            self.check_room(cache.len(), tokens.len(), Some(&**cache))?;
            x.extend(self.embed_tokens(tokens)?);
        }
        let mut spans: Vec<Span> = seqs
            .iter_mut()
            .map(|(tokens, cache)| Span {
                t: tokens.len(),
                start: cache.len(),
                cache: Some(&mut cache.layers[..]),
            })
            .collect();
        self.run_layers(&mut x, &mut spans, None);
        for (tokens, cache) in seqs.iter_mut() {
            cache.advance(tokens.len());
        }
        Ok(x)
    }

    /// Whether `n` positions from `start` fit the model's context and the cache.
    fn check_room(&self, start: usize, n: usize, cache: Option<&KvCache>) -> Result<()> {
        if start + n > self.config.context_length {
            return Err(Error::Invalid(format!(
                "{} positions exceed the model's context length {}",
                start + n,
                self.config.context_length
            )));
        }
        cache.map_or(Ok(()), |c| c.check_room(n))
    }

    /// Every layer over `x` (the spans' rows, concatenated), in place.
    fn run_layers(
        &self,
        x: &mut [f32],
        spans: &mut [Span],
        mut observer: Option<&mut dyn Observer>,
    ) {
        let t = spans.iter().map(|s| s.t).sum();
        let mut scratch = Scratch::default();
        let mut shared = vec![None; self.layers.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            let run = LayerRun {
                index: i,
                t,
                spans: &mut *spans,
                shared: &mut shared,
            };
            self.layer_forward(
                layer,
                x,
                run,
                &mut scratch,
                observer.as_mut().map(|o| &mut **o as &mut dyn Observer),
            );
        }
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
        if let Some(Attention {
            kv: KvSource::Shared(p),
            ..
        }) = &layer.attn
        {
            return Err(Error::Invalid(format!(
                "layer {index} reads the K/V of layer {p}: it cannot run on its own"
            )));
        }
        let mut shared = vec![None; self.layers.len()];
        let run = LayerRun {
            index,
            t,
            spans: &mut [Span {
                t,
                start: 0,
                cache: None,
            }],
            shared: &mut shared,
        };
        self.layer_forward(layer, x, run, &mut Scratch::default(), observer);
        Ok(())
    }

    /// One block over `x` (`t × hidden`, positions `start..start+t`), updating `x` in place.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &mut [f32],
        run: LayerRun,
        s: &mut Scratch,
        mut observer: Option<&mut dyn Observer>,
    ) {
        let (h, eps, t, index) = (self.config.hidden, self.config.rms_eps, run.t, run.index);
        let stats_only = observer.as_ref().is_some_and(|o| !o.needs_output());
        let mut observe = |site, buf: &[f32]| {
            if let Some(o) = observer.as_deref_mut() {
                o.observe(index, site, buf, t);
            }
        };
        observe(Site::BlockIn, x);
        if layer.attn.is_some() || layer.ssm.is_some() {
            let normed = sized(&mut s.normed, t * h);
            rms_norm(x, &layer.attn_norm, eps, normed);
            observe(Site::AttnIn, normed);
            self.mixer_projections(layer, t, s);
            if let Some(a) = &layer.attn {
                self.attention(a, run.spans, index, run.shared, s);
            }
            if let Some(m) = &layer.ssm {
                let (e, wx, wz) = (m.shape.inner, m.in_x.out_features, m.in_z.out_features);
                let y = sized(&mut s.ssm, t * e);
                let mut row = 0;
                for span in run.spans.iter_mut() {
                    let mut fresh = None;
                    let state = match span.cache.as_deref_mut() {
                        Some(c) => c[index].ssm.as_mut().expect("cache has the SSM state"),
                        None => fresh.insert(SsmState::new(m.shape)),
                    };
                    let rows = row..row + span.t;
                    m.run(
                        &s.xs[rows.start * wx..rows.end * wx],
                        &s.z[rows.start * wz..rows.end * wz],
                        span.t,
                        state,
                        eps,
                        &mut observe,
                        &mut y[rows.start * e..rows.end * e],
                    );
                    row = rows.end;
                }
            }
            let mixed: &[f32] = match (&layer.attn, &layer.ssm, &layer.fusion) {
                (Some(_), Some(_), Some([wa, ws])) => {
                    observe(Site::AttnHeads, &s.attn);
                    observe(Site::SsmGated, &s.ssm);
                    // (norm_a(attn) + norm_s(ssm)) / 2, into the attention buffer.
                    let normed_ssm = &mut s.xs[..s.ssm.len()];
                    rms_norm(&s.ssm, ws, eps, normed_ssm);
                    let heads = s.attn.clone();
                    rms_norm(&heads, wa, eps, &mut s.attn);
                    for (a, b) in s.attn.iter_mut().zip(normed_ssm.iter()) {
                        *a = (*a + b) * 0.5;
                    }
                    &s.attn
                }
                (Some(_), _, _) => &s.attn,
                _ => &s.ssm,
            };
            observe(Site::AttnOut, mixed);
            let out = match (&layer.attn, &layer.ssm) {
                (Some(a), _) => &a.o,
                (None, Some(m)) => m.out.as_ref().expect("validated: SSM-only layers project"),
                (None, None) => unreachable!(),
            };
            let delta = sized(&mut s.delta, t * h);
            out.forward(mixed, t, delta);
            add_in_place(x, delta, h);
        } else if let Some(e) = &layer.emulated.mixer {
            e.apply(x, t);
        }
        observe(Site::Mixed, x);
        if let Some(m) = &layer.mlp {
            let w = m.gate.out_features;
            let normed = sized(&mut s.normed, t * h);
            rms_norm(x, &layer.mlp_norm, eps, normed);
            observe(Site::MlpIn, normed);
            let (gate, up) = (sized(&mut s.gate, t * w), sized(&mut s.up, t * w));
            Linear::forward_shared_input(&[&m.gate, &m.up], normed, t, &mut [gate, up]);
            let (gate, up) = (&mut s.gate[..], &s.up[..]);
            swiglu_in_place(gate, up, w);
            observe(Site::MlpDown, gate);
            if stats_only {
                return;
            }
            let delta = sized(&mut s.delta, t * h);
            m.down.forward(gate, t, delta);
            add_in_place(x, delta, h);
        } else if let Some(e) = &layer.emulated.mlp {
            e.apply(x, t);
        }
        if !stats_only {
            observe(Site::BlockOut, x);
        }
    }

    /// All projections of the mixer's normalised input (q, own k/v, SSM x and z) in one pass.
    fn mixer_projections(&self, layer: &Layer, t: usize, s: &mut Scratch) {
        let mut lins: Vec<&Linear> = Vec::with_capacity(5);
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(5);
        if let Some(a) = &layer.attn {
            lins.push(&a.q);
            outs.push(sized(&mut s.q, t * a.q.out_features));
            if let KvSource::Own { k, v } = &a.kv {
                lins.extend([k, v]);
                outs.push(sized(&mut s.k, t * k.out_features));
                outs.push(sized(&mut s.v, t * v.out_features));
            }
        }
        if let Some(m) = &layer.ssm {
            lins.extend([&m.in_x, &m.in_z]);
            outs.push(sized(&mut s.xs, t * m.in_x.out_features));
            outs.push(sized(&mut s.z, t * m.in_z.out_features));
        }
        Linear::forward_shared_input(&lins, &s.normed, t, &mut outs);
    }

    /// Attention heads of layer `index` into `s.attn`, from `s.q` (and `s.k`, `s.v` when the
    /// layer has its own K/V), span by span. A full pass (`start == 0`, a span of its own)
    /// attends over this call's keys with the layer's mask and stores them in the cache; a
    /// cached step attends over its span's cache.
    fn attention(
        &self,
        a: &Attention,
        spans: &mut [Span],
        index: usize,
        shared: &mut [Option<(Vec<f32>, Vec<f32>)>],
        s: &mut Scratch,
    ) {
        let sh = a.shape;
        let (qd, kd, vd, od) = (sh.q_dim(), sh.kv_dim(), sh.v_dim(), sh.out_dim());
        let total = spans.iter().map(|p| p.t).sum::<usize>();
        let Scratch { q, k, v, attn, .. } = s;
        let out = sized(attn, total * od);
        let mut row = 0;
        for span in spans.iter_mut() {
            let (t, start, rows) = (span.t, span.start, row..row + span.t);
            let q = &mut q[rows.start * qd..rows.end * qd];
            self.rope.apply(q, t, qd, sh.n_heads, start);
            let producer = match a.kv {
                KvSource::Own { .. } => {
                    let k = &mut k[rows.start * kd..rows.end * kd];
                    let v = &v[rows.start * vd..rows.end * vd];
                    self.rope.apply(k, t, kd, sh.n_kv_heads, start);
                    if let Some(c) = span.cache.as_deref_mut() {
                        c[index]
                            .kv
                            .as_mut()
                            .expect("cache has rows for layers with own K/V")
                            .store(start, k, v);
                    }
                    if start == 0 && self.kv_is_shared(index) {
                        shared[index] = Some((k.to_vec(), v.to_vec()));
                    }
                    index
                }
                KvSource::Shared(p) => p,
            };
            let out = &mut out[rows.start * od..rows.end * od];
            if start == 0 {
                let (k, v) = match (producer == index, &shared[producer]) {
                    (true, _) => (
                        &k[rows.start * kd..rows.end * kd],
                        &v[rows.start * vd..rows.end * vd],
                    ),
                    (false, Some((k, v))) => (&k[..], &v[..]),
                    (false, None) => unreachable!("producers run before their consumers"),
                };
                let mask = Mask {
                    window: a.window,
                    sink: self.config.memory_tokens,
                    ..Mask::CAUSAL
                };
                causal_attention(q, k, v, t, t, sh, mask, out);
            } else {
                let stored = span.cache.as_deref().expect("start > 0 implies a cache")[producer]
                    .kv
                    .as_ref()
                    .expect("producers store K/V");
                // A ring holds exactly the visible keys (in slot order); a full history is
                // causal.
                let keys = |n: usize| {
                    if stored.is_ring() {
                        n / kd
                    } else {
                        start + t
                    }
                };
                match stored.view() {
                    KvView::F32 { k, v } => {
                        causal_attention(q, k, v, t, keys(k.len()), sh, Mask::CAUSAL, out)
                    }
                    KvView::F16 { k, v } => {
                        causal_attention_f16(q, k, v, t, keys(k.len()), sh, Mask::CAUSAL, out)
                    }
                }
            }
            row = rows.end;
        }
    }

    /// Whether a later layer reads layer `index`'s K/V (Hymba's KV sharing).
    pub(crate) fn kv_is_shared(&self, index: usize) -> bool {
        self.layers[index + 1..].iter().any(
            |l| matches!(l.attn.as_ref().map(|a| &a.kv), Some(KvSource::Shared(p)) if *p == index),
        )
    }
}

/// Where one layer's pass sits: its index, its rows (all spans'), the spans and the K/V that
/// earlier layers share with later ones.
struct LayerRun<'s, 'a> {
    index: usize,
    t: usize,
    spans: &'s mut [Span<'a>],
    shared: &'s mut [Option<(Vec<f32>, Vec<f32>)>],
}

/// One sequence of a pass: its row count (its rows follow the previous span's), its first
/// position and its cache.
struct Span<'a> {
    t: usize,
    start: usize,
    cache: Option<&'a mut [LayerCache]>,
}
