//! Width pruning (Minitron): keep the top-scored hidden channels, MLP neurons and query heads
//! (within each KV group, so grouped-query attention keeps its structure), slicing every tensor
//! that reads or writes them consistently: embeddings (and so a tied head), every norm, the
//! input columns of q/k/v/gate/up and the output rows of o/down for channels; gate/up rows and
//! down columns for neurons; q rows and o columns for heads. Widths are uniform across layers,
//! so a pruned Llama stays a plain Llama config. The head width stays; the hidden size may drop
//! below `heads × head_dim` (the exported config states `head_dim`, as Minitron's do).

use super::importance::WidthScores;
use crate::model::{Linear, LowRank, Site, Weight};
use crate::{Error, Model, Result};

/// Target widths; `None` keeps an axis as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WidthTarget {
    pub hidden: Option<usize>,
    pub ffn: Option<usize>,
    pub heads_per_group: Option<usize>,
}

impl WidthTarget {
    pub fn is_empty(&self) -> bool {
        *self == WidthTarget::default()
    }
}

/// The indices of the `k` highest scores, in increasing index order (ties: lower index first).
pub fn top_indices(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// A copy of `l` restricted to output rows `rows` and input columns `cols` (`None`: all), as a
/// dense f32 weight; an adapter is sliced with it.
pub fn slice_linear(l: &Linear, rows: Option<&[usize]>, cols: Option<&[usize]>) -> Result<Linear> {
    let (out, inp) = (l.out_features, l.in_features);
    let all_rows: Vec<usize>;
    let all_cols: Vec<usize>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all_rows = (0..out).collect();
            &all_rows
        }
    };
    let cols = match cols {
        Some(c) => c,
        None => {
            all_cols = (0..inp).collect();
            &all_cols
        }
    };
    let w = l.dense_weight();
    let sliced: Vec<f32> = rows
        .iter()
        .flat_map(|&r| cols.iter().map(move |&c| (r, c)))
        .map(|(r, c)| w[r * inp + c])
        .collect();
    let mut s = Linear::new(Weight::Dense(sliced), rows.len(), cols.len());
    if let Some(a) = &l.adapter {
        s.adapter = Some(LowRank {
            rank: a.rank,
            a: (0..a.rank)
                .flat_map(|k| cols.iter().map(move |&c| a.a[k * inp + c]))
                .collect(),
            b: rows
                .iter()
                .flat_map(|&r| a.b[r * a.rank..(r + 1) * a.rank].iter().copied())
                .collect(),
        });
    }
    Ok(s)
}

fn pick(v: &[f32], keep: &[usize]) -> Vec<f32> {
    keep.iter().map(|&i| v[i]).collect()
}

/// Prunes `model` to `target` by `scores` (from [`super::importance`] on this model).
/// Inputs are checked before anything changes.
pub fn prune_width(model: &mut Model, scores: &WidthScores, target: &WidthTarget) -> Result<()> {
    if target.heads_per_group.is_some() && model.layers.iter().any(|l| l.ssm.is_some()) {
        // A hybrid layer fuses its attention heads with its SSM channels position by position
        // before one output projection, so a head cannot leave alone.
        return Err(Error::Invalid(
            "query heads of a model with SSM layers (Hymba, Mamba) are not pruned: a hybrid \
             layer's heads share its output projection with the SSM channels; prune --hidden \
             and --ffn instead"
                .into(),
        ));
    }
    let n = model.layers.len();
    if scores.channels.len() != model.config.hidden
        || scores.neurons.len() != n
        || scores.heads.len() != n
    {
        return Err(Error::Invalid(
            "the width scores do not match this model's shape".into(),
        ));
    }
    check_target(model, scores, target)?;
    if let Some(f) = target.ffn {
        prune_ffn(model, scores, f)?;
    }
    if let Some(g) = target.heads_per_group {
        prune_heads(model, scores, g)?;
    }
    if let Some(h) = target.hidden {
        prune_hidden(model, &scores.channels, h)?;
    }
    model.revalidate()
}

/// Fails unless every requested width exists in every layer and the scores cover it.
fn check_target(model: &Model, scores: &WidthScores, target: &WidthTarget) -> Result<()> {
    let old = model.config.hidden;
    if let Some(h) = target.hidden.filter(|&h| h == 0 || h > old) {
        return Err(Error::Invalid(format!(
            "cannot keep {h} of {old} hidden channels"
        )));
    }
    for (i, l) in model.layers.iter().enumerate() {
        if let (Some(f), Some(m)) = (target.ffn, &l.mlp) {
            let w = m.gate.out_features;
            if f == 0 || f > w || scores.neurons[i].len() != w {
                return Err(Error::Invalid(format!(
                    "layer {i}: cannot keep {f} of {w} MLP neurons{}",
                    if scores.neurons[i].len() != w {
                        " (scores of another width)"
                    } else {
                        ""
                    }
                )));
            }
        }
        if let (Some(g), Some(a)) = (target.heads_per_group, &l.attn) {
            let s = a.shape;
            let group = s.n_heads / s.n_kv_heads;
            if g == 0 || g > group || scores.heads[i].len() != s.n_heads {
                return Err(Error::Invalid(format!(
                    "layer {i}: cannot keep {g} of the {group} query heads of each KV group"
                )));
            }
        }
    }
    Ok(())
}

