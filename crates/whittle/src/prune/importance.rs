//! Importance scores from one no-grad pass over calibration windows: Minitron's activation
//! scores for every width axis and the static depth metrics of every block and sublayer.
//!
//! Width (Minitron, arXiv 2407.14679), aggregated as ModelOpt does: per window, the mean of
//! `|activation|` over the window's tokens; over windows, the L2 norm of those means.
//! - embedding channels: the outputs of both RMSNorms of every layer, summed over layers;
//! - MLP neurons: the input of `down_proj`;
//! - attention heads: the input of `o_proj` cut into heads, each head's row reduced by its L2
//!   norm before the mean over tokens; a KV group scores the sum of its heads.
//!
//! Depth ("A deeper look at depth pruning of LLMs", arXiv 2407.16286; ShortGPT's block
//! influence), per unit with input `x` and output `y = x + f(x)` on the residual stream, averaged
//! over every token: cosine distance `1 − cos(x, y)`, angular distance `arccos(cos(x, y))/π`, and
//! the relative update norms `‖y − x‖₁/‖x‖₁`, `‖y − x‖₂/‖x‖₂`. Units are whole blocks and the
//! attention and MLP sublayers (the mixer's input to its output, the MLP's input to the block's
//! output).

use crate::model::Fingerprint;
use crate::model::{Observer, Site};
use crate::{Error, Model, Result};
use serde::{Deserialize, Serialize};

/// The static metrics of one unit (higher: the unit changes the stream more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DepthMetrics {
    pub cosine: f64,
    pub angular: f64,
    pub rel_l1: f64,
    pub rel_l2: f64,
}

/// Static metrics of every block, attention sublayer and MLP sublayer, by layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DepthScores {
    pub block: Vec<DepthMetrics>,
    pub attn: Vec<DepthMetrics>,
    pub mlp: Vec<DepthMetrics>,
}

/// Minitron's width scores (higher: keep).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WidthScores {
    /// One per hidden channel.
    pub channels: Vec<f64>,
    /// Per layer, one per MLP neuron (empty for a layer without MLP).
    pub neurons: Vec<Vec<f64>>,
    /// Per layer, one per query head (empty for a layer without attention).
    pub heads: Vec<Vec<f64>>,
    /// Per layer, one per KV group: the sum of its heads' scores.
    pub kv_groups: Vec<Vec<f64>>,
}

/// What one calibration pass measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivationScores {
    pub width: WidthScores,
    pub depth: DepthScores,
    /// Calibration tokens seen (meta tokens excluded).
    pub tokens: usize,
    pub windows: usize,
}

/// Running sums of one unit's per-token metrics.
#[derive(Default, Clone)]
struct DepthSums {
    cosine: f64,
    angular: f64,
    rel_l1: f64,
    rel_l2: f64,
}

impl DepthSums {
    fn add(&mut self, x: &[f32], y: &[f32], h: usize) {
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact(h)) {
            let (mut dot, mut xx, mut yy, mut x1, mut d1, mut dd) =
                (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
            for (&a, &b) in xr.iter().zip(yr) {
                let (a, b) = (a as f64, b as f64);
                dot += a * b;
                xx += a * a;
                yy += b * b;
                x1 += a.abs();
                d1 += (b - a).abs();
                dd += (b - a) * (b - a);
            }
            let cos = if xx > 0.0 && yy > 0.0 {
                (dot / (xx.sqrt() * yy.sqrt())).clamp(-1.0, 1.0)
            } else {
                1.0
            };
            self.cosine += 1.0 - cos;
            self.angular += cos.acos() / std::f64::consts::PI;
            self.rel_l1 += if x1 > 0.0 { d1 / x1 } else { 0.0 };
            self.rel_l2 += if xx > 0.0 { (dd / xx).sqrt() } else { 0.0 };
        }
    }

    fn mean(&self, n: usize) -> DepthMetrics {
        let n = n.max(1) as f64;
        DepthMetrics {
            cosine: self.cosine / n,
            angular: self.angular / n,
            rel_l1: self.rel_l1 / n,
            rel_l2: self.rel_l2 / n,
        }
    }
}

/// Per-window mean |activation| of one axis, and the running sum of its squares over windows.
#[derive(Default, Clone)]
struct AxisSums {
    squares: Vec<f64>,
}

impl AxisSums {
    fn add_window_mean(&mut self, means: impl Iterator<Item = f64>) {
        let means: Vec<f64> = means.collect();
        if self.squares.is_empty() {
            self.squares = vec![0.0; means.len()];
        }
        self.squares
            .iter_mut()
            .zip(&means)
            .for_each(|(s, m)| *s += m * m);
    }

    fn l2(&self) -> Vec<f64> {
        self.squares.iter().map(|s| s.sqrt()).collect()
    }
}

