//! The decode cache: per layer, preallocated K/V rows (post-RoPE) and, for SSM layers, the conv and
//! recurrent state, so that decode steps never allocate or copy the history.
//!
//! A global-attention layer keeps every position. A sliding-window layer keeps its meta-token rows
//! plus a ring of the last `W` (or `W+1`, see [`WindowRule`]) positions: attention is invariant
//! to the order of its keys once RoPE is applied, so the ring is never rotated. A layer that
//! shares another layer's K/V stores nothing. Hence only global layers grow with the length.
//! Rows are kept in f32 or, to halve the cache and what decode reads, in f16 ([`KvDtype`]).

use super::ssm::SsmState;
use super::{KvDtype, KvSource, Model};
use crate::{Error, Result};

/// A layer's K and V rows, both in the cache's element type.
#[derive(Clone)]
enum Rows {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// f16 bits ([`crate::kernels::f16`]).
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
}

impl Rows {
    fn new(dtype: KvDtype, k_len: usize, v_len: usize) -> Self {
        match dtype {
            KvDtype::F32 => Rows::F32 {
                k: vec![0.0; k_len],
                v: vec![0.0; v_len],
            },
            KvDtype::F16 => Rows::F16 {
                k: vec![0; k_len],
                v: vec![0; v_len],
            },
        }
    }

    /// Writes one position's K row at element `ka` and V row at element `va`.
    fn write(&mut self, (ka, k): (usize, &[f32]), (va, v): (usize, &[f32])) {
        use crate::kernels::f16::narrow;
        match self {
            Rows::F32 { k: kr, v: vr } => {
                kr[ka..ka + k.len()].copy_from_slice(k);
                vr[va..va + v.len()].copy_from_slice(v);
            }
            Rows::F16 { k: kr, v: vr } => {
                narrow(k, &mut kr[ka..ka + k.len()]);
                narrow(v, &mut vr[va..va + v.len()]);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::F32 { k, v } => (k.len() + v.len()) * 4,
            Rows::F16 { k, v } => (k.len() + v.len()) * 2,
        }
    }
}

/// The stored K and V rows of a layer, as attention reads them.
pub(crate) enum KvView<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [u16], v: &'a [u16] },
}

/// K/V rows of one layer.
#[derive(Clone)]
pub(crate) struct KvRows {
    kv: Rows,
    k_dim: usize,
    v_dim: usize,
    /// `(sink, ring)`: rows `0..sink` are kept (meta tokens); later positions cycle through
    /// `ring` rows. `None`: one row per position.
    ring: Option<(usize, usize)>,
    /// Rows holding data.
    rows: usize,
}

impl KvRows {
    fn new(
        (k_dim, v_dim): (usize, usize),
        rows: usize,
        ring: Option<(usize, usize)>,
        dtype: KvDtype,
    ) -> Self {
        KvRows {
            kv: Rows::new(dtype, rows * k_dim, rows * v_dim),
            k_dim,
            v_dim,
            ring,
            rows: 0,
        }
    }

    fn slot(&self, pos: usize) -> usize {
        match self.ring {
            Some((sink, ring)) if pos >= sink => sink + (pos - sink) % ring,
            _ => pos,
        }
    }

    /// Stores the rows of positions `at..at+t`; on a ring, later positions overwrite older ones.
    pub(crate) fn store(&mut self, at: usize, k: &[f32], v: &[f32]) {
        let t = k.len() / self.k_dim;
        for r in 0..t {
            let s = self.slot(at + r);
            let (kd, vd) = (self.k_dim, self.v_dim);
            let (kr, vr) = (&k[r * kd..(r + 1) * kd], &v[r * vd..(r + 1) * vd]);
            self.kv.write((s * kd, kr), (s * vd, vr));
        }
        let end = at + t;
        self.rows = match self.ring {
            Some((sink, ring)) => end.min(sink + ring),
            None => end,
        };
    }