fn prune_ffn(model: &mut Model, scores: &WidthScores, f: usize) -> Result<()> {
    for (i, l) in model.layers.iter_mut().enumerate() {
        let Some(m) = &mut l.mlp else { continue };
        let keep = top_indices(&scores.neurons[i], f);
        m.gate = slice_linear(&m.gate, Some(&keep), None)?;
        m.up = slice_linear(&m.up, Some(&keep), None)?;
        m.down = slice_linear(&m.down, None, Some(&keep))?;
    }
    Ok(())
}

fn prune_heads(model: &mut Model, scores: &WidthScores, per_group: usize) -> Result<()> {
    for (i, l) in model.layers.iter_mut().enumerate() {
        let Some(a) = &mut l.attn else { continue };
        let s = a.shape;
        let group = s.n_heads / s.n_kv_heads;
        // Heads `g·group .. (g+1)·group` read KV head `g`.
        let heads: Vec<usize> = (0..s.n_kv_heads)
            .flat_map(|g| {
                top_indices(&scores.heads[i][g * group..(g + 1) * group], per_group)
                    .into_iter()
                    .map(move |j| g * group + j)
            })
            .collect();
        let span =
            |d: usize| -> Vec<usize> { heads.iter().flat_map(|h| h * d..(h + 1) * d).collect() };
        a.q = slice_linear(&a.q, Some(&span(s.head_dim)), None)?;
        a.o = slice_linear(&a.o, None, Some(&span(s.v_head_dim)))?;
        a.shape.n_heads = heads.len();
    }
    Ok(())
}

fn prune_hidden(model: &mut Model, channels: &[f64], h: usize) -> Result<()> {
    let keep = top_indices(channels, h);
    let k = Some(&keep[..]);
    model.embed = slice_linear(&model.embed, None, k)?;
    if let Some(head) = &model.lm_head {
        model.lm_head = Some(slice_linear(head, None, k)?);
    }
    model.final_norm = pick(&model.final_norm, &keep);
    // Meta tokens are rows of the residual stream.
    model.memory = model
        .memory
        .chunks_exact(model.config.hidden)
        .flat_map(|row| pick(row, &keep))
        .collect();
    for l in &mut model.layers {
        l.attn_norm = pick(&l.attn_norm, &keep);
        l.mlp_norm = pick(&l.mlp_norm, &keep);
        for (_, site, lin) in l.linears_mut() {
            *lin = match site {
                // The mixer's and the MLP's output projections write the residual stream.
                Site::AttnOut | Site::MlpDown => slice_linear(lin, k, None)?,
                // q/k/v, the SSM's x and z projections, gate and up read it.
                Site::AttnIn | Site::MlpIn => slice_linear(lin, None, k)?,
                // x_proj and dt_proj stay inside the SSM branch.
                _ => continue,
            };
        }
        for (_, e) in l.emulated.named_mut() {
            let last = e.maps.len().saturating_sub(1);
            for (j, m) in e.maps.iter_mut().enumerate() {
                let rows = (j == last).then_some(&keep[..]);
                let cols = (j == 0).then_some(&keep[..]);
                *m = slice_linear(m, rows, cols)?;
            }
            e.bias = pick(&e.bias, &keep);
        }
    }
    model.config.hidden = h;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_indices_keep_the_largest_in_order() {
        assert_eq!(top_indices(&[0.5, 3.0, 1.0, 3.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_indices(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    }

    #[test]
    fn slicing_picks_rows_columns_and_the_adapter() {
        let mut l = Linear::dense("t", (0..12).map(|v| v as f32).collect(), 3, 4).unwrap();
        l.adapter = Some(LowRank {
            rank: 1,
            a: vec![1.0, 2.0, 3.0, 4.0],
            b: vec![10.0, 20.0, 30.0],
        });
        let s = slice_linear(&l, Some(&[0, 2]), Some(&[1, 3])).unwrap();
        assert_eq!((s.out_features, s.in_features), (2, 2));
        assert_eq!(&s.dense_weight()[..], &[1.0, 3.0, 9.0, 11.0]);
        let a = s.adapter.unwrap();
        assert_eq!((a.a, a.b), (vec![2.0, 4.0], vec![10.0, 30.0]));
    }
}