/// The observer of the importance pass. Meta-token rows (Hymba) are skipped.
struct Collector {
    hidden: usize,
    skip: usize,
    /// Per layer with attention: (query heads, value head width, heads per KV group).
    head_dims: Vec<Option<(usize, usize, usize)>>,
    /// Per layer: sums of |x| over this window's tokens for the attention-norm and MLP-norm
    /// outputs, the down_proj input, and the per-head L2 of the o_proj input.
    norms: Vec<[Vec<f64>; 2]>,
    channels: Vec<AxisSums>,
    neurons: Vec<AxisSums>,
    heads: Vec<AxisSums>,
    down_sum: Vec<Vec<f64>>,
    head_sum: Vec<Vec<f64>>,
    block_in: Vec<f32>,
    mixed: Vec<f32>,
    depth: Vec<[DepthSums; 3]>,
    tokens: usize,
    window_tokens: usize,
    error: Option<Error>,
}

impl Collector {
    fn new(model: &Model) -> Self {
        let n = model.layers.len();
        Collector {
            hidden: model.config.hidden,
            skip: model.config.memory_tokens,
            head_dims: model
                .layers
                .iter()
                .map(|l| {
                    l.attn.as_ref().map(|a| {
                        let s = a.shape;
                        (s.n_heads, s.v_head_dim, s.n_heads / s.n_kv_heads)
                    })
                })
                .collect(),
            norms: vec![[Vec::new(), Vec::new()]; n],
            channels: vec![AxisSums::default(); 2 * n],
            neurons: vec![AxisSums::default(); n],
            heads: vec![AxisSums::default(); n],
            down_sum: vec![Vec::new(); n],
            head_sum: vec![Vec::new(); n],
            block_in: Vec::new(),
            mixed: Vec::new(),
            depth: vec![Default::default(); n],
            tokens: 0,
            window_tokens: 0,
            error: None,
        }
    }

    /// Closes one window: its per-token means join the sums of squares over windows.
    fn end_window(&mut self) {
        let t = self.window_tokens.max(1) as f64;
        for (l, [a, m]) in self.norms.iter_mut().enumerate() {
            for (k, v) in [a, m].into_iter().enumerate() {
                if !v.is_empty() {
                    self.channels[2 * l + k].add_window_mean(v.iter().map(|s| s / t));
                    v.iter_mut().for_each(|s| *s = 0.0);
                }
            }
        }
        for (sums, axis) in [
            (&mut self.down_sum, &mut self.neurons),
            (&mut self.head_sum, &mut self.heads),
        ] {
            for (v, a) in sums.iter_mut().zip(axis.iter_mut()) {
                if !v.is_empty() {
                    a.add_window_mean(v.iter().map(|s| s / t));
                    v.iter_mut().for_each(|s| *s = 0.0);
                }
            }
        }
        self.tokens += self.window_tokens;
        self.window_tokens = 0;
    }

    /// Sums the window statistics over `comm`'s ranks (each collected its own windows); an
    /// error on any rank becomes an error on every rank.
    fn all_reduce(&mut self, comm: &dyn crate::dist::Collective) -> Result<()> {
        if comm.size() == 1 {
            return Ok(());
        }
        crate::dist::share_error(comm, &mut self.error, "the importance pass")?;
        let axes = || self.channels.iter().chain(&self.neurons).chain(&self.heads);
        let shape: Vec<usize> = axes().map(|a| a.squares.len()).collect();
        let shape_text = format!("{shape:?}").into_bytes();
        crate::dist::check_agreement(comm, &[("importance statistics", shape_text)])?;
        let mut flat: Vec<f64> = axes().flat_map(|a| a.squares.iter().copied()).collect();
        for d in self.depth.iter().flatten() {
            flat.extend([d.cosine, d.angular, d.rel_l1, d.rel_l2]);
        }
        flat.push(self.tokens as f64);
        crate::dist::all_reduce_f64(comm, &mut flat)?;
        let mut it = flat.into_iter();
        let axes_mut = self
            .channels
            .iter_mut()
            .chain(&mut self.neurons)
            .chain(&mut self.heads);
        for a in axes_mut {
            a.squares
                .iter_mut()
                .for_each(|v| *v = it.next().expect("sized above"));
        }
        for d in self.depth.iter_mut().flatten() {
            let mut next = || it.next().expect("sized above");
            (d.cosine, d.angular, d.rel_l1, d.rel_l2) = (next(), next(), next(), next());
        }
        self.tokens = it.next().expect("sized above") as usize;
        Ok(())
    }

