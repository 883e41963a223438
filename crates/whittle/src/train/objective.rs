//! Training objectives as values: a weighted sum of terms that the trainer takes, written on the
//! command line as `kd:T=2+ce:0.5` (logit distillation at temperature 2, weight 1, plus half the
//! cross-entropy). This module parses them and holds the logit-distillation loss, a
//! [`super::loss_op::RowLoss`] like the cross-entropy (one fused op through
//! [`super::loss_op::mean_over_rows`]: with a 49k vocabulary, primitive ops would make a dozen
//! `[tokens, vocab]` temporaries per direction).
//!
//! Divergences between the teacher's `p = softmax(t / T)` and the student's `q = softmax(s / T)`
//! per token, averaged over tokens and multiplied by `T²` (Hinton et al.: keeps the gradient scale
//! independent of `T`):
//! - forward KL `Σ p (log p − log q)` (Minitron's KD), gradient `T (q − p)`;
//! - reverse KL `Σ q (log q − log p)`, gradient `T q (log q − log p − KL)`;
//! - generalised Jensen–Shannon `β KL(p‖m) + (1−β) KL(q‖m)`, `m = β p + (1−β) q` (GKD, DistiLLM),
//!   gradient `T q (g − ⟨q, g⟩)` with `g = (1−β) (log q − log m)`.
//!
//! The logs of `p` and `q` are `z − logsumexp(z)` of the scaled logits and `log m` is
//! [`crate::kernels::exp::ln_mix`]: the op calls no libm per element.

use super::loss_op::RowLoss;
use crate::distill::features::FeatureLoss;
use crate::distill::heads::FeatureSpec;
use crate::distill::normalizer::NormKind;
use crate::kernels::exp::{exp_shift_scale, ln_mix, logsumexp};
use crate::{Error, Result};

/// Which divergence a logit-distillation term measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    /// Generalised JSD with mixture weight `beta` on the teacher, `0 < beta < 1`.
    Jsd {
        beta: f32,
    },
}

/// One term of an objective.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// Next-token cross-entropy on the data.
    CrossEntropy,
    /// Logit distillation toward the teacher at `temperature`.
    Logits {
        divergence: Divergence,
        temperature: f32,
    },
    /// Hidden-state distillation: the mean over the distilled layers of the feature loss between
    /// the student's projected features and the teacher's normalised ones.
    Features(FeatureSpec),
}

/// A weighted sum of terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub terms: Vec<(f32, Term)>,
}