    /// The stored K and V rows (for a ring: in slot order, not position order).
    pub(crate) fn view(&self) -> KvView<'_> {
        let (kn, vn) = (self.rows * self.k_dim, self.rows * self.v_dim);
        match &self.kv {
            Rows::F32 { k, v } => KvView::F32 {
                k: &k[..kn],
                v: &v[..vn],
            },
            Rows::F16 { k, v } => KvView::F16 {
                k: &k[..kn],
                v: &v[..vn],
            },
        }
    }

    pub(crate) fn is_ring(&self) -> bool {
        self.ring.is_some()
    }

    fn bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// What one layer carries between calls.
#[derive(Clone)]
pub struct LayerCache {
    pub(crate) kv: Option<KvRows>,
    pub(crate) ssm: Option<SsmState>,
}

/// Cloning forks a sequence: the clone continues from the same positions (scoring several
/// continuations of one prompt).
#[derive(Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

/// Rows a layer's K/V buffer needs for `positions` positions: `None` if it stores none, else
/// `(rows, ring)` as in [`KvRows`].
fn kv_rows(
    model: &Model,
    layer: usize,
    positions: usize,
) -> Option<(usize, Option<(usize, usize)>)> {
    let a = model.layers[layer].attn.as_ref()?;
    if matches!(a.kv, KvSource::Shared(_)) {
        return None;
    }
    Some(match a.window {
        None => (positions, None),
        Some(w) => {
            let sink = model.config.memory_tokens;
            let ring = model.config.window_rule.decode_positions(w);
            (positions.min(sink + ring), Some((sink, ring)))
        }
    })
}

impl KvCache {
    /// A cache for up to `tokens` tokens (plus the model's meta tokens, which take positions
    /// too), its K/V rows in the model's `config.kv_cache` type.
    pub fn new(model: &Model, tokens: usize) -> Result<Self> {
        Self::with_dtype(model, tokens, model.config.kv_cache)
    }

    /// [`KvCache::new`] with K/V rows in `dtype`.
    pub fn with_dtype(model: &Model, tokens: usize, dtype: KvDtype) -> Result<Self> {
        let capacity = tokens + model.config.memory_tokens;
        if capacity > model.config.context_length {
            return Err(Error::Invalid(format!(
                "a cache of {capacity} positions exceeds the model's context length {}",
                model.config.context_length
            )));
        }
        let layers = (0..model.layers.len())
            .map(|i| {
                let shape = model.layers[i].shape();
                LayerCache {
                    kv: kv_rows(model, i, capacity).map(|(rows, ring)| {
                        let a = shape.attn.expect("kv rows imply attention");
                        let dims = (a.kv_dim(), a.v_dim());
                        KvRows::new(dims, rows, ring, dtype)
                    }),
                    ssm: shape.ssm.map(SsmState::new),
                }
            })
            .collect();
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Bytes a cache for `tokens` tokens holds, from the model's shapes alone (what `inspect`
    /// reports; equals [`KvCache::bytes`] of such a cache).
    pub fn footprint(model: &Model, tokens: usize) -> usize {
        let positions = tokens + model.config.memory_tokens;
        (0..model.layers.len())
            .map(|i| {
                let shape = model.layers[i].shape();
                let kv = kv_rows(model, i, positions).map_or(0, |(rows, _)| {
                    let a = shape.attn.expect("kv rows imply attention");
                    rows * (a.kv_dim() + a.v_dim()) * model.config.kv_cache.bytes()
                });
                let ssm = shape.ssm.map_or(0, |s| SsmState::new(s).bytes());
                kv + ssm
            })
            .sum()
    }

    /// Positions already stored (meta tokens included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold (meta tokens included).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by K/V rows and SSM states of all layers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|c| {
                c.kv.as_ref().map_or(0, KvRows::bytes) + c.ssm.as_ref().map_or(0, SsmState::bytes)
            })
            .sum()
    }

    /// Forgets all positions (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
        for c in &mut self.layers {
            if let Some(kv) = &mut c.kv {
                kv.rows = 0;
            }
            if let Some(s) = &mut c.ssm {
                s.conv.fill(0.0);
                s.h.fill(0.0);
            }
        }
    }

    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::Invalid(format!(
                "KV cache full: {} + {t} positions exceed its capacity {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