    fn finish(self, windows: usize) -> Result<ActivationScores> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut channels = vec![0f64; self.hidden];
        for a in &self.channels {
            a.l2()
                .iter()
                .zip(channels.iter_mut())
                .for_each(|(v, c)| *c += v);
        }
        let heads: Vec<Vec<f64>> = self.heads.iter().map(AxisSums::l2).collect();
        let kv_groups = heads
            .iter()
            .zip(&self.head_dims)
            .map(|(h, d)| match d {
                Some((_, _, group)) if !h.is_empty() => {
                    h.chunks(*group).map(|g| g.iter().sum()).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        let n = self.tokens;
        let mean = |k: usize| self.depth.iter().map(|d| d[k].mean(n)).collect();
        Ok(ActivationScores {
            width: WidthScores {
                channels,
                neurons: self.neurons.iter().map(AxisSums::l2).collect(),
                heads,
                kv_groups,
            },
            depth: DepthScores {
                block: mean(0),
                attn: mean(1),
                mlp: mean(2),
            },
            tokens: n,
            windows,
        })
    }
}

/// Adds `|x|` of every row to `sums` (column-wise).
fn add_abs(sums: &mut Vec<f64>, x: &[f32], width: usize) {
    sums.resize(width, 0.0);
    for row in x.chunks_exact(width) {
        sums.iter_mut()
            .zip(row)
            .for_each(|(s, v)| *s += v.abs() as f64);
    }
}

impl Observer for Collector {
    fn observe(&mut self, layer: usize, site: Site, x: &[f32], rows: usize) {
        if self.error.is_some() || rows <= self.skip {
            return;
        }
        let width = x.len() / rows;
        let x = &x[self.skip * width..];
        if x.iter().any(|v| !v.is_finite()) {
            self.error = Some(Error::NonFinite {
                name: format!("layer {layer} activations at {site:?} during the importance pass"),
                count: x.iter().filter(|v| !v.is_finite()).count(),
            });
            return;
        }
        let h = self.hidden;
        match site {
            Site::AttnIn => add_abs(&mut self.norms[layer][0], x, width),
            Site::MlpIn => add_abs(&mut self.norms[layer][1], x, width),
            Site::MlpDown => add_abs(&mut self.down_sum[layer], x, width),
            Site::AttnOut => {
                if let Some((heads, d, _)) = self.head_dims[layer] {
                    let sums = &mut self.head_sum[layer];
                    sums.resize(heads, 0.0);
                    for row in x.chunks_exact(width) {
                        for (s, head) in sums.iter_mut().zip(row.chunks_exact(d)) {
                            *s += head.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                        }
                    }
                }
            }
            Site::BlockIn => {
                self.block_in.clear();
                self.block_in.extend_from_slice(x);
                if layer == 0 {
                    self.window_tokens = x.len() / h;
                }
            }
            Site::Mixed => {
                self.depth[layer][1].add(&self.block_in, x, h);
                self.mixed.clear();
                self.mixed.extend_from_slice(x);
            }
            Site::BlockOut => {
                self.depth[layer][0].add(&self.block_in, x, h);
                self.depth[layer][2].add(&self.mixed, x, h);
            }
            _ => {}
        }
    }
}

/// The activation and static depth scores of `model` over calibration `windows`.
/// `progress(done, total)` after each window. Under [`crate::dist::scoped`], each rank scores
/// its share of the windows and the sums are added over the ranks.
pub fn activation_scores(
    model: &Model,
    windows: &[&[u32]],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActivationScores> {
    let comm = crate::dist::current();
    if windows.len() < comm.size().max(1) {
        return Err(Error::Invalid(format!(
            "importance needs at least one calibration window per rank ({} windows, {} ranks)",
            windows.len(),
            comm.size()
        )));
    }
    let mine: Vec<usize> = crate::dist::shard(windows.len(), comm.rank(), comm.size()).collect();
    let mut c = Collector::new(model);
    for (done, &i) in mine.iter().enumerate() {
        model.hidden_states(windows[i], None, Some(&mut c))?;
        c.end_window();
        progress(done + 1, mine.len());
    }
    c.all_reduce(&*comm)?;
    c.finish(windows.len())
}

/// Everything `whittle importance` stores: the scores and what they were computed on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    pub fingerprint: Fingerprint,
    pub calibration: String,
    pub activation: ActivationScores,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shapley: Option<super::shapley::ShapleyScores>,
}

impl Scores {
    /// Reads scores written by `whittle importance` (JSON).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: Scores = serde_json::from_str(&text).map_err(|e| Error::format(path, e))?;
        let n = s.fingerprint.layers.len();
        let d = &s.activation.depth;
        let w = &s.activation.width;
        if [
            d.block.len(),
            d.attn.len(),
            d.mlp.len(),
            w.neurons.len(),
            w.heads.len(),
        ]
        .iter()
        .any(|&l| l != n)
            || w.channels.len() != s.fingerprint.hidden
        {
            return Err(Error::format(
                path,
                "the score lists do not match the model shape recorded in the file",
            ));
        }
        Ok(s)
    }
}