impl Objective {
    /// Parses `TERM[+TERM...]`, each `NAME[:SETTING,...]` where a setting is `T=2` (temperature),
    /// `w=0.5`, `beta=0.5` (JSD's mixture weight, default 0.5) or a bare number (the weight,
    /// default 1). Names: `ce`, `kd` (forward KL), `rkl` (reverse KL), `jsd`, and `feat` with
    /// `layers=4/8/12` (student blocks, required), `norm=phis` (see
    /// [`NormKind::parse`], default phis) and `loss=mse|cosine` (default mse).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |m: String| Error::Invalid(format!("objective '{spec}': {m}"));
        let mut terms = Vec::new();
        for part in spec.split('+').map(str::trim) {
            let (name, settings) = part.split_once(':').unwrap_or((part, ""));
            let (mut weight, mut temperature, mut beta) = (1.0f32, 1.0f32, 0.5f32);
            let mut features = FeatureSpec {
                layers: Vec::new(),
                norm: NormKind::Phis,
                loss: FeatureLoss::Mse,
            };
            for s in settings.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let number = |v: &str| {
                    v.parse::<f32>()
                        .ok()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| bad(format!("'{s}' is not a positive number")))
                };
                match s.split_once('=') {
                    Some(("T", v)) if name != "feat" => temperature = number(v)?,
                    Some(("layers", v)) if name == "feat" => {
                        features.layers = v
                            .split('/')
                            .map(|l| l.trim().parse::<usize>())
                            .collect::<std::result::Result<_, _>>()
                            .map_err(|_| bad(format!("'{v}': layers are block indices a/b/c")))?
                    }
                    Some(("norm", v)) if name == "feat" => features.norm = NormKind::parse(v)?,
                    Some(("loss", v)) if name == "feat" => features.loss = FeatureLoss::parse(v)?,
                    Some(("w", v)) => weight = number(v)?,
                    Some(("beta", v)) => {
                        beta = number(v)?;
                        if beta >= 1.0 {
                            return Err(bad(format!("beta {beta} must lie between 0 and 1")));
                        }
                    }
                    Some((k, _)) => {
                        return Err(bad(format!(
                            "unknown setting '{k}' of '{name}' (T, w, beta; feat: layers, norm, \
                             loss, w)"
                        )))
                    }
                    None => weight = number(s)?,
                }
            }
            let logits = |divergence| Term::Logits {
                divergence,
                temperature,
            };
            let term = match name {
                "ce" if settings.contains("T=") => {
                    return Err(bad("cross-entropy takes no temperature".into()))
                }
                "ce" => Term::CrossEntropy,
                "kd" => logits(Divergence::ForwardKl),
                "rkl" => logits(Divergence::ReverseKl),
                "jsd" => logits(Divergence::Jsd { beta }),
                "feat" if features.layers.is_empty() => {
                    return Err(bad("feat needs layers=a/b/c".into()))
                }
                "feat" => Term::Features(features),
                other => {
                    return Err(bad(format!(
                        "unknown term '{other}' (ce, kd, rkl, jsd, feat)"
                    )))
                }
            };
            terms.push((weight, term));
        }
        Ok(Objective { terms })
    }

    /// Whether any term needs a teacher.
    pub fn needs_teacher(&self) -> bool {
        self.terms
            .iter()
            .any(|(_, t)| !matches!(t, Term::CrossEntropy))
    }

    /// The feature-distillation term, if any (at most one: one set of heads).
    pub fn features(&self) -> Result<Option<&FeatureSpec>> {
        let mut f = self.terms.iter().filter_map(|(_, t)| match t {
            Term::Features(s) => Some(s),
            _ => None,
        });
        let first = f.next();
        if f.next().is_some() {
            return Err(Error::Invalid(
                "an objective takes one feature term (list all its layers in it)".into(),
            ));
        }
        Ok(first)
    }
}

/// `T² · mean_rows D(p_row, q_row)` of student logits `[rows, vocab]` against the teacher's.
pub struct LogitDistillation {
    /// Teacher logits, `[rows, vocab]` row-major (shared: at batch 8 × 512 they are 800 MB,
    /// and the op is kept by the graph until backward).
    pub teacher: std::sync::Arc<Vec<f32>>,
    pub divergence: Divergence,
    pub temperature: f32,
}

/// One row's log-softmax and softmax at a temperature.
pub(crate) struct Dist {
    pub log: Vec<f32>,
    pub prob: Vec<f32>,
}

/// `softmax(logits / temperature)` and its log, the log as `z − logsumexp(z)` (no libm).
pub(crate) fn dist(logits: &[f32], temperature: f32) -> Dist {
    let z: Vec<f32> = logits.iter().map(|v| v / temperature).collect();
    let lse = logsumexp(&z);
    let mut prob = vec![0.0; z.len()];
    exp_shift_scale(&z, lse, 1.0, &mut prob);
    Dist {
        log: z.iter().map(|v| v - lse).collect(),
        prob,
    }
}

