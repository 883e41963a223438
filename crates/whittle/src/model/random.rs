//! Seeded random models: the "tiny random model" every method and kernel test runs on, and the
//! initial weights of models trained from scratch. Any layer shape works: attention, SSM, both
//! in parallel (hybrid, with unit branch norms), and any MLP width.

use super::{
    Attention, KvSource, Layer, LayerShape, Linear, Mlp, Model, ModelConfig, Ssm, SsmShape,
};
use crate::Result;
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Uniform weights scaled by `1/√in` (so activations stay O(1) through depth), norm weights near 1.
pub fn random_model(config: ModelConfig, shapes: &[LayerShape], seed: u64) -> Result<Model> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let h = config.hidden;
    let mut layers = Vec::with_capacity(shapes.len());
    for s in shapes {
        let mut lin = |out: usize, inp: usize| random_linear(&mut rng, out, inp);
        let attn = match s.attn {
            Some(sh) => Some(Attention {
                shape: sh,
                q: lin(sh.q_dim(), h)?,
                kv: KvSource::Own {
                    k: lin(sh.kv_dim(), h)?,
                    v: lin(sh.v_dim(), h)?,
                },
                o: lin(h, sh.out_dim())?,
                window: None,
            }),
            None => None,
        };
        let ssm = match s.ssm {
            Some(sh) => Some(random_ssm(&mut rng, sh, h, s.attn.is_none())?),
            None => None,
        };
        let fusion = (s.attn.is_some() && s.ssm.is_some()).then(|| {
            let e = s.ssm.map_or(0, |x| x.inner);
            [vec![1.0; e], vec![1.0; e]]
        });
        let mut lin = |out: usize, inp: usize| random_linear(&mut rng, out, inp);
        let mlp = match s.mlp {
            Some(w) => Some(Mlp {
                gate: lin(w, h)?,
                up: lin(w, h)?,
                down: lin(h, w)?,
            }),
            None => None,
        };
        layers.push(Layer {
            attn_norm: vec![1.0; h],
            attn,
            ssm,
            fusion,
            mlp_norm: vec![1.0; h],
            mlp,
            emulated: Default::default(),
        });
    }
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let embed = (0..config.vocab_size * h)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let embed = Linear::dense("embed_tokens", embed, config.vocab_size, h)?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(random_linear(&mut rng, config.vocab_size, h)?)
    };
    let final_norm = (0..h).map(|_| rng.random_range(0.8f32..1.2)).collect();
    Model::new(config, embed, layers, final_norm, lm_head)
}

/// Mamba's initialisation: `A_log = log(1..N)` per channel, Δ's bias the inverse softplus of a
/// step log-uniform in [1e-3, 1e-1], `D = 1`; inner RMSNorms (as Hymba has) when the SSM is a
/// branch of a hybrid layer, its own output projection when it is the whole mixer.
fn random_ssm(rng: &mut SmallRng, sh: SsmShape, h: usize, own_out: bool) -> Result<Ssm> {
    let SsmShape {
        inner: e,
        d_state: n,
        d_conv: k,
        dt_rank: r,
    } = sh;
    let conv_bound = 1.0 / (k as f32).sqrt();
    let dt_bias = (0..e)
        .map(|_| {
            let dt = (rng.random_range(1e-3f32.ln()..1e-1f32.ln())).exp();
            dt + (-(-dt).exp_m1()).ln() // softplus⁻¹(dt) = dt + log(1 − e^{−dt})
        })
        .collect();
    Ok(Ssm {
        shape: sh,
        in_x: random_linear(rng, e, h)?,
        in_z: random_linear(rng, e, h)?,
        conv_weight: (0..e * k)
            .map(|_| rng.random_range(-conv_bound..conv_bound))
            .collect(),
        conv_bias: vec![0.0; e],
        x_proj: random_linear(rng, r + 2 * n, e)?,
        inner_norms: (!own_out).then(|| [vec![1.0; r], vec![1.0; n], vec![1.0; n]]),
        dt_proj: random_linear(rng, e, r)?,
        dt_bias,
        a_log: (0..e * n).map(|i| ((i % n + 1) as f32).ln()).collect(),
        d: vec![1.0; e],
        out: if own_out {
            Some(random_linear(rng, h, e)?)
        } else {
            None
        },
    })
}

fn random_linear(rng: &mut SmallRng, out: usize, inp: usize) -> Result<Linear> {
    let a = 1.0 / (inp as f32).sqrt();
    let w = (0..out * inp).map(|_| rng.random_range(-a..a)).collect();
    Linear::dense("random", w, out, inp)
}