impl RowLoss for LogitDistillation {
    fn name(&self) -> &'static str {
        "logit-distillation"
    }

    fn check(&self, rows: usize, vocab: usize) -> candle_core::Result<()> {
        if self.teacher.len() != rows * vocab {
            candle_core::bail!(
                "logit distillation: {} teacher logits for {rows} × {vocab} student logits",
                self.teacher.len()
            );
        }
        Ok(())
    }

    fn factor(&self) -> f32 {
        self.temperature * self.temperature
    }

    /// The row's divergence; with `grad`, `scale · ∂D/∂s` (`∂/∂s = (1/T) ∂/∂z`).
    fn row(&self, r: usize, student: &[f32], grad: Option<(f32, &mut [f32])>) -> f64 {
        let vocab = student.len();
        let teacher = &self.teacher[r * vocab..(r + 1) * vocab];
        let t = self.temperature;
        let (p, q) = (dist(teacher, t), dist(student, t));
        // Σ a (log a − log b)
        let kl = |a: &Dist, log_b: &[f32]| -> f64 {
            a.prob
                .iter()
                .zip(&a.log)
                .zip(log_b)
                .map(|((pr, la), lb)| *pr as f64 * (*la as f64 - *lb as f64))
                .sum()
        };
        // The divergence, and `g = ∂D/∂q` up to a constant where the gradient needs one.
        let (d, g): (f64, Option<Vec<f32>>) = match self.divergence {
            Divergence::ForwardKl => (kl(&p, &q.log), None),
            Divergence::ReverseKl => {
                let d = kl(&q, &p.log);
                let g = grad
                    .as_ref()
                    .map(|_| q.log.iter().zip(&p.log).map(|(lq, lp)| lq - lp).collect());
                (d, g)
            }
            Divergence::Jsd { beta } => {
                let mut log_m = vec![0.0; p.prob.len()];
                ln_mix(&p.prob, beta, &q.prob, 1.0 - beta, &mut log_m);
                let d = beta as f64 * kl(&p, &log_m) + (1.0 - beta as f64) * kl(&q, &log_m);
                let g = grad.as_ref().map(|_| {
                    let w = 1.0 - beta;
                    q.log
                        .iter()
                        .zip(&log_m)
                        .map(|(lq, lm)| w * (lq - lm))
                        .collect()
                });
                (d, g)
            }
        };
        if let Some((scale, out)) = grad {
            // ∂D/∂s = q (g − ⟨q, g⟩) / T; for forward KL that is (q − p) / T.
            let s = scale / t;
            match g {
                None => {
                    for ((o, qi), pi) in out.iter_mut().zip(&q.prob).zip(&p.prob) {
                        *o = s * (qi - pi);
                    }
                }
                Some(g) => {
                    let mean: f64 = q
                        .prob
                        .iter()
                        .zip(&g)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    for ((o, qi), gi) in out.iter_mut().zip(&q.prob).zip(&g) {
                        *o = s * qi * (gi - mean as f32);
                    }
                }
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    /// The divergence in f64 from its definition.
    fn naive(s: &[f64], t: &[f64], temp: f64, d: Divergence) -> f64 {
        let soft = |z: &[f64]| {
            let m = z.iter().fold(f64::MIN, |a, b| a.max(*b / temp));
            let e: Vec<f64> = z.iter().map(|v| (v / temp - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
        };
        let (p, q) = (soft(t), soft(s));
        let kl = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * (x / y).ln()).sum::<f64>();
        let d = match d {
            Divergence::ForwardKl => kl(&p, &q),
            Divergence::ReverseKl => kl(&q, &p),
            Divergence::Jsd { beta } => {
                let b = beta as f64;
                let m: Vec<f64> = p
                    .iter()
                    .zip(&q)
                    .map(|(x, y)| b * x + (1.0 - b) * y)
                    .collect();
                b * kl(&p, &m) + (1.0 - b) * kl(&q, &m)
            }
        };
        d * temp * temp
    }

    #[test]
    fn values_and_gradients_match_the_definition() {
        let (rows, vocab) = (3, 7);
        let s: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4)
            .collect();
        let t: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7)
            .collect();
        for divergence in [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.5 },
            Divergence::Jsd { beta: 0.1 },
        ] {
            for temperature in [1.0f32, 2.0] {
                let op = || LogitDistillation {
                    teacher: std::sync::Arc::new(t.clone()),
                    divergence,
                    temperature,
                };
                let var = Var::from_vec(s.clone(), (rows, vocab), &Device::Cpu).unwrap();
                let loss = crate::train::loss_op::mean_over_rows(var.as_tensor(), op()).unwrap();
                let got = loss.to_scalar::<f32>().unwrap() as f64;
                let f = |x: &[f64]| -> f64 {
                    (0..rows)
                        .map(|r| {
                            let tt: Vec<f64> = t[r * vocab..(r + 1) * vocab]
                                .iter()
                                .map(|v| *v as f64)
                                .collect();
                            naive(
                                &x[r * vocab..(r + 1) * vocab],
                                &tt,
                                temperature as f64,
                                divergence,
                            )
                        })
                        .sum::<f64>()
                        / rows as f64
                };
                let x: Vec<f64> = s.iter().map(|v| *v as f64).collect();
                let want = f(&x);
                assert!(
                    (got - want).abs() < 1e-5 * want.max(1.0),
                    "{divergence:?} T={temperature}: {got} vs {want}"
                );
                let g = crate::train::grad_of(&loss, &var);
                for i in 0..x.len() {
                    let h = 1e-6;
                    let (mut up, mut down) = (x.clone(), x.clone());
                    up[i] += h;
                    down[i] -= h;
                    let fd = (f(&up) - f(&down)) / (2.0 * h);
                    assert!(
                        (g[i] as f64 - fd).abs() < 1e-4,
                        "{divergence:?} T={temperature} [{i}]: {} vs {fd}",
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn identical_logits_have_zero_divergence() {
        let s: Vec<f32> = (0..20).map(|i| (i as f32 * 0.3).sin()).collect();
        let op = LogitDistillation {
            teacher: std::sync::Arc::new(s.clone()),
            divergence: Divergence::ForwardKl,
            temperature: 2.0,
        };
        let x = Tensor::from_vec(s, (2, 10), &Device::Cpu).unwrap();
        assert!(
            crate::train::loss_op::mean_over_rows(&x, op)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
    }

    #[test]
    fn objectives_parse_from_their_spec() {
        let o = Objective::parse("kd:T=2+ce:0.5").unwrap();
        assert_eq!(
            o.terms,
            vec![
                (
                    1.0,
                    Term::Logits {
                        divergence: Divergence::ForwardKl,
                        temperature: 2.0
                    }
                ),
                (0.5, Term::CrossEntropy)
            ]
        );
        assert!(o.needs_teacher());
        let o = Objective::parse("rkl:T=1.5,w=0.3").unwrap();
        assert_eq!(
            o.terms,
            vec![(
                0.3,
                Term::Logits {
                    divergence: Divergence::ReverseKl,
                    temperature: 1.5
                }
            )]
        );
        assert!(!Objective::parse("ce").unwrap().needs_teacher());
        let o =
            Objective::parse("kd+feat:layers=4/8/12,norm=per-channel,loss=cosine,w=0.5").unwrap();
        assert_eq!(
            o.features().unwrap(),
            Some(&FeatureSpec {
                layers: vec![4, 8, 12],
                norm: NormKind::PerChannel,
                loss: FeatureLoss::Cosine
            })
        );
        assert_eq!(o.terms[1].0, 0.5);
        assert!(Objective::parse("feat:layers=1+feat:layers=2")
            .unwrap()
            .features()
            .is_err());
        let o = Objective::parse("jsd:beta=0.9,T=2").unwrap();
        assert_eq!(
            o.terms,
            vec![(
                1.0,
                Term::Logits {
                    divergence: Divergence::Jsd { beta: 0.9 },
                    temperature: 2.0
                }
            )]
        );
        for bad in [
            "kl",
            "kd:T=0",
            "kd:T=x",
            "ce:T=2",
            "kd:q=1",
            "kd:-1",
            "jsd:beta=1",
            "feat",
            "feat:layers=a",
            "feat:layers=1,norm=x",
            "kd:layers=1",
            "feat:layers=1,T=2",
        ] {
            assert!(Objective::parse(bad).is_err(), "{bad}");
        }
    }
}
